"""Smoke test of select_vision_weights (two tiny candidates) and lora_finetune, in an isolated ZenML store and MLflow
DB: the champion alias must point at the model the declared rule prefers, re-running must train nothing, and the
champion must answer by URI (pyfunc) and through `hilight ask`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import lora_config, selection_config

pytestmark = pytest.mark.pipeline

STAGES = ("stage1", "stage2", "merge", "evaluate")


def test_selection_registers_the_rules_champion_and_reruns_from_cache(zenml_project, caption_manifest, vlm_weights,
                                                                     billiards_dir, general_dir):
    import mlflow
    from typer.testing import CliRunner
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from hilight.cli import app
    from hilight.experiments.selection import SelectionConfig, decide
    from pipelines.run import run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    selection = selection_config(root, caption_manifest, vlm_weights, billiards_dir, general_dir)
    selection["evaluation"]["generation"]["temperature"] = 0.0  # greedy: a model whose logits are all 0 says nothing
    # every val/test billiards clip (6): a random 3 of them can all be breaks, whose answers name no single ball colour
    selection["evaluation"]["max_videos"] = 6
    a, b = (selection["candidates"][c]["clipvip"] for c in ("original", "table1k"))
    cfg_path = root / "selection.yaml"
    cfg_path.write_text("# hilight run select_vision_weights -c selection.yaml\n" + yaml.safe_dump(selection))
    config = SelectionConfig.model_validate(selection)
    stage1, stage2 = config.candidate_configs("table1k")
    assert stage1.vision.clipvip == str(b) and stage2.vision.clipvip == str(b)  # only the candidate weights differ
    assert stage2.token_mining.init == f"{stage1.output_dir}/best" and stage2.llm == stage1.llm

    run = Client().get_pipeline_run(run_pipeline("select_vision_weights", cfg_path).id)
    assert run.status == ExecutionStatus.COMPLETED
    decision = step_output(run, "select_and_promote", "selection_decision")
    evidence = step_output(run, "select_and_promote", "selection_evidence")
    expected = decide(evidence[["candidate", *(c for c in evidence.columns if "/" in c)]], config.rule)
    assert decision["winner"] == expected["winner"] and decision["runner_up"] == expected["runner_up"]
    assert set(evidence["candidate"]) == {"original", "table1k"} and evidence["rank"].tolist() == [1, 2]
    answers = step_output(run, "evaluate_original", "vlm_answers")
    assert {"describe", "qa"} == set(answers["kind"]) and {"billiards", "general"} == set(answers["dataset"])
    assert {"answer", "reference", "rougeL", "bleu", "chrf", "clip_similarity", "fact_colour"} <= set(answers.columns)
    assert answers["fact_colour"].notna().any()
    # each stated fact also scored as a multiple choice, through the real pipeline and into the evidence
    chosen = answers["choice_colour"].notna()
    assert chosen.any() and set(answers.loc[chosen, "choice_colour_options"]) <= {6, 8}  # ball / shape colours
    assert {"billiards/choice_accuracy", "billiards/choice/colour", "billiards/choice_chance"} <= set(evidence.columns)

    mlflow.set_tracking_uri(mlflow_tracking_uri())
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("hilight-vlm", "champion")
    challenger = client.get_model_version_by_alias("hilight-vlm", "challenger")
    assert champion.tags["hilight.candidate"] == decision["winner"]
    assert challenger.tags["hilight.candidate"] == decision["runner_up"]
    assert champion.tags["hilight.zenml_model_version"].startswith("hilight-vlm:")
    assert decision["registry"]["champion"] == str(champion.version)
    zenml_model = Client().get_model_version("hilight-vlm", "production")
    assert zenml_model.run_metadata["winner"] == decision["winner"]

    # the evaluation's per-answer table and summary are in MLflow, nested under the pipeline run
    exp = client.get_experiment_by_name("select_vision_weights")
    evals = client.search_runs([exp.experiment_id], "tags.`hilight.stage` = 'evaluation'")
    assert len(evals) == 2 and all("billiards/fact_accuracy" in r.data.metrics for r in evals)
    assert "evaluation/answers.json" in {f.path for f in client.list_artifacts(evals[0].info.run_id, "evaluation")}
    skipped = client.search_runs([exp.experiment_id], "tags.`hilight.stage` = 'evaluation-skipped'")
    assert len(skipped) == 1 and not skipped[0].data.metrics  # no champion yet: the incumbent step says so
    assert "No champion was registered" in skipped[0].data.tags["mlflow.note.content"]

    # the champion loads by URI and answers
    model = mlflow.pyfunc.load_model("models:/hilight-vlm@champion")
    video = str(sorted((billiards_dir / "videos").glob("*.mp4"))[0])
    out = model.predict(pd.DataFrame({"video": [video], "question": ["What's happened in this video?"]}))
    assert len(out) == 1 and isinstance(out[0], str)
    asked = CliRunner().invoke(app, ["ask", video, "What's happened in this video?"])
    assert asked.exit_code == 0, asked.output
    missing = CliRunner().invoke(app, ["ask", video, "q", "--model", "models:/no-such-model@champion"])
    assert missing.exit_code == 1 and "register a champion" in missing.output

    # nothing changed: nothing trains, merges or evaluates again; the aliases stay on the same versions
    rerun = Client().get_pipeline_run(run_pipeline("select_vision_weights", cfg_path).id)
    for name in config.candidates:
        for stage in STAGES:
            assert rerun.steps[f"{stage}_{name}"].status == ExecutionStatus.CACHED, f"{stage}_{name} ran again"
    assert client.get_model_version_by_alias("hilight-vlm", "champion").version == champion.version
    assert len(client.search_model_versions("name='hilight-vlm'")) == 2
    again = step_output(rerun, "select_and_promote", "selection_decision")
    assert again["status"] == "unchanged" and again["incumbent"]["version"] == str(champion.version)

    # promotion is gated by the incumbent, evaluated on the same sets (issue 15)
    winner_dir = Path(step_output(run, f"merge_{decision['winner']}", "merged_model")["dir"])
    _gate_against_incumbents(cfg_path, client, winner_dir, decision["winner"], str(champion.version))


def _register_incumbent(client, model_dir: Path, digest: str) -> str:
    """Register ``model_dir`` as a new hilight-vlm version (content tagged ``digest``) and make it the champion."""
    import mlflow

    from hilight.registry import log_vlm_model, register, set_alias

    from pipelines.stack import mlflow_tracking_uri

    mlflow.set_tracking_uri(mlflow_tracking_uri())  # the pipeline run left the tracker's URI behind
    with mlflow.start_run(run_name=f"incumbent-{digest}"):
        info = log_vlm_model(model_dir, digest)
    version = register(info.model_uri, digest, "hilight-vlm", {"hilight.candidate": f"incumbent-{digest}"})
    set_alias("hilight-vlm", "champion", version)
    return version


def _gate_against_incumbents(cfg_path: Path, client, winner_dir: Path, winner: str, winner_version: str) -> None:
    """Two more selection runs (every candidate step cached): against a champion identical to the best candidate
    (not significantly better: held back, the candidate becomes challenger), then against a champion whose LLM is
    zeroed, so it answers nothing (clearly worse: the candidate takes champion). Both decisions are logged with their
    evidence."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from hilight.models.export import GenerationSpec, load_vlm_dir, save_vlm_dir
    from pipelines.run import run_pipeline, step_output

    same = _register_incumbent(client, winner_dir, "copy-of-the-winner")
    run = Client().get_pipeline_run(run_pipeline("select_vision_weights", cfg_path).id)
    assert run.steps["evaluate_incumbent"].status == ExecutionStatus.COMPLETED
    d = step_output(run, "select_and_promote", "selection_decision")
    margin = d["against_incumbent"][winner]
    assert (d["status"], d["champion"], d["challenger"]) == ("held_back", f"champion-v{same}", winner)
    assert margin["estimate"] == 0 and margin["low"] == 0 and d["held_back"][0].startswith("margin:")
    assert str(client.get_model_version_by_alias("hilight-vlm", "champion").version) == same
    assert str(client.get_model_version_by_alias("hilight-vlm", "challenger").version) == winner_version
    mrun = client.get_run(client.get_model_version("hilight-vlm", same).tags["hilight.selection_report"].split("/")[1])
    logged = {f.path for f in client.list_artifacts(mrun.info.run_id, "selection")}
    assert {"selection/decision.json", "selection/decision.md", "selection/comparison.png"} <= logged
    assert mrun.data.tags["hilight.selection_status"] == "held_back"
    assert '"held_back"' in client.get_model_version("hilight-vlm", winner_version).tags["hilight.selection_decision"]

    bundle = load_vlm_dir(winner_dir)
    for param in bundle.vlm.llm.parameters():
        param.data.zero_()  # every logit 0: greedy decoding emits <pad>, an empty answer, whatever the question
    worse_dir = save_vlm_dir(bundle.vlm, bundle.tokenizer, winner_dir.parent.parent / "worse", hidden_act=bundle.meta[
        "hidden_act"], prompt=bundle.meta["prompt"], generation=GenerationSpec(**bundle.meta["generation"]), lineage={})
    worse = _register_incumbent(client, worse_dir, "empty-answers")
    # ranked by text overlap with the references: any answer beats an empty one on every question
    config = yaml.safe_load(cfg_path.read_text())
    config["rule"]["primary"] = {"metric": "billiards/qa/chrf"}
    cfg_path.write_text(yaml.safe_dump(config))
    run = Client().get_pipeline_run(run_pipeline("select_vision_weights", cfg_path).id)
    d = step_output(run, "select_and_promote", "selection_decision")
    answers = step_output(run, "evaluate_incumbent", "incumbent_answers")
    assert (answers["answer"] == "").all()
    assert (d["status"], d["champion"], d["promoted"]) == ("promoted", winner, True), (
        d["explanation"], step_output(run, f"evaluate_{winner}", "vlm_answers")["answer"].tolist())
    assert d["against_incumbent"][winner]["low"] > 0 and d["challenger"] in (d["runner_up"], f"champion-v{worse}")
    assert str(client.get_model_version_by_alias("hilight-vlm", "champion").version) == winner_version
    assert "champion: version " + worse + " -> " + winner_version in d["changes"][0]


