"""CLIP-ViP stage-0 benchmarks (CPU, fp32), each against a baseline measured in the same run.

    python benchmarks/clipvip.py attention --batch 1 --repeats 2
    python benchmarks/clipvip.py local-loss

attention   vision tower forward+backward at the real ViP-B/16 shape (12 frames x 224 px -> 2356 tokens, random
            weights): factorised proxy attention vs the dense 2356x2356 boolean-mask baseline. Prints the max
            output difference (target <= 1e-5) and the time ratio factorised/dense (target <= 0.75).
local-loss  the SPARC local loss at B=40, P=2356, L=50, D=512, forward+backward: time and peak extra memory for one
            depth (target <= 200 MB), and for the 13 depths of all_hidden_states with per-depth recomputation.
            Peak memory comes from the allocator (``gpu.peak_bytes``): ``torch.cuda.max_memory_allocated`` on CUDA,
            ``torch.profiler`` allocation events (``profile_memory=True``) on CPU — the bytes the loss allocates
            above what was alive at its start, minus the inputs' gradients. (Peak RSS, used before, cannot see
            memory the allocator reuses: a rerun printed "-0 MB" where the first run had printed 153 MB.)
            ``--device cuda`` runs it on a GPU.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from gpu import peak_bytes  # benchmarks/ is on sys.path when a script in it runs

from hilight.losses import SparcLocalLoss
from hilight.losses.sparc_local import parse_keep
from hilight.models.clipvip import build_clipvip, load_preset


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


def local_loss(device: torch.device, b: int = 40, p: int = 2356, l: int = 50, d: int = 512) -> None:
    g = torch.Generator().manual_seed(0)
    k = parse_keep("2320/2356", p)
    loss_fn = SparcLocalLoss(k)
    mask = torch.ones(b, l, dtype=torch.bool, device=device)
    mask[:, 30:] = False
    scale = torch.tensor(100.0, device=device)

    def measure(depths: int) -> tuple[float, float]:
        v = torch.randn(b, p, d, generator=g).to(device).requires_grad_()
        t = torch.randn(b, l, d, generator=g).to(device).requires_grad_()

        def run() -> None:
            total = 0.0
            for _ in range(depths):
                fn = lambda vv, tt: loss_fn(vv, tt, mask, scale)["local_loss"]  # noqa: E731
                total = total + (torch.utils.checkpoint.checkpoint(fn, v, t, use_reentrant=False) if depths > 1
                                 else fn(v, t))
            total.backward()

        start = time.perf_counter()
        run()  # timed without the profiler, which slows every allocation on CPU
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        v.grad = t.grad = None
        _, _, extra = peak_bytes(run, device)
        grads = (v.numel() + t.numel()) * v.element_size()
        return elapsed, (extra - grads) / 2**20  # beyond the inputs (alive before) and their gradients

    measure(1)  # warm-up (allocator, kernels)
    t1, m1 = measure(1)
    t13, m13 = measure(13)
    print(f"local loss B={b} P={p} L={l} D={d} k={k} fp32 {device.type}: one depth {t1:.2f}s, extra peak {m1:.0f} MB "
          f"(target <= 200 MB); 13 depths with recomputation {t13:.2f}s, extra peak {m13:.0f} MB. "
          f"Forbidden [B,L,P,D] broadcast would be {b * l * p * d * 4 / 2**30:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["attention", "local-loss"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="local-loss only: cpu or cuda")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}")
    if args.what == "attention":
        attention(args.batch, args.repeats)
    else:
        local_loss(torch.device(args.device))


if __name__ == "__main__":
    main()
