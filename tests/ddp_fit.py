"""Runs the shared training loop (``hilight.train.loop.fit``) on a tiny regression model; launched by
``tests/test_multiprocess.py`` once in one process and once in two DDP processes (``torchrun`` +
``ACCELERATE_USE_CPU=true``: accelerate's Accelerator then runs DDP over gloo).

Usage: python tests/ddp_fit.py RUN_DIR --batch-size B --grad-accum A
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hilight.data.samplers import CaptionBatchSampler
from hilight.train.loop import TrainSettings, fit


class Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        return {"x": self.x[items], "y": self.y[items]}


def objective(model, batch):
    loss = torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])
    return {"loss": loss, "mse_loss": loss.detach()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    data = Regression()
    settings = TrainSettings(max_steps=4, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=1e-2,
                             weight_decay=0.0, max_grad_norm=1.0, val_every=100, ckpt_every=2, progress=False, seed=0)
    sampler = CaptionBatchSampler(range(len(data)), args.batch_size, mode="random", seed=0)
    fit(model, objective, data, sampler, settings, args.run_dir)


if __name__ == "__main__":
    main()
