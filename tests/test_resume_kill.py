"""Crash safety: SIGKILL a training process mid-run, re-run the same command, and get the same final weights as an
uninterrupted run (deterministic on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import alignment_config

MAX_STEPS, CKPT_EVERY = 40, 4


def _command(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "hilight.cli", "train", "-c", str(cfg)]


def _env() -> dict[str, str]:
    # one intra-op thread in every process, so reductions run in the same order in all three runs
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _write(tmp_path: Path, name: str, manifest: Path) -> Path:
    raw = alignment_config(manifest, tmp_path / name, max_steps=MAX_STEPS, ckpt_every=CKPT_EVERY, val_every=20,
                           keep_last=2, lr=5e-4)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _checkpoints(out: Path) -> list[Path]:
    return sorted(out.glob("runs/*/checkpoints/step-*/trainer_state.json"))


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path, caption_manifest):
    straight = _write(tmp_path, "straight", caption_manifest)
    subprocess.run(_command(straight), check=True, env=_env(), capture_output=True, timeout=600)

    killed = _write(tmp_path, "killed", caption_manifest)
    proc = subprocess.Popen(_command(killed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while len(_checkpoints(tmp_path / "killed")) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for the second checkpoint (step 8), then kill without warning
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    last = max(int(p.parent.name.split("-")[1]) for p in _checkpoints(tmp_path / "killed"))
    assert CKPT_EVERY <= last < MAX_STEPS
    assert not (tmp_path / "killed" / "final").exists()

    rerun = subprocess.run(_command(killed), check=True, env=_env(), capture_output=True, text=True, timeout=600)
    assert f"resumed from step {last}" in rerun.stdout
    print(f"killed after checkpoint {last}/{MAX_STEPS}; resumed and finished")  # the drill's count

    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"weights differ after resume: {different[:5]}"
