"""Adapter formats, validation and (later) durable storage."""
