"""Steps of the VLM stages: the demo's text-LM stand-in for Gemma (``llm_pretrain``), stage 1
(``tokenmining_pretrain``), stage 2 (``lora_finetune``), the merge and the caption-score evaluation. Each locate
step is never cached: its fingerprints key the training step's cache, so new data or new weights retrain and nothing
else does."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import mlflow
import pandas as pd
from zenml import get_step_context, log_metadata, step

from hilight.data.captions import read_caption_manifest
from hilight.env import resolve_path
from hilight.eval.vlm import VLMEvalSpec, evaluate_vlm
from hilight.models.checkpoints import directory_digest, weights_digest
from hilight.models.export import GenerationSpec, load_vlm_dir
from hilight.registry import log_vlm_model
from hilight.tracking import ResilientTracker, data_roles, log_lineage, log_manifest_inputs, log_training_outcome
from hilight.train.lora import LoRAFinetuneConfig, run_lora_finetune
from hilight.train.merge import merge_stage2
from hilight.train.text_lm import LLMPretrainConfig, run_llm_pretrain
from hilight.train.tokenmining import (
    TokenMiningPretrainConfig,
    run_tokenmining_pretrain,
)
from steps import EXPERIMENT_TRACKER

log = logging.getLogger(__name__)


def _lineage(config, fingerprint: str, stage: str) -> None:
    run = get_step_context().pipeline_run
    log_lineage(config, fingerprint=fingerprint, zenml_run_id=str(run.id), pipeline=run.pipeline.name)
    log_manifest_inputs(config.data.manifest_dir, data_roles(config.data))
    mlflow.set_tag("hilight.stage", stage)


def _log_run(result, stage: str, best_path: str) -> None:
    """What every VLM training step logs: validation history, rejected samples, the best export, run-dir tags."""
    log_training_outcome(result.fit, run_dir=result.run_dir, best_dir=result.best_dir, artifact_path=best_path,
                         table_dir=stage, rejected=result.rejected)


@step(enable_cache=False)
def locate_text_corpus(config: LLMPretrainConfig) -> Annotated[dict[str, str], "corpus_inputs"]:
    return {"data_fingerprint": read_caption_manifest(config.data.manifest_dir).fingerprint}


@step(experiment_tracker=EXPERIMENT_TRACKER)
def pretrain_llm(config: LLMPretrainConfig, inputs: dict[str, str]) -> tuple[
    Annotated[Path, "llm_dir"],
    Annotated[dict[str, float], "llm_heldout_loss"],
]:
    """Train the demo's tiny Gemma as a text LM (resuming the same run) and export a transformers directory."""
    _lineage(config, inputs["data_fingerprint"], "llm_pretrain")
    result = run_llm_pretrain(config, tracker=ResilientTracker.for_active_run())
    metrics = {"heldout/lm_loss": result.val_loss, "heldout/lm_loss_untrained": result.val_loss_init}
    mlflow.log_metrics(metrics, step=result.fit.step)
    mlflow.log_artifacts(str(result.model_dir), artifact_path="model")
    mlflow.set_tags({"hilight.run_dir": str(result.run_dir), "hilight.resumed_from": str(result.fit.resumed_from)})
    log_metadata({"lm_loss": result.val_loss, "lm_loss_untrained": result.val_loss_init, "llm_dir": str(result.model_dir)})
    return result.model_dir, {"lm_loss": result.val_loss, "lm_loss_untrained": result.val_loss_init}


