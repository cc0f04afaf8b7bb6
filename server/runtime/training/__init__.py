"""Training: the loop (shared by `switchboard train` and server jobs), its data, and background jobs."""
