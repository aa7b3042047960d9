"""``benchmarks/gpu.py --smoke``: the GPU benchmark's code runs on CPU at tiny shapes, so it never rots, and without
ZenML, MLflow, decord or Great Expectations (the GPU machine has none of them). Plus its two measuring helpers:
FLOPs from ``torch.utils.flop_counter`` (the CPU SDPA kernel included) and peak memory from the allocator."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu.py"
ABSENT_ON_GPU_MACHINE = ("mlflow", "zenml", "decord", "great_expectations")
STAGES = ("stage0", "stage1", "stage2")


@pytest.fixture(scope="module")
def gpu_module():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    # a module set to None in sys.modules cannot be imported: any import of these fails the run
    blocker = "; ".join(f"sys.modules[{m!r}] = None" for m in ABSENT_ON_GPU_MACHINE)
    code = (f"import runpy, sys; {blocker}; sys.argv = [{str(SCRIPT)!r}, '--smoke', '--device', 'cpu', "
            f"'--json-out', {str(out)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def test_smoke_json_has_every_stage_with_numbers(smoke):
    results, _ = smoke
    assert results["smoke"] is True and results["device"].startswith("CPU") and results["date"] and results["dtype"]
    for name in STAGES:
        s = results["stages"][name]
        assert s["samples_per_s"] > 0 and s["peak_mem_gb"] > 0 and s["mfu"] is None, (name, s)
        assert isinstance(s["flops_per_step"], int) and s["flops_per_step"] > 0
        assert s["tokens_per_s"] == pytest.approx(s["samples_per_s"] * s["tokens_per_sample"])
        assert s["epoch_hours"]["valley703k"] == pytest.approx(703_000 / s["samples_per_s"] / 3600)
        assert s["epoch_hours"]["videoinstruct100k"] == pytest.approx(100_000 / s["samples_per_s"] / 3600)
    # tiny preset: 4 proxies + 6 frames x 16 patches, + 16 caption tokens; VLM: 6 frames x 4 video tokens + text - 1
    assert results["stages"]["stage0"]["tokens_per_sample"] == 100 + 16
    assert results["stages"]["stage1"]["tokens_per_sample"] == 24 + 16 - 1
    assert results["stages"]["stage2"]["tokens_per_sample"] == 24 + 24 - 1
    assert results["stages"]["stage1"]["trainable_tensors"] == 22  # TokenMining's reference layout, nothing else


def test_smoke_attention_generation_and_zero2(smoke):
    results, _ = smoke
    att = results["attention"]
    assert att["max_abs_diff_fp32"] < 1e-5  # both forms compute the same attention
    for b in (1, 2):
        fact, dense = att["forms"][f"b{b}_factorised"], att["forms"][f"b{b}_dense"]
        assert fact["step_s"] > 0 and dense["step_s"] > 0
        assert dense["flops_per_step"] > fact["flops_per_step"]  # the dense [S, S] scores are counted
    assert att["flash_only"] is None  # a CUDA-only check
    gen = results["generation"]
    assert gen["tokens_per_s"] == pytest.approx(gen["batch"] * gen["new_tokens"] / gen["call_s"])
    assert "CUDA" in results["zero2"]["skipped"]
    assert results["zero2"]["rehearsal_without_deepspeed"]["samples_per_s"] > 0


def test_smoke_prints_the_table_with_na_mfu(smoke):
    _, stdout = smoke
    assert "MFU" in stdout and "Valley703K h" in stdout
    for name in STAGES:
        row = next(line for line in stdout.splitlines() if line.startswith(name))
        assert row.split()[9] == "n/a", row  # the MFU column
    assert "zero2   skipped" in stdout and "generation:" in stdout and "time ratio factorised/dense" in stdout


def test_flop_count_includes_matmul_and_cpu_attention(gpu_module):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert gpu_module.count_flops(lambda: a @ b)[1] == 2 * 8 * 16 * 4
    q = torch.randn(1, 2, 10, 8)
    flops = gpu_module.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))[1]
    assert flops == 4 * 2 * 10 * 10 * 8  # QK^T and PV: 2 matmuls of 2*S*S*D per head


def test_peak_bytes_reads_the_allocator_on_cpu(gpu_module):
    keep = torch.zeros(1_000_000)  # alive before: not part of the peak

    def fn() -> float:
        x = torch.ones(2_000_000)  # 8 MB
        y = x * 2  # 8 MB more while x lives
        return float(y[0]) + float(keep[0])

    out, start, extra = gpu_module.peak_bytes(fn, torch.device("cpu"))
    assert out == 2.0 and start == 0
    assert 16_000_000 <= extra < 17_000_000
