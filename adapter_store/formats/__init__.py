"""Parsers that turn uploaded files into a `TaskAdapter`; one module per format. Safetensors only."""
