"""``hilight estimate``: counted FLOPs against a hand count, and a whole estimate at tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hilight.estimate import GPUS, count_step, estimate
from tests.conftest import alignment_config

HILIGHT = Path(sys.executable).with_name("hilight")


def _mlp(frozen_first: bool) -> tuple[nn.Module, callable]:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if frozen_first:
        model[0].requires_grad_(False)
    x = torch.empty(3, 8, device="meta")  # 3 rows: every matmul below is (3 x k) @ (k x n)
    return model, lambda: model(x).sum()


def test_counted_flops_match_a_hand_count():
    model, step = _mlp(frozen_first=False)
    count = count_step(step, list(model.parameters()), [])
    fwd = 2 * 3 * 8 * 16 + 2 * 3 * 16 * 4  # two matmuls, 2 FLOPs per multiply-add
    # backward: both weight gradients, and the input gradient of the second layer only (the data needs none)
    bwd = 2 * 3 * 8 * 16 + 2 * 3 * 16 * 4 + 2 * 3 * 16 * 4
    assert (count.forward_flops, count.flops) == (fwd, fwd + bwd) == (1152, 2688)


def test_a_frozen_layer_gets_no_gradient_work():
    model, step = _mlp(frozen_first=True)
    count = count_step(step, list(model.parameters()), [])
    # only the trained second layer's weight gradient; nothing flows back into the frozen first layer
    assert count.flops - count.forward_flops == 2 * 3 * 16 * 4


def test_saved_activations_are_measured_per_layer():
    model, step = _mlp(frozen_first=False)
    count = count_step(step, list(model.parameters()), [model[2]])
    # saved for backward: x (input of layer 0, 3x8), the ReLU output (3x16, the input of layer 2; float32)
    assert count.saved_bytes == (3 * 8 + 3 * 16) * 4
    assert count.layer_inputs == 3 * 16 * 4


def test_estimate_of_a_tiny_alignment_config(tmp_path):
    from hilight.train.alignment import AlignmentConfig

    cfg = AlignmentConfig.model_validate(alignment_config(tmp_path / "none", tmp_path / "out", max_steps=100,
                                                          batch_size=4))
    e = estimate(cfg, "tiny.yaml", gpu="h200", gpus=2, mfu=0.5, samples=1000)
    assert e.stage == "stage0" and e.params["frozen"] == 0 and e.params["trainable"] > 0
    peak = GPUS["h200"].peak_flops
    assert e.epoch_hours == pytest.approx(1000 * e.flops_per_sample / (2 * peak * 0.5) / 3600)
    assert e.run["samples"] == 100 * 4 * 2 and e.run["epochs"] == pytest.approx(0.8)
    m = e.memory_gib
    assert m["optimizer"] == pytest.approx(2 * m["gradients"]) and m["activations"] > 0
    assert m["total"] == pytest.approx(m["weights"] + m["gradients"] + m["optimizer"] + m["activations"])
    # a fully trained model: counted FLOPs are within a small factor of the notes' 6TP
    assert 0.3 < e.notes_6tp["counted_over_6tp"] < 1.5


def test_measured_mfu_is_used_and_named(tmp_path):
    from hilight.train.alignment import AlignmentConfig

    results = tmp_path / "gpu.json"
    results.write_text(json.dumps({"device": "NVIDIA H200", "stages": {"stage0": {"mfu": 0.31}}}))
    cfg = AlignmentConfig.model_validate(alignment_config(tmp_path / "none", tmp_path / "out"))
    e = estimate(cfg, "tiny.yaml", samples=10, gpu_results=results)
    assert e.mfu == 0.31 and "measured by benchmarks/gpu.py on NVIDIA H200" in e.mfu_source


def test_cli_real_stage1_config_without_weights():
    """The done-when command: the real stage-1 config names weights that are not here; the architecture comes
    from the presets (clipvip-b16, Long-CLIP ViT-B/16, gemma-2b) on the meta device."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([str(HILIGHT), "estimate", "-c", "configs/tokenmining_hilight_2b.yaml", "--gpu", "h200",
                           "--gpus", "1", "--samples", "703000", "--json", "--mfu", "0.4"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    e = json.loads(proc.stdout)
    assert e["params"]["trainable"] == 6_892_864  # TokenMining at reference depth, 384 video tokens
    assert e["tokens_per_sample"] == {"video": 384, "text": 128, "llm": 511}
    # frozen Gemma-2B: forward ~2PT plus input gradients ~2PT, so between 3.5 and 5 x P x T
    assert 3.5 < e["flops_per_sample"] / (2.506e9 * 511) < 5
    assert e["epoch_hours"] == pytest.approx(703000 * e["flops_per_sample"] / (989e12 * 0.4) / 3600)
    assert 4 < e["memory_gib"]["weights"] < 5.5 and e["memory_gib"]["checkpointing"] == 1.0
