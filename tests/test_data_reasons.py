"""Rejection reasons say what really failed (issue 18, item 6), and every data model refuses unknown keys."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from hilight.data.contracts import DataContract, load_contracts
from hilight.data.ingest import DatasetSpec, DataValidationConfig, ProbeSettings, run_ingest
from tests.conftest import REPO


@pytest.fixture
def odd_dataset(tmp_path, billiards_dir, monkeypatch):
    monkeypatch.setenv("HILIGHT_STATE_DIR", str(tmp_path / "state"))
    root, vids = tmp_path / "odd", tmp_path / "odd" / "videos"
    (vids / "sub").mkdir(parents=True)
    good = sorted((billiards_dir / "videos").glob("*.mp4"))
    for name in ("clip.mkv", "clip.mov", "clip.mp4", "sub/clip.mp4", "ok.mp4", "fallback.mp4"):
        (vids / name).write_bytes(good[0].read_bytes())  # decord reads the container, not the suffix
    from hilight.data.synth.video import write_mp4
    write_mp4(vids / "short.mp4", np.zeros((5, 48, 64, 3), np.uint8), fps=8)
    np.save(vids / "wide.npy", np.zeros((12, 33, 4097, 3), np.uint8))  # 4097x33: the longer side is too long
    (vids / "empty.mp4").write_bytes(b"")
    (vids / "cache.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    refs = ["clip.mkv", "clip.mov", "clip.mp4", "sub/clip.mp4", "ok.mp4", "short.mp4", "wide.npy",
            "absent.pkl", "empty.pkl", "cache.pkl", "fallback.pkl"]
    (root / "captions.json").write_text(json.dumps([{"video": r, "caption": f"a pool table ({r})"} for r in refs]))
    spec = DatasetSpec(name="odd", root=str(root), captions=["captions.json"], pkl_fallback_suffixes=[".mp4"])
    cfg = DataValidationConfig(datasets=[spec], output_dir=str(tmp_path / "out"), progress=False,
                               probe={"workers": 1})
    result = run_ingest(cfg, load_contracts(REPO / "data_contracts"), check=False)
    return vids, pd.read_parquet(result.quarantine_path), pd.read_parquet(result.manifests["captions"])


def _videos(q: pd.DataFrame) -> dict[str, tuple[str, str | None]]:
    return {r.item: (r.reason, r.detail) for r in q[q["table"] == "videos"].itertuples(index=False)}


def test_max_side_checks_the_longer_side(odd_dataset):
    _, q, _ = odd_dataset
    assert _videos(q)["wide.npy"] == ("resolution_too_large", "4097x33: longer side 4097 > 4096")


def test_too_few_frames_says_found_and_needed(odd_dataset):
    _, q, _ = odd_dataset
    assert _videos(q)["short.mp4"] == ("too_few_frames", "5 frames found, 12 needed")


def test_fallback_reasons_name_the_real_file(odd_dataset):
    vids, q, captions = odd_dataset
    videos = _videos(q)
    assert videos["absent.pkl"] == (
        "missing_file", f"no file at {vids / 'absent.pkl'}; no absent.mp4 beside it either (pkl_fallback_suffixes)")
    assert videos["empty.mp4"] == (  # the zero-byte file the .pkl reference resolved to, under its own name
        "zero_byte_file", f"0 bytes at {vids / 'empty.mp4'}; referenced as empty.pkl, resolved by pkl_fallback_suffixes")
    assert videos["cache.pkl"] == (
        "pkl_cache_rejected", f"{vids / 'cache.pkl'} is a pickle; no cache.mp4 beside it either (pkl_fallback_suffixes)")
    caps = q[q["table"] == "captions"].set_index("item")["detail"].to_dict()
    assert caps["a pool table (empty.pkl)"].startswith("empty.pkl -> empty.mp4: zero_byte_file (0 bytes at ")
    assert "fallback.pkl" in set(captions["video"])  # a resolvable .pkl reference is kept, as before


def test_same_stem_files_do_not_share_a_video_id_silently(odd_dataset):
    _, q, captions = odd_dataset
    caps = q[(q["table"] == "captions") & (q["reason"] == "duplicate_video_id")]
    assert sorted(caps["detail"]) == [f"video_id 'clip' already names clip.mkv, not {v}"
                                      for v in ("clip.mov", "clip.mp4", "sub/clip.mp4")]
    kept = captions[captions["video_id"] == "clip"]
    assert kept["video"].tolist() == ["clip.mkv"]  # the first file keeps the id; nothing is merged
    assert not captions.duplicated(["dataset", "video_id", "caption"]).any()


def test_data_models_forbid_unknown_keys():
    with pytest.raises(ValidationError, match="capions"):
        DatasetSpec.model_validate({"name": "d", "root": "x", "capions": ["c.json"]})
    with pytest.raises(ValidationError, match="pkl_fallback_suffix"):
        DatasetSpec.model_validate({"name": "d", "root": "x", "pkl_fallback_suffix": [".mp4"]})
    with pytest.raises(ValidationError, match="worker"):
        ProbeSettings.model_validate({"worker": 4})
    contract = {"name": "c", "version": "1", "table": "videos", "max_reject_fraction": 0.1,
                "expectations": [{"reason": "r", "message": "m", "expect": "expect_column_values_to_be_between",
                                  "column": "a", "min_value": 1}]}
    assert DataContract.model_validate(contract).expectations[0].args == {"min_value": 1}
    with pytest.raises(ValidationError, match="max_reject_fracton"):
        DataContract.model_validate({**contract, "max_reject_fracton": 0.2})
    typo = {**contract, "expectations": [{**contract["expectations"][0], "min_vale": 1}]}
    with pytest.raises(ValidationError, match="min_vale"):
        DataContract.model_validate(typo)
    for model in (DatasetSpec, ProbeSettings, DataValidationConfig, DataContract,
                  DataContract.model_fields["expectations"].annotation.__args__[0]):
        assert model.model_config.get("extra") == "forbid", model


def test_qa_naming_pkl_caches_takes_its_videos_split_from_the_captions(dataset_copy, tmp_path, monkeypatch):
    """The reference's QA files name .pkl caches that pkl_fallback_suffixes resolves to the .mp4 the caption table
    names: the QA takes the split of that video (matched by content), so held-out videos stay out of training."""
    from hilight.data.captions import read_caption_manifest
    from hilight.data.qa import read_qa_manifest

    monkeypatch.setenv("HILIGHT_STATE_DIR", str(tmp_path / "state"))
    qa = json.loads((dataset_copy / "qa.json").read_text())
    (dataset_copy / "qa.json").write_text(json.dumps([{**r, "video": r["video"].replace(".mp4", ".pkl")} for r in qa]))
    spec = DatasetSpec(name="t", root=str(dataset_copy), captions=["captions.json"], qa=["qa.json"],
                       pkl_fallback_suffixes=[".mp4"])
    out = tmp_path / "out"
    run_ingest(DataValidationConfig(datasets=[spec], output_dir=str(out), progress=False, probe={"workers": 1}),
               load_contracts(REPO / "data_contracts"))
    split_of = read_caption_manifest(out).rows.drop_duplicates("video_sha256").set_index("video_sha256")["split"]
    rows = read_qa_manifest(out).rows
    assert len(rows) == len(qa) and set(split_of) >= {"train", "val"}
    assert rows["split"].tolist() == split_of.reindex(rows["video_sha256"]).tolist()
    assert {"val", "test"} & set(rows["split"])  # held-out videos' QA is held out


def test_clip_names_without_a_suffix_resolve_to_the_video_beside_them(dataset_copy, tmp_path, monkeypatch):
    """CLIP-ViP's caption files name clips without their container's suffix (``clip_name``): the file with the
    first of .mp4, .mkv, .webm, ... that exists is used, and the reason says so when none does."""
    monkeypatch.setenv("HILIGHT_STATE_DIR", str(tmp_path / "state"))
    records = json.loads((dataset_copy / "captions.json").read_text())
    renamed = [{"clip_name": r["video"].removesuffix(".mp4"), **{k: v for k, v in r.items() if k != "video"}}
               for r in records] + [{"clip_name": "nowhere", "caption": "a pool table"}]
    (dataset_copy / "captions.json").write_text(json.dumps(renamed))
    spec = DatasetSpec(name="t", root=str(dataset_copy), captions=["captions.json"])
    result = run_ingest(DataValidationConfig(datasets=[spec], output_dir=str(tmp_path / "out"), progress=False,
                                             probe={"workers": 1}), load_contracts(REPO / "data_contracts"), check=False)
    q = pd.read_parquet(result.quarantine_path)
    assert _videos(q) == {"nowhere": ("missing_file", f"no file at {dataset_copy / 'videos' / 'nowhere'}; no nowhere.mp4 "
                                      "or nowhere.mkv or nowhere.webm or nowhere.avi or nowhere.mov beside it either "
                                      "(a name without a suffix)")}
    captions = pd.read_parquet(result.manifests["captions"])
    assert len(captions) == sum(len(r["captions"]) for r in records)  # every real clip's captions kept
