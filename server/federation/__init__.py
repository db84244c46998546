"""The federated workflow over an abstract transport: preflight, rounds, evaluation, selection, the wait for sites, and the neutral message types."""
