"""The training loop every stage uses: accelerate, AdamW, warmup + cosine, clipping, mixed precision, periodic
validation, atomic checkpoints with automatic resume, non-finite-loss protection, resilient MLflow logging.

``Trainer.fit`` reads top to bottom: set up → resume if a checkpoint exists → loop (step, log, validate, checkpoint)
→ final checkpoint. A stage's recipe (``hilight.train.recipe``) owns the ``Accelerator`` and supplies the model, a
dataset with ``collate``, a resumable batch sampler, an ``objective(model, batch) -> {"loss": ..., "<name>_loss": ...}``
that calls the *wrapped* model (DDP all-reduces only through ``forward``) and optionally ``evaluate(model) ->
metrics``. Everything the loop must carry across a crash lives in one ``TrainState``.

Resume is exact on CPU: the batch order depends only on (seed, epoch) and the position in the epoch, and model,
optimizer, scheduler and RNG states (each process's own stream, seeded ``seed + rank``) are restored, so a killed
and re-run job ends with the same weights.

Under DeepSpeed ZeRO (``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml``) the same loop
runs with what the engine needs told: the micro-batch, gradient accumulation and clipping come from ``train:``
(no DataLoader goes through ``prepare``, so accelerate cannot infer them); the engine accumulates, clips, steps and
skips a step whose gradient norm is not finite; each process's share of the optimizer state is saved with the
engine's own checkpoint inside the step directory (``deepspeed/``), next to the full weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from hilight.tracking import ResilientTracker
from hilight.train.checkpoint import (list_checkpoints, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
                                      step_dir)

log = logging.getLogger(__name__)


class TrainSettings(BaseModel):
    """Optimisation and bookkeeping of one training run (the ``train:`` block of a stage config)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)  # per process and micro-step
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    # learning-rate multipliers by parameter-name prefix, e.g. {token_mining: 3.0}: the parameters under a prefix train
    # at lr * factor, on the same schedule (LLaVA's mm_projector_lr, as a ratio); a prefix must name trained parameters
    lr_scale: dict[str, float] = Field(default_factory=dict)
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
    keep_every: int | None = Field(None, ge=1)  # also keep every checkpoint at a multiple of this (a later evaluation's)
    max_nonfinite_in_row: int = Field(5, ge=1)
    select_metric: str = "val/t2v_r1"  # decides the best checkpoint
    # max / min: the validated checkpoint with the highest / lowest select_metric is the run's model ("best");
    # last: the last one is, whatever its value (the reference's and LLaVA's final model; select_metric is only
    # recorded), for a recipe whose end is its budget rather than a noisy choice among near-equal checkpoints
    select_mode: Literal["max", "min", "last"] = "max"
    progress: bool = True
    resume: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        bad = {k: v for k, v in self.lr_scale.items() if not v > 0}
        if bad:
            raise ValueError(f"train.lr_scale {bad}: every factor must be positive (freeze a module in its stage's "
                             "config instead)")
        return self


class TrackingSpec(BaseModel):
    """What a stage sends to MLflow besides metrics (the ``tracking:`` block of a stage config)."""

    model_config = ConfigDict(extra="forbid")

    # which checkpoints' model weights are uploaded: "all" at every save (at real shapes ~60 x 0.6 GB per
    # alignment run), "best" / "best_and_final" once training ends, "none". Local checkpoints (train.keep_last)
    # are kept either way.
    checkpoints: Literal["best", "best_and_final", "all", "none"] = "best_and_final"


# settings that do not change what a run computes; a run key ignores them so changing them resumes the same run
NON_SEMANTIC_TRAIN_KEYS = ("progress", "resume", "num_workers", "keep_every")
NON_SEMANTIC_KEYS = ("enable_cache", "experiment_name", "tracking")


