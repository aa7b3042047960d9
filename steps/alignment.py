"""Steps of the ``clipvip_alignment`` pipeline: locate the validated data → train (+ held-out retrieval)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import mlflow
import pandas as pd
from zenml import get_step_context, log_metadata, step

from hilight.data.captions import read_caption_manifest
from hilight.tracking import ResilientTracker, data_roles, log_lineage, log_manifest_inputs
from hilight.train.alignment import AlignmentConfig, init_digest, run_alignment
from steps import EXPERIMENT_TRACKER

log = logging.getLogger(__name__)


@step(enable_cache=False)
def locate_training_data(config: AlignmentConfig) -> Annotated[dict[str, str], "training_inputs"]:
    """Fingerprints of the validated manifest and the initial weights. Never cached: its value keys the
    training step's cache, so new data or new initial weights retrain and nothing else does."""
    manifest = read_caption_manifest(config.data.manifest_dir)
    return {"data_fingerprint": manifest.fingerprint, "init_digest": init_digest(config.model)}


@step(experiment_tracker=EXPERIMENT_TRACKER)
def train_clipvip(config: AlignmentConfig, inputs: dict[str, str]) -> tuple[
    Annotated[Path, "clipvip_model_dir"],
    Annotated[dict[str, float], "heldout_retrieval"],
    Annotated[dict[str, str], "training_run"],
]:
    """Fine-tune CLIP-ViP (resuming from the last checkpoint of the same run), export the best model,
    and report held-out retrieval next to a random-init model. ``training_run`` says where everything is
    (run dir with its checkpoints, tokenizer, exports, MLflow run) for later evaluation steps."""
    run = get_step_context().pipeline_run
    log_lineage(config, fingerprint=inputs["data_fingerprint"], zenml_run_id=str(run.id), pipeline=run.pipeline.name)
    log_manifest_inputs(config.data.manifest_dir, data_roles(config.data))
    mlflow.set_tags({"hilight.init_digest": inputs["init_digest"], "hilight.stage": "alignment"})
    mlflow.log_text(config.model_dump_json(indent=1), "config/alignment.json")

    result = run_alignment(config, tracker=ResilientTracker.for_active_run())

    step = result.fit.step
    metrics = {f"heldout/{k}": v for k, v in result.retrieval.items()}
    metrics.update({f"heldout_random_init/{k}": v for k, v in result.baseline.items()})
    metrics["heldout/t2v_r1_gain_over_random"] = result.retrieval["t2v_r1"] - result.baseline["t2v_r1"]
    mlflow.log_metrics(metrics, step=step)
    table = pd.DataFrame([{"model": "aligned (best)", **result.retrieval}, {"model": "random init", **result.baseline}])
    mlflow.log_table(table, artifact_file="alignment/heldout_retrieval.json")
    if result.fit.history:
        mlflow.log_table(pd.DataFrame(result.fit.history), artifact_file="alignment/validation_history.json")
    mlflow.log_artifacts(str(result.best_model), artifact_path="model/best")
    mlflow.set_tags({"hilight.run_dir": str(result.run_dir), "hilight.skipped_steps": str(result.fit.skipped_steps),
                     "hilight.resumed_from": str(result.fit.resumed_from)})
    log.info("held-out text->video R@1: aligned %.3f vs random init %.3f",
             result.retrieval["t2v_r1"], result.baseline["t2v_r1"])
    log_metadata({"t2v_r1": result.retrieval["t2v_r1"], "random_init_t2v_r1": result.baseline["t2v_r1"],
                  "best_model": str(result.best_model)})
    training_run = {"run_dir": str(result.run_dir), "tokenizer_dir": str(result.tokenizer_dir),
                    "best_model": str(result.best_model), "final_model": str(result.final_model),
                    "best_checkpoint": str(result.fit.best_checkpoint or ""),
                    "mlflow_run_id": mlflow.active_run().info.run_id}
    return (result.best_model, {**result.retrieval, **{f"random_init/{k}": v for k, v in result.baseline.items()}},
            training_run)
