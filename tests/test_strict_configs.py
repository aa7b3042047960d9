"""Every pydantic model a config can reach forbids unknown keys, and a typo names the closest valid key."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from hilight.config import ConfigError, import_object, load_config, nested_models
from pipelines import PIPELINES

# Top-level models of everything a user writes: pipeline configs, the retrain config, data contracts, the VLM
# evaluation spec, the model presets and the decoding settings of a model directory.
ROOTS = [
    *(ref for _, ref in PIPELINES.values()),
    "hilight.retrain:RetrainConfig",
    "hilight.data.contracts:DataContract",
    "hilight.eval.vlm:VLMEvalSpec",
    "hilight.models.clipvip:CLIPViPConfig",
    "hilight.models.token_mining:TokenMiningConfig",
    "hilight.models.export:GenerationSpec",
]
# Models that take free-form keys on purpose, with the reason (none today).
OPEN_ON_PURPOSE: set[str] = set()


def _reachable() -> dict[str, type[BaseModel]]:
    out = {}
    for ref in ROOTS:
        for m in nested_models(import_object(ref)):
            out[f"{m.__module__}:{m.__qualname__}"] = m
    return out


def test_the_walk_reaches_nested_blocks():
    names = set(_reachable())
    for expected in ("hilight.data.ingest:DatasetSpec", "hilight.data.ingest:ProbeSettings",
                     "hilight.train.loop:TrainSettings", "hilight.retrain:ScheduleSpec",
                     "hilight.experiments.selection:SelectionRule", "hilight.eval.vlm:VLMEvalSpec"):
        assert expected in names
    assert len(names) >= 35


@pytest.mark.parametrize("name", sorted(_reachable()))
def test_every_config_model_forbids_unknown_keys(name):
    model = _reachable()[name]
    if name in OPEN_ON_PURPOSE:
        pytest.skip("free-form keys on purpose: " + name)
    assert model.model_config.get("extra") == "forbid", f"{name} accepts unknown keys; add extra='forbid'"


@pytest.mark.parametrize("yaml_text, expected", [
    ("datasets: [{name: a, root: r, capions: [c.json]}]\n", "datasets.0.capions: unknown key `capions`; did you mean `captions`?"),
    ("datasets: [{name: a, root: r, pkl_fallback_suffix: [.mp4]}]\n",
     "did you mean `pkl_fallback_suffixes`?"),
    ("datasets: [{name: a, root: r}]\nprobe: {worker: 2}\n", "probe.worker: unknown key `worker`; did you mean `workers`?"),
    ("datasets: [{name: a, root: r}]\noutput_dri: x\n", "output_dri: unknown key `output_dri`; did you mean `output_dir`?"),
    ("datasets: [{name: a, root: r}]\nzzz: 1\n", "zzz: unknown key `zzz`; valid keys here: allow_rejects, contracts_dir, datasets,"),
])
def test_unknown_key_names_the_closest_valid_one(tmp_path, yaml_text, expected):
    from hilight.data.ingest import DataValidationConfig

    path = tmp_path / "c.yaml"
    path.write_text("pipeline: data_validation\n" + yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, DataValidationConfig)
    assert expected in str(err.value)


def test_nested_training_typo_is_suggested(tmp_path):
    from hilight.train.alignment import AlignmentConfig

    path = tmp_path / "c.yaml"
    path.write_text("pipeline: clipvip_alignment\ndata: {manifest_dir: m, train_datasets: [a]}\n"
                    "train: {max_stpes: 3}\nloss: {local: {placment: after_embedding}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, AlignmentConfig)
    msg = str(err.value)
    assert "train.max_stpes: unknown key `max_stpes`; did you mean `max_steps`?" in msg
    assert "loss.local.placment: unknown key `placment`; did you mean `placement`?" in msg
