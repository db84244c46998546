"""Metrics: exact ones on per-patient arrays (``exact``) and the same metrics from summed per-site statistics (``federated``)."""
