"""Stage 1: TokenMining pretraining. Both vision towers and the LLM frozen; TokenMining trained with the LM loss on
video QA (hilight-reference §4.2: Valley-703K, lr 1e-4 cosine, 20 epochs; ``configs/tokenmining_hilight_2b.yaml``).

``TokenMiningRecipe(config).run()`` reads top to bottom: the frozen parts (CLIP-ViP candidate, Long-CLIP, Gemma +
tokenizer) and TokenMining on the accelerator's device → encode the QA samples with the chat template → fill the
feature cache (the towers run once per video, not once per epoch, on the device) → baselines → train TokenMining
alone → exports.

Only TokenMining goes through the trainer: the frozen parts live beside it in the objective, so checkpoints hold the
6.9M trained parameters rather than the whole 2.8B model, and under DDP only TokenMining's gradients are
all-reduced.

Proof of learning: the held-out answer-token loss is reported at step 0 and at every validation, next to three
controls: the same samples with every video token zeroed (``val/lm_loss_zero_video``), without any video block
(``val/lm_loss_no_video``, the LLM's text prior), and with the trained TokenMining fed *another* clip's features
(``val/lm_loss_wrong_video``). The last one is the decisive one: tokens in the right format but from the wrong
clip; a loss below it means the tokens carry what this clip shows, not just a format the LLM likes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from hilight.data.qa import EncodedSet, VideoQADataset, encode_samples, read_qa_manifest
from hilight.data.samplers import CaptionBatchSampler
from hilight.models.checkpoints import module_digest
from hilight.models.token_mining import save_token_mining
from hilight.models.vlm import freeze_all_but
from hilight.tracking import ResilientTracker
from hilight.train.loop import FitResult, TrackingSpec, TrainSettings
from hilight.train.recipe import Recipe
from hilight.train.vlm_parts import (
    FeatureCacheSpec,
    LLMSpec,
    TokenMiningSpec,
    VideoAnswerObjective,
    Tokenize,
    VisionSpec,
    answer_loss,
    attention_summary,
    build_vlm_parts,
    cache_tower_features,
    encode_training_set,
)

log = logging.getLogger(__name__)


class QADataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_dir: str = "outputs/data_validation"
    train_datasets: list[str] | None = None  # None = every dataset with QA
    train_splits: list[str] = ["train"]
    val_datasets: list[str] | None = None
    val_splits: list[str] = ["val", "test"]
    max_length: int = Field(1024, ge=16)  # tokens the LLM sees, each video counting as its video tokens
    max_val_samples: int | None = Field(512, ge=1)  # a fixed random subset keeps validation cheap at scale
    # training samples: "lazy" (encoded on first use, O(1) start-up; Valley-703K) or "upfront" (all rejections
    # known before training); held-out samples are always encoded up front
    tokenize: Tokenize = "lazy"
    memo_tokens: bool = False  # keep lazy encodings in <run_dir>/tokens.sqlite (later epochs and runs skip them)




class TokenMiningPretrainConfig(BaseModel):
    """Config of the ``tokenmining_pretrain`` pipeline (``configs/tokenmining_*.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Literal["tokenmining_pretrain"] = "tokenmining_pretrain"
    experiment_name: str = "tokenmining_pretrain"
    name: str = Field("tokenmining", pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "outputs/tokenmining"
    data: QADataSpec = Field(default_factory=QADataSpec)
    vision: VisionSpec
    llm: LLMSpec
    token_mining: TokenMiningSpec = Field(default_factory=TokenMiningSpec)
    features: FeatureCacheSpec = Field(default_factory=FeatureCacheSpec)
    eval_batch_size: int = Field(16, ge=1)
    train: TrainSettings
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    enable_cache: bool = True




@dataclass
class Stage1Result:
    run_dir: Path
    best_dir: Path
    final_dir: Path
    fit: FitResult
    metrics: dict[str, float]  # held-out losses: initial, best model, zero-video and no-video baselines
    samples: dict[str, int]  # kept / rejected / truncated counts
    rejected: pd.DataFrame  # dataset, id, reason of every rejected sample




class TokenMiningRecipe(Recipe):
    """Stage 1 (see the module docstring): the frozen parts on the device, TokenMining trained alone."""

    stage = "tokenmining_pretrain"

    def run(self) -> Stage1Result:
        config = self.config
        manifest = read_qa_manifest(config.data.manifest_dir)

        # build: frozen towers and LLM, a fresh (or initialised) TokenMining, all on the accelerator's device
        parts = build_vlm_parts(config.vision, config.llm, config.token_mining).to(self.device)
        vlm, tokenizer = parts.vlm, parts.tokenizer
        trainable = freeze_all_but(vlm, ("token_mining.",))
        log.info("stage 1: %d trainable tensors (TokenMining), %d parameters", len(trainable),
                 sum(p.numel() for p in vlm.token_mining.parameters()))
        self.open_run(data=manifest.fingerprint, **parts.digests, token_mining_init=module_digest(vlm.token_mining))

        # data: encode the QA samples with the chat template, fill the feature cache on the device
        n_tokens = vlm.token_mining.config.num_tokens(parts.num_frames)
        train_rows = manifest.select(config.data.train_datasets, config.data.train_splits)
        val_rows = manifest.select(config.data.val_datasets, config.data.val_splits)
        if config.data.max_val_samples and len(val_rows) > config.data.max_val_samples:
            val_rows = val_rows.sample(config.data.max_val_samples, random_state=0).reset_index(drop=True)
        enc = lambda rows, text_only=False: encode_samples(  # noqa: E731
            rows, tokenizer, video_tokens=n_tokens, max_length=config.data.max_length, text_only=text_only)
        train_enc = encode_training_set(train_rows, tokenizer, video_tokens=n_tokens, max_length=config.data.max_length,
                                        tokenize=config.data.tokenize,
                                        memo=self.run_dir / "tokens.sqlite" if config.data.memo_tokens else None)
        val_enc, val_text = enc(val_rows), enc(val_rows, True)
        for name, encoded, total in (("training", train_enc, len(train_rows)), ("held-out", val_enc, len(val_rows))):
            if not encoded.samples:
                raise ValueError(f"all {total} {name} QA samples were rejected, e.g. "
                                 f"{encoded.rejected['reason'].iat[0]!r}; fix the data or raise data.max_length "
                                 f"(now {config.data.max_length})")
        cache = cache_tower_features(config.features, parts, [train_enc, val_enc], self.tracker, config.train.progress)

        def dataset(encoded: EncodedSet, with_video: bool = True) -> VideoQADataset:
            return VideoQADataset(encoded, pad_token_id=tokenizer.pad_token_id, cache=cache,
                                  num_frames=parts.num_frames, image_size=parts.image_size, with_video=with_video)

        train_set, val_set, val_text_set = dataset(train_enc), dataset(val_enc), dataset(val_text, with_video=False)
        log.info("stage 1: %d training (%s) and %d held-out samples (%d held-out rejected); %d video tokens per clip",
                 len(train_set), config.data.tokenize, len(val_set), len(val_enc.rejected), n_tokens)

        # baselines at step 0
        bs = config.eval_batch_size
        baselines = {"val/lm_loss_zero_video": answer_loss(vlm, val_set, bs, zero_video=True),
                     "val/lm_loss_no_video": answer_loss(vlm, val_text_set, bs)}
        initial = answer_loss(vlm, val_set, bs)
        initial_wrong = answer_loss(vlm, val_set, bs, shuffle_video=True)

        def attention() -> dict[str, float]:  # where TokenMining looks (vlm_parts.attention_summary)
            summary = attention_summary(vlm, val_set, bs, parts.num_proxies)
            return {f"val/tm_attention/{k}": v for k, v in summary.items()}

        self.tracker.log_metrics({"val/lm_loss": initial, "val/lm_loss_wrong_video": initial_wrong, **baselines,
                                  **attention()}, 0)
        log.info("held-out loss before training %.4f; zeroed video %.4f; no video %.4f", initial,
                 baselines["val/lm_loss_zero_video"], baselines["val/lm_loss_no_video"])

        def evaluate(_token_mining) -> dict[str, float]:  # vlm holds the same TokenMining
            loss = answer_loss(vlm, val_set, bs)
            wrong = answer_loss(vlm, val_set, bs, shuffle_video=True)
            return {"val/lm_loss": loss, "val/lm_loss_wrong_video": wrong, **baselines, "val/video_gain": wrong - loss,
                    **attention()}

        # train TokenMining alone: checkpoints hold its 6.9M parameters, DDP all-reduces only its gradients
        settings = config.train
        if settings.gradient_checkpointing:  # recompute the frozen LLM's activations; TokenMining itself is small
            vlm.llm.gradient_checkpointing_enable()
            settings = settings.model_copy(update={"gradient_checkpointing": False})
        token_mining = vlm.token_mining
        sampler = CaptionBatchSampler(range(len(train_set)), settings.batch_size, mode="random", seed=settings.seed)
        resolved = {"tokenmining_pretrain": config.model_dump(mode="json"), "data_fingerprint": manifest.fingerprint,
                    "run_key": self.key, "token_mining": token_mining.config.model_dump(), "digests": parts.digests}
        fit = self.train(token_mining, VideoAnswerObjective(vlm), train_set, sampler, resolved=resolved,
                         evaluate=evaluate, settings=settings)

        # export the final and the best weights; report the best with its controls
        final_dir = self.export(self.out_dir / "final", lambda d: save_token_mining(
            token_mining, d, {"stage1": resolved, "step": fit.step}))
        best_step = self.restore_best(token_mining, fit)
        best_dir = self.export(self.out_dir / "best", lambda d: save_token_mining(
            token_mining, d, {"stage1": resolved, "step": best_step}))
        rejected = pd.concat([train_enc.rejections(), val_enc.rejected], ignore_index=True)  # lazy: as met
        samples = {"train": len(train_set) - len(train_enc.rejections()), "val": len(val_set),
                   "rejected": len(rejected), "truncated": train_enc.truncated + val_enc.truncated}
        metrics = {"lm_loss_initial": initial, "lm_loss": answer_loss(vlm, val_set, bs),
                   "lm_loss_wrong_video": answer_loss(vlm, val_set, bs, shuffle_video=True),
                   "lm_loss_zero_video": baselines["val/lm_loss_zero_video"],
                   "lm_loss_no_video": baselines["val/lm_loss_no_video"]}
        return Stage1Result(self.run_dir, best_dir, final_dir, fit, metrics, samples, rejected)


def run_tokenmining_pretrain(config: TokenMiningPretrainConfig, *,
                             tracker: ResilientTracker | None = None) -> Stage1Result:
    return TokenMiningRecipe(config, tracker=tracker).run()
