"""Shared fixtures: tiny synthetic datasets and an isolated ZenML + MLflow project."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from hilight.env import apply_offline_defaults

apply_offline_defaults()
REPO = Path(__file__).resolve().parents[1]
TINY = dict(width=64, height=48, fps=8, duration_s=2.0)  # 16 frames: enough for the 12-frame sampler


@pytest.fixture(scope="session")
def tiny_settings():
    from hilight.data.synth import SynthSettings

    return SynthSettings(**TINY)


@pytest.fixture(scope="session")
def billiards_dir(tmp_path_factory, tiny_settings) -> Path:
    """A 24-clip billiards dataset, generated once per session. Treat as read-only."""
    from hilight.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("billiards"), domain="billiards", n_videos=24, seed=3,
                            settings=tiny_settings, progress=False)


@pytest.fixture(scope="session")
def general_dir(tmp_path_factory, tiny_settings) -> Path:
    from hilight.data.synth import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("general"), domain="general", n_videos=8, seed=3,
                            settings=tiny_settings, progress=False)


@pytest.fixture
def dataset_copy(tmp_path, billiards_dir) -> Path:
    """A private, writable copy of the billiards dataset."""
    dst = tmp_path / "billiards"
    shutil.copytree(billiards_dir, dst)
    return dst


@pytest.fixture
def zenml_project(tmp_path, monkeypatch):
    """An isolated project: its own .zenml config dir (ZenML SQLite store, artifacts, MLflow DB).

    Follows ZenML's template ``clean_zenml_client`` fixture: reset the GlobalConfiguration and
    Client singletons, point ZENML_CONFIG_PATH at a temp dir, restore everything afterwards.
    """
    from zenml.client import Client
    from zenml.config.global_config import GlobalConfiguration

    root = tmp_path / "project"
    (root / ".zenml").mkdir(parents=True)
    shutil.copy(REPO / ".zenml" / "stack.yaml", root / ".zenml" / "stack.yaml")
    shutil.copytree(REPO / "data_contracts", root / "data_contracts")
    original_config, original_client = GlobalConfiguration.get_instance(), Client.get_instance()
    GlobalConfiguration._reset_instance()
    Client._reset_instance()
    monkeypatch.setenv("HILIGHT_PROJECT_ROOT", str(root))
    monkeypatch.setenv("ZENML_CONFIG_PATH", str(root / ".zenml"))
    monkeypatch.chdir(root)
    yield root
    GlobalConfiguration._reset_instance(original_config)
    Client._reset_instance(original_client)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def caption_manifest(tmp_path_factory, billiards_dir, general_dir) -> Path:
    """A validated manifest (the data_validation outputs) of the session's tiny datasets."""
    from hilight.data.contracts import load_contracts
    from hilight.data.ingest import DataValidationConfig, run_ingest

    out = tmp_path_factory.mktemp("manifest")
    config = DataValidationConfig.model_validate({
        "datasets": [{"name": "billiards", "root": str(billiards_dir), "captions": ["captions.json"], "qa": ["qa.json"]},
                     {"name": "general", "domain": "general", "root": str(general_dir), "captions": ["captions.json"],
                      "qa": ["qa.json"]}],
        "output_dir": str(out), "progress": False, "probe": {"workers": 1}})
    run_ingest(config, load_contracts(REPO / "data_contracts"))
    return out


def alignment_config(manifest: Path, output_dir: Path, **train) -> dict:
    """A tiny clipvip_alignment config as a dict (tests dump it to YAML or validate it directly)."""
    return {
        "pipeline": "clipvip_alignment", "name": "test", "output_dir": str(output_dir),
        "data": {"manifest_dir": str(manifest), "train_datasets": ["billiards"], "val_datasets": ["billiards"],
                 "cache_frames": True},
        "model": {"preset": "tiny"},
        "tokenizer": {"vocab_size": 1024, "max_length": 16},
        "loss": {"group_aware": True, "local": {"keep": 12}},
        "sampler": "grouped",
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "val_every": 3, "ckpt_every": 2, "warmup_steps": 1,
                  "progress": False, **train},
    }
