"""EFCM: distil a pathology foundation model into a small student, fine-tune it, serve it."""

__version__ = "0.1.0"
