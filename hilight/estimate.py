"""What a training run will cost before it starts (``hilight estimate``): model FLOPs per sample, parameter counts,
memory per GPU and projected hours, for a stage-0 (``clipvip_alignment``), stage-1 (``tokenmining_pretrain``) or
stage-2 (``lora_finetune``) config.

How each number is obtained:

* **FLOPs** are counted, not guessed: the stage's real architecture (presets and config shapes; no weight file is
  read) is built on PyTorch's ``meta`` device, where tensors have shapes but no data, and one training step at batch
  1 (forward, loss, backward) runs under ``torch.utils.flop_counter.FlopCounterMode``. Frozen weights get no
  gradient, so the backward pass counts exactly what autograd computes (stage 1: input gradients through the frozen
  LLM to TokenMining; stage 2: LoRA's gradients through the frozen LLM). Elementwise work is not counted (as in
  MFU's usual definition). The towers of stages 1-2 run once per clip into the feature cache when it is enabled;
  their forward is reported separately and added to every step only when it is off.
* **Activations** are measured on the same meta pass: every tensor autograd saves for backward passes through a
  ``torch.autograd.graph.saved_tensors_hooks`` pack hook; their bytes (distinct storages, parameters excluded) at
  batch 1, times the configured batch, are what backward holds at its peak. With gradient checkpointing the number
  is *estimated* from the same measurement: what is saved outside the checkpointed layers, plus each layer's input,
  plus the largest single layer's saved tensors (recomputed during backward). Not counted: the CUDA context
  (~0.5-1 GiB), allocator fragmentation, short-lived temporaries.
* **Weights, gradients, optimizer state**: trained parameters as fp32 master weights (4 B) + fp32 gradients (4 B) +
  AdamW's two fp32 moments (8 B); frozen parameters in their configured dtype. Per GPU under DDP (every rank holds
  all of it).
* **Time** = samples x FLOPs per sample / (GPUs x peak x MFU). Peak is the GPU's dense bf16 tensor-core rate; MFU is
  ``--mfu`` (default 0.4), or the stage's value measured by ``benchmarks/gpu.py`` in ``benchmarks/results/gpu.json``
  when that exists (the estimate says which). The research notes' ``6TP/(nXu)`` (§1.7; T tokens, P parameters the
  tokens pass through) is shown beside it as a cross-check; it assumes every parameter is trained, so it reads high
  for the frozen-LLM stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from unittest import mock
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.fx.experimental import _config as fx_config
from torch.utils.flop_counter import FlopCounterMode

from hilight.env import project_root, resolve_path

log = logging.getLogger(__name__)

GPU_RESULTS = Path("benchmarks/results/gpu.json")  # written by benchmarks/gpu.py
DEFAULT_MFU = 0.4
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_BYTES = {name: torch.finfo(dtype).bits // 8 for name, dtype in DTYPES.items()}
# text tokens per sample beside the video tokens when the data cannot say (benchmarks/gpu.py's shapes: a Valley QA
# pair for stage 1, a longer VideoInstruct answer for stage 2)
DEFAULT_TEXT_TOKENS = {"stage1": 128, "stage2": 256}


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    memory_gib: float


GPUS = {
    "h100": GPU("NVIDIA H100 SXM 80GB", 989e12, 80),
    "h200": GPU("NVIDIA H200 141GB", 989e12, 141),
    "a100": GPU("NVIDIA A100 80GB", 312e12, 80),
    "a100-40gb": GPU("NVIDIA A100 40GB", 312e12, 40),
    "l40s": GPU("NVIDIA L40S 48GB", 362e12, 48),
    "rtx4090": GPU("NVIDIA RTX 4090 24GB", 165e12, 24),
}


@dataclass
class StepCount:
    """One batch-1 training step on the meta device."""

    flops: int  # forward + backward
    forward_flops: int
    saved_bytes: int  # activations saved for backward
    saved_outside_layers: int  # of which outside the checkpointable layers
    layer_inputs: int  # bytes of the checkpointable layers' inputs
    largest_layer: int  # saved bytes of the largest checkpointable layer


@dataclass
class Estimate:
    stage: str
    config: str
    what: str
    gpu: str
    gpus: int
    batch_per_gpu: int
    tokens_per_sample: dict[str, int]
    flops_per_sample: float  # model FLOPs of one training sample (forward + backward)
    tower_flops_per_clip: float | None  # stages 1-2: the frozen towers' forward, once per clip into the cache
    towers_every_step: bool
    params: dict[str, int]  # trainable / frozen
    memory_gib: dict[str, float]
    samples: int | None
    samples_source: str
    mfu: float
    mfu_source: str
    epoch_hours: float | None
    cache_fill_hours: float | None
    run: dict[str, float]  # steps, samples, epochs, hours of the configured max_steps
    notes_6tp: dict[str, float | None] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ counting


def count_step(step: Callable[[], torch.Tensor], params: list[nn.Parameter], layers: list[nn.Module]) -> StepCount:
    """FLOPs and saved-for-backward bytes of ``step()`` (which returns the loss) and its backward. ``layers`` are
    the modules gradient checkpointing would wrap (their saved bytes are kept apart)."""
    param_storages = {p.untyped_storage()._cdata for p in params}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # hold the tensors so storage ids are not reused during the pass
    per_layer = [0] * len(layers)
    inputs = [0] * len(layers)
    current: list[int] = []
    bytes_outside = [0]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in param_storages:
            seen.add(key)
            keep.append(t)
            if current:
                per_layer[current[-1]] += storage.nbytes()
            else:
                bytes_outside[0] += storage.nbytes()
        return t

    def enter(i: int):
        def hook(module, args, kwargs):
            current.append(i)
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, torch.Tensor):
                inputs[i] = first.numel() * first.element_size()
        return hook

    def leave(module, args, output):
        current.pop()

    handles = [h for i, m in enumerate(layers) for h in (m.register_forward_pre_hook(enter(i), with_kwargs=True),
                                                          m.register_forward_hook(leave))]
    try:
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
            forward = counter.get_total_flops()
            loss.backward()
        total = counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()
    return StepCount(int(total), int(forward), bytes_outside[0] + sum(per_layer), bytes_outside[0], sum(inputs),
                     max(per_layer, default=0))


def forward_flops(fn: Callable[[], Any]) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _meta(shape: tuple[int, ...], dtype=torch.float32, *, ints: int | None = None) -> torch.Tensor:
    if ints is not None:
        return torch.zeros(shape, dtype=torch.long, device="meta")
    return torch.empty(shape, dtype=dtype, device="meta")


# ------------------------------------------------------------------------------------------------ stages


@dataclass
class StageModel:
    """A stage built on the meta device, ready to count."""

    stage: str
    what: str
    step: Callable[[], torch.Tensor]
    params_trained: int
    params_frozen_resident: dict[str, tuple[int, str]]  # part -> (parameters, dtype) held during training
    params_frozen_total: int
    layers: list[nn.Module]
    trained: list[nn.Parameter]
    tokens: dict[str, int]
    tower_forward: Callable[[], Any] | None = None
    towers_every_step: bool = False
    module: nn.Module | None = None  # everything built (its parameters are not activations)


def _dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def _feature_cache_on(features) -> bool:
    """Whether the towers' features come from the cache (``mode: cache``; older configs: ``enabled: true``)."""
    mode = getattr(features, "mode", None)
    return mode == "cache" if mode is not None else bool(getattr(features, "enabled", True))


