"""The real recipes in 2 CPU processes (DDP over gloo, started by torchrun as ``accelerate launch`` would) against
one process that sees the same global batches: the same weights after training (atol 1e-5), the same stage-0 loss
and gradient (negatives gathered across ranks), an exact resume after a SIGKILL in the 2-process run, and a
feature cache filled by both processes. Where DeepSpeed is installed, stages 1 and 2 also run under the shipped
ZeRO-2 launcher config (one process, DeepSpeed's CPU accelerator) against the plain loop.

Same global batches: the samplers' order does not depend on the batch size, and accelerate hands process r the
batches r, r + 2, ... of size B, so two processes at B consume exactly what one process at 2B does."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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


def _zero2(*args: str, mixed_precision: str = "no") -> list[str]:
    """``accelerate launch`` with the shipped ZeRO-2 config, in one process: accelerate drives DeepSpeed across
    processes only on an accelerator (on CPU its state stays at one process while DeepSpeed's world has two). fp32
    unless told: the weights are compared with a plain fp32 process."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "1",
            "--mixed_precision", mixed_precision, "--main_process_port", str(free_port()), str(SCRIPT), *args]


def _train(config: dict, path: Path, processes: int, launcher=None) -> Path:
    """Run the recipe (in one process, under torchrun, or under ``launcher``); returns its checkpoints directory."""
    path.write_text(json.dumps(config))
    if launcher is not None:
        _run(launcher("train", str(path)))
    elif processes == 1:
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


def test_two_process_dropout_draws_per_process_and_resumes_bit_equal(tmp_path, caption_manifest, vlm_weights,
                                                                     stage1_export):
    """Stage 2 with LoRA dropout in 2 processes: each process draws its masks from its own stream (seed + rank), each
    stream is saved with the checkpoint, and a run that lost its last checkpoint resumes every rank's stream and ends
    with the same weights, bit for bit. Before, only the main process's generator was saved and every rank resumed
    from it, while the ranks had drawn different amounts (batches of other lengths) since step 0."""
    config = _stage_config("lora", tmp_path / "run", 4, caption_manifest, vlm_weights, stage1_export)
    config["lora"]["dropout"] = 0.3
    config["train"]["keep_last"] = 10
    ckpts = _train(config, tmp_path / "run.json", processes=2)
    saved = ckpts / "step-00000002"
    main, other = (load_file(saved / f)["torch_cpu"] for f in ("rng.safetensors", "rng-00001.safetensors"))
    assert not torch.equal(main, other)

    finished = _weights(ckpts, STEPS)
    shutil.rmtree(ckpts / f"step-{STEPS:08d}")
    _train(config, tmp_path / "run.json", processes=2)
    _assert_same(finished, _weights(ckpts, STEPS), atol=0)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (README, Running at scale)")


@needs_deepspeed
@pytest.mark.parametrize("stage", ["tokenmining", "lora"])
def test_zero2_recipe_matches_one_process_and_resumes(stage, tmp_path, caption_manifest, vlm_weights, stage1_export):
    """``hilight train`` under ``configs/accelerate/deepspeed_zero2.yaml``: the engine is told the micro-batch,
    accumulation and clipping from ``train:`` and trains to the same weights as the plain loop (atol 1e-5; two
    micro-batches accumulated per step), saves its optimizer partition in the step directory, and a run that lost
    its last checkpoint resumes from the one before to the same weights."""
    def make(name: str) -> dict:
        config = _stage_config(stage, tmp_path / name, 4, caption_manifest, vlm_weights, stage1_export)
        config["train"]["grad_accum"] = 2
        return config

    one = _train(make("one"), tmp_path / "one.json", processes=1)
    config = make("zero2")
    two = _train(config, tmp_path / "zero2.json", processes=1, launcher=_zero2)
    for step in (2, STEPS):
        _assert_same(_weights(one, step), _weights(two, step), atol=1e-5)
    engine = two / "step-00000002" / "deepspeed"
    assert not (two / "step-00000002" / "optimizer.pt").exists()
    assert len(list(engine.glob("state/*optim_states.pt"))) == 1  # one partition per process
    assert any(not torch.equal(v, _weights(one, 2)[k]) for k, v in _weights(one, STEPS).items())  # it did train

    finished = _weights(two, STEPS)
    shutil.rmtree(two / f"step-{STEPS:08d}")
    _train(config, tmp_path / "zero2.json", processes=2, launcher=_zero2)
    _assert_same(finished, _weights(two, STEPS), atol=1e-6)

    # a plain run cannot take over the engine's optimizer state: it says so instead of resuming without it
    done = subprocess.run([sys.executable, str(SCRIPT), "train", str(tmp_path / "zero2.json")], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "written by DeepSpeed" in done.stderr and "train.resume=false" in done.stderr


@needs_deepspeed
def test_zero2_refuses_a_stage_that_edits_weights_after_the_step(tmp_path, caption_manifest):
    """Stage 0 clamps CLIP-ViP's logit scale after each step; ZeRO would overwrite that from its fp32 copy, so the
    run stops before training and points at DDP."""
    path = tmp_path / "alignment.json"
    path.write_text(json.dumps(alignment_config(caption_manifest, tmp_path / "out", max_steps=2, batch_size=4)))
    done = subprocess.run(_zero2("train", str(path)), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "clamp_logit_scale" in done.stderr and "ddp_multigpu.yaml" in done.stderr
    assert not list((tmp_path / "out").glob("runs/*/checkpoints/step-*"))


@needs_deepspeed
def test_zero2_bf16_stage2_trains(tmp_path, caption_manifest, vlm_weights, stage1_export):
    """The shipped config's precision: DeepSpeed casts the model to bf16 (not its inputs; the loop does), trains,
    and checkpoints and exports the bf16 weights."""
    config = _stage_config("lora", tmp_path / "out", 4, caption_manifest, vlm_weights, stage1_export)
    config["train"]["mixed_precision"] = "bf16"
    ckpts = _train(config, tmp_path / "bf16.json", processes=1, launcher=lambda *a: _zero2(*a, mixed_precision="bf16"))
    before, after = _weights(ckpts, 2), _weights(ckpts, STEPS)
    assert {v.dtype for v in after.values()} == {torch.bfloat16}
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
    assert (tmp_path / "out" / "final" / "adapter").is_dir()
