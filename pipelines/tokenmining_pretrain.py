"""Stage 1: TokenMining trained with the LM loss on video QA; CLIP-ViP, Long-CLIP and the LLM frozen."""

from __future__ import annotations

from zenml import pipeline

from hilight.train.tokenmining import TokenMiningPretrainConfig
from steps.vlm import locate_vlm_inputs, train_token_mining


@pipeline
def tokenmining_pretrain(config: TokenMiningPretrainConfig):
    inputs = locate_vlm_inputs(config)
    return train_token_mining(config, inputs)
