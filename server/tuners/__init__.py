"""Per-task module kinds, one folder per method: config (weights + shapes) and layer (compute)."""
