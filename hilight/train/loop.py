"""The training loop every stage uses: accelerate, AdamW, warmup + cosine, clipping, mixed precision, periodic
validation, atomic checkpoints with automatic resume, non-finite-loss protection, resilient MLflow logging.

``fit`` reads top to bottom: set up → resume if a checkpoint exists → loop (step, log, validate, checkpoint) →
final checkpoint. A stage supplies the model, a dataset with ``collate``, a resumable batch sampler, an
``objective(model, batch) -> {"loss": ..., "<name>_loss": ...}`` and optionally ``evaluate(model) -> metrics``.

Resume is exact on CPU: the batch order depends only on (seed, epoch) and the position in the epoch, and model,
optimizer, scheduler and RNG states are restored, so a killed and re-run job ends with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from hilight.tracking import ResilientTracker
from hilight.train.checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint, step_dir

log = logging.getLogger(__name__)


class TrainSettings(BaseModel):
    """Optimisation and bookkeeping of one training run (the ``train:`` block of a stage config)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)  # per process and micro-step
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.2, ge=0)  # not applied to biases, norms, embeddings tables and scalars
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    max_grad_norm: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    num_workers: int = Field(0, ge=0)
    val_every: int = Field(100, ge=1)
    ckpt_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    max_nonfinite_in_row: int = Field(5, ge=1)
    select_metric: str = "val/t2v_r1"  # decides the best checkpoint
    select_mode: Literal["max", "min"] = "max"
    log_checkpoints: Literal["model", "none"] = "model"  # upload each checkpoint's model weights to MLflow
    progress: bool = True
    resume: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self


# settings that do not change what a run computes; a run key ignores them so changing them resumes the same run
NON_SEMANTIC_TRAIN_KEYS = ("progress", "resume", "num_workers", "log_checkpoints")


