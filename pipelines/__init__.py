"""ZenML pipelines. ``PIPELINES`` maps the CLI name to (pipeline module, config class)."""

PIPELINES = {
    "data_validation": ("pipelines.data_validation", "hilight.data.ingest:DataValidationConfig"),
    "clipvip_alignment": ("pipelines.clipvip_alignment", "hilight.train.alignment:AlignmentConfig"),
    "alignment_ablation": ("pipelines.alignment_ablation", "hilight.experiments.ablation:AblationConfig"),
    "llm_pretrain": ("pipelines.llm_pretrain", "hilight.train.text_lm:LLMPretrainConfig"),
    "tokenmining_pretrain": ("pipelines.tokenmining_pretrain", "hilight.train.tokenmining:TokenMiningPretrainConfig"),
    "lora_finetune": ("pipelines.lora_finetune", "hilight.train.lora:LoRAFinetuneConfig"),
    "select_vision_weights": ("pipelines.select_vision_weights", "hilight.experiments.selection:SelectionConfig"),
}
