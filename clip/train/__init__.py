"""Training: set-up, train-state store, objectives, optimisers, accumulation, the loop."""
