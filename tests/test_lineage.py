"""Lineage in MLflow's own terms: dataset inputs per run (manifest as source, fingerprint as digest, context
training / evaluation) and registered versions whose description says why they hold their alias."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def test_runs_log_the_manifest_datasets_as_inputs(mlflow_store, caption_manifest):
    import mlflow

    from hilight.tracking import log_manifest_inputs

    meta = json.loads((caption_manifest / "manifest.json").read_text())
    fps = meta["dataset_fingerprints"]
    with mlflow.start_run() as run:
        logged = log_manifest_inputs(caption_manifest, {"training": (["billiards"], ["train"]),
                                                        "evaluation": (None, ["val", "test"])})
    assert logged == ["training:billiards[train]", "evaluation:billiards[val+test]", "evaluation:general[val+test]"]
    inputs = mlflow_store.get_run(run.info.run_id).inputs.dataset_inputs
    seen = {(i.dataset.name, {t.key: t.value for t in i.tags}["mlflow.data.context"]): i for i in inputs}
    assert set(seen) == {("billiards[train]", "training"), ("billiards[val+test]", "evaluation"),
                         ("general[val+test]", "evaluation")}
    billiards = seen["billiards[train]", "training"]
    assert billiards.dataset.digest == fps["billiards"][:32]
    assert {t.key: t.value for t in billiards.tags}["hilight.fingerprint"] == fps["billiards"]
    assert "manifest.json" in billiards.dataset.source and billiards.dataset.source_type == "local"
    with pytest.raises(ValueError, match="dataset 'nope' is not in the manifest"):
        log_manifest_inputs(caption_manifest, {"training": (["nope"], None)})


def test_stage2_lineage_names_a_holdout_source_by_its_share_not_val_splits(mlflow_store, caption_manifest):
    """VideoInstruct-style QA has no held-out split: its source validates on a content-hash share of its training
    videos. Its inputs say so; a source without holdout keeps val_splits."""
    import mlflow

    from hilight.tracking import data_roles, log_manifest_inputs
    from hilight.train.lora import MixtureDataSpec

    data = MixtureDataSpec.model_validate({"sources": [
        {"dataset": "general", "kind": "qa", "holdout": 0.02}, {"dataset": "general", "kind": "describe", "holdout": 0.02},
        {"dataset": "billiards", "kind": "qa"}]})
    assert data_roles(data) == {
        "training": [(["billiards"], ["train"]), (["general"], ["train less holdout 0.02"])],
        "evaluation": [(["billiards"], ["val", "test"]), (["general"], ["train holdout 0.02"])]}
    with mlflow.start_run():
        logged = log_manifest_inputs(caption_manifest, data_roles(data))
    assert logged == ["training:billiards[train]", "training:general[train less holdout 0.02]",
                      "evaluation:billiards[val+test]", "evaluation:general[train holdout 0.02]"]


def test_version_descriptions_say_why_they_hold_their_alias(mlflow_store, tmp_path):
    from hilight.registry import set_alias

    client = mlflow_store
    client.create_registered_model("m")
    v1, v2 = (client.create_model_version("m", source=str(tmp_path)).version for _ in range(2))
    set_alias("m", "champion", v1, reason="table1k (selection run r1, decision promoted)")
    assert client.get_model_version("m", v1).description.startswith("champion since ")
    assert client.get_model_version("m", v1).description.endswith(": table1k (selection run r1, decision promoted)")
    set_alias("m", "champion", v2, reason="original (selection run r2, decision promoted)")
    assert client.get_model_version_by_alias("m", "champion").version == v2
    old = client.get_model_version("m", v1).description
    assert old.startswith("was champion until ") and f"then version {v2}: original" in old


def test_data_roles_of_the_text_corpus_use_its_one_dataset_list_for_both_roles():
    """The demo LLM's corpus names its datasets once (``data.datasets``): both roles read those, not every dataset."""
    from hilight.tracking import data_roles
    from hilight.train.text_lm import TextCorpusSpec

    assert data_roles(TextCorpusSpec(datasets=["billiards"])) == {"training": (["billiards"], ["train"]),
                                                                  "evaluation": (["billiards"], ["val", "test"])}
    assert data_roles(TextCorpusSpec()) == {"training": (None, ["train"]), "evaluation": (None, ["val", "test"])}
