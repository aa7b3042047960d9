"""Training: the shared loop (``loop``), checkpoints (``checkpoint``) and stage jobs (``alignment``)."""
