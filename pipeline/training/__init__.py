"""Training utilities every stage shares: the optimiser step and loop, resumable state, optimisers, distributed checks."""
