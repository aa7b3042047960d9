"""Every training stage, eval generation and the CLIP-ViP attention forms, measured on one GPU (issue 14, item 7).

    PYTHONPATH=. python benchmarks/gpu.py                  # real shapes, random weights, bf16; ~5 min on one H200
    PYTHONPATH=. python benchmarks/gpu.py --smoke          # the same code at tiny shapes, on CPU in well under 2 min

Stages, each ``--warmup`` steps (the first counts FLOPs, the second measures memory) then ``--steps`` timed steps
of forward + backward + gradient clipping + AdamW step, at the recipes' per-GPU batch sizes
(``configs/alignment_clipvip_b16.yaml``: 10 captions; ``configs/tokenmining_hilight_2b.yaml`` and
``configs/lora_hilight_2b.yaml``: 5 samples):

stage0      CLIP-ViP ViP-B/16, 12 x 224 px (2356 vision tokens) + CLIP text tower (50 tokens), trained whole with the
            real ``AlignmentObjective`` and the loss block of ``alignment_clipvip_b16.yaml`` (global + SPARC local
            loss before the projector, keep 36 of 2356); fp32 weights under bf16 autocast (accelerate's
            ``mixed_precision: bf16``). One distinct video per caption (the most vision work a batch can hold).
stage1      both frozen towers (CLIP-ViP B/16 and Long-CLIP ViT-B/16, bf16) on the clip -> TokenMining (reference
            depth, 384 video tokens, fp32, trained) -> frozen Gemma-2B-shaped LLM (bf16) with the LM loss on
            ``--stage1-text`` text tokens; through ``HiLightVLM.forward`` (the towers run every step, as when the
            feature cache is off or being filled).
stage2      the same model with peft LoRA r64/alpha32 on q/k/v/o/gate/up/down (``hilight.train.lora.apply_lora`` with
            the lora block of ``lora_hilight_2b.yaml``), TokenMining frozen, ``--stage2-text`` text tokens.
attention   the CLIP-ViP vision tower forward + backward at batch 1 and 8, factorised proxy attention vs the same
            weights under the dense [S, S] boolean mask (``ViPAttention.dense``); both forms' outputs compared in fp32;
            on CUDA also whether the factorised path runs on the flash kernel alone.
generation  ``HiLightVLM.generate`` on a batch of left-padded prompts with a video each, everything in bf16, greedy,
            a fixed number of new tokens.
zero2       stage 2 under ``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 1``
            (a subprocess), only on CUDA with ``deepspeed`` importable; otherwise skipped with the reason.

Reported per stage: samples/s and tokens/s (tokens = what the towers / LLM see per sample: 2356 + 50 for stage 0,
video tokens + text for stages 1-2), peak memory, model FLOPs per step counted by ``torch.utils.flop_counter``
(``FlopCounterMode`` over one whole step: matmuls, convolutions and SDPA, forward and backward; elementwise work is
not counted, so MFU is slightly conservative), MFU against the device's dense bf16 peak (``PEAK_BF16_FLOPS``; "n/a"
on CPU or an unknown device), and the projected hours per epoch of Valley-703K and VideoInstruct-100K on ONE device
(divide by the GPU count). Peak memory comes from the allocator: on CUDA ``torch.cuda.max_memory_allocated`` over
one step (weights, gradients, optimizer state and activations: what must fit on the card); on CPU ``torch.profiler``
with ``profile_memory=True``, the peak of the allocations made during one step above those alive at its start.

The JSON (``--json-out``, default ``benchmarks/results/gpu.json``) is rewritten after every section, so a run cut
short still leaves what it measured. Its schema: ``{"device", "date", "dtype", "smoke", "stages": {"stage0" |
"stage1" | "stage2": {"samples_per_s", "tokens_per_s", "peak_mem_gb", "flops_per_step", "mfu", "epoch_hours":
{"valley703k", "videoinstruct100k"}, ...}}, "attention": {...}, "generation": {...}, "zero2": {...}}``.

Imports: torch, transformers, peft, accelerate, pydantic (hilight's presets and specs), pyyaml, pandas (through
``hilight.data``) — never ZenML, MLflow or decord, so it runs on a bare GPU machine. The training-code imports
(``hilight.train.alignment``, ``hilight.train.lora``) happen inside the stages that use them.

On the lent GPU machine (no registry there; pydantic and its dependencies travel as wheels in ``.whl``, see
``/work/.library/device/README.md``, Notes), the ``run`` tool's command, with ``carry: [".whl"]`` and
``timeout_s: 450`` (the JSON is rewritten after every section, so a cut-short run still returns what it measured;
rerun a part with ``--skip``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; nvidia-smi --query-gpu=name,memory.total --format=csv; PYTHONUNBUFFERED=1 timeout 420 python3 benchmarks/gpu.py --json-out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

Fill ``.whl`` first, here, once (``echo /.whl/ >> .git/info/exclude``; 4.7 MB): pydantic==2.12.5 pydantic-core==2.41.5
typing-extensions==4.16.0 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0, each with ``python3 -m pip
download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION``, and DeepSpeed, which PyPI
ships as source only: ``pip download --no-deps --no-binary=:all: deepspeed==0.19.8`` then ``.venv/bin/python -m pip
wheel --no-deps --no-build-isolation deepspeed-0.19.8.tar.gz -w .whl`` (a pure-Python wheel; its other needs are on
the GPU machine). Rehearsed on CPU (2026-12-02) in a clean venv holding only torch, transformers, accelerate, peft,
safetensors, pandas, pyarrow (+ einops, msgpack, ninja, py-cpuinfo, as there): the line above with ``--smoke``, and
the ZeRO-2 worker under ``accelerate launch`` with DeepSpeed's CPU accelerator.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import itertools
import json
import logging
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from hilight.config import deep_merge
from hilight.data.conversations import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from hilight.models.clipvip import CLIPViPConfig, build_clipvip, load_preset
from hilight.models.longclip import LongCLIPImageTower, longclip_preset
from hilight.models.token_mining import TokenMining, TokenMiningConfig
from hilight.models.vlm import HiLightVLM, build_llm, freeze_all_but, gemma_config

log = logging.getLogger("benchmarks.gpu")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu.json"
# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name in this order.
# H100 is the SXM figure; an H100 PCIe peaks at 756e12, so its MFU reads low by that ratio.
PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("4090", 165e12))
EPOCH_SAMPLES = {"valley703k": 703_000, "videoinstruct100k": 100_000}
GEMMA_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}  # Gemma's tokenizer (hilight-reference §1.5)


@dataclass(frozen=True)
class Shapes:
    """What one run measures. ``FULL`` is the recipes' shapes; ``SMOKE`` the same structure at test size."""

    clipvip_preset: str
    longclip_preset: str
    gemma_preset: str
    vocab_size: int | None  # None = the preset's
    tm_expand: int  # TokenMining query tokens per frame (32 -> 12 x 32 = 384 video tokens)
    caption_len: int  # CLIP text tokens (alignment_clipvip_b16.yaml: tokenizer.max_length 50)
    stage0_batch: int | None  # None = the config's train.batch_size (per GPU)
    stage1_batch: int | None
    stage2_batch: int | None
    stage1_text: int  # text tokens per sample beside the video tokens (a Valley QA pair)
    stage2_text: int  # (a VideoInstruct QA pair: longer answers)
    gen_batch: int  # eval_batch_size of the stage configs
    gen_prompt: int  # longest prompt, text tokens
    gen_new_tokens: int
    attention_batches: tuple[int, ...]
    warmup: int  # >= 2: the first step counts FLOPs, the second measures memory
    steps: int
    loss_overrides: dict = field(default_factory=dict)  # deep-merged into the stage-0 loss block
    longclip_overrides: dict = field(default_factory=dict)  # set on the Long-CLIP preset's config