def run_key(config: BaseModel, **inputs: str) -> str:
    """Identifies a training run: the same config and inputs (data fingerprint, weight digests) resume the same run
    directory; anything that changes the result starts fresh. ``enable_cache``/``experiment_name`` and the
    non-semantic train settings do not count."""
    relevant = config.model_dump(mode="json", exclude=set(NON_SEMANTIC_KEYS))
    relevant["train"] = {k: v for k, v in relevant["train"].items() if k not in NON_SEMANTIC_TRAIN_KEYS}
    blob = json.dumps({"config": relevant, **inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Everything besides weights, optimizer and scheduler that a resumed run needs (``trainer_state.json``)."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch consumed, over all processes
    skipped_steps: int = 0
    nonfinite_in_row: int = 0
    best_step: int | None = None
    best_metric: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # validation metrics per evaluation

    def improves(self, value: float, mode: str) -> bool:
        if mode == "last" or self.best_metric is None:
            return True
        return value > self.best_metric if mode == "max" else value < self.best_metric


@dataclass
class FitResult:
    run_dir: Path
    step: int
    final_checkpoint: Path
    best_checkpoint: Path | None
    best_step: int | None
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


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """CLIP's convention: decay matrices and convolutions, not biases, norms, 1-D tables or scalars. ``lr_scale``
    (parameter-name prefix -> factor) puts the parameters under a prefix in their own groups at ``lr * factor``;
    the longest matching prefix wins, and a prefix that matches no trained parameter is an error (a typo would
    otherwise train at the base rate unnoticed)."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): [], (1.0, False): []}  # as before
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = max((k for k in lr_scale if name == k or name.startswith(k + ".")), key=len, default=None)
        used.add(prefix)
        decay = not (p.ndim < 2 or "embedding" in name or "norm" in name)
        groups.setdefault((lr_scale.get(prefix, 1.0), decay), []).append(p)
    unused = sorted(set(lr_scale) - used)
    if unused:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        raise ValueError(f"train.lr_scale prefix(es) {unused} match no trained parameter; trained parameters are "
                         f"e.g. {names[:3]} (a prefix is a dotted module path, such as the part of one of those "
                         "names before its last dot)")
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))  # the base-rate decay group first
    return [{"params": groups[k], "weight_decay": weight_decay if k[1] else 0.0, "lr": lr * k[0]} for k in order]


Objective = Callable[[torch.nn.Module, dict], dict[str, torch.Tensor]]


class Trainer:
    """One training run of one model: optimizer, schedule, checkpoints under ``run_dir/checkpoints``, resume.

    ``state="trainable"`` checkpoints only the parameters that require grad (LoRA adapters next to a frozen
    multi-GB LLM); resuming then checks that the checkpoint holds exactly those."""

    def __init__(self, accelerator: Accelerator, settings: TrainSettings, run_dir: Path, *,
                 tracker: ResilientTracker | None = None, config: dict | None = None,
                 state: Literal["all", "trainable"] = "all", tracking: TrackingSpec | None = None):
        self.accelerator, self.settings, self.run_dir = accelerator, settings, run_dir
        self.tracking = tracking or TrackingSpec()
        self.tracker = tracker or ResilientTracker(None)
        self.config, self.state_mode = config or {}, state
        self.ckpt_root = run_dir / "checkpoints"
        self.state = TrainState()
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    # ------------------------------------------------------------------------------------------- the loop

    def fit(self, model: torch.nn.Module, objective: Objective, dataset, sampler, *,
            evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
            after_step: Callable[[torch.nn.Module], None] | None = None) -> FitResult:
        """Train ``model`` for ``settings.max_steps`` optimizer steps, resuming from the last checkpoint."""
        settings, acc = self.settings, self.accelerator
        # one stream per process: with one seed every rank would draw the same dropout masks (the weights are
        # rank 0's either way: DDP and the DeepSpeed engine broadcast rank 0's parameters when they wrap the model)
        torch.manual_seed(settings.seed + acc.process_index)
        if settings.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        model.to(acc.device)
        if self.deepspeed:
            if after_step is not None:
                hook = getattr(after_step, "__qualname__", repr(after_step))
                raise ValueError(f"this stage changes its weights after each optimizer step ({hook}), which DeepSpeed "
                                 "ZeRO would overwrite from its own fp32 copy of them; run it under DDP instead "
                                 "(accelerate launch --config_file configs/accelerate/ddp_multigpu.yaml)")
            configure_deepspeed(acc, settings)
            frozen_scalars_to_buffers(model)
        groups = param_groups(model, settings.weight_decay, settings.lr, settings.lr_scale)
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps)
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, settings.warmup_steps, settings.max_steps, min_lr_rate=settings.min_lr_ratio)
        resumed_from = self._resume(model, optimizer, scheduler)
        st = self.state
        wrapped, optimizer = acc.prepare(model, optimizer)
        self.wrapped, self.raw_model = wrapped, acc.unwrap_model(wrapped)
        if self.deepspeed and resumed_from is not None:  # the engine's optimizer exists only now
            self._resume_deepspeed(step_dir(self.ckpt_root, resumed_from))
        self.optimizer, self.scheduler = optimizer, scheduler
        params = [p for p in wrapped.parameters() if p.requires_grad]
        stream = self._batches(dataset, sampler)
        bar = tqdm(total=settings.max_steps, initial=st.step, desc="train", disable=not settings.progress,
                   dynamic_ncols=True)
        while st.step < settings.max_steps:
            metrics = self._train_step(wrapped, objective, stream, params, after_step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('train/loss', float('nan')):.4f}", lr=f"{metrics['train/lr']:.2e}")
            new_best = evaluate is not None and self._validate(wrapped, evaluate)
            if st.step % settings.ckpt_every == 0 or st.step == settings.max_steps or new_best:
                self._checkpoint()
                if new_best:
                    self.tracker.set_tags({"hilight.best_step": str(st.step),
                                           "hilight.best_checkpoint": f"checkpoints/step-{st.step:08d}",
                                           "hilight.best_metric": f"{settings.select_metric}={st.best_metric:.6g}"})
        bar.close()
        final = step_dir(self.ckpt_root, st.step)
        if not (final / "trainer_state.json").is_file():  # resumed at max_steps: nothing left to train
            final = self._checkpoint()
        best = step_dir(self.ckpt_root, st.best_step) if st.best_step else None
        self._upload_kept(best, final)
        self.tracker.flush()
        return FitResult(self.run_dir, st.step, final, best, st.best_step, st.best_metric, st.skipped_steps,
                         resumed_from, list(st.history))

    def _train_step(self, model, objective: Objective, stream, params, after_step) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; a non-finite loss or gradient skips it on every
        process together."""
        settings, acc, st = self.settings, self.accelerator, self.state
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = {}
        local_nonfinite = torch.zeros((), device=acc.device)
        n_samples = 0
        for micro in range(settings.grad_accum):
            batch = next(stream)
            n_samples += len(batch["input_ids"]) if "input_ids" in batch else len(next(iter(batch.values())))
            with acc.autocast():
                terms = objective(model, batch)
            loss = terms["loss"]
            # always backward, even on NaN: under DDP every process must join the gradient all-reduce
            if self.deepspeed:  # the engine divides by its gradient_accumulation_steps and steps at the boundary
                acc.deepspeed_engine_wrapped.backward(loss, sync_gradients=micro == settings.grad_accum - 1)
            else:
                acc.backward(loss / settings.grad_accum)
            local_nonfinite += (~torch.isfinite(loss.detach())).float()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().item() / settings.grad_accum
        nonfinite = acc.reduce(local_nonfinite, "sum").item() > 0
        if self.deepspeed:  # the engine has clipped and stepped (or skipped a non-finite step); its norm, pre-clip
            grad_norm = float(acc.deepspeed_engine_wrapped.get_global_grad_norm() or math.nan)
        else:
            grad_norm = float(acc.clip_grad_norm_(params, settings.max_grad_norm) if settings.max_grad_norm
                              else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                                         if p.grad is not None])))
        if nonfinite or not math.isfinite(grad_norm):
            st.skipped_steps, st.nonfinite_in_row = st.skipped_steps + 1, st.nonfinite_in_row + 1
            log.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s); step skipped (%d in a row)",
                        st.step + 1, sums.get("loss"), grad_norm, st.nonfinite_in_row)
            if st.nonfinite_in_row >= settings.max_nonfinite_in_row:
                self.tracker.log_metrics({"train/skipped_steps": st.skipped_steps}, st.step + 1)
                self.tracker.flush()
                raise NonFiniteLossError(
                    f"{st.nonfinite_in_row} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{st.step + 1}); stopping. Lower train.lr, enable train.max_grad_norm, or check the data; the "
                    f"last good checkpoint is in {self.ckpt_root}")
        else:
            self.optimizer.step()
            st.nonfinite_in_row = 0
            if after_step is not None:
                after_step(self.raw_model)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        st.step += 1
        elapsed = time.perf_counter() - started
        metrics = {f"train/{k}": v for k, v in sums.items() if math.isfinite(v)}
        metrics.update({"train/lr": self.scheduler.get_last_lr()[0],
                        "train/samples_per_s": n_samples * acc.num_processes / elapsed,
                        "train/skipped_steps": st.skipped_steps, "train/epoch": st.epoch})
        if math.isfinite(grad_norm):
            metrics["train/grad_norm"] = grad_norm
        self.tracker.log_metrics(metrics, st.step)
        return metrics

    def _validate(self, model, evaluate) -> bool:
        """Validate when due; True when this step is the new best by ``select_metric``."""
        settings, st = self.settings, self.state
        if not (st.step % settings.val_every == 0 or st.step == settings.max_steps):
            return False
        model.eval()
        with torch.no_grad():
            val = evaluate(self.raw_model)
        st.history.append({"step": st.step, **val})
        self.tracker.log_metrics(val, st.step)
        log.info("step %d: %s", st.step, ", ".join(f"{k}={v:.4f}" for k, v in val.items()))
        if settings.select_metric not in val:  # else no step would be "best" and the final one would pass for it
            raise ValueError(f"train.select_metric {settings.select_metric!r} is not among this stage's validation "
                             f"metrics {sorted(val)}; set it to one of them")
        value = val[settings.select_metric]
        if st.improves(value, settings.select_mode):
            st.best_step, st.best_metric = st.step, value
            return True
        return False

    def _batches(self, dataset, sampler):
        """Endless batches on the accelerator's device; keeps (epoch, position) in step with what was consumed."""
        acc, st, world = self.accelerator, self.state, self.accelerator.num_processes
        # DeepSpeed's bf16/fp16 casts the model itself and, unlike autocast, not its inputs
        dtype = ({"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision) if self.deepspeed
                 else None)
        while True:
            sampler.set_epoch(st.epoch, skip=st.position)
            dataset.epoch = st.epoch
            # an own generator: creating the loader would otherwise draw from the global RNG, shifting a resumed
            # run's dropout masks (e.g. LoRA's) against an uninterrupted one
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate,
                                num_workers=self.settings.num_workers,
                                pin_memory=acc.device.type == "cuda",
                                generator=torch.Generator().manual_seed(self.settings.seed + st.epoch))
            if world > 1:
                loader = acc.prepare_data_loader(loader)
            for batch in loader:
                st.position += world
                yield {k: v.to(acc.device, non_blocking=True) if dtype is None or not v.is_floating_point()
                       else v.to(acc.device, dtype, non_blocking=True) for k, v in batch.items()}
            st.epoch, st.position = st.epoch + 1, 0

    # ------------------------------------------------------------------------------------- checkpoints

    def _resume(self, model, optimizer, scheduler) -> int | None:
        existing = list_checkpoints(self.ckpt_root) if self.settings.resume else []
        if not existing:
            return None
        at, path = existing[-1]
        written_by = "DeepSpeed" if (path / DEEPSPEED_DIR).is_dir() else "a plain optimizer"
        if written_by != ("DeepSpeed" if self.deepspeed else "a plain optimizer"):
            raise RuntimeError(
                f"checkpoint {path} was written by {written_by}, and this run "
                f"{'is' if self.deepspeed else 'is not'} under DeepSpeed: its optimizer state cannot be carried "
                "over. Resume it under the launcher that wrote it, or start afresh with train.resume=false (or "
                "a new output_dir)")
        model_state, trainer = load_checkpoint(path, None if self.deepspeed else optimizer,
                                               rank=self.accelerator.process_index)
        if self.state_mode == "trainable":
            load_trainable_state(model, model_state, str(path))
        else:
            model.load_state_dict(model_state, strict=True)
        scheduler.load_state_dict(trainer.pop("scheduler"))
        self.state = TrainState(**{k: trainer[k] for k in TrainState.__dataclass_fields__})
        log.info("resuming from %s (step %d of %d)", path, self.state.step, self.settings.max_steps)
        return at

    def _resume_deepspeed(self, path: Path) -> None:
        """Every process loads its share of the optimizer state (and the fp32 master weights) from the engine's
        checkpoint; the weights themselves were loaded before ``prepare``."""
        loaded, _ = self.wrapped.load_checkpoint(str(path / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, load_module_strict=False,
                                                 load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load its state from {path / DEEPSPEED_DIR}; the log above says "
                               "why (a different number of processes or ZeRO stage is the usual cause)")

    def _save_deepspeed(self) -> Path:
        """The engine's checkpoint (each process writes its own optimizer partition) into a temporary directory
        that the main process then moves into the step directory before marking it complete."""
        acc = self.accelerator
        tmp = self.ckpt_root / f".tmp-deepspeed-{self.state.step:08d}"
        if acc.is_main_process:  # left by a killed run, perhaps with more processes' partitions than now
            for stale in self.ckpt_root.glob(".tmp-deepspeed-*"):
                shutil.rmtree(stale)
        acc.wait_for_everyone()
        # frozen weights are in model.safetensors already (and loaded from there on resume)
        self.wrapped.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        acc.wait_for_everyone()
        return tmp

    def _checkpoint(self) -> Path:
        st, acc = self.state, self.accelerator
        path = step_dir(self.ckpt_root, st.step)
        engine_state = self._save_deepspeed() if self.deepspeed else None
        process_rng = gather_object([rng_state()]) if acc.num_processes > 1 else None  # a collective: every rank
        if acc.is_main_process:
            weights = (trainable_state_dict(self.raw_model) if self.state_mode == "trainable"
                       else self.raw_model.state_dict())
            trainer = {**asdict(st), "scheduler": self.scheduler.state_dict()}
            path = save_checkpoint(self.ckpt_root, st.step, model_state=weights,
                                   optimizer=None if self.deepspeed else self.optimizer, trainer_state=trainer,
                                   config=self.config, directories={DEEPSPEED_DIR: engine_state} if engine_state else {},
                                   process_rng=process_rng)
            prune_checkpoints(self.ckpt_root, self.settings.keep_last, protect={st.best_step} if st.best_step else set(),
                              keep_every=self.settings.keep_every)
            if self.tracking.checkpoints == "all":
                self._upload(path)
        acc.wait_for_everyone()
        return path

    def _upload(self, path: Path) -> None:
        self.tracker.log_artifacts(path / "model.safetensors", f"checkpoints/{path.name}")

    def _upload_kept(self, best: Path | None, final: Path) -> None:
        """``tracking.checkpoints: best | best_and_final``: the checkpoints worth keeping, once training is over."""
        mode = self.tracking.checkpoints
        if not self.accelerator.is_main_process or mode in ("all", "none"):
            return
        wanted = [best or final] + ([final] if mode == "best_and_final" else [])
        for path in dict.fromkeys(wanted):  # best may be final
            self._upload(path)


DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "state"


def configure_deepspeed(accelerator: Accelerator, settings: TrainSettings) -> None:
    """Tell DeepSpeed what ``train:`` says: the micro-batch per process (accelerate would infer it from a prepared
    DataLoader, and the loop prepares none), the accumulation steps and the clipping norm. A launcher config that
    sets them otherwise is overridden, with a warning: the run key, and so resume, follows the stage config."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {"train_micro_batch_size_per_gpu": settings.batch_size,
              "gradient_accumulation_steps": settings.grad_accum,
              "gradient_clipping": settings.max_grad_norm or 0.0}
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            log.warning("DeepSpeed config %s=%s overridden by the stage config's train settings: %s", key,
                        config[key], value)
        config[key] = value
    config["train_batch_size"] = settings.batch_size * settings.grad_accum * accelerator.num_processes


def frozen_scalars_to_buffers(model: torch.nn.Module) -> list[str]:
    """Keep frozen 0-dim parameters as buffers (same state-dict keys): DeepSpeed 0.19's engine broadcasts every
    parameter as bytes (``p.data.view(torch.uint8)``), which fails on a 0-dim tensor such as CLIP-ViP's frozen
    ``logit_scale``. Returns the names moved."""
    moved = []
    for prefix, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0 and not p.requires_grad:
                delattr(module, name)
                module.register_buffer(name, p.detach())
                moved.append(f"{prefix}.{name}" if prefix else name)
    if moved:
        log.info("DeepSpeed: frozen 0-dim parameters kept as buffers: %s", moved)
    return moved


def fit(model: torch.nn.Module, objective: Objective, dataset, sampler, settings: TrainSettings, run_dir: Path, *,
        accelerator: Accelerator | None = None, evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        after_step: Callable[[torch.nn.Module], None] | None = None, tracker: ResilientTracker | None = None,
        config: dict | None = None, state: Literal["all", "trainable"] = "all",
        tracking: TrackingSpec | None = None) -> FitResult:
    """``Trainer(...).fit(...)`` in one call (a fresh ``Accelerator`` unless one is given)."""
    accelerator = accelerator or Accelerator(mixed_precision=settings.mixed_precision)
    return Trainer(accelerator, settings, run_dir, tracker=tracker, config=config, state=state,
                   tracking=tracking).fit(
        model, objective, dataset, sampler, evaluate=evaluate, after_step=after_step)
