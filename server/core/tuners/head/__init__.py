"""The classification head: config (weights), layer (compute), kind (the tuner interface)."""
