"""Aggregation: Flower's strategies behind the guards on the sites' replies."""
