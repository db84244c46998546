"""Runs on site folders outside a federation: pooled (centralized) and local-only training, local evaluation of a model, and the run-folder files they write."""
