"""The networks: the SMM model and the paper's baselines, their attention, token layout, layers and the batch they read."""