def test_lora_pipeline_trains_merges_and_logs_a_loadable_model(zenml_project, caption_manifest, vlm_weights,
                                                              stage1_export):
    import mlflow
    from zenml.client import Client
    from zenml.enums import ExecutionStatus

    from hilight.models.export import load_vlm_dir
    from pipelines.run import run_pipeline, step_output
    from pipelines.stack import mlflow_tracking_uri

    root = zenml_project
    cfg = root / "lora.yaml"
    cfg.write_text("# hilight run lora_finetune -c lora.yaml\n" + yaml.safe_dump(lora_config(
        caption_manifest, root / "outputs" / "lora", vlm_weights["clipvip"], vlm_weights["llm"], stage1_export)))
    run = Client().get_pipeline_run(run_pipeline("lora_finetune", cfg).id)
    assert run.status == ExecutionStatus.COMPLETED
    heldout = step_output(run, "train_lora", "stage2_heldout")
    assert heldout["lm_loss"] < heldout["lm_loss_initial"]
    merged = step_output(run, "merge_model", "merged_model")
    bundle = load_vlm_dir(merged["dir"])
    assert bundle.video_tokens == 12

    client = mlflow.MlflowClient(mlflow_tracking_uri())
    exp = client.get_experiment_by_name("lora_finetune")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.data.tags["hilight.stage"] == "merge"  # the last step to tag the pipeline's shared run
    assert mrun.data.metrics["merge/max_abs_logit_diff"] < 1e-4
    assert [m.step for m in client.get_metric_history(mrun.info.run_id, "val/lm_loss")] == [0, 3, 6]
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    version = mlflow.register_model(merged["model_uri"], "hilight-vlm-test")
    local = mlflow.artifacts.download_artifacts(f"models:/hilight-vlm-test/{version.version}")
    assert list(Path(local).rglob("hilight.json"))