def run_key(config: BaseModel, **inputs: str) -> str:
    """Identifies a training run: the same config and inputs (data fingerprint, weight digests) resume the same run
    directory; anything that changes the result starts fresh. ``enable_cache``/``experiment_name`` and the
    non-semantic train settings do not count."""
    relevant = config.model_dump(mode="json", exclude={"enable_cache", "experiment_name"})
    relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in NON_SEMANTIC_TRAIN_KEYS}
    blob = json.dumps({"config": relevant, **inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class FitResult:
    run_dir: Path
    step: int
    final_checkpoint: Path
    best_checkpoint: Path | None
    best_metric: float | None
    skipped_steps: int
    resumed_from: int | None
    history: list[dict[str, Any]] = field(default_factory=list)  # validation metrics per evaluation


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a ``trainable_state_dict``: its keys must be exactly the model's trainable parameters."""
    want = set(trainable_state_dict(model))
    missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
    if missing or unexpected:
        raise RuntimeError(f"{source} does not hold this model's trainable parameters: {len(missing)} missing "
                           f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}; was the run's config changed?")
    model.load_state_dict(state, strict=False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """CLIP's convention: decay matrices and convolutions, not biases, norms, 1-D tables or scalars."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fit(model: torch.nn.Module, objective: Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]], dataset,
        sampler, settings: TrainSettings, run_dir: Path, *,
        evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        after_step: Callable[[torch.nn.Module], None] | None = None,
        tracker: ResilientTracker | None = None, config: dict | None = None,
        state: Literal["all", "trainable"] = "all") -> FitResult:
    """Train ``model`` for ``settings.max_steps`` optimizer steps; resumes from ``run_dir/checkpoints``.

    ``state="trainable"`` checkpoints only the parameters that require grad (LoRA adapters next to a frozen
    multi-GB LLM); resuming then checks that the checkpoint holds exactly those."""
    tracker = tracker or ResilientTracker(None)
    config = config or {}
    ckpt_root = run_dir / "checkpoints"
    torch.manual_seed(settings.seed)
    accelerator = Accelerator(mixed_precision=settings.mixed_precision)
    if settings.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas,
                                  eps=settings.eps)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, settings.warmup_steps, settings.max_steps, min_lr_rate=settings.min_lr_ratio)

    step, epoch, position, skipped, in_row = 0, 0, 0, 0, 0
    best_step, best_metric, history, resumed_from = None, None, [], None
    existing = list_checkpoints(ckpt_root) if settings.resume else []
    if existing:
        resumed_from, path = existing[-1]
        model_state, trainer = load_checkpoint(path, optimizer)
        if state == "trainable":
            load_trainable_state(model, model_state, str(path))
        else:
            model.load_state_dict(model_state, strict=True)
        scheduler.load_state_dict(trainer["scheduler"])
        step, epoch, position = trainer["step"], trainer["epoch"], trainer["position"]
        skipped, in_row = trainer["skipped_steps"], trainer["nonfinite_in_row"]
        best_step, best_metric, history = trainer["best_step"], trainer["best_metric"], trainer["history"]
        log.info("resuming from %s (step %d of %d)", path, step, settings.max_steps)

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    world = accelerator.num_processes

    def batches():
        """Endless batches; keeps (epoch, position) in step with what has been consumed."""
        nonlocal epoch, position
        while True:
            sampler.set_epoch(epoch, skip=position)
            dataset.epoch = epoch
            # an own generator: creating the loader would otherwise draw from the global RNG, shifting a resumed
            # run's dropout masks (e.g. LoRA's) against an uninterrupted one
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate,
                                num_workers=settings.num_workers,
                                generator=torch.Generator().manual_seed(settings.seed + epoch))
            if world > 1:
                loader = accelerator.prepare_data_loader(loader)
            for batch in loader:
                position += world
                yield {k: v.to(accelerator.device) for k, v in batch.items()}
            epoch, position = epoch + 1, 0

    def checkpoint(at: int) -> Path:
        trainer = {"epoch": epoch, "position": position, "scheduler": scheduler.state_dict(),
                   "skipped_steps": skipped, "nonfinite_in_row": in_row, "best_step": best_step,
                   "best_metric": best_metric, "history": history}
        path = step_dir(ckpt_root, at)
        if accelerator.is_main_process:
            weights = trainable_state_dict(raw_model) if state == "trainable" else raw_model.state_dict()
            path = save_checkpoint(ckpt_root, at, model_state=weights, optimizer=optimizer,
                                   trainer_state=trainer, config=config)
            prune_checkpoints(ckpt_root, settings.keep_last, protect={best_step} if best_step else set())
            if settings.log_checkpoints == "model":
                tracker.log_artifacts(path / "model.safetensors", f"checkpoints/step-{at:08d}")
        accelerator.wait_for_everyone()
        return path

    stream = batches()
    bar = tqdm(total=settings.max_steps, initial=step, desc="train", disable=not settings.progress,
               dynamic_ncols=True)
    while step < settings.max_steps:
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        local_nonfinite = torch.zeros((), device=accelerator.device)
        n_samples = 0
        for _ in range(settings.grad_accum):
            batch = next(stream)
            n_samples += len(batch["input_ids"]) if "input_ids" in batch else len(next(iter(batch.values())))
            with accelerator.autocast():
                terms = objective(model, batch)
            loss = terms["loss"]
            # always backward, even on NaN: under DDP every process must join the gradient all-reduce; the
            # step is then skipped on all processes together
            accelerator.backward(loss / settings.grad_accum)
            local_nonfinite += (~torch.isfinite(loss.detach())).float()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().item() / settings.grad_accum
        nonfinite = accelerator.reduce(local_nonfinite, "sum").item() > 0
        grad_norm = (accelerator.clip_grad_norm_(params, settings.max_grad_norm) if settings.max_grad_norm
                     else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        grad_norm = float(grad_norm)
        nonfinite = nonfinite or not math.isfinite(grad_norm)
        if nonfinite:
            skipped, in_row = skipped + 1, in_row + 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); step skipped (%d in a row)",
                        step + 1, sums.get("loss"), grad_norm, in_row)
            if in_row >= settings.max_nonfinite_in_row:
                tracker.log_metrics({"train/skipped_steps": skipped}, step + 1)
                tracker.flush()
                raise NonFiniteLossError(
                    f"{in_row} consecutive steps had a non-finite loss or gradient (last at step {step + 1}); "
                    f"stopping. Lower train.lr, enable train.max_grad_norm, or check the data; the last good "
                    f"checkpoint is in {ckpt_root}")
        else:
            optimizer.step()
            in_row = 0
            if after_step is not None:
                after_step(raw_model)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - started
        metrics = {f"train/{k}": v for k, v in sums.items() if math.isfinite(v)}
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/samples_per_s": n_samples * world / elapsed,
                        "train/skipped_steps": skipped, "train/epoch": epoch})
        if math.isfinite(grad_norm):
            metrics["train/grad_norm"] = grad_norm
        tracker.log_metrics(metrics, step)
        bar.update(1)
        bar.set_postfix(loss=f"{sums.get('loss', float('nan')):.4f}", lr=f"{metrics['train/lr']:.2e}")

        new_best = False
        if evaluate is not None and (step % settings.val_every == 0 or step == settings.max_steps):
            model.eval()
            with torch.no_grad():
                val = evaluate(raw_model)
            history.append({"step": step, **val})
            tracker.log_metrics(val, step)
            value = val.get(settings.select_metric)
            if value is not None and (best_metric is None or (value > best_metric if settings.select_mode == "max"
                                                               else value < best_metric)):
                best_step, best_metric, new_best = step, value, True
            log.info("step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
        if step % settings.ckpt_every == 0 or step == settings.max_steps or new_best:
            path = checkpoint(step)
            if new_best:
                tracker.set_tags({"hilight.best_step": str(step), "hilight.best_checkpoint": f"checkpoints/step-{step:08d}",
                                  "hilight.best_metric": f"{settings.select_metric}={best_metric:.6g}"})
    bar.close()
    tracker.flush()
    final = step_dir(ckpt_root, step)
    if not (final / "trainer_state.json").is_file():  # resumed at max_steps: nothing left to train
        final = checkpoint(step)
    return FitResult(run_dir, step, final, step_dir(ckpt_root, best_step) if best_step else None, best_metric,
                     skipped, resumed_from, history)
