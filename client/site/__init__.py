"""A hospital's site folder: its layout on disk, validation, labels, genomics, splits, the patient dataset and ``smm site check``."""
