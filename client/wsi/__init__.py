"""Whole-slide images to features: OpenSlide reading and tiling, patch encoders, ``smm extract``."""