def _compute_dtype(mixed_precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


_torch_autocast = torch.autocast


def _autocast(device_type: str, *args, **kwargs):
    return contextlib.nullcontext() if device_type == "meta" else _torch_autocast(device_type, *args, **kwargs)


def build_stage0(config) -> StageModel:
    """CLIP-ViP trained whole with the alignment objective; one caption and its clip per sample."""
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.train.alignment import AlignmentObjective

    cfg = load_preset(config.model.preset, config.model.overrides)
    dtype = _compute_dtype(config.train.mixed_precision)
    with torch.device("meta"):
        model = build_clipvip(cfg).to(dtype).train()
    objective = AlignmentObjective(config.loss, cfg)
    length = config.tokenizer.max_length
    size = cfg.vision.image_size
    batch = {"pixel_values": _meta((1, cfg.num_frames, 3, size, size), dtype), "input_ids": _meta((1, length), ints=1),
             "attention_mask": torch.ones(1, length, dtype=torch.long, device="meta"),
             "video_index": torch.zeros(1, dtype=torch.long, device="meta"),
             "groups": torch.zeros(1, dtype=torch.long, device="meta")}
    params = list(model.parameters())
    layers = list(model.vision_model.encoder.layers) if hasattr(model.vision_model, "encoder") else []
    def step() -> torch.Tensor:
        # transformers asks whether the text padding mask is all ones (a data-dependent .item(), impossible on meta
        # tensors) to skip building the causal mask; answering "no" builds it from shapes, same FLOPs either way
        # the language mask indexes by a boolean mask (nonzero); on meta torch may assume every element is set
        # and the local loss turns autocast off, which has no meta variant (nothing to turn off there)
        with mock.patch("transformers.masking_utils._ignore_causal_mask_sdpa", return_value=False), \
                fx_config.patch(meta_nonzero_assume_all_nonzero=True), mock.patch.object(torch, "autocast", _autocast):
            return objective(model, batch)["loss"]

    return StageModel("stage0", f"CLIP-ViP {config.model.preset} ({cfg.num_frames}x{size}px, {cfg.seq_len} vision "
                      f"tokens) + text ({length} tokens), trained whole with the alignment objective",
                      step, sum(p.numel() for p in params), {}, 0, layers, params,
                      {"vision": cfg.seq_len, "text": length}, module=model)


def _llm_config(llm_spec, llm_preset: str | None):
    """The LLM's architecture: the local directory's config.json when present (no weights are read), else a preset
    (``--llm-preset``, or the preset named in the directory's name, e.g. gemma-2b in model_zoo/.../gemma-2b-it)."""
    from transformers import GemmaConfig

    from hilight.models.vlm import PRESET_DIR, gemma_config

    directory = resolve_path(llm_spec.dir)
    if llm_preset is None and (directory / "config.json").is_file():
        cfg = GemmaConfig.from_pretrained(str(directory))
        cfg.hidden_act = cfg.hidden_activation = llm_spec.hidden_act
        return cfg, f"{directory}/config.json"
    names = sorted((p.stem for p in PRESET_DIR.glob("*.json")), key=len, reverse=True)
    name = llm_preset or next((n for n in names if n in directory.name), None)
    if name is None:
        raise ValueError(f"{directory} has no config.json and its name names no Gemma preset ({', '.join(names)}); "
                         "pass --llm-preset")
    return gemma_config(name, hidden_act=llm_spec.hidden_act), f"preset {name}"


def _longclip_config(vision):
    from hilight.models.longclip import longclip_preset

    if vision.longclip_random_init:
        return longclip_preset(vision.longclip_random_init), f"preset {vision.longclip_random_init}"
    name = vision.longclip_preset or "longclip-b16"  # null (the file's own) is estimated as LongCLIP-B
    return longclip_preset(name), f"preset {name} (vision.longclip_preset)"


def build_vlm_stage(config, stage: str, text_tokens: int, llm_preset: str | None) -> StageModel:
    """Stage 1 (TokenMining trained, towers and LLM frozen) or stage 2 (LoRA on the LLM, TokenMining tuned or not)
    at the config's shapes, on the meta device."""
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.models.longclip import LongCLIPImageTower
    from hilight.models.token_mining import TokenMining, TokenMiningConfig
    from hilight.models.vlm import HiLightVLM, build_llm

    clip_cfg = load_preset(config.vision.clipvip_preset)
    lc_cfg, lc_source = _longclip_config(config.vision)
    llm_cfg, llm_source = _llm_config(config.llm, llm_preset)
    llm_dtype = _dtype(config.llm.dtype)
    with torch.device("meta"):
        clipvip = build_clipvip(clip_cfg).eval()
        clipvip.text_model = None
        longclip = LongCLIPImageTower(lc_cfg).eval()
        llm = build_llm(llm_cfg, dtype=llm_dtype)
        tm = TokenMining(TokenMiningConfig(video_dim=clip_cfg.vision.hidden_size, image_dim=lc_cfg.projection_dim,
                                           llm_dim=llm_cfg.hidden_size, expand=config.token_mining.expand,
                                           depth=config.token_mining.depth))
        vlm = HiLightVLM(llm, tm)
        vlm.requires_grad_(False)
        if stage == "stage2":
            from hilight.train.lora import apply_lora

            apply_lora(vlm, config.lora, seed=0)
        else:
            tm.requires_grad_(True)
    frames = clip_cfg.num_frames
    size = clip_cfg.vision.image_size
    n_video = tm.config.num_tokens(frames)
    text = max(2, min(text_tokens, config.data.max_length - n_video))
    pixels = _meta((1, frames, 3, size, size))
    with torch.no_grad():
        video_shape = clipvip.encode_video(pixels).last_hidden_state.shape
        frame_shape = longclip(pixels).shape
    video, frame = _meta(tuple(video_shape)), _meta(tuple(frame_shape))
    half = text // 2

    def step() -> torch.Tensor:
        # HiLightVLM.splice at batch 1 without its data-dependent indexing (meta tensors hold no ids): text
        # embeddings, the video tokens (scaled like Gemma's embeddings), the rest of the text; answer half supervised
        tokens = vlm.token_mining(video, frame).to(llm_dtype) * vlm.embed_scale
        embed = vlm.llm.get_input_embeddings()
        ids = _meta((1, text - 1), ints=1)
        emb = embed(ids)
        x = torch.cat([emb[:, :1], tokens, emb[:, 1:]], dim=1)
        labels = torch.cat([torch.full((1, x.shape[1] - half), -100, device="meta"), _meta((1, half), ints=1)], dim=1)
        positions = torch.arange(x.shape[1], device="meta")[None]
        return vlm.llm(inputs_embeds=x, position_ids=positions, labels=labels).loss

    trained = [p for p in vlm.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    n_llm = sum(p.numel() for n, p in vlm.llm.named_parameters() if not p.requires_grad)
    n_tm_frozen = sum(p.numel() for p in tm.parameters() if not p.requires_grad)
    n_towers = sum(p.numel() for p in clipvip.parameters()) + sum(p.numel() for p in longclip.parameters())
    cache = _feature_cache_on(config.features)
    resident = {"llm": (n_llm, config.llm.dtype)}
    if n_tm_frozen:
        resident["token_mining"] = (n_tm_frozen, "float32")
    if not cache:
        resident["towers"] = (n_towers, "float32")  # loaded as saved (fp32) and kept for every step
    base = vlm.llm.get_base_model() if hasattr(vlm.llm, "get_base_model") else vlm.llm
    trained_what = "TokenMining" if stage == "stage1" else config.lora.describe()
    what = (f"CLIP-ViP {config.vision.clipvip_preset} + Long-CLIP {lc_source} (frozen) -> TokenMining "
            f"({n_video} video tokens) -> LLM {llm_source} ({config.llm.dtype}); trained: {trained_what}; "
            f"{text} text tokens per sample")

    def towers() -> None:
        clipvip.encode_video(pixels)
        longclip(pixels)

    return StageModel(stage, what, step, n_trained, resident, n_llm + n_tm_frozen + n_towers, list(base.model.layers),
                      trained, {"video": n_video, "text": text, "llm": n_video + text - 1}, towers, not cache, vlm)


# ------------------------------------------------------------------------------------------------ data, MFU


def dataset_samples(config, stage: str) -> tuple[int | None, str]:
    """Training samples per epoch from the config's validated manifest; (None, why) when it does not exist."""
    manifest = resolve_path(config.data.manifest_dir)
    if not (manifest / "manifest.json").is_file():
        return None, f"no manifest at {manifest}"
    d = config.data
    if stage == "stage0":
        from hilight.data.captions import read_caption_manifest

        return len(read_caption_manifest(manifest).select(d.train_datasets, d.train_splits)), f"manifest {manifest}"
    from hilight.data.qa import read_qa_manifest

    if stage == "stage1":
        return len(read_qa_manifest(manifest).select(d.train_datasets, d.train_splits)), f"manifest {manifest}"
    from hilight.train.lora import source_rows

    # the rows stage 2 trains on (a source's holdout left out), one describe sample per video as it builds them
    total = sum(source.ratio * len(rows) for source, rows in zip(d.sources, source_rows(d, "train"), strict=True))
    return int(total), f"manifest {manifest} (sources weighted by ratio)"


def measured_mfu(stage: str, path: Path | None = None) -> tuple[float | None, str]:
    """The stage's MFU measured by benchmarks/gpu.py, when its results file has one."""
    path = path or project_root() / GPU_RESULTS
    if not path.is_file():
        return None, ""
    results = json.loads(path.read_text())
    value = (results.get("stages", {}).get(stage) or {}).get("mfu")
    if value is None:
        return None, ""
    return float(value), f"measured by benchmarks/gpu.py on {results.get('device', 'an unknown device')} ({path})"


# ------------------------------------------------------------------------------------------------ estimate


STAGES = {"clipvip_alignment": "stage0", "tokenmining_pretrain": "stage1", "lora_finetune": "stage2"}


def estimate(config: BaseModel, config_path: str, *, gpu: str = "h100", gpus: int = 1, mfu: float | None = None,
             samples: int | None = None, text_tokens: int | None = None, llm_preset: str | None = None,
             gpu_results: Path | None = None) -> Estimate:
    """The cost of training ``config`` (a clipvip_alignment, tokenmining_pretrain or lora_finetune config)."""
    kind = getattr(config, "pipeline", None)
    if kind not in STAGES:
        raise ValueError(f"{config_path} is a {kind!r} config; `hilight estimate` takes the training stages "
                         f"{', '.join(STAGES)}")
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    if gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {gpus}")
    stage = STAGES[kind]
    model = (build_stage0(config) if stage == "stage0" else
             build_vlm_stage(config, stage, text_tokens or DEFAULT_TEXT_TOKENS[stage], llm_preset))
    count = count_step(model.step, list(model.module.parameters()), model.layers)
    tower = forward_flops(model.tower_forward) if model.tower_forward else None
    per_sample = count.flops + (tower if model.towers_every_step and tower else 0)

    t = config.train
    batch = t.batch_size * t.grad_accum
    memory = _memory(model, count, t.batch_size, t.gradient_checkpointing)
    if mfu is not None:
        mfu_source = "--mfu"
    else:
        mfu, mfu_source = measured_mfu(stage, gpu_results)
        if mfu is None:
            mfu, mfu_source = DEFAULT_MFU, "default (no measured MFU for this stage in benchmarks/results/gpu.json)"
    spec = GPUS[gpu]
    rate = gpus * spec.peak_flops * mfu  # useful FLOP/s of the whole job
    if samples is not None:
        source = "--samples"
    else:
        samples, source = dataset_samples(config, stage)
    epoch_h = samples * per_sample / rate / 3600 if samples else None
    fill_h = (samples * tower / rate / 3600) if (samples and tower and not model.towers_every_step) else None
    run_samples = t.max_steps * batch * gpus
    run = {"max_steps": t.max_steps, "samples": run_samples, "hours": run_samples * per_sample / rate / 3600,
           "epochs": run_samples / samples if samples else math.nan}
    tokens = model.tokens.get("llm", sum(model.tokens.values()))
    p_notes = model.params_trained + (model.params_frozen_resident.get("llm", (0, ""))[0])
    six = 6 * samples * tokens * p_notes / rate / 3600 if samples else None
    notes = {"tokens_per_sample": tokens, "parameters": p_notes, "hours_6tp": six,
             "hours_8tp_recompute": six * 8 / 6 if six and t.gradient_checkpointing else None,
             "counted_over_6tp": per_sample / (6 * tokens * p_notes)}
    return Estimate(stage, config_path, model.what, spec.name, gpus, t.batch_size, model.tokens, float(per_sample),
                    float(tower) if tower else None, model.towers_every_step,
                    {"trainable": model.params_trained, "frozen": model.params_frozen_total}, memory, samples, source,
                    mfu, mfu_source, epoch_h, fill_h, run, notes)


def _memory(model: StageModel, count: StepCount, batch: int, checkpointing: bool) -> dict[str, float]:
    gib = 1024 ** 3
    frozen = sum(n * DTYPE_BYTES[dtype] for n, dtype in model.params_frozen_resident.values())
    trained = model.params_trained
    act = count.saved_bytes * batch
    act_ckpt = (count.saved_outside_layers + count.layer_inputs + count.largest_layer) * batch
    weights = frozen + 4 * trained
    grads, optim = 4 * trained, 8 * trained
    out = {"weights": weights / gib, "gradients": grads / gib, "optimizer": optim / gib,
           "activations": act / gib, "activations_checkpointed_estimate": act_ckpt / gib,
           "checkpointing": float(checkpointing)}
    out["total"] = (weights + grads + optim + (act_ckpt if checkpointing else act)) / gib
    return out


# ------------------------------------------------------------------------------------------------ output


def _fmt_hours(h: float | None) -> str:
    if h is None or (isinstance(h, float) and math.isnan(h)):
        return "n/a"
    return f"{h:,.1f} h ({h / 24:,.1f} days)" if h >= 48 else f"{h:,.2f} h"


def format_table(e: Estimate) -> str:
    """The estimate as aligned ``label  value`` lines."""
    m = e.memory_gib
    ckpt = "on" if m["checkpointing"] else "off"
    rows = [
        ("stage", f"{e.stage} ({e.config})"),
        ("model", e.what),
        ("parameters", f"{e.params['trainable']:,} trainable, {e.params['frozen']:,} frozen"),
        ("tokens / sample", ", ".join(f"{k} {v:,}" for k, v in e.tokens_per_sample.items())),
        ("FLOPs / sample", f"{e.flops_per_sample:.3e} (counted: FlopCounterMode, one batch-1 training step on the "
                           "meta device, forward + backward)"),
    ]
    if e.tower_flops_per_clip:
        rows.append(("tower FLOPs / clip", f"{e.tower_flops_per_clip:.3e} forward, "
                     + ("every step (feature cache off)" if e.towers_every_step else "once per clip into the cache")))
    rows += [
        ("memory / GPU", f"{m['total']:.1f} GiB at batch {e.batch_per_gpu} (gradient checkpointing {ckpt})"),
        ("  weights", f"{m['weights']:.2f} GiB"),
        ("  gradients", f"{m['gradients']:.2f} GiB"),
        ("  AdamW state", f"{m['optimizer']:.2f} GiB"),
        ("  activations", f"{m['activations']:.2f} GiB measured without checkpointing, "
                          f"{m['activations_checkpointed_estimate']:.2f} GiB estimated with it"),
        ("GPU", f"{e.gpus} x {e.gpu}, MFU {e.mfu:.2f} ({e.mfu_source})"),
        ("samples / epoch", f"{e.samples:,} ({e.samples_source})" if e.samples else
         f"unknown ({e.samples_source}); pass --samples N"),
        ("epoch", _fmt_hours(e.epoch_hours)),
    ]
    if e.cache_fill_hours is not None:
        rows.append(("feature cache fill", _fmt_hours(e.cache_fill_hours) + " (first epoch only)"))
    r = e.run
    epochs = "" if math.isnan(r["epochs"]) else f", {r['epochs']:.2f} epochs"
    rows.append(("configured run", f"{_fmt_hours(r['hours'])}: {r['max_steps']:,} steps x {e.batch_per_gpu} x "
                                   f"{e.gpus} GPU(s) = {r['samples']:,} samples{epochs}"))
    n = e.notes_6tp
    if n.get("hours_6tp") is not None:
        extra = (f"; 8TP with recompute {_fmt_hours(n['hours_8tp_recompute'])}"
                 if n.get("hours_8tp_recompute") else "")
        rows.append(("notes' 6TP/(nXu)", f"{_fmt_hours(n['hours_6tp'])} per epoch (T = {n['tokens_per_sample']:,} "
                                         f"tokens x samples, P = {n['parameters']:,}){extra}; counted / 6TP = "
                                         f"{n['counted_over_6tp']:.2f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
