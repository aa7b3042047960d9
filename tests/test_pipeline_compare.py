"""Any-axis comparison (issue 15, item 3): ``configs/compare_tune_token_mining_demo.yaml``'s candidates (§7.1 LoRA only
vs §7.2 TokenMining tuned too) run through select_vision_weights at test size, in an isolated ZenML store and MLflow
DB. The other comparison configs are validated with every shipped config (tests/test_config_cli.py)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO, selection_config

pytestmark = pytest.mark.pipeline


def test_stage2_axis_comparison_runs_and_decides(zenml_project, caption_manifest, vlm_weights, billiards_dir,
                                                 general_dir):
    import torch
    from safetensors.torch import load_file
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from hilight.experiments.selection import SelectionConfig
    from pipelines.run import run_pipeline, step_output

    root = zenml_project
    shipped = yaml.safe_load((REPO / "configs" / "compare_tune_token_mining_demo.yaml").read_text())
    tiny = selection_config(root, caption_manifest, vlm_weights, billiards_dir, general_dir)
    # the shipped candidates and registry; the tiny fixtures' bases, evaluation sets and rule (demo paths do not exist)
    config = {**tiny, "candidates": shipped["candidates"], "registry": shipped["registry"], "name": "tune_tm",
              "stage1_overrides": {"vision": {"clipvip": tiny["candidates"]["table1k"]["clipvip"]}}}
    cfg = root / "compare.yaml"
    cfg.write_text("# hilight run select_vision_weights -c compare.yaml\n" + yaml.safe_dump(config))
    parsed = SelectionConfig.model_validate(config)
    (a1, a2), (b1, b2) = parsed.candidate_configs("lora_only"), parsed.candidate_configs("tune_tm")
    assert (a2.lora.tune_token_mining, b2.lora.tune_token_mining) == (False, True)
    # only stage 2 differs, so tune_tm starts from lora_only's stage-1 run instead of training the same one again
    assert parsed.stage1_owner("tune_tm") == "lora_only" and a1 == b1
    assert a2.token_mining.init == b2.token_mining.init == f"{a1.output_dir}/best"

    run = Client().get_pipeline_run(run_pipeline("select_vision_weights", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED
    assert {s for s in run.steps if s.startswith("stage1_")} == {"stage1_lora_only"}  # one stage-1 training
    decision = step_output(run, "select_and_promote", "selection_decision")
    assert decision["status"] == "first" and {decision["winner"], decision["runner_up"]} == {"lora_only", "tune_tm"}
    assert decision["registry"]["model_name"] == "hilight-vlm-tune-token-mining"

    # the axis did what it says: frozen TokenMining leaves stage 2 with the stage-1 weights, tuned one moves them
    def token_mining(candidate: str, part: str) -> dict[str, torch.Tensor]:
        path = (root / parsed.merged_dir(candidate) / "token_mining" if part == "merged"
                else root / parsed.candidate_configs(candidate)[0].output_dir / "best")  # the shared stage 1
        return load_file(next(path.glob("*.safetensors")))

    for candidate, moved in (("lora_only", False), ("tune_tm", True)):
        before, after = token_mining(candidate, "stage1"), token_mining(candidate, "merged")
        assert set(before) == set(after)
        same = all(torch.equal(before[k], after[k]) for k in before)
        assert same is not moved, f"{candidate}: TokenMining {'unchanged' if same else 'changed'} by stage 2"
