"""Per-task LayerNorm: config (weights), layer (compute), kind (the tuner interface)."""
