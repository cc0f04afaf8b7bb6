"""Adapter formats (native, PEFT, AdapterHub), upload parsing and the durable store."""
