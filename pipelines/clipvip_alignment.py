"""Stage 0: fine-tune CLIP-ViP with the global + SPARC local losses on validated caption data."""

from __future__ import annotations

from zenml import pipeline

from hilight.train.alignment import AlignmentConfig
from steps.alignment import locate_training_data, train_clipvip


@pipeline
def clipvip_alignment(config: AlignmentConfig):
    inputs = locate_training_data(config)
    return train_clipvip(config, inputs)
