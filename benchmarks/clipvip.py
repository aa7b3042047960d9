"""CLIP-ViP stage-0 benchmarks (CPU, fp32), each against a baseline measured in the same run.

    python benchmarks/clipvip.py attention --batch 1 --repeats 2
    python benchmarks/clipvip.py local-loss

attention   vision tower forward+backward at the real ViP-B/16 shape (12 frames x 224 px -> 2356 tokens, random
            weights): factorised proxy attention vs the dense 2356x2356 boolean-mask baseline. Prints the max
            output difference (target <= 1e-5) and the time ratio factorised/dense (target <= 0.75).
local-loss  the SPARC local loss at B=40, P=2356, L=50, D=512, forward+backward: time and peak extra memory for one
            depth (target <= 200 MB), and for the 13 depths of all_hidden_states with per-depth recomputation.
            Peak memory is the process's peak RSS above its RSS before the call (Linux: VmHWM reset via
            /proc/self/clear_refs), so it counts every allocation the loss makes.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from hilight.losses import SparcLocalLoss
from hilight.losses.sparc_local import parse_keep
from hilight.models.clipvip import build_clipvip, load_preset


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def attention(batch: int, repeats: int) -> None:
    cfg = load_preset("clipvip-b16")
    model = build_clipvip(cfg, seed=0)
    vision = model.vision_model.train()
    x = torch.randn(batch, cfg.num_frames, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))

    def run(dense: bool) -> tuple[float, torch.Tensor]:
        for layer in vision.encoder.layers:
            layer.self_attn.dense = dense
        times = []
        for i in range(repeats + 1):  # the first is a warm-up
            vision.zero_grad(set_to_none=True)
            start = time.perf_counter()
            out = vision(x).last_hidden_state
            out.float().pow(2).mean().backward()
            if i:
                times.append(time.perf_counter() - start)
        return min(times), out.detach()

    t_fact, out_fact = run(False)
    t_dense, out_dense = run(True)
    diff = (out_fact - out_dense).abs().max().item()
    print(f"attention B={batch} T={cfg.num_frames} S={cfg.seq_len} fp32 CPU x{torch.get_num_threads()} threads: "
          f"factorised {t_fact:.2f}s, dense-mask {t_dense:.2f}s, ratio {t_fact / t_dense:.2f} "
          f"(target <= 0.75), max |diff| {diff:.2e} (target <= 1e-5)")


def local_loss(b: int = 40, p: int = 2356, l: int = 50, d: int = 512) -> None:
    g = torch.Generator().manual_seed(0)
    k = parse_keep("2320/2356", p)
    loss_fn = SparcLocalLoss(k)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[:, 30:] = False
    scale = torch.tensor(100.0)

    def measure(depths: int) -> tuple[float, float]:
        v = torch.randn(b, p, d, generator=g, requires_grad=True)
        t = torch.randn(b, l, d, generator=g, requires_grad=True)
        base = _rss_mb("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        total = 0.0
        for _ in range(depths):
            fn = lambda vv, tt: loss_fn(vv, tt, mask, scale)["local_loss"]  # noqa: E731
            total = total + (torch.utils.checkpoint.checkpoint(fn, v, t, use_reentrant=False) if depths > 1 else fn(v, t))
        total.backward()
        elapsed = time.perf_counter() - start
        peak = _rss_mb("VmHWM") - base
        inputs_and_grads = 2 * (v.numel() + t.numel()) * 4 / 2**20
        return elapsed, peak - inputs_and_grads  # extra beyond the inputs and their gradients

    measure(1)  # warm-up (allocator, kernels)
    t1, m1 = measure(1)
    t13, m13 = measure(13)
    print(f"local loss B={b} P={p} L={l} D={d} k={k} fp32 CPU: one depth {t1:.2f}s, extra peak {m1:.0f} MB "
          f"(target <= 200 MB); 13 depths with recomputation {t13:.2f}s, extra peak {m13:.0f} MB. "
          f"Forbidden [B,L,P,D] broadcast would be {b * l * p * d * 4 / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "local-loss"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.what == "attention":
        attention(args.batch, args.repeats)
    else:
        local_loss()


if __name__ == "__main__":
    main()
