"""Rank classification over answer choices (T-Few): config (weights), layer (compute), kind (the interface)."""
