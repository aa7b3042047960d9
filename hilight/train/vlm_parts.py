"""The parts stages 1 and 2 (and the merge) share: the frozen CLIP-ViP and Long-CLIP towers, the LLM, TokenMining,
the frozen-tower feature cache, the answer-loss objective and the held-out answer loss.

Device: every function here works on whatever device the recipe placed the parts on (``VLMParts.to``); the cache
fill runs the towers there and stores features on the host.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hilight.data.feature_cache import FeatureCache, fill_cache
from hilight.data.qa import FEATURE_NAMES, EncodedSet, VideoQADataset, encode_samples, lazy_samples
from hilight.data import frames as frames_module
from hilight.data import probe as probe_module
from hilight.env import package_versions, resolve_path, source_digest
from hilight.losses.distributed import tokens_per_rank
from hilight.models import clipvip as clipvip_module
from hilight.models import longclip as longclip_module
from hilight.models.checkpoints import load_clipvip_weights, load_saved_clipvip, module_digest
from hilight.models.clipvip import CLIPViPModel, build_clipvip, load_preset
from hilight.models.longclip import LongCLIPImageTower, longclip_preset
from hilight.models.token_mining import Depth, TokenMining, TokenMiningConfig, load_token_mining
from hilight.models.tokenizers import load_llm_tokenizer
from hilight.models.vlm import HiLightVLM, load_llm
from hilight.tracking import ResilientTracker

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DType = Literal["float32", "bfloat16", "float16"]
FRAME_PIPELINE = "linspace-floor|bicubic-squash-antialias|clip-mean-std"  # hilight.data.frames (reference §2)


class VisionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clipvip: str  # the CLIP-ViP candidate: a saved model dir (alignment export) or an original-layout .pt
    clipvip_preset: str = "clipvip-b16"  # architecture of a .pt file
    longclip: str | None = None  # longclip-B.pt (original OpenAI layout)
    # the architecture that file must have: a name in presets/longclip (null: whatever the file holds)
    longclip_preset: str | None = "longclip-b16"
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
    """Where the frozen towers' outputs come from (the ``features:`` block).

    ``cache``: computed once per clip into ``dir`` and read every epoch — cheap per step, but ~3.5 MiB per clip in
    bf16 at real shapes (2356 x 768 + 12 x 512 values; ~2.5 TB for Valley-703K per CLIP-ViP candidate). Before
    filling, the projected size of the missing clips is compared with the free disk and the run refuses when it
    would not fit. ``online``: the towers run on the accelerator at every step (no disk; the better choice on a GPU
    with little disk, at the cost of the towers' forward pass per step)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["cache", "online"] = "cache"
    dir: str = "outputs/feature_cache"
    dtype: DType = "float32"  # also "bf16" / "fp16"; bfloat16 halves the cache
    batch_size: int = Field(8, ge=1)  # clips per tower pass while filling
    free_margin_gb: float = Field(1.0, ge=0)  # disk left free after the projected fill

    @field_validator("dtype", mode="before")
    @classmethod
    def _short_names(cls, v):
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(v, v)



@dataclass
class VLMParts:
    vlm: HiLightVLM
    tokenizer: object
    num_frames: int
    image_size: int
    digests: dict[str, str]  # clipvip / longclip (vision weights as loaded), llm
    num_proxies: int  # CLIP-ViP's CLS + proxy tokens, the first of the tokens TokenMining attends over

    def to(self, device: torch.device) -> VLMParts:
        """Place every part on ``device`` (dtypes stay as loaded: the LLM in ``llm.dtype``)."""
        self.vlm.to(device)
        return self


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
        return LongCLIPImageTower.from_original(resolve_path(spec.longclip), spec.longclip_preset)
    log.warning("Long-CLIP tower is randomly initialised (vision.longclip_random_init=%r, seed %d): demo only",
                spec.longclip_random_init, spec.longclip_seed)
    torch.manual_seed(spec.longclip_seed)
    return LongCLIPImageTower(longclip_preset(spec.longclip_random_init))


def build_vlm_parts(vision: VisionSpec, llm_spec: LLMSpec, tm_spec: TokenMiningSpec) -> VLMParts:
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
    return VLMParts(vlm, tokenizer, num_frames, image_size, digests, clipvip.config.vision.num_proxies)


def tower_encoder(vlm: HiLightVLM):
    """``clips`` [B, T, 3, S, S] on the host → tower features computed where the towers are (the GPU under a
    recipe), handed back for the cache to store."""
    device = next(vlm.clipvip.parameters()).device

    def encode(clips: torch.Tensor) -> dict[str, torch.Tensor]:
        video, frames = vlm.tower_features(clips.to(device, non_blocking=True))
        return dict(zip(FEATURE_NAMES, (video, frames), strict=True))
    return encode


# The code between a video file and its cached features, besides the weights: decoding, frame sampling and
# preprocessing, and the two towers' forward passes. Hashed by source, so an edit of any of them opens a new cache, as
# a change of weights does; the rest of the library (losses, TokenMining, the LLM) can change without recomputing.
FEATURE_CODE = (frames_module, probe_module, clipvip_module, longclip_module, HiLightVLM.tower_features)


def feature_cache_key(parts: VLMParts) -> dict:
    """Everything a clip's cached features depend on besides the clip: the towers' weights (digests) and settings,
    the frame sampling, the source of ``FEATURE_CODE`` and the installed numeric libraries (an upgraded torch or
    decoder computes the features again instead of reading the old ones)."""
    longclip = parts.vlm.longclip.model.config.to_dict()
    return {"clipvip": parts.digests["clipvip"], "longclip": parts.digests["longclip"],
            "towers": {"clipvip": parts.vlm.clipvip.config.vision.model_dump(mode="json"),
                       "longclip": {k: v for k, v in sorted(longclip.items())  # not where it was read from
                                    if not k.startswith("_") and k != "transformers_version"}},
            "num_frames": parts.num_frames, "image_size": parts.image_size, "frames": FRAME_PIPELINE,
            "code": source_digest(*FEATURE_CODE), "packages": package_versions()}


def open_feature_cache(spec: FeatureCacheSpec, parts: VLMParts) -> FeatureCache:
    return FeatureCache(resolve_path(spec.dir), feature_cache_key(parts), dtype=DTYPES[spec.dtype])


Tokenize = Literal["lazy", "upfront"]


def encode_training_set(rows, tokenizer, *, video_tokens: int, max_length: int, tokenize: Tokenize,
                        memo: Path | None) -> EncodedSet:
    """A training set: ``lazy`` (each sample on first use; start-up and memory independent of the dataset's size,
    rejections reported as met) or ``upfront`` (everything encoded now, every rejection known before training)."""
    if tokenize == "lazy":
        return lazy_samples(rows, tokenizer, video_tokens=video_tokens, max_length=max_length, memo=memo)
    return encode_samples(rows, tokenizer, video_tokens=video_tokens, max_length=max_length)


class FeatureCacheSpaceError(RuntimeError):
    """The feature cache would not fit on its disk."""


def feature_bytes_per_clip(parts: VLMParts, dtype: torch.dtype) -> int:
    """Bytes one clip's cached features take: CLIP-ViP's last hidden states [S', Dv] + Long-CLIP's frame vectors
    [T, Di]."""
    cv, lc = parts.vlm.clipvip.config, parts.vlm.longclip.model.config
    values = cv.seq_len * cv.vision.hidden_size + parts.num_frames * lc.projection_dim
    return values * torch.empty((), dtype=dtype).element_size()


def check_cache_space(spec: FeatureCacheSpec, cache: FeatureCache, parts: VLMParts, missing: int,
                      tracker: ResilientTracker) -> None:
    """Print and log the projected size of the fill and the free disk; refuse when it would not fit."""
    per_clip = feature_bytes_per_clip(parts, DTYPES[spec.dtype])
    projected, free = missing * per_clip, shutil.disk_usage(cache.dir).free
    log.info("feature cache %s: %d clips to compute x %.2f MiB = %.2f GiB; %.1f GiB free", cache.dir, missing,
             per_clip / 2**20, projected / 2**30, free / 2**30)
    tracker.log_metrics({"features/projected_gib": projected / 2**30, "features/free_gib": free / 2**30,
                         "features/mib_per_clip": per_clip / 2**20}, 0)
    if projected > free - spec.free_margin_gb * 2**30:
        raise FeatureCacheSpaceError(
            f"the feature cache needs {projected / 2**30:.1f} GiB for {missing} clips ({per_clip / 2**20:.2f} MiB "
            f"each in {spec.dtype}) but {cache.dir} has {free / 2**30:.1f} GiB free (keeping "
            f"{spec.free_margin_gb} GiB); set features.mode: online (towers on the accelerator every step), "
            f"features.dtype: bf16, or features.dir on a larger disk")


def cache_tower_features(spec: FeatureCacheSpec, parts: VLMParts, sets: list[EncodedSet],
                         tracker: ResilientTracker, progress: bool) -> FeatureCache | None:
    """``features.mode: cache``: fill the feature cache for every video of ``sets`` on the towers' device and drop
    the towers, which are not needed once every clip's features are cached. ``online``: nothing to fill, the towers
    stay; returns ``None``.

    Under DDP every process fills a share: the i-th missing clip (in SHA order, the same list on every process) goes
    to process i mod N (process 0's list, broadcast), which writes its own shards; then all wait and re-read the
    index. One process filling alone
    would take N times as long, while the others sat in a barrier: at Valley-703K scale, hours, far past the
    process group's timeout."""
    if spec.mode == "online":
        log.info("features.mode online: the frozen towers run at every step on %s",
                 next(parts.vlm.clipvip.parameters()).device)
        return None
    cache = open_feature_cache(spec, parts)
    videos = {}
    for encoded in sets:
        videos.update(zip(encoded.rows["video_sha256"], encoded.rows["video_file"], strict=True))
    state = PartialState()
    cache.refresh()
    todo = [cache.missing(videos)]
    if state.num_processes > 1:  # one list for all (another job sharing the cache may add shards meanwhile)
        broadcast_object_list(todo)
    todo = todo[0]
    check_cache_space(spec, cache, parts, len(todo), tracker)
    mine = todo[state.process_index::state.num_processes]
    fill_cache(cache, {s: videos[s] for s in mine}, tower_encoder(parts.vlm), num_frames=parts.num_frames,
               image_size=parts.image_size, batch_size=spec.batch_size, progress=progress,
               writer=f"p{state.process_index}" if state.num_processes > 1 else "")
    state.wait_for_everyone()
    cache.refresh()
    lost = cache.missing(videos)
    if lost:  # shards deleted meanwhile (a prune of this key directory while it was being filled)
        raise RuntimeError(f"feature cache {cache.dir}: {len(lost)} clip(s) missing after the fill (e.g. {lost[0]}); "
                           "shards were deleted during it (hilight cache prune?): run again")
    tracker.log_metrics({"features/cached": len(videos) - len(todo), "features/computed": len(todo)}, 0)
    parts.vlm.clipvip = parts.vlm.longclip = None
    return cache


# ------------------------------------------------------------------------------------------------ objective


class VideoAnswerObjective:
    """Stage 1: LM loss of the answers given the video tokens that the trained TokenMining makes.

    Called with TokenMining as training sees it (DDP-wrapped on several processes): its ``forward`` runs inside
    the wrapper, so only its gradients are all-reduced; the frozen towers and LLM (placed on the device by the
    recipe) pass gradients through to the tokens without being trained."""

    def __init__(self, vlm: HiLightVLM):
        self.vlm = vlm

    def video_tokens(self, token_mining: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, N, D_llm] tokens from cached features or, without a cache, from the frozen towers."""
        return token_mining(*tower_outputs(self.vlm, batch))

    def __call__(self, token_mining: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = self.video_tokens(token_mining, batch)
        loss = self.vlm(batch["input_ids"], batch["attention_mask"], batch["labels"], video_tokens=tokens,
                        num_items_in_batch=tokens_per_rank(batch["labels"])).loss
        return {"loss": loss, "lm_loss": loss.detach()}


VIDEO_INPUTS = ("video_features", "frame_features", "pixel_values")  # a batch's video, cached or as frames


def tower_outputs(vlm: HiLightVLM, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's CLIP-ViP and Long-CLIP features (cached, or from the frozen towers) in TokenMining's dtype."""
    if "video_features" in batch:
        video, frames = batch["video_features"], batch["frame_features"]
    else:
        video, frames = vlm.tower_features(batch["pixel_values"])
    dtype = next(vlm.token_mining.parameters()).dtype
    return video.to(dtype), frames.to(dtype)


def other_clip_index(clips: list[str], seed: int = 1) -> list[int]:
    """For each sample, the sample whose clip the wrong-video control shows it: the nearest one before it, in a fixed
    random cyclic order of the samples, whose clip is another one (a random order, so that neighbouring rows, often
    clips of one source video, are not paired). Raises when every sample shows one clip."""
    if len(set(clips)) < 2:
        raise ValueError(f"the wrong-video control needs held-out samples of 2 or more clips, got {len(set(clips))}")
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * len(clips)
    for pos, i in enumerate(order):
        back = 1
        while clips[order[(pos - back) % len(order)]] == clips[i]:
            back += 1
        out[i] = order[(pos - back) % len(order)]
    return out


@torch.no_grad()
def answer_loss(vlm: HiLightVLM, dataset: VideoQADataset, batch_size: int, *, zero_video: bool = False,
                shuffle_video: bool = False) -> float:
    """Per-token answer loss of ``vlm`` (its own TokenMining) over ``dataset``, on the device ``vlm`` is on; none
    for a text-only dataset. ``zero_video`` zeroes the video tokens; ``shuffle_video`` gives each sample another clip's
    tokens (``other_clip_index``): a wrong video for every sample, in any batch size."""
    total, count = 0.0, 0
    device = next(vlm.token_mining.parameters()).device
    tokens_of = VideoAnswerObjective(vlm).video_tokens
    was_training = vlm.training
    vlm.eval()  # no dropout (LoRA's) in a measurement
    size = len(dataset)
    wrong = other_clip_index(dataset.rows["video_sha256"].tolist()) if shuffle_video and dataset.with_video else None
    for start in range(0, size, batch_size):
        index = list(range(start, min(start + batch_size, size)))
        batch = {k: v.to(device) for k, v in dataset.collate(index).items()}
        if wrong is not None:
            other = dataset.collate([wrong[i] for i in index])
            if len(other["input_ids"]) != len(batch["input_ids"]):  # a lazily rejected sample left one of them
                raise ValueError("the wrong-video control needs every held-out sample encoded; encode them upfront")
            batch.update({k: other[k].to(device) for k in VIDEO_INPUTS if k in other})
        tokens = tokens_of(vlm.token_mining, batch) if dataset.with_video else None
        if zero_video:
            tokens = torch.zeros_like(tokens)
        s, n = vlm.token_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], tokens)
        total, count = total + s, count + n
    vlm.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def attention_summary(vlm: HiLightVLM, dataset: VideoQADataset, batch_size: int, num_proxies: int) -> dict[str, float]:
    """Where TokenMining looks on ``dataset``'s clips (each clip once). ``global_mass``: the share of its attention on
    CLIP-ViP's CLS + proxy tokens (the first ``num_proxies``, the clip-level summary that alignment trains), averaged
    over query tokens; ``global_mass_max``: that share for the query token that looks there most;
    ``global_mass_uniform``: the share under uniform attention (M / S); ``entropy``: the attention's entropy as a
    fraction of uniform's (1: spread evenly).

    On the demo, stage-2 runs whose VLM named the ball colours ended with a query token putting 0.58-1.0 of its
    attention there; runs whose colour answers stayed at chance, 0.03-0.05 (benchmarks/RESULTS.md, "Where
    TokenMining looks")."""
    first = {}  # each clip's first sample, by position
    for i, sha in enumerate(dataset.rows["video_sha256"].tolist()):
        first.setdefault(sha, i)
    rows = list(first.values())
    if not rows:
        raise ValueError("attention_summary needs a dataset with at least one clip")
    device = next(vlm.token_mining.parameters()).device
    parts = []
    for start in range(0, len(rows), batch_size):
        batch = dataset.collate(rows[start:start + batch_size])
        batch = {k: v.to(device) for k, v in batch.items() if k in VIDEO_INPUTS}
        probs = vlm.token_mining.attention(*tower_outputs(vlm, batch))  # [B, Q, S]
        parts.append(global_attention(probs, num_proxies))
    on_global, entropy = (torch.cat(x) for x in zip(*parts, strict=True))
    return attention_stats(on_global, entropy, num_proxies / probs.shape[-1])


def global_attention(probs: torch.Tensor, num_proxies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenMining attention ``[B, Q, S]`` -> each query token's share on the first ``num_proxies`` (CLIP-ViP's CLS +
    proxies) ``[B, Q]``, and each clip's mean entropy as a fraction of uniform attention's ``[B]``."""
    probs = probs.float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(-1) / math.log(probs.shape[-1])
    return probs[..., :num_proxies].sum(-1), entropy


def attention_stats(on_global: torch.Tensor, entropy: torch.Tensor, uniform: float) -> dict[str, float]:
    """:func:`global_attention`'s per-clip tensors (``[N, Q]``, ``[N]``) -> the summary :func:`attention_summary`
    returns; ``uniform``: the share on the summary tokens under uniform attention (M / S)."""
    per_query = on_global.mean(0)
    return {"global_mass": float(per_query.mean()), "global_mass_max": float(per_query.max()),
            "global_mass_uniform": uniform, "entropy": float(entropy.mean())}