@step(enable_cache=False)
def locate_vlm_inputs(config: TokenMiningPretrainConfig | LoRAFinetuneConfig, with_init: bool = True) -> Annotated[
        dict[str, str], "vlm_inputs"]:
    """Fingerprints of the QA data and of every weight the stage reads (CLIP-ViP, Long-CLIP, LLM dir, TokenMining
    init; ``with_init=False`` when the init arrives as an upstream step's output instead)."""
    v = config.vision
    inputs = {"data_fingerprint": read_caption_manifest(config.data.manifest_dir).fingerprint,
              "clipvip": weights_digest(resolve_path(v.clipvip)),
              "longclip": weights_digest(resolve_path(v.longclip)) if v.longclip else f"random:{v.longclip_random_init}:{v.longclip_seed}",
              "llm": directory_digest(resolve_path(config.llm.dir))}
    if config.llm.tokenizer_dir:
        inputs["tokenizer"] = directory_digest(resolve_path(config.llm.tokenizer_dir))
    if config.token_mining.init and with_init:
        inputs["token_mining_init"] = weights_digest(resolve_path(config.token_mining.init))
    return inputs


@step(experiment_tracker=EXPERIMENT_TRACKER)
def train_token_mining(config: TokenMiningPretrainConfig, inputs: dict[str, str]) -> tuple[
    Annotated[Path, "token_mining_dir"],
    Annotated[dict[str, float], "stage1_heldout"],
    Annotated[dict[str, str], "training_run"],
]:
    """Stage 1: train TokenMining against the frozen towers and LLM; export the best and final weights
    (safetensors + the reference's ``.bin``) and log the held-out losses next to the no-video baselines."""
    _lineage(config, inputs["data_fingerprint"], "tokenmining_pretrain")
    mlflow.set_tags({f"hilight.weights.{k}": v for k, v in inputs.items() if k != "data_fingerprint"})
    result = run_tokenmining_pretrain(config, tracker=ResilientTracker.for_active_run())
    m = result.metrics
    mlflow.log_metrics({f"heldout/{k}": v for k, v in m.items()}, step=result.fit.step)
    mlflow.log_metrics({f"samples/{k}": v for k, v in result.samples.items()}, step=result.fit.step)
    table = pd.DataFrame([{"model": "trained TokenMining (best)", "lm_loss": m["lm_loss"]},
                          {"model": "untrained TokenMining", "lm_loss": m["lm_loss_initial"]},
                          {"model": "trained TokenMining, another clip's video", "lm_loss": m["lm_loss_wrong_video"]},
                          {"model": "video tokens zeroed", "lm_loss": m["lm_loss_zero_video"]},
                          {"model": "no video (text prior)", "lm_loss": m["lm_loss_no_video"]}])
    mlflow.log_table(table, artifact_file="stage1/heldout_loss.json")
    _log_run(result, "stage1", "token_mining/best")
    log.info("stage 1 held-out answer loss %.4f (untrained %.4f, wrong video %.4f, zeroed video %.4f, no video %.4f)",
             m["lm_loss"], m["lm_loss_initial"], m["lm_loss_wrong_video"], m["lm_loss_zero_video"], m["lm_loss_no_video"])
    log_metadata({**m, "token_mining_dir": str(result.best_dir)})
    training_run = {"run_dir": str(result.run_dir), "best": str(result.best_dir), "final": str(result.final_dir),
                    "best_checkpoint": str(result.fit.best_checkpoint or ""),
                    "mlflow_run_id": mlflow.active_run().info.run_id}
    return result.best_dir, m, training_run


@step(experiment_tracker=EXPERIMENT_TRACKER)
def train_lora(config: LoRAFinetuneConfig, inputs: dict[str, str], stage1_run: dict[str, str] | None = None) -> tuple[
    Annotated[dict[str, float], "stage2_heldout"],
    Annotated[dict[str, str], "stage2_run"],
]:
    """Stage 2: LoRA on the LLM (and TokenMining when tuned) from the stage-1 TokenMining (``stage1_run["best"]``
    when given, else ``token_mining.init``); export adapter + TokenMining; log held-out losses per source."""
    if stage1_run is not None:
        config = config.model_copy(update={"token_mining": config.token_mining.model_copy(
            update={"init": stage1_run["best"]})})
    _lineage(config, inputs["data_fingerprint"], "lora_finetune")
    mlflow.set_tags({f"hilight.weights.{k}": v for k, v in inputs.items() if k != "data_fingerprint"})
    if stage1_run is not None:
        mlflow.set_tag("hilight.stage1_mlflow_run", stage1_run.get("mlflow_run_id", ""))
    result = run_lora_finetune(config, tracker=ResilientTracker.for_active_run())
    mlflow.log_metrics({f"heldout/{k}": v for k, v in result.metrics.items()}, step=result.fit.step)
    mlflow.log_metrics({f"samples/{k}": v for k, v in result.samples.items()}, step=result.fit.step)
    _log_run(result, "stage2", "stage2/best")
    log.info("stage 2 held-out answer loss %.4f (before %.4f)", result.metrics["lm_loss"],
             result.metrics["lm_loss_initial"])
    log_metadata({**result.metrics, "stage2_dir": str(result.best_dir)})
    return result.metrics, {"run_dir": str(result.run_dir), "best": str(result.best_dir), "final": str(result.final_dir),
                            "mlflow_run_id": mlflow.active_run().info.run_id}


