"""Houlsby bottleneck adapters: config (weights), layer (compute), kind (the tuner interface)."""
