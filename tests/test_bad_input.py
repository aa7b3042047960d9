"""Every kind of bad input is rejected with a named reason, and no valid row is lost."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest

from hilight.data.contracts import load_contracts
from hilight.data.ingest import DataRejectedError, DatasetSpec, DataValidationConfig, run_ingest
from tests.conftest import REPO


class _Bomb:
    """Unpickling this would create a file: proof that .pkl caches are never unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _qa(i, video, turns=None):
    turns = turns or [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A ball moves."}]
    return {"id": i, "video": video, "conversations": turns}


@pytest.fixture
def bad_dataset(dataset_copy, tmp_path):
    """The synthetic dataset plus one bad row per failure mode (the good rows stay untouched)."""
    root, vids = dataset_copy, dataset_copy / "videos"
    good = json.loads((root / "captions.json").read_text())
    good_qa = json.loads((root / "qa.json").read_text())
    a_good = good[0]["video"]
    src = (vids / a_good).read_bytes()
    (vids / "zero.mp4").write_bytes(b"")
    (vids / "truncated.mp4").write_bytes(src[: len(src) // 2])
    (vids / "notvideo.mp4").write_bytes(b"this is a text file, not an mp4" * 50)
    from hilight.data.synth.video import write_mp4
    write_mp4(vids / "short.mp4", np.zeros((5, 48, 64, 3), np.uint8), fps=8)
    (tmp_path / "outside.mp4").write_bytes(src)
    os.symlink(tmp_path / "outside.mp4", vids / "escape.mp4")
    marker = tmp_path / "pwned"
    (vids / "cache.pkl").write_bytes(pickle.dumps(_Bomb(str(marker))))
    np.save(vids / "frames.npy", np.zeros((12, 3, 32, 32), np.float32))
    bad_caps = [
        {"video": "missing.mp4", "caption": "bad: missing file"},
        {"video": "zero.mp4", "caption": "bad: zero byte"},
        {"video": "truncated.mp4", "caption": "bad: truncated"},
        {"video": "notvideo.mp4", "caption": "bad: not a video"},
        {"video": "short.mp4", "caption": "bad: too few frames"},
        {"video": "../outside.mp4", "caption": "bad: dotdot"},
        {"video": str(tmp_path / "outside.mp4"), "caption": "bad: absolute"},
        {"video": "escape.mp4", "caption": "bad: symlink out"},
        {"video": "cache.pkl", "caption": "bad: pickle"},
        {"video": a_good, "caption": ""},
        {"video": a_good, "caption": " ".join(["word"] * 120)},
        {"video": a_good},
        {"video": 42, "caption": "wrong type"},
        {"video": a_good, "caption": good[0]["captions"][0]["caption"]},  # duplicate of a good row
        {"video": "frames.npy", "caption": "good: npy array input"},
    ]
    text = json.dumps(good + bad_caps)[:-1] + ', {"video": "%s", "caption": "bad utf8 \\u00e9 ' % a_good
    (root / "captions.json").write_bytes(text.encode() + b"\xff\xfe\"}]")
    bad_qa = [
        _qa("q_nomarker", a_good, [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}]),
        _qa("q_two", a_good, [{"from": "human", "value": "<video> <video> What?"}, {"from": "gpt", "value": "x"}]),
        _qa("q_alt", a_good, [{"from": "human", "value": "<video> Q"}, {"from": "human", "value": "Q2"}]),
        dict(good_qa[0]),  # the same record again: a duplicate
        _qa(good_qa[0]["id"], a_good, [{"from": "human", "value": "<video>\nAnother question?"},
                                        {"from": "gpt", "value": "Another answer."}]),  # same id, new QA: kept
        {"id": "q_schema", "conversations": []},
        _qa("q_missing", "gone.mp4"),
    ]
    (root / "qa.json").write_text(json.dumps(good_qa + bad_qa))
    (root / "broken.json").write_text('[{"id": "x", "video": "a.mp4",, ]')
    return root, good, good_qa, marker


def _run(root, allow_rejects=False, **kw):
    spec = DatasetSpec(name="bil", root=str(root), captions=["captions.json"], qa=["qa.json", "broken.json"])
    cfg = DataValidationConfig(datasets=[spec], output_dir=str(root.parent / "out"), progress=False,
                               probe={"workers": 2, "decode_frames": 12}, allow_rejects=allow_rejects)
    return run_ingest(cfg, load_contracts(REPO / "data_contracts"), **kw)


def test_each_bad_input_has_a_named_reason_and_no_valid_row_is_lost(bad_dataset):
    root, good, good_qa, marker = bad_dataset
    result = _run(root, check=False)
    q = pd.read_parquet(result.quarantine_path)
    vids = q[q["table"] == "videos"].set_index("item")["reason"].to_dict()
    assert vids == {
        "missing.mp4": "missing_file", "zero.mp4": "zero_byte_file", "truncated.mp4": "undecodable_video",
        "notvideo.mp4": "undecodable_video", "short.mp4": "too_few_frames", "../outside.mp4": "path_escapes_root",
        str(root.parent / "outside.mp4"): "path_escapes_root", "escape.mp4": "path_escapes_root",
        "cache.pkl": "pkl_cache_rejected", "gone.mp4": "missing_file",
    }
    assert not marker.exists(), "a .pkl cache was unpickled"
    pkl = q[q["reason"] == "pkl_cache_rejected"]["message"].iloc[0]
    assert "supply the source video or a .npy array" in pkl
    assert "Error reading" in q[q["item"] == "notvideo.mp4"]["detail"].iloc[0]

    caps = q[q["table"] == "captions"]
    by_reason = caps.groupby("reason")["item"].apply(list).to_dict()
    assert by_reason["empty_caption"] == [""]
    assert len(by_reason["caption_too_long"]) == 1
    assert len(by_reason["wrong_schema"]) == 2
    assert sorted(caps[caps["reason"] == "wrong_schema"]["detail"]) == ["'video' must be a string, got int",
                                                                       "missing key 'caption' (or 'captions')"]
    assert by_reason["duplicate_id"] == [good[0]["captions"][0]["caption"]]
    assert by_reason["invalid_utf8"] == ["bad utf8 é \\xff\\xfe"]
    assert len(by_reason["video_rejected"]) == 9
    assert caps[caps["item"] == "bad: pickle"]["detail"].iloc[0].startswith("cache.pkl: pkl_cache_rejected")

    qa = q[q["table"] == "qa"].set_index("item")["reason"].to_dict()
    assert qa["q_nomarker"] == "no_video_marker" and qa["q_two"] == "multiple_video_markers"
    assert qa["q_alt"] == "non_alternating_turns" and qa[good_qa[0]["id"]] == "duplicate_id"
    assert qa["q_schema"] == "wrong_schema" and qa["q_missing"] == "video_rejected"
    unreadable = q[q["reason"] == "unreadable_file"]
    assert len(unreadable) == 1 and "broken.json at line 1" in unreadable["detail"].iloc[0]

    # no valid row lost: every good caption/QA and the .npy input are in the manifests, once
    manifest = pd.read_parquet(result.manifests["captions"])
    expected = {(r["video"], c["caption"]) for r in good for c in r["captions"]} | {("frames.npy", "good: npy array input")}
    assert set(zip(manifest["video"], manifest["caption"])) == expected and len(manifest) == len(expected)
    qa_manifest = pd.read_parquet(result.manifests["qa"])
    assert sorted(qa_manifest["id"]) == sorted([r["id"] for r in good_qa] + [good_qa[0]["id"]])  # VideoInstruct-style
    assert len(q) + len(manifest) + len(qa_manifest) + len(pd.read_parquet(result.manifests["videos"])) == \
        sum(result.counts.values())


def test_threshold_fails_with_top_reasons_and_report(bad_dataset):
    root = bad_dataset[0]
    with pytest.raises(DataRejectedError) as err:
        _run(root)
    msg = str(err.value)
    assert "videos/bil: 10/35 rejected (28.6% > 10%)" in msg
    assert "Top reasons: captions:video_rejected x9, videos:path_escapes_root x3" in msg
    # the failed run is kept in its own directory, named in the message, and never becomes the current manifest
    from hilight.data.manifest import latest_version

    failed = latest_version(root.parent / "out")
    assert failed.name.endswith("_failed") and f"Report: {failed / 'report.md'}" in msg
    assert "This run was not published: there is no validated manifest yet" in msg
    assert not (root.parent / "out" / "manifest.json").exists()
    report = (failed / "report.md").read_text()
    assert "`captions` / `caption_too_long` (1)" in report and "**FAIL**" in report


def test_clean_data_passes(billiards_dir, tmp_path):
    spec = DatasetSpec(name="bil", root=str(billiards_dir), captions=["captions.json"], qa=["qa.json"])
    cfg = DataValidationConfig(datasets=[spec], output_dir=str(tmp_path / "out"), progress=False)
    result = run_ingest(cfg, load_contracts(REPO / "data_contracts"))
    assert result.counts["videos_rejected"] == result.counts["captions_rejected"] == result.counts["qa_rejected"] == 0
    assert result.counts["videos_accepted"] == 24
    meta = __import__("pyarrow.parquet", fromlist=["x"]).read_schema(result.manifests["captions"]).metadata
    assert meta[b"hilight.data_fingerprint"].decode() == result.fingerprints["combined"]


def test_captions_without_a_split_validate_but_selecting_a_split_names_the_fix(dataset_copy, tmp_path):
    """A caption table whose records carry no split field is valid data (nothing rejected, nothing lost), but no
    run can select train or val rows from it: the error says what splits there are and how to fix it."""
    from hilight.data.captions import ManifestError, read_caption_manifest
    from hilight.data.qa import read_qa_manifest

    records = json.loads((dataset_copy / "captions.json").read_text())
    (dataset_copy / "captions.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "split"}
                                                            for r in records]))
    spec = DatasetSpec(name="bil", root=str(dataset_copy), captions=["captions.json"], qa=["qa.json"])
    out = tmp_path / "out"
    result = run_ingest(DataValidationConfig(datasets=[spec], output_dir=str(out), progress=False),
                        load_contracts(REPO / "data_contracts"))
    assert result.counts["captions_rejected"] == 0 and result.counts["captions_accepted"] > 0
    captions = read_caption_manifest(out)
    assert len(captions.rows) == result.counts["captions_accepted"]
    with pytest.raises(ManifestError, match=r"splits=\['train'\]: their rows have splits \{'missing': \d+\}; give the "
                                            r"caption records a split field"):
        captions.select(["bil"], ["train"])
    # their QA falls to "train" (as for QA-only sets): asking it for val rows points at the held-out options
    with pytest.raises(ManifestError, match=r"splits \{'train': \d+\}; QA of videos without captions is all "
                                            r"'train'.*holdout"):
        read_qa_manifest(out).select(["bil"], ["val", "test"])


