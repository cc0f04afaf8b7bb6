"""The runtime: registry, leases, the batcher, training and the builder that wires them."""
