"""(IA)3 scaling vectors: config (weights), layer (compute), kind (the tuner interface)."""
