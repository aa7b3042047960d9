"""Ablation of alignment variants: each variant trained by the stage-0 step (cached per variant, and per seed with
``seeds:``) and evaluated on one held-out suite at several checkpoints; references (e.g. the "original" weights) evaluated alongside; then one
comparison, its plots and the selected variant."""

from __future__ import annotations

from zenml import pipeline

from hilight.experiments.ablation import AblationConfig
from steps.ablation import compare_variants, evaluate_variant, locate_eval_data
from steps.alignment import locate_training_data, train_clipvip


@pipeline
def alignment_ablation(config: AblationConfig):
    nested = {"experiment_tracker.mlflow": {"experiment_name": config.experiment_name, "nested": True}}
    evaluate = evaluate_variant.with_options(settings=nested)
    eval_inputs = locate_eval_data(config)
    evaluated, runs = [], []
    for name, seed, variant in config.training_runs():  # one training per variant, or per (variant, seed)
        key = name if seed is None else f"{name}_seed{seed}"
        inputs = locate_training_data(variant, id=f"locate_{key}")
        _, _, run = train_clipvip.with_options(settings=nested)(variant, inputs, id=f"train_{key}")
        evaluated.append(evaluate(config, name, run, eval_inputs, seed, id=f"evaluate_{key}"))
        runs.append(run)
    for label in config.eval.references:
        evaluated.append(evaluate(config, label, {}, eval_inputs, id=f"evaluate_{label}"))
    metrics, scores, attention = (list(outputs) for outputs in zip(*evaluated, strict=True))
    compare_variants(config, metrics, scores, attention, runs, eval_inputs)
