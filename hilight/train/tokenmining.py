"""Stage 1: TokenMining pretraining. Both vision towers and the LLM frozen; TokenMining trained with the LM loss on
video QA (hilight-reference §4.2: Valley-703K, lr 1e-4 cosine, 20 epochs; ``configs/tokenmining_hilight_2b.yaml``).

``run_tokenmining_pretrain(config)`` reads top to bottom: data → the frozen parts (CLIP-ViP candidate, Long-CLIP,
Gemma + tokenizer) → TokenMining → encode the QA samples with the chat template → fill the feature cache (the
towers run once per video, not once per epoch) → baselines → ``fit`` on TokenMining alone → exports.

Only TokenMining goes through ``fit``: the frozen parts live beside it in the objective, so checkpoints hold the
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
import torch
from accelerate import PartialState
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hilight.data.feature_cache import FeatureCache, fill_cache
from hilight.data.qa import (
    FEATURE_NAMES,
    EncodedSet,
    VideoQADataset,
    encode_samples,
    read_qa_manifest,
)
from hilight.data.samplers import CaptionBatchSampler
from hilight.env import resolve_path
from hilight.models.checkpoints import (
    load_clipvip_weights,
    load_saved_clipvip,
    module_digest,
)
from hilight.models.clipvip import CLIPViPModel, build_clipvip, load_preset
from hilight.models.longclip import LongCLIPImageTower, longclip_preset
from hilight.models.token_mining import (
    Depth,
    TokenMining,
    TokenMiningConfig,
    load_token_mining,
    save_token_mining,
)
from hilight.models.tokenizers import load_llm_tokenizer
from hilight.models.vlm import HiLightVLM, freeze_all_but, load_llm
from hilight.tracking import ResilientTracker
from hilight.train.checkpoint import load_checkpoint
from hilight.train.loop import FitResult, TrainSettings, fit, run_key

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]
FRAME_PIPELINE = "linspace-floor|bicubic-squash-antialias|clip-mean-std"  # hilight.data.frames (reference §2)


class QADataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest_dir: str = "outputs/data_validation"
    train_datasets: list[str] | None = None  # None = every dataset with QA
    train_splits: list[str] = ["train"]
    val_datasets: list[str] | None = None
    val_splits: list[str] = ["val", "test"]
    max_length: int = Field(1024, ge=16)  # tokens the LLM sees, each video counting as its video tokens
    max_val_samples: int | None = Field(512, ge=1)  # a fixed random subset keeps validation cheap at scale


class VisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clipvip: str  # the CLIP-ViP candidate: a saved model dir (alignment export) or an original-layout .pt
    clipvip_preset: str = "clipvip-b16"  # architecture of a .pt file
    longclip: str | None = None  # longclip-B.pt (original OpenAI layout)
    # demo only (no Long-CLIP weights exist offline): a declared random-init tower from presets/longclip/<name>.json
    longclip_random_init: str | None = None
    longclip_seed: int = 0

    @model_validator(mode="after")
    def _one_longclip(self) -> VisionSpec:
        if (self.longclip is None) == (self.longclip_random_init is None):
            raise ValueError("set exactly one of vision.longclip (a longclip-B.pt) and vision.longclip_random_init "
                             "(a preset name, demo only)")
        return self


class LLMSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: str  # a local Gemma directory (config.json + safetensors); llm_pretrain's export in the demo
    tokenizer_dir: str | None = None  # default: llm.dir
    hidden_act: str = "gelu"  # pinned: exact GELU, as transformers 4.38 ran Gemma-2B for the reference
    dtype: DType = "float32"  # frozen weights' dtype (bf16 halves the memory on GPU)


class TokenMiningSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    depth: Depth = "reference"
    expand: int = Field(32, ge=1)  # reference depth: query tokens per frame
    init: str | None = None  # start from a .bin / .pt / export dir instead of the reference's xavier init
    init_seed: int = 0


class FeatureCacheSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    dir: str = "outputs/feature_cache"
    dtype: DType = "float32"
    batch_size: int = Field(8, ge=1)  # clips per tower pass while filling


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
    enable_cache: bool = True


@dataclass
class Stage1Parts:
    vlm: HiLightVLM
    tokenizer: object
    num_frames: int
    image_size: int
    digests: dict[str, str]  # clipvip / longclip (vision weights as loaded), llm


@dataclass
class Stage1Result:
    run_dir: Path
    best_dir: Path
    final_dir: Path
    fit: FitResult
    metrics: dict[str, float]  # held-out losses: initial, best model, zero-video and no-video baselines
    samples: dict[str, int]  # kept / rejected / truncated counts
    rejected: pd.DataFrame  # dataset, id, reason of every rejected sample


# ------------------------------------------------------------------------------------------------ building


def load_clipvip_tower(spec: VisionSpec) -> CLIPViPModel:
    path = resolve_path(spec.clipvip)
    if path.is_dir():
        return load_saved_clipvip(path)
    model = build_clipvip(load_preset(spec.clipvip_preset))
    load_clipvip_weights(model, path, part="vision")
    return model


def load_longclip_tower(spec: VisionSpec) -> LongCLIPImageTower:
    if spec.longclip is not None:
        return LongCLIPImageTower.from_original(resolve_path(spec.longclip))
    log.warning("Long-CLIP tower is randomly initialised (vision.longclip_random_init=%r, seed %d): demo only",
                spec.longclip_random_init, spec.longclip_seed)
    torch.manual_seed(spec.longclip_seed)
    return LongCLIPImageTower(longclip_preset(spec.longclip_random_init))


def build_stage1_parts(vision: VisionSpec, llm_spec: LLMSpec, tm_spec: TokenMiningSpec) -> Stage1Parts:
    """The frozen towers and LLM, a fresh (or initialised) TokenMining, and the tokenizer."""
    clipvip, longclip = load_clipvip_tower(vision), load_longclip_tower(vision)
    num_frames, image_size = clipvip.config.num_frames, clipvip.config.vision.image_size
    if longclip.model.config.image_size != image_size:
        raise ValueError(f"both towers read the same clip tensor, but CLIP-ViP takes {image_size}px frames and "
                         f"Long-CLIP {longclip.model.config.image_size}px; use towers of the same input size")
    llm_dir = resolve_path(llm_spec.dir)
    llm = load_llm(llm_dir, hidden_act=llm_spec.hidden_act, dtype=DTYPES[llm_spec.dtype])
    tokenizer = load_llm_tokenizer(resolve_path(llm_spec.tokenizer_dir) if llm_spec.tokenizer_dir else llm_dir)
    if len(tokenizer) > llm.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM's vocab_size is {llm.config.vocab_size}")
    tm_config = TokenMiningConfig(video_dim=clipvip.config.vision.hidden_size,
                                  image_dim=longclip.model.config.projection_dim, llm_dim=llm.config.hidden_size,
                                  expand=tm_spec.expand, depth=tm_spec.depth)
    torch.manual_seed(tm_spec.init_seed)
    token_mining = TokenMining(tm_config)
    if tm_spec.init is not None:
        load_token_mining(token_mining, resolve_path(tm_spec.init))
    clipvip.text_model = None  # the VLM uses only the video tower
    digests = {"clipvip": module_digest(clipvip.vision_state_dict()), "longclip": module_digest(longclip),
               "llm": module_digest(llm)}
    vlm = HiLightVLM(llm, token_mining, clipvip.eval(), longclip.eval())
    return Stage1Parts(vlm, tokenizer, num_frames, image_size, digests)


def tower_encoder(vlm: HiLightVLM):
    def encode(clips: torch.Tensor) -> dict[str, torch.Tensor]:
        video, frames = vlm.tower_features(clips)
        return dict(zip(FEATURE_NAMES, (video, frames), strict=True))
    return encode


def open_feature_cache(spec: FeatureCacheSpec, parts: Stage1Parts) -> FeatureCache:
    key = {"clipvip": parts.digests["clipvip"], "longclip": parts.digests["longclip"], "num_frames": parts.num_frames,
           "image_size": parts.image_size, "frames": FRAME_PIPELINE}
    return FeatureCache(resolve_path(spec.dir), key, dtype=DTYPES[spec.dtype])


def cache_tower_features(spec: FeatureCacheSpec, parts: Stage1Parts, sets: list[EncodedSet],
                         tracker: ResilientTracker, progress: bool) -> FeatureCache | None:
    """Fill the feature cache for every video of ``sets`` (under DDP one process fills, the others then find it
    all) and drop the towers, which are not needed once every clip's features are cached. ``None`` when disabled."""
    if not spec.enabled:
        return None
    cache = open_feature_cache(spec, parts)
    videos = {}
    for encoded in sets:
        videos.update(zip(encoded.rows["video_sha256"], encoded.rows["video_file"], strict=True))
    with PartialState().main_process_first():
        cache.refresh()
        stats = fill_cache(cache, videos, tower_encoder(parts.vlm), num_frames=parts.num_frames,
                           image_size=parts.image_size, batch_size=spec.batch_size, progress=progress)
    tracker.log_metrics({"features/cached": stats["cached"], "features/computed": stats["computed"]}, 0)
    parts.vlm.clipvip = parts.vlm.longclip = None
    return cache


