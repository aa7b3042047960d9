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


@pytest.fixture(autouse=True)
def _no_mlflow_state_between_tests():
    """MLflow keeps the tracking URI, the active experiment and the run stack in module globals. A test that set them
    (itself, or through ZenML's tracker) must not hand them to the next test on its worker, whose store is another
    one: seen as "No Experiment with id=2 exists" and a file-store URI where a test had set an SQLite one."""
    yield
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
    sys.modules["mlflow.tracking.fluent"]._active_experiment_id = None
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers and process groups started by tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def llm_pretrain_config(manifest: Path, output_dir: Path, **train) -> dict:
    """A tiny llm_pretrain config as a dict."""
    return {"pipeline": "llm_pretrain", "name": "test", "output_dir": str(output_dir),
            "data": {"manifest_dir": str(manifest)}, "vocab_size": 400, "max_length": 64,
            "train": {"max_steps": 80, "batch_size": 16, "lr": 5e-3, "warmup_steps": 2, "weight_decay": 0.0,
                      "val_every": 40, "ckpt_every": 40, "select_metric": "val/lm_loss", "select_mode": "min",
                      "progress": False, **train}}


def tokenmining_config(manifest: Path, output_dir: Path, clipvip: Path, llm: Path, **train) -> dict:
    """A tiny tokenmining_pretrain config as a dict (features cached under output_dir)."""
    return {"pipeline": "tokenmining_pretrain", "name": "test", "output_dir": str(output_dir),
            "data": {"manifest_dir": str(manifest), "max_length": 96, "max_val_samples": 8},
            "vision": {"clipvip": str(clipvip), "longclip_random_init": "tiny"},
            "llm": {"dir": str(llm)}, "token_mining": {"expand": 2},
            "features": {"dir": str(output_dir / "features")}, "eval_batch_size": 8,
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0,
                      "val_every": 3, "ckpt_every": 3, "select_metric": "val/lm_loss", "select_mode": "min",
                      "progress": False, **train}}


def lora_config(manifest: Path, output_dir: Path, clipvip: Path, llm: Path, init: Path | str, **train) -> dict:
    """A tiny lora_finetune config as a dict: QA + describe sources of both domains, TokenMining tuned."""
    return {"pipeline": "lora_finetune", "name": "test", "output_dir": str(output_dir),
            "data": {"manifest_dir": str(manifest), "max_length": 128, "max_val_samples": 6,
                     "sources": [{"dataset": "billiards", "kind": "qa"}, {"dataset": "billiards", "kind": "describe"},
                                 {"dataset": "general", "kind": "qa", "ratio": 0.5}]},
            "vision": {"clipvip": str(clipvip), "longclip_random_init": "tiny"},
            "llm": {"dir": str(llm)}, "token_mining": {"expand": 2, "init": str(init)},
            "lora": {"r": 4, "alpha": 8, "tune_token_mining": True},
            "features": {"dir": str(output_dir / "features")}, "eval_batch_size": 8,
            "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0,
                      "val_every": 3, "ckpt_every": 3, "select_metric": "val/lm_loss", "select_mode": "min",
                      "progress": False, **train}}


def clipvip_candidate(root: Path, manifest: Path, seed: int) -> Path:
    """A tiny 96-px CLIP-ViP export with its own tokenizer (the judge needs one); ``seed`` varies the weights."""
    import pandas as pd

    from hilight.models.checkpoints import save_model
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.models.tokenizers import build_clip_tokenizer

    out = root / f"clipvip_{seed}"
    cfg = load_preset("tiny", {"vision": {"image_size": 96, "patch_size": 16}})
    save_model(build_clipvip(cfg, seed=seed), out, {"family": "clipvip", "model": cfg.model_dump(mode="json")})
    captions = pd.read_parquet(manifest / "captions.parquet")["caption"].tolist()
    build_clip_tokenizer(captions, out / "tokenizer", vocab_size=1024, max_length=16)
    return out


def selection_config(root: Path, manifest: Path, vlm_weights: dict, billiards_dir: Path, general_dir: Path) -> dict:
    """A tiny select_vision_weights config (two random CLIP-ViP candidates, 3 steps per stage) as a dict; writes
    its stage-1/stage-2 base YAMLs and candidate weights under ``root``."""
    import yaml

    a, b = clipvip_candidate(root, manifest, 0), clipvip_candidate(root, manifest, 1)
    s1, s2 = root / "stage1.yaml", root / "stage2.yaml"
    s1.write_text(yaml.safe_dump(tokenmining_config(manifest, root / "unused", a, vlm_weights["llm"], max_steps=3,
                                                    val_every=3)))
    s2.write_text(yaml.safe_dump(lora_config(manifest, root / "unused2", a, vlm_weights["llm"], "unused", max_steps=3,
                                             val_every=3)))
    return {
        "pipeline": "select_vision_weights", "name": "test", "output_dir": str(root / "outputs" / "selection"),
        "candidates": {"original": {"clipvip": str(a)}, "table1k": {"clipvip": str(b)}},
        "stage1": str(s1), "stage2": str(s2),
        "evaluation": {"manifest_dir": str(manifest), "max_videos": 3, "judge": str(a), "batch_size": 8,
                       "events": {"billiards": str(billiards_dir / "events.json"),
                                  "general": str(general_dir / "events.json")},
                       "generation": {"temperature": 0.1, "max_new_tokens": 12}},
        "rule": {"primary": {"metric": "billiards/qa/rougeL"},
                 "guards": [{"metric": "general/qa/rougeL", "tolerance": 0.5}],
                 "tie_breakers": [{"metric": "billiards/fact_accuracy"}]},
    }


@pytest.fixture(scope="session")
def stage1_export(tmp_path_factory, caption_manifest, vlm_weights) -> Path:
    """An (untrained) TokenMining export matching the tiny towers and LLM, as stage 2's init."""
    from hilight.models.token_mining import save_token_mining
    from hilight.train.tokenmining import TokenMiningPretrainConfig
    from hilight.train.vlm_parts import build_vlm_parts

    cfg = TokenMiningPretrainConfig.model_validate(
        tokenmining_config(caption_manifest, tmp_path_factory.mktemp("s1"), vlm_weights["clipvip"], vlm_weights["llm"]))
    parts = build_vlm_parts(cfg.vision, cfg.llm, cfg.token_mining)
    return save_token_mining(parts.vlm.token_mining, tmp_path_factory.mktemp("stage1") / "best", {"test": True})


@pytest.fixture(scope="session")
def vlm_weights(tmp_path_factory, caption_manifest) -> dict[str, Path]:
    """A saved tiny CLIP-ViP (96 px, like the Long-CLIP preset) and a tiny text-pretrained Gemma directory."""
    from hilight.models.checkpoints import save_model
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.train.text_lm import LLMPretrainConfig, run_llm_pretrain

    root = tmp_path_factory.mktemp("vlm_weights")
    cfg = load_preset("tiny", {"vision": {"image_size": 96, "patch_size": 16}})
    save_model(build_clipvip(cfg, seed=0), root / "clipvip", {"family": "clipvip", "model": cfg.model_dump(mode="json")})
    llm = run_llm_pretrain(LLMPretrainConfig.model_validate(llm_pretrain_config(caption_manifest, root / "llm")))
    return {"clipvip": root / "clipvip", "llm": llm.model_dir, "llm_result": llm}
