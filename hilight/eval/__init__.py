"""Evaluation: retrieval metrics now; caption-score matrices and probes build on them."""