@step(experiment_tracker=EXPERIMENT_TRACKER)
def merge_model(stage2_run: dict[str, str], out_dir: str, prompt: str, generation: GenerationSpec) -> Annotated[
        dict[str, str], "merged_model"]:
    """Merge the adapter into the LLM (logits checked equal), write the standalone model directory and log it to
    MLflow as a pyfunc model (registrable, loadable by URI)."""
    run = get_step_context().pipeline_run
    result = merge_stage2(stage2_run["best"], resolve_path(out_dir), generation=generation, prompt=prompt,
                          lineage={"zenml_run_id": str(run.id), "stage2_mlflow_run": stage2_run.get("mlflow_run_id", "")})
    log_lineage({"stage2_dir": stage2_run["best"], "out_dir": out_dir, "prompt": prompt,
                 "generation": generation.model_dump()}, fingerprint=result.meta["data_fingerprint"],
                zenml_run_id=str(run.id), pipeline=run.pipeline.name)
    mlflow.set_tag("hilight.stage", "merge")
    mlflow.log_metric("merge/max_abs_logit_diff", result.max_abs_logit_diff)
    info = log_vlm_model(result.out_dir, result.digest)
    log.info("merged model %s (digest %s), logged as %s", result.out_dir, result.digest[:12], info.model_uri)
    log_metadata({"merged_dir": str(result.out_dir), "model_uri": info.model_uri, "digest": result.digest,
                  "max_abs_logit_diff": result.max_abs_logit_diff})
    return {"dir": str(result.out_dir), "digest": result.digest, "model_uri": info.model_uri,
            "model_id": info.model_id, "mlflow_run_id": mlflow.active_run().info.run_id,
            "clipvip": result.meta["vision"]["clipvip"], "data_fingerprint": result.meta["data_fingerprint"]}


@step(experiment_tracker=EXPERIMENT_TRACKER)
def evaluate_model(spec: VLMEvalSpec, candidate: str, model: dict[str, str], eval_inputs: dict[str, str]) -> tuple[
    Annotated[dict[str, float], "vlm_metrics"],
    Annotated[pd.DataFrame, "vlm_answers"],
]:
    """Generate answers on the held-out sets and score them; the per-answer table and the summary land in MLflow,
    the summary also on the logged model."""
    mlflow.set_tags({"hilight.stage": "evaluation", "hilight.candidate": candidate, "hilight.model_uri": model["model_uri"],
                     "hilight.data_fingerprint": eval_inputs["data_fingerprint"],
                     "hilight.zenml_run_id": str(get_step_context().pipeline_run.id)})
    log_manifest_inputs(spec.manifest_dir, {"evaluation": (spec.datasets, spec.splits)})
    result = evaluate_vlm(load_vlm_dir(model["dir"]), spec)
    metrics = {k: v for k, v in result.metrics.items() if v == v}  # NaN-free
    mlflow.log_metrics(metrics)
    mlflow.log_metrics(metrics, model_id=model["model_id"])
    mlflow.log_table(result.loggable_answers(),
                     artifact_file="evaluation/answers.json")
    log_metadata({"candidate": candidate, **metrics})
    return metrics, result.answers
