"""Stage 2: LoRA on the LLM (TokenMining optionally unfrozen) from the stage-1 TokenMining, then the merge into a
standalone model logged to MLflow."""

from __future__ import annotations

from zenml import pipeline

from hilight.models.export import GenerationSpec
from hilight.train.lora import LoRAFinetuneConfig
from steps.vlm import locate_vlm_inputs, merge_model, train_lora


@pipeline
def lora_finetune(config: LoRAFinetuneConfig):
    inputs = locate_vlm_inputs(config)
    _, run = train_lora(config, inputs)
    merge_model(run, f"{config.output_dir}/merged", config.data.describe_prompt, GenerationSpec())
