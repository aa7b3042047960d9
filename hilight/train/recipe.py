"""The base of every training recipe: one class per stage that owns its device for the whole stage.

A recipe (in the manner of torchtune's ``recipes/*.py``) reads top to bottom in its ``run()``: build the models on
the accelerator's device → data → step-0 baselines → train (``Trainer``) → restore the best weights → export →
the post-training evaluation it reports, and returns a typed result. The base holds only what every stage needs:
the ``Accelerator`` (created once, so cache fill, baselines, training and evaluation share one device and one
process group), the run directory keyed by config + inputs, and the restore-best step. It does not invert control
through hooks; a stage's phases stay visible in its own ``run``.

One code path: on a CPU box the accelerator's device is the CPU; with one GPU it is ``cuda``; under
``accelerate launch`` / ``torchrun`` each process gets its GPU and DDP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from pydantic import BaseModel

from hilight.env import resolve_path
from hilight.losses.distributed import tokens_per_rank
from hilight.tracking import ResilientTracker
from hilight.train.checkpoint import load_weights
from hilight.train.loop import FitResult, Objective, Trainer, load_trainable_state, run_key

log = logging.getLogger(__name__)


def lm_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Causal-LM loss of a model called with the batch (a text LM, or the HiLight VLM with its video inputs),
    normalised by the global number of answer tokens so that DDP's average is the single-process loss."""
    loss = model(**batch, num_items_in_batch=tokens_per_rank(batch["labels"])).loss
    return {"loss": loss, "lm_loss": loss.detach()}


class Recipe:
    """Shared phases of a training stage. Subclasses set ``stage`` and implement ``run()``."""

    stage: str = "stage"

    def __init__(self, config: BaseModel, *, tracker: ResilientTracker | None = None):
        self.config = config
        self.settings = config.train
        self.tracker = tracker or ResilientTracker(None)
        self.accelerator = Accelerator(mixed_precision=self.settings.mixed_precision)
        self.device = self.accelerator.device
        self.out_dir = resolve_path(config.output_dir)
        self.key: str | None = None
        self.run_dir: Path | None = None

    def open_run(self, **inputs: str) -> Path:
        """``<output_dir>/runs/<key>``: the same config and inputs (data fingerprint, weight digests) resume the same
        run; anything that changes the result starts fresh."""
        self.key = run_key(self.config, **inputs)
        self.run_dir = self.out_dir / "runs" / self.key
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log.info("%s: run directory %s (device %s, %d process(es))", self.stage, self.run_dir, self.device,
                 self.accelerator.num_processes)
        return self.run_dir

    def train(self, model: torch.nn.Module, objective: Objective, dataset, sampler, *, resolved: dict,
              evaluate=None, after_step=None, state: str = "all", settings=None) -> FitResult:
        """Train ``model`` (already on ``self.device``) with this recipe's accelerator and tracker."""
        trainer = Trainer(self.accelerator, settings or self.settings, self.run_dir, tracker=self.tracker,
                          config=resolved, state=state, tracking=self.config.tracking)
        return trainer.fit(model, objective, dataset, sampler, evaluate=evaluate, after_step=after_step)

    def export(self, out_dir: Path, write: Callable[[Path], object]) -> Path:
        """``write(out_dir)`` on the main process only (the others would race on the same directory); every
        process returns once it is written."""
        if self.accelerator.is_main_process:
            write(out_dir)
        self.accelerator.wait_for_everyone()
        return out_dir

    @staticmethod
    def restore_best(model: torch.nn.Module, fit: FitResult, *, state: str = "all") -> int:
        """Load the best checkpoint's weights into ``model`` when they are not the final ones; returns the step
        whose weights ``model`` now holds."""
        if fit.best_checkpoint is None or fit.best_step == fit.step:
            return fit.step
        weights = load_weights(fit.best_checkpoint)  # the weights only: every process keeps its own RNG stream
        if state == "trainable":
            load_trainable_state(model, weights, str(fit.best_checkpoint))
        else:
            model.load_state_dict(weights, strict=True)
        return fit.best_step

    def run(self):
        raise NotImplementedError
