"""The real recipes in 2 CPU processes (DDP over gloo, started by torchrun as ``accelerate launch`` would) against
one process that sees the same global batches: the same weights after training (atol 1e-5), the same stage-0 loss
and gradient (negatives gathered across ranks), an exact resume after a SIGKILL in the 2-process run, and a
feature cache filled by both processes.

Same global batches: the samplers' order does not depend on the batch size, and accelerate hands process r the
batches r, r + 2, ... of size B, so two processes at B consume exactly what one process at 2B does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, alignment_config, free_port, lora_config, tokenmining_config

SCRIPT = REPO / "tests" / "ddp_recipe.py"
STEPS = 4


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(SCRIPT), *args]


def _run(cmd: list[str], **env) -> None:
    done = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _train(config: dict, path: Path, processes: int) -> Path:
    """Run the recipe; returns its checkpoints directory."""
    path.write_text(json.dumps(config))
    if processes == 1:
        _run([sys.executable, str(SCRIPT), "train", str(path)])
    else:
        _run(_torchrun("train", str(path)), ACCELERATE_USE_CPU="true")
    (ckpts,) = Path(config["output_dir"]).glob("runs/*/checkpoints")
    return ckpts


def _weights(ckpts: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(ckpts / f"step-{step:08d}" / "model.safetensors")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


def test_stage0_loss_and_gradient_with_gathered_negatives_equal_one_process(tmp_path):
    """Global (group-aware, with per-row hard negatives and their pairwise term) + local (all hidden states) +
    penalties on one fixed batch of 8: each rank holds 4 pairs and its rows' hard negatives (3 and 1), its global loss
    sees all 8 captions and videos as negatives; rank-averaged terms and gradients = one process."""
    _run([sys.executable, str(SCRIPT), "loss", str(tmp_path / "one.json")])
    _run(_torchrun("loss", str(tmp_path / "two.json")), ACCELERATE_USE_CPU="true")
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one.keys() == two.keys() >= {"global_loss", "hard_negative_loss", "local_loss", "token_similarity_loss",
                                        "grad_norm"}
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-6), k
    # a per-rank loss would differ: 4 negatives per row instead of 8 (checked by the loss tests' values too)
    assert one["global_loss"] > 0


def _stage_config(stage: str, root: Path, batch: int, caption_manifest, vlm_weights, stage1_export) -> dict:
    train = {"max_steps": STEPS, "batch_size": batch, "ckpt_every": 2, "val_every": STEPS, "warmup_steps": 1}
    if stage == "alignment":
        return alignment_config(caption_manifest, root, **train)
    if stage == "tokenmining":
        return tokenmining_config(caption_manifest, root, vlm_weights["clipvip"], vlm_weights["llm"], **train)
    config = lora_config(caption_manifest, root, vlm_weights["clipvip"], vlm_weights["llm"], stage1_export, **train)
    config["lora"]["dropout"] = 0.0  # dropout masks come from each process's RNG: no equality to test with them
    return config


@pytest.mark.parametrize("stage", ["alignment", "tokenmining", "lora"])
def test_two_process_recipe_matches_one_process(stage, tmp_path, caption_manifest, vlm_weights, stage1_export):
    make = lambda name, batch: _stage_config(stage, tmp_path / name, batch, caption_manifest,  # noqa: E731
                                             vlm_weights, stage1_export)
    one = _train(make("one", 8), tmp_path / "one.json", processes=1)
    two = _train(make("two", 4), tmp_path / "two.json", processes=2)
    for step in (2, STEPS):
        _assert_same(_weights(one, step), _weights(two, step), atol=1e-5)
    trained = _weights(one, STEPS)
    assert any(not torch.equal(v, _weights(one, 2)[k]) for k, v in trained.items())  # it did train
    if stage != "alignment":  # the frozen towers' feature cache: each process filled its share, in its own shards
        shards = list((tmp_path / "two" / "features").glob("*/shard-*.safetensors"))
        assert {p.name.split("-")[1] for p in shards} == {"p0", "p1"}
        assert not any(p.name.split("-")[1].startswith("p") for p in (tmp_path / "one" / "features").glob("*/shard-*"))


def test_two_process_alignment_resumes_bit_equal_after_sigkill(tmp_path, caption_manifest):
    config = alignment_config(caption_manifest, tmp_path / "full", max_steps=6, batch_size=4, ckpt_every=2,
                              val_every=3, warmup_steps=1, keep_last=10)
    full = _train(config, tmp_path / "full.json", processes=2)

    killed = {**config, "output_dir": str(tmp_path / "killed")}
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(killed))
    proc = subprocess.Popen(_torchrun("train", str(path)), env=_env(ACCELERATE_USE_CPU="true"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").glob("runs/*/checkpoints/step-00000002/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "the 2-process run ended before its checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-training
    proc.wait()
    done = list((tmp_path / "killed").glob("runs/*/checkpoints/step-*"))
    assert not any(d.name == "step-00000006" for d in done), "killed too late to test a resume"

    resumed = _train(killed, path, processes=2)
    _assert_same(_weights(full, 6), _weights(resumed, 6), atol=0)