FULL = Shapes(clipvip_preset="clipvip-b16", longclip_preset="longclip-b16", gemma_preset="gemma-2b", vocab_size=None,
              tm_expand=32, caption_len=50, stage0_batch=None, stage1_batch=None, stage2_batch=None, stage1_text=128,
              stage2_text=256, gen_batch=16, gen_prompt=64, gen_new_tokens=128, attention_batches=(1, 8), warmup=3,
              steps=10)
SMOKE = Shapes(clipvip_preset="tiny", longclip_preset="tiny", gemma_preset="tiny", vocab_size=512, tm_expand=4,
               caption_len=16, stage0_batch=4, stage1_batch=2, stage2_batch=2, stage1_text=16, stage2_text=24,
               gen_batch=3, gen_prompt=12, gen_new_tokens=4, attention_batches=(1, 2), warmup=2, steps=2,
               loss_overrides={"local": {"keep": 8}},  # the tiny preset has 100 vision tokens, not 2356
               longclip_overrides={"image_size": 32, "patch_size": 8})  # both towers read the same 32 px clip


# ------------------------------------------------------------------------------------------------ measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int, int]:
    """Run ``fn`` once: (its result, bytes allocated at the start, peak bytes allocated during it above the start).

    From the allocator, not RSS: on CUDA ``memory_allocated`` / ``max_memory_allocated``; on CPU the profiler's
    allocation events (``profile_memory=True``), summed in time order — the CPU allocator keeps no running total,
    so the start figure is 0 there."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, start, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    # every allocation (+) and free (-) is a "[memory]" event with nbytes; the public FunctionEvent view drops
    # those attributed to operators, so read the kineto events
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return out, 0, max(itertools.accumulate((n for _, n in events), initial=0))


# torch's flop counter knows the CUDA SDPA kernels but not the CPU one; the same formulas count it, so the smoke
# run's FLOPs include attention as the GPU run's do
def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:  # the op's arguments, as shapes
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_sdpa_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


CPU_SDPA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
                  torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(result, FLOPs) of one call, counted by ``torch.utils.flop_counter`` (forward and backward)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def device_peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, dense bf16 peak FLOP/s or None when unknown)."""
    if device.type != "cuda":
        return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


