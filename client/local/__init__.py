"""Local training at a site: the trainer and what a site does in one federated round."""
