"""Evaluation metrics: retrieval, caption-score matrices and probes, attention maps, VLM answer scores. Imports no
training code (``hilight.experiments`` combines the two)."""