@dataclass
class StepStats:
    batch: int
    tokens_per_sample: int
    step_s: float
    samples_per_s: float
    tokens_per_s: float
    peak_mem_gb: float
    flops_per_step: int | None
    tflops_per_s: float | None
    mfu: float | None
    epoch_hours: dict[str, float]


def measure(step: Callable[[], Any], *, batch: int, tokens_per_sample: int, shapes: Shapes, device: torch.device,
            count: bool = True) -> StepStats:
    """Warm-up (FLOP count, memory) then ``shapes.steps`` timed calls of ``step``."""
    flops = count_flops(step)[1] if count else None
    _, start, extra = peak_bytes(step, device)
    for _ in range(shapes.warmup - 2):
        step()
    sync(device)
    began = time.perf_counter()
    for _ in range(shapes.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - began) / shapes.steps
    peak = device_peak_flops(device)[1]
    achieved = flops / step_s if flops else None
    samples_per_s = batch / step_s
    return StepStats(batch=batch, tokens_per_sample=tokens_per_sample, step_s=step_s, samples_per_s=samples_per_s,
                     tokens_per_s=samples_per_s * tokens_per_sample, peak_mem_gb=(start + extra) / 1e9,
                     flops_per_step=flops, tflops_per_s=achieved / 1e12 if achieved else None,
                     mfu=achieved / peak if achieved and peak else None,
                     epoch_hours={k: n / samples_per_s / 3600 for k, n in EPOCH_SAMPLES.items()})


