"""Demo stand-in for a pretrained Gemma: a tiny Gemma trained as a text LM on the synthetic corpus."""

from __future__ import annotations

from zenml import pipeline

from hilight.train.text_lm import LLMPretrainConfig
from steps.vlm import locate_text_corpus, pretrain_llm


@pipeline
def llm_pretrain(config: LLMPretrainConfig):
    inputs = locate_text_corpus(config)
    return pretrain_llm(config, inputs)
