"""Steps of the ``alignment_ablation`` pipeline: fingerprint the evaluation inputs → (per variant: locate data →
train → evaluate its checkpoints) → compare, plot, select. Each variant trains and evaluates in its own nested
MLflow run; the comparison, plots, attention pictures and the selection land in the pipeline's parent run."""

from __future__ import annotations

import logging
from typing import Annotated

import mlflow
import numpy as np
import pandas as pd
from zenml import get_step_context, log_metadata, step

from hilight.env import resolve_path
from hilight.experiments.ablation import (
    AblationConfig,
    Evaluation,
    check_significance,
    eval_fingerprints,
    eval_suite,
    validate_eval_files,
    evaluate_models,
    reference_model,
    variant_models,
    write_report,
)
from hilight.tracking import log_lineage, log_manifest_inputs
from steps import EXPERIMENT_TRACKER

log = logging.getLogger(__name__)
LOSS_KEYS = ("train/loss", "train/global_loss", "train/local_loss")


@step(enable_cache=False)
def locate_eval_data(config: AblationConfig) -> Annotated[dict[str, str], "eval_inputs"]:
    """Hashes of the held-out manifest, negative/probe files and reference weights, and the negative/probe records
    their data contracts accepted (rejects quarantined and reported). Never cached: its value keys the evaluation
    steps' cache."""
    validated = validate_eval_files(config)
    rejected = {k.removeprefix("rejected:"): int(v) for k, v in validated.items() if k.startswith("rejected:")}
    log_metadata({"eval_file_rejects": rejected})
    return {**eval_fingerprints(config), **validated}


@step(experiment_tracker=EXPERIMENT_TRACKER)
def evaluate_variant(config: AblationConfig, variant: str, training_run: dict[str, str],
                     eval_inputs: dict[str, str], seed: int | None = None) -> tuple[
    Annotated[pd.DataFrame, "checkpoint_metrics"],
    Annotated[pd.DataFrame, "caption_scores"],
    Annotated[np.ndarray, "attention_maps"],
]:
    """Score a variant's checkpoints (or a reference's weights) on the held-out suite; metrics go to MLflow with
    the checkpoint's training step as their step, so the UI plots them over training."""
    if variant in config.eval.references:
        models = [reference_model(variant, config.eval.references[variant])]
    else:
        models = variant_models(variant, training_run, config.eval.checkpoints, seed)
    base = next(iter(config.variant_configs().values()))
    log_manifest_inputs(base.data.manifest_dir, {"evaluation": (config.eval_datasets(), config.eval.splits)})
    result = evaluate_models(models, eval_suite(config, eval_inputs), config.eval)
    mlflow.set_tags({"hilight.ablation": config.name, "hilight.variant": variant, "hilight.seed": str(seed),
                     "hilight.data_fingerprint": eval_inputs["data_fingerprint"],
                     "hilight.zenml_run_id": str(get_step_context().pipeline_run.id),
                     "hilight.training_mlflow_run": training_run.get("mlflow_run_id", "")})
    for row in result.metrics.to_dict("records"):
        mlflow.log_metrics({k: float(v) for k, v in row.items() if "/" in k and np.isfinite(v)}, step=int(row["step"]))
    mlflow.log_table(result.metrics, artifact_file="evaluation/checkpoint_metrics.json")
    return result.metrics, result.scores, result.attention


@step(experiment_tracker=EXPERIMENT_TRACKER)
def compare_variants(config: AblationConfig, metrics: list[pd.DataFrame], scores: list[pd.DataFrame],
                     attention: list[np.ndarray], training_runs: list[dict[str, str]],
                     eval_inputs: dict[str, str] | None = None) -> tuple[
    Annotated[pd.DataFrame, "ablation_comparison"],
    Annotated[dict, "ablation_selection"],
]:
    """Comparison table (MLflow table + Parquet), plots, attention GIFs and grids, and the selected variant with
    its evidence (bootstrap intervals over clips, "inconclusive" when the top two overlap, per-seed winners), all in
    the pipeline's MLflow run. With ``selection.require_significance`` an inconclusive selection fails the step after
    the report is logged."""
    run = get_step_context().pipeline_run
    log_lineage(config, fingerprint=None, zenml_run_id=str(run.id), pipeline=run.pipeline.name)
    history = _loss_history(config, training_runs)
    evaluations = [Evaluation(m, s, a) for m, s, a in zip(metrics, scores, attention, strict=True)]
    report = write_report(config, evaluations, eval_suite(config, eval_inputs), resolve_path(config.output_dir) / "report",
                          history)

    mlflow.log_table(report.table, artifact_file="ablation/comparison.json")
    mlflow.log_artifacts(str(report.out_dir), artifact_path="ablation")
    winner = report.selection["winner"]
    rule = config.selection
    mlflow.set_tags({"hilight.selected_variant": winner["variant"], "hilight.selected_checkpoint": winner["checkpoint"],
                     "hilight.selected_model": winner["path"],
                     "hilight.selection_rule": f"{rule.mode} {rule.metric} ({rule.checkpoint} checkpoint per variant)"})
    mlflow.log_metric(f"selected/{rule.metric}", float(winner[rule.metric]))
    interval = report.selection.get("intervals", {}).get(winner["variant"])
    if interval:
        mlflow.log_metrics({f"selected/{rule.metric}/ci_low": interval["low"], f"selected/{rule.metric}/ci_high": interval["high"]})
    inconclusive = report.selection.get("inconclusive")
    mlflow.set_tag("hilight.selection_inconclusive", str(inconclusive))
    log.info("selected %s at %s: %s = %.4f; %s", winner["variant"], winner["checkpoint"], rule.metric,
             winner[rule.metric], report.selection.get("significance", ""))
    log_metadata({"selected_variant": winner["variant"], "selected_checkpoint": winner["checkpoint"],
                  "selected_model": winner["path"], rule.metric: float(winner[rule.metric]),
                  "inconclusive": str(inconclusive), "significance": report.selection.get("significance", "")})
    check_significance(report.selection, rule)
    return report.table, report.selection


def _loss_history(config: AblationConfig, training_runs: list[dict[str, str]]) -> pd.DataFrame:
    """Per-step training losses of each variant, read back from its MLflow run."""
    client = mlflow.MlflowClient()
    rows = []
    labels = [name if seed is None else f"{name}#s{seed}" for name, seed, _ in config.training_runs()]
    for variant, run in zip(labels, training_runs, strict=True):
        for key in LOSS_KEYS:
            rows += [{"variant": variant, "key": key, "step": m.step, "value": m.value}
                     for m in client.get_metric_history(run["mlflow_run_id"], key)]
    return pd.DataFrame(rows, columns=["variant", "key", "step", "value"])
