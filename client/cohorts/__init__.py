"""Cohorts of site folders for experiments: ``smm synth`` (synthetic, with ground truth) and ``smm tcga`` (the real TCGA GBM/LGG tables)."""