def test_dataset_without_qa_files_validates(tmp_path, billiards_dir):
    """Caption-only datasets (the table1k alignment data has no QA) must validate; nothing is rejected."""
    from hilight.data.contracts import load_contracts
    from hilight.data.ingest import DataValidationConfig, run_ingest
    from tests.conftest import REPO

    config = DataValidationConfig.model_validate({
        "datasets": [{"name": "billiards", "root": str(billiards_dir), "captions": ["captions.json"]}],
        "output_dir": str(tmp_path / "out"), "progress": False, "probe": {"workers": 1}})
    result = run_ingest(config, load_contracts(REPO / "data_contracts"))
    assert result.counts["qa_accepted"] == 0 and result.counts["captions_rejected"] == 0
    assert result.counts["captions_accepted"] > 0


def test_bad_corpus_through_the_chain(bad_dataset, tmp_path):
    """Drill (d): the bad corpus through validation, then what each stage reads from the manifest: every bad record
    stays out with its reason, every good record (the .npy frames included) reaches training and the VLM stages."""
    from hilight.data.captions import CaptionVideoDataset, read_caption_manifest
    from hilight.data.qa import encode_samples, read_qa_manifest
    from hilight.models.tokenizers import build_clip_tokenizer, build_gemma_tokenizer

    root, good, good_qa, marker = bad_dataset
    result = _run(root, allow_rejects=True)  # the explicit way to accept a partial dataset
    assert result.status == "accepted_with_rejects"
    out = root.parent / "out"
    quarantined = pd.read_parquet(result.quarantine_path)
    assert quarantined["reason"].notna().all() and (quarantined["reason"] != "").all()

    # stage 0 reads every accepted caption, and decodes every accepted video, the .npy array included
    captions = read_caption_manifest(out).rows
    assert len(captions) == sum(len(r["captions"]) for r in good) + 1
    tok = build_clip_tokenizer(captions["caption"].tolist(), tmp_path / "tok", vocab_size=1024, max_length=16)
    data = CaptionVideoDataset(captions, tok, num_frames=4, image_size=32, max_length=16)
    batch = data.collate([data[i] for i in range(len(data))])
    assert batch["pixel_values"].shape[:2] == (len(data.video_files), 4)
    assert torch_isfinite(batch["pixel_values"])
    assert any(f.endswith("frames.npy") for f in data.video_files)

    # the VLM stages read every accepted conversation; the template keeps them all
    qa = read_qa_manifest(out).rows
    assert sorted(qa["id"]) == sorted([r["id"] for r in good_qa] + [good_qa[0]["id"]])  # + the VideoInstruct-style one
    gemma = build_gemma_tokenizer([c for r in good for c in (x["caption"] for x in r["captions"])] + ["yes no"],
                                  tmp_path / "gemma", vocab_size=300)
    encoded = encode_samples(qa, gemma, video_tokens=4, max_length=512)
    assert len(encoded.samples) == len(qa) and encoded.rejected.empty
    assert not marker.exists()
    print(f"bad corpus: {len(quarantined)} records rejected with reasons, {len(captions)} captions and {len(qa)} "
          "conversations reached the stages")


def torch_isfinite(x) -> bool:
    import torch

    return bool(torch.isfinite(x).all())
