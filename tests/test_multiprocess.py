"""Multi-process training: the shared loop in 2 CPU processes (DDP over gloo, through accelerate) ends with the same
weights as one process that sees the same global batches (one process, 2 micro-batches of gradient accumulation)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.conftest import REPO, free_port

SCRIPT = REPO / "tests" / "ddp_fit.py"


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def test_two_process_ddp_matches_single_process_on_the_same_global_batch(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, str(SCRIPT), str(single), "--batch-size", "4", "--grad-accum", "2"],
                   env=_env(), check=True, timeout=300)
    # accelerate's own launcher needs mpirun for multi-CPU; torchrun starts the processes (as `accelerate launch
    # --multi_gpu` does) and ACCELERATE_USE_CPU makes the Accelerator run DDP over gloo
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(SCRIPT), str(ddp), "--batch-size", "4",
                           "--grad-accum", "1"], env=_env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for step in (2, 4):
        a = load_file(single / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        b = load_file(ddp / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), f"step {step} {k}: max diff {(a[k] - b[k]).abs().max():.3g}"
    first = load_file(single / "checkpoints" / "step-00000004" / "model.safetensors")
    torch.manual_seed(0)  # the script's initialisation
    init = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    assert all(not torch.equal(v, init.state_dict()[k]) for k, v in first.items())  # every tensor trained