# ------------------------------------------------------------------------------------------------ objective


class Stage1Objective:
    """LM loss of the answers given the video tokens; the frozen VLM follows TokenMining to its device."""

    def __init__(self, vlm: HiLightVLM):
        self.vlm = vlm
        self._device = None

    def follow(self, device: torch.device) -> None:
        """Move the frozen parts to ``device`` (once)."""
        if self._device != device:
            self.vlm.to(device)
            self._device = device

    def video_tokens(self, token_mining, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.follow(batch["input_ids"].device)
        if "video_features" in batch:
            video, frames = batch["video_features"], batch["frame_features"]
        else:
            video, frames = self.vlm.tower_features(batch["pixel_values"])
        dtype = next(self.vlm.token_mining.parameters()).dtype
        return token_mining(video.to(dtype), frames.to(dtype))

    def __call__(self, token_mining, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = self.video_tokens(token_mining, batch)
        loss = self.vlm(batch["input_ids"], batch["attention_mask"], batch["labels"], video_tokens=tokens).loss
        return {"loss": loss, "lm_loss": loss.detach()}


@torch.no_grad()
def heldout_loss(objective: Stage1Objective, token_mining, dataset: VideoQADataset, batch_size: int, *,
                 zero_video: bool = False, shuffle_video: bool = False) -> float:
    """Per-token answer loss over ``dataset``; none for a text-only dataset. ``zero_video`` zeroes the video tokens;
    ``shuffle_video`` gives each sample the tokens of the next sample's clip in its batch (a wrong video)."""
    total, count = 0.0, 0
    device = next(token_mining.parameters()).device
    objective.follow(device)
    was_training = objective.vlm.training
    objective.vlm.eval()  # no dropout (LoRA's) in a measurement
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in dataset.collate(list(range(start, min(start + batch_size, len(dataset))))).items()}
        tokens = objective.video_tokens(token_mining, batch) if dataset.with_video else None
        if zero_video:
            tokens = torch.zeros_like(tokens)
        if shuffle_video:
            tokens = tokens.roll(1, dims=0)
        s, n = objective.vlm.token_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], tokens)
        total, count = total + s, count + n
    objective.vlm.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------------ the job