def autocast(device: torch.device):
    """bf16 autocast, as accelerate's ``mixed_precision: bf16`` runs the recipes."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(loss_fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
               device: torch.device, after: Callable[[], None] | None = None) -> Callable[[], None]:
    """One optimizer step as ``hilight.train.loop.fit`` takes it: autocast forward, backward, clip at 1.0, AdamW."""

    def step() -> None:
        with autocast(device):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if after is not None:
            after()
        optimizer.zero_grad(set_to_none=True)

    return step


def read_config(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ inputs


def caption_batch(cfg: CLIPViPConfig, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Stage-0 batch: one video per caption. Captions of random length, EOS-terminated and EOS-padded (CLIP)."""
    g = torch.Generator().manual_seed(0)
    eos = cfg.text.eos_token_id
    ids = torch.randint(2, cfg.text.vocab_size - 2, (batch, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = cfg.text.bos_token_id
    ids = torch.where(mask.bool(), ids, eos)
    ids[torch.arange(batch), lengths - 1] = eos
    size = cfg.vision.image_size
    return {"pixel_values": torch.randn(batch, cfg.num_frames, 3, size, size, generator=g).to(device),
            "input_ids": ids.to(device), "attention_mask": mask.to(device),
            "video_index": torch.arange(batch, device=device), "groups": torch.arange(batch, device=device)}


def qa_batch(vlm: HiLightVLM, batch: int, text: int, device: torch.device, *, left_pad: bool = False
             ) -> dict[str, torch.Tensor]:
    """VLM batch: ``<bos> <video> text...``; the second half of the text is the supervised answer. With
    ``left_pad``, prompt lengths vary (up to a quarter shorter) and are padded on the left, as generation batches."""
    g = torch.Generator().manual_seed(0)
    clip = vlm.clipvip.config
    ids = torch.randint(3, vlm.llm.config.vocab_size, (batch, text), generator=g)
    ids[:, 0], ids[:, 1] = GEMMA_IDS["bos_token_id"], VIDEO_TOKEN_INDEX
    mask = torch.ones(batch, text, dtype=torch.long)
    if left_pad:
        for i in range(batch):
            pad = (i % 4) * text // 8
            ids[i] = torch.cat([torch.full((pad,), GEMMA_IDS["pad_token_id"]), ids[i, :text - pad]])
            mask[i, :pad] = 0
    labels = ids.clone()
    labels[:, :text // 2] = IGNORE_INDEX
    size = clip.vision.image_size
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(batch, clip.num_frames, 3, size, size, generator=g).to(device)}


def build_vlm(shapes: Shapes, device: torch.device) -> HiLightVLM:
    """Random-weight HiLight at ``shapes``: towers and LLM in bf16, TokenMining in fp32 (it is trained)."""
    clip_cfg = load_preset(shapes.clipvip_preset)
    lc_cfg = longclip_preset(shapes.longclip_preset)
    for key, value in shapes.longclip_overrides.items():
        setattr(lc_cfg, key, value)
    llm_cfg = gemma_config(shapes.gemma_preset, vocab_size=shapes.vocab_size, hidden_act="gelu", **GEMMA_IDS)
    with torch.device(device):  # built where it runs: a 2.5B-parameter init on the CPU alone takes minutes
        clipvip = build_clipvip(clip_cfg, seed=0).to(torch.bfloat16)
        longclip = LongCLIPImageTower(lc_cfg).to(torch.bfloat16)
        llm = build_llm(llm_cfg, seed=0, dtype=torch.bfloat16)
        tm = TokenMining(TokenMiningConfig(video_dim=clip_cfg.vision.hidden_size, image_dim=lc_cfg.projection_dim,
                                           llm_dim=llm_cfg.hidden_size, expand=shapes.tm_expand))
    return HiLightVLM(llm, tm, clipvip, longclip)


def vlm_tokens(vlm: HiLightVLM, text: int) -> int:
    """Positions the LLM sees per sample: text minus the placeholder plus the video tokens."""
    return text - 1 + vlm.token_mining.config.num_tokens(vlm.clipvip.config.num_frames)


# ------------------------------------------------------------------------------------------------ stages


def stage0(shapes: Shapes, device: torch.device) -> dict:
    from hilight.train.alignment import AlignmentObjective, LossSpec  # training code: imported only here

    raw = read_config("alignment_clipvip_b16.yaml")
    spec = LossSpec.model_validate(deep_merge(raw["loss"], shapes.loss_overrides))
    batch_size = shapes.stage0_batch or raw["train"]["batch_size"]
    cfg = load_preset(shapes.clipvip_preset)
    with torch.device(device):
        model = build_clipvip(cfg, seed=0).train()
    objective = AlignmentObjective(spec, cfg)
    batch = caption_batch(cfg, batch_size, shapes.caption_len, device)
    params = list(model.parameters())
    step = train_step(lambda: objective(model, batch)["loss"], params, adamw(params, raw["train"]), device,
                      model.clamp_logit_scale)
    stats = measure(step, batch=batch_size, tokens_per_sample=cfg.seq_len + shapes.caption_len, shapes=shapes,
                    device=device)
    return {**asdict(stats), "trainable_params": sum(p.numel() for p in params),
            "what": f"CLIP-ViP {shapes.clipvip_preset} {cfg.num_frames}x{cfg.vision.image_size}px ({cfg.seq_len} "
                    f"tokens) + text {shapes.caption_len}, AlignmentObjective (global + local), trained whole"}


def adamw(params: list[torch.nn.Parameter], train: dict) -> torch.optim.AdamW:
    """AdamW with a recipe's ``train:`` block settings."""
    return torch.optim.AdamW(params, lr=train["lr"], betas=tuple(train.get("betas", (0.9, 0.98))),
                             eps=train.get("eps", 1e-6), weight_decay=train["weight_decay"])


def train_vlm(vlm: HiLightVLM, train: dict, batch_size: int, text: int, shapes: Shapes, device: torch.device
              ) -> tuple[StepStats, int]:
    """Measure ``HiLightVLM.forward`` training steps of whatever is trainable now; (stats, trainable parameters)."""
    vlm.train()
    params = [p for p in vlm.parameters() if p.requires_grad]
    batch = qa_batch(vlm, batch_size, text, device)
    step = train_step(lambda: vlm(**batch).loss, params, adamw(params, train), device)
    stats = measure(step, batch=batch_size, tokens_per_sample=vlm_tokens(vlm, text), shapes=shapes, device=device)
    return stats, sum(p.numel() for p in params)


def stage1(vlm: HiLightVLM, shapes: Shapes, device: torch.device) -> dict:
    train = read_config("tokenmining_hilight_2b.yaml")["train"]
    trainable = freeze_all_but(vlm, ("token_mining.",))
    stats, n_params = train_vlm(vlm, train, shapes.stage1_batch or train["batch_size"], shapes.stage1_text, shapes,
                                device)
    return {**asdict(stats), "trainable_params": n_params, "trainable_tensors": len(trainable),
            "what": "towers (frozen) + TokenMining (trained) + frozen LLM, LM loss",
            "llm_attention": vlm.llm.config._attn_implementation}


def stage2(vlm: HiLightVLM, shapes: Shapes, device: torch.device) -> dict:
    from hilight.train.lora import LoRASpec, apply_lora  # training code: imported only here

    raw = read_config("lora_hilight_2b.yaml")
    spec = LoRASpec.model_validate(raw["lora"])
    apply_lora(vlm, spec, seed=0)
    stats, n_params = train_vlm(vlm, raw["train"], shapes.stage2_batch or raw["train"]["batch_size"],
                                shapes.stage2_text, shapes, device)
    return {**asdict(stats), "trainable_params": n_params,
            "what": f"towers + TokenMining (frozen) + LLM with LoRA r{spec.r}/alpha{spec.alpha} on "
                    f"{','.join(spec.target_modules)}"}


def generation(vlm: HiLightVLM, shapes: Shapes, device: torch.device) -> dict:
    """Batched, left-padded greedy generation, everything in bf16 (the LLM's dtype)."""
    vlm.to(torch.bfloat16).eval()
    batch = qa_batch(vlm, shapes.gen_batch, shapes.gen_prompt, device, left_pad=True)
    n = shapes.gen_new_tokens

    def run() -> torch.Tensor:
        return vlm.generate(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                            max_new_tokens=n, min_new_tokens=n, do_sample=False)

    out, start, extra = peak_bytes(run, device)  # also the warm-up
    if out.shape != (shapes.gen_batch, n):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected ({shapes.gen_batch}, {n}) new tokens")
    repeats = 2
    sync(device)
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    sync(device)
    call_s = (time.perf_counter() - began) / repeats
    return {"batch": shapes.gen_batch, "prompt_tokens": vlm_tokens(vlm, shapes.gen_prompt), "new_tokens": n,
            "call_s": call_s, "tokens_per_s": shapes.gen_batch * n / call_s, "peak_mem_gb": (start + extra) / 1e9,
            "what": "HiLightVLM.generate: towers + TokenMining + prefill + greedy decode, left-padded, bf16"}


def attention(shapes: Shapes, device: torch.device) -> dict:
    """Vision tower fwd+bwd, factorised vs dense-mask proxy attention, same weights; outputs compared in fp32."""
    cfg = load_preset(shapes.clipvip_preset)
    with torch.device(device):
        vision = build_clipvip(cfg, seed=0).vision_model
    layers = [layer.self_attn for layer in vision.encoder.layers]

    def set_dense(dense: bool) -> None:
        for attn in layers:
            attn.dense = dense

    size = cfg.vision.image_size
    x1 = torch.randn(1, cfg.num_frames, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    vision.eval()
    with torch.no_grad():
        outs = {}
        for dense in (False, True):
            set_dense(dense)
            outs[dense] = vision(x1).last_hidden_state
    max_diff = (outs[False] - outs[True]).abs().max().item()
    result: dict[str, Any] = {"tokens": cfg.seq_len, "max_abs_diff_fp32": max_diff, "forms": {}}
    vision.train()
    for b in shapes.attention_batches:
        x = torch.randn(b, cfg.num_frames, 3, size, size, generator=torch.Generator().manual_seed(b)).to(device)
        for dense in (False, True):
            set_dense(dense)

            def step() -> None:
                with autocast(device):
                    out = vision(x).last_hidden_state
                out.float().pow(2).mean().backward()
                vision.zero_grad(set_to_none=True)

            stats = measure(step, batch=b, tokens_per_sample=cfg.seq_len, shapes=shapes, device=device)
            result["forms"][f"b{b}_{'dense' if dense else 'factorised'}"] = {
                "batch": b, "form": "dense" if dense else "factorised", "step_s": stats.step_s,
                "peak_mem_gb": stats.peak_mem_gb, "flops_per_step": stats.flops_per_step, "mfu": stats.mfu}
            free(device)
        fact, dense_ = result["forms"][f"b{b}_factorised"], result["forms"][f"b{b}_dense"]
        result[f"b{b}_time_ratio"] = fact["step_s"] / dense_["step_s"]
    set_dense(False)
    result["flash_only"] = flash_eligible(vision, x1, device)
    return result


def flash_eligible(vision: torch.nn.Module, x: torch.Tensor, device: torch.device) -> bool | None:
    """Whether the factorised attention runs with SDPA restricted to the flash kernel (None: no CUDA)."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(device), torch.no_grad():
            vision(x)
    except RuntimeError as exc:  # "No available kernel": the inputs do not qualify for flash
        log.warning("factorised attention cannot run on the flash kernel alone: %s", exc)
        return False
    return True


# ------------------------------------------------------------------------------------------------ ZeRO-2


def zero2(shapes: Shapes, device: torch.device, smoke: bool, stage2_flops: int | None) -> dict:
    """Stage 2 under accelerate + DeepSpeed ZeRO-2 on one GPU, in a subprocess started by ``accelerate launch``."""
    reason = ("needs a CUDA device (DeepSpeed ZeRO-2)" if device.type != "cuda" else
              "deepspeed is not installed: carry its wheel (and hjson) in .whl, see the docstring"
              if importlib.util.find_spec("deepspeed") is None else None)
    if reason and smoke:  # still run the worker's code, under a plain Accelerator, so the test keeps it working
        with tempfile.TemporaryDirectory() as tmp:
            zero2_worker(shapes, Path(tmp) / "zero2.json")
            return {"skipped": reason, "rehearsal_without_deepspeed": json.loads((Path(tmp) / "zero2.json").read_text())}
    if reason:
        return {"skipped": reason}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero2.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(CONFIGS / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1", "--main_process_port",
               str(port), str(Path(__file__).resolve()), "--zero2-worker", str(out)] + (["--smoke"] if smoke else [])
        log.info("ZeRO-2: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stdout + proc.stderr)[-3000:]
            log.error("ZeRO-2 run failed (exit %d):\n%s", proc.returncode, tail)
            return {"error": f"exit code {proc.returncode}", "log_tail": tail}
        result = json.loads(out.read_text())
    if stage2_flops and result.get("step_s"):  # the same model and batch as stage 2
        result["flops_per_step"] = stage2_flops
        peak = device_peak_flops(device)[1]
        result["mfu"] = stage2_flops / result["step_s"] / peak if peak else None
    return result


def zero2_worker(shapes: Shapes, out: Path) -> None:
    """Run inside ``accelerate launch`` (DeepSpeed config from the environment): stage 2 through the accelerator."""
    from accelerate import Accelerator

    from hilight.train.loop import TrainSettings, configure_deepspeed, frozen_scalars_to_buffers
    from hilight.train.lora import LoRASpec, apply_lora

    raw = read_config("lora_hilight_2b.yaml")
    batch_size = shapes.stage2_batch or raw["train"]["batch_size"]
    accelerator = Accelerator(mixed_precision="bf16")  # as the ZeRO-2 config; a no-op autocast otherwise
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # what hilight train does under DeepSpeed (hilight.train.loop)
        configure_deepspeed(accelerator, TrainSettings.model_validate({**raw["train"], "batch_size": batch_size,
                                                                        "grad_accum": 1}))
    device = accelerator.device
    vlm = build_vlm(shapes, device)
    apply_lora(vlm, LoRASpec.model_validate(raw["lora"]), seed=0)
    if plugin is not None:
        frozen_scalars_to_buffers(vlm)
    vlm.train()
    params = [p for p in vlm.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(vlm, adamw(params, raw["train"]))
    batch = qa_batch(vlm, batch_size, shapes.stage2_text, device)

    def step() -> None:
        with accelerator.autocast():
            loss = model(**batch).loss
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    stats = measure(step, batch=batch_size, tokens_per_sample=vlm_tokens(vlm, shapes.stage2_text), shapes=shapes,
                    device=device, count=False)
    out.write_text(json.dumps({**asdict(stats), "distributed_type": str(accelerator.distributed_type),
                               "what": f"stage 2 through accelerate ({accelerator.distributed_type.value}), 1 process"}))


# ------------------------------------------------------------------------------------------------ report


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(results: dict) -> str:
    """The per-stage table, the attention comparison, generation and ZeRO-2, as plain text."""
    head = (f"{'stage':<8}{'batch':>6}{'tok/smp':>8}{'step s':>9}{'smp/s':>9}{'tok/s':>10}{'peak GB':>9}"
            f"{'TFLOP/step':>11}{'TFLOP/s':>9}{'MFU':>7}{'Valley703K h':>13}{'VI100K h':>10}")
    lines = [f"device: {results['device']}  dtype: {results['dtype']}  smoke: {results['smoke']}  "
             f"date: {results['date']}", head]
    rows = dict(results["stages"])
    if "step_s" in results.get("zero2", {}):
        rows["zero2"] = results["zero2"]
    for name, s in rows.items():
        flops = s.get("flops_per_step")
        lines.append(f"{name:<8}{s['batch']:>6}{s['tokens_per_sample']:>8}{s['step_s']:>9.4f}{s['samples_per_s']:>9.2f}"
                     f"{s['tokens_per_s']:>10.0f}{s['peak_mem_gb']:>9.3f}{fmt(flops / 1e12 if flops else None, '.4g'):>11}"
                     f"{fmt(flops / s['step_s'] / 1e12 if flops else None, '.2f'):>9}"
                     f"{fmt(s.get('mfu') and 100 * s['mfu'], '.1f'):>7}"
                     f"{s['epoch_hours']['valley703k']:>13.1f}{s['epoch_hours']['videoinstruct100k']:>10.1f}")
    if "skipped" in results.get("zero2", {}) or "error" in results.get("zero2", {}):
        z = results["zero2"]
        lines.append(f"zero2   skipped: {z['skipped']}" if "skipped" in z else f"zero2   FAILED: {z['error']}")
    att = results.get("attention")
    if att:
        lines.append(f"attention (vision tower fwd+bwd, {att['tokens']} tokens): max |factorised - dense| fp32 "
                     f"{att['max_abs_diff_fp32']:.1e}; flash kernel alone: {fmt(att['flash_only'], '')}")
        for f in att["forms"].values():
            lines.append(f"  batch {f['batch']:>2} {f['form']:<11}{f['step_s']:>9.4f} s  peak {f['peak_mem_gb']:.3f} GB  "
                         f"{f['flops_per_step'] / 1e12:.4g} TFLOP  MFU {fmt(f['mfu'] and 100 * f['mfu'], '.1f')}")
        lines.extend(f"  batch {b:>2} time ratio factorised/dense {att[f'b{b}_time_ratio']:.2f}"
                     for b in (int(k[1:].split("_")[0]) for k in att if k.endswith("_time_ratio")))
    gen = results.get("generation")
    if gen:
        lines.append(f"generation: batch {gen['batch']}, {gen['prompt_tokens']} prompt positions, {gen['new_tokens']} "
                     f"new tokens: {gen['call_s']:.3f} s per call, {gen['tokens_per_s']:.1f} tokens/s, peak "
                     f"{gen['peak_mem_gb']:.3f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the same code)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--steps", type=int, help="timed steps per stage (default 10; smoke 2)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["stage0", "stage1", "stage2", "attention", "generation", "zero2"])
    parser.add_argument("--zero2-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    shapes = SMOKE if args.smoke else FULL
    if args.steps:
        shapes = Shapes(**{**asdict(shapes), "steps": args.steps})
    if args.zero2_worker:
        zero2_worker(shapes, args.zero2_worker)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference trained with --tf32; fp32 leftovers use it
        torch.backends.cudnn.allow_tf32 = True
    results: dict[str, Any] = {
        "device": device_peak_flops(device)[0], "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "dtype": "bf16 autocast (trained weights fp32), frozen towers/LLM bf16",
        "smoke": args.smoke, "torch": torch.__version__, "shapes": asdict(shapes), "stages": {}}

    def save() -> None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=1))

    began = time.perf_counter()
    if "stage0" not in args.skip:
        results["stages"]["stage0"] = stage0(shapes, device)
        free(device)
        save()
    if "attention" not in args.skip:
        results["attention"] = attention(shapes, device)
        free(device)
        save()
    if {"stage1", "generation", "stage2"} - set(args.skip):
        vlm = build_vlm(shapes, device)  # one LLM for the three: stage 1, then generation, then LoRA on top
        if "stage1" not in args.skip:
            results["stages"]["stage1"] = stage1(vlm, shapes, device)
            free(device)
            save()
        if "generation" not in args.skip:
            results["generation"] = generation(vlm, shapes, device)
            free(device)
            save()
        if "stage2" not in args.skip:
            results["stages"]["stage2"] = stage2(vlm, shapes, device)
            save()
        del vlm
        free(device)
    if "zero2" not in args.skip:
        results["zero2"] = zero2(shapes, device, args.smoke,
                                 results["stages"].get("stage2", {}).get("flops_per_step"))
        save()
    results["total_s"] = time.perf_counter() - began
    save()
    print(table(results))
    print(f"total {results['total_s']:.0f} s; JSON: {args.json_out}")


if __name__ == "__main__":
    main()
