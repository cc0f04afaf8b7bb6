"""Switchboard server: frozen encoder + per-task modules served in mixed batches."""