def run_tokenmining_pretrain(config: TokenMiningPretrainConfig, *,
                             tracker: ResilientTracker | None = None) -> Stage1Result:
    tracker = tracker or ResilientTracker(None)
    manifest = read_qa_manifest(config.data.manifest_dir)
    parts = build_stage1_parts(config.vision, config.llm, config.token_mining)
    vlm, tokenizer = parts.vlm, parts.tokenizer
    trainable = freeze_all_but(vlm, ("token_mining.",))
    log.info("stage 1: %d trainable tensors (TokenMining), %d parameters", len(trainable),
             sum(p.numel() for p in vlm.token_mining.parameters()))
    key = run_key(config, data=manifest.fingerprint, **parts.digests,
                  token_mining_init=module_digest(vlm.token_mining))
    out_dir = resolve_path(config.output_dir)
    run_dir = out_dir / "runs" / key
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory %s", run_dir)

    n_tokens = vlm.token_mining.config.num_tokens(parts.num_frames)
    train_rows = manifest.select(config.data.train_datasets, config.data.train_splits)
    val_rows = manifest.select(config.data.val_datasets, config.data.val_splits)
    if config.data.max_val_samples and len(val_rows) > config.data.max_val_samples:
        val_rows = val_rows.sample(config.data.max_val_samples, random_state=0).reset_index(drop=True)
    enc = lambda rows, text_only=False: encode_samples(  # noqa: E731
        rows, tokenizer, video_tokens=n_tokens, max_length=config.data.max_length, text_only=text_only)
    train_enc, val_enc, val_text = enc(train_rows), enc(val_rows), enc(val_rows, True)
    for name, encoded, total in (("training", train_enc, len(train_rows)), ("held-out", val_enc, len(val_rows))):
        if not encoded.samples:
            raise ValueError(f"all {total} {name} QA samples were rejected, e.g. {encoded.rejected['reason'].iat[0]!r}; "
                             f"fix the data or raise data.max_length (now {config.data.max_length})")
    rejected = pd.concat([train_enc.rejected, val_enc.rejected], ignore_index=True)

    cache = cache_tower_features(config.features, parts, [train_enc, val_enc], tracker, config.train.progress)

    def dataset(encoded: EncodedSet, with_video: bool = True) -> VideoQADataset:
        return VideoQADataset(encoded, pad_token_id=tokenizer.pad_token_id, cache=cache, num_frames=parts.num_frames,
                              image_size=parts.image_size, with_video=with_video)

    train_set, val_set, val_text_set = dataset(train_enc), dataset(val_enc), dataset(val_text, with_video=False)
    samples = {"train": len(train_set), "val": len(val_set), "rejected": len(rejected),
               "truncated": train_enc.truncated + val_enc.truncated}
    log.info("stage 1: %d training and %d held-out samples (%d rejected, %d truncated); %d video tokens per clip",
             samples["train"], samples["val"], samples["rejected"], samples["truncated"], n_tokens)

    objective = Stage1Objective(vlm)
    token_mining = vlm.token_mining
    bs = config.eval_batch_size
    baselines = {"val/lm_loss_zero_video": heldout_loss(objective, token_mining, val_set, bs, zero_video=True),
                 "val/lm_loss_no_video": heldout_loss(objective, token_mining, val_text_set, bs)}
    # the wrong-video control: every held-out sample with another clip's tokens (clips mixed across batches first)
    order = val_enc.rows.sample(frac=1.0, random_state=1).index
    val_shuffled = dataset(EncodedSet(val_enc.rows.loc[order].reset_index(drop=True),
                                      [val_enc.samples[i] for i in order], val_enc.rejected, 0))
    initial = heldout_loss(objective, token_mining, val_set, bs)
    initial_wrong = heldout_loss(objective, token_mining, val_shuffled, bs, shuffle_video=True)
    tracker.log_metrics({"val/lm_loss": initial, "val/lm_loss_wrong_video": initial_wrong, **baselines}, 0)
    log.info("held-out loss before training %.4f; zeroed video %.4f; no video %.4f", initial,
             baselines["val/lm_loss_zero_video"], baselines["val/lm_loss_no_video"])

    def evaluate(tm) -> dict[str, float]:
        loss = heldout_loss(objective, tm, val_set, bs)
        wrong = heldout_loss(objective, tm, val_shuffled, bs, shuffle_video=True)
        return {"val/lm_loss": loss, "val/lm_loss_wrong_video": wrong, **baselines, "val/video_gain": wrong - loss}

    settings = config.train
    if settings.gradient_checkpointing:  # recompute the frozen LLM's activations; TokenMining itself is small
        vlm.llm.gradient_checkpointing_enable()
        settings = settings.model_copy(update={"gradient_checkpointing": False})
    sampler = CaptionBatchSampler(range(len(train_set)), settings.batch_size, mode="random", seed=settings.seed)
    resolved = {"tokenmining_pretrain": config.model_dump(mode="json"), "data_fingerprint": manifest.fingerprint,
                "run_key": key, "token_mining": token_mining.config.model_dump(), "digests": parts.digests}
    result = fit(token_mining, objective, train_set, sampler, settings, run_dir, evaluate=evaluate, tracker=tracker,
                 config=resolved)

    meta = {"stage1": resolved, "step": result.step}
    final_dir = save_token_mining(token_mining, out_dir / "final", meta)
    if result.best_checkpoint is not None and result.best_checkpoint != result.final_checkpoint:
        token_mining.load_state_dict(load_checkpoint(result.best_checkpoint, None)[0], strict=True)
        meta["step"] = int(result.best_checkpoint.name.split("-")[1])
    best_dir = save_token_mining(token_mining, out_dir / "best", meta)
    best = heldout_loss(objective, token_mining, val_set, bs)
    metrics = {"lm_loss_initial": initial, "lm_loss": best,
               "lm_loss_wrong_video": heldout_loss(objective, token_mining, val_shuffled, bs, shuffle_video=True),
               "lm_loss_zero_video": baselines["val/lm_loss_zero_video"],
               "lm_loss_no_video": baselines["val/lm_loss_no_video"]}
    return Stage1Result(run_dir, best_dir, final_dir, result, metrics, samples, rejected)
