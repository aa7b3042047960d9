"""Incremental validation: probe results are cached by (content hash, suffix, probe settings, prober version), so a
re-validation decodes only new or changed clips, and still writes the manifest and quarantine a from-scratch run
writes."""

from __future__ import annotations

import json
import os
import struct
import time

import pandas as pd
import pytest

from hilight.data import hashcache
from hilight.data.contracts import load_contracts
from hilight.data.hashcache import STATS
from hilight.data.ingest import DataValidationConfig, run_ingest
from tests.conftest import REPO


def _free_box(tag: int) -> bytes:
    """An MP4 top-level ``free`` box: decoders skip it, so appending one makes new bytes that decode the same."""
    payload = f"hilight-test-{tag}".encode()
    return struct.pack(">I", 8 + len(payload)) + b"free" + payload


def _add_clips(root, sources, start: int, n: int) -> None:
    """``n`` distinct clips (copies of ``sources`` with a different ``free`` box each) and their captions."""
    caps = json.loads((root / "captions.json").read_text()) if (root / "captions.json").exists() else []
    for i in range(start, start + n):
        src = sources[i % len(sources)]
        (root / "videos" / f"clip{i:04d}.mp4").write_bytes(src.read_bytes() + _free_box(i))
        caps.append({"video": f"clip{i:04d}.mp4", "captions": [{"caption": f"clip {i} shows a pool table"}]})
    (root / "captions.json").write_text(json.dumps(caps))


@pytest.fixture
def clips200(tmp_path, billiards_dir):
    root = tmp_path / "many"
    (root / "videos").mkdir(parents=True)
    sources = sorted((billiards_dir / "videos").glob("*.mp4"))
    _add_clips(root, sources, 0, 198)
    good = (root / "videos" / "clip0000.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(good[: len(good) // 2])  # two bad clips: a quarantine to compare
    (root / "videos" / "empty.mp4").write_bytes(b"")
    caps = json.loads((root / "captions.json").read_text())
    caps += [{"video": "truncated.mp4", "caption": "bad: truncated"}, {"video": "empty.mp4", "caption": "bad: empty"}]
    (root / "captions.json").write_text(json.dumps(caps))
    past = time.time() - 60  # written "long ago": their cache entries are trusted at once (not racily clean)
    for p in root.rglob("*"):
        os.utime(p, (past, past))
    return root, sources


def _validate(root, out, state, monkeypatch):
    monkeypatch.setenv(hashcache.STATE_DIR_ENV, str(state))
    cfg = DataValidationConfig.model_validate({
        "datasets": [{"name": "many", "root": str(root), "captions": ["captions.json"]}],
        "output_dir": str(out), "progress": False, "probe": {"workers": 2}})
    STATS.reset()
    result = run_ingest(cfg, load_contracts(REPO / "data_contracts"), check=False)
    return result, STATS.probed


def _outputs(result) -> dict[str, pd.DataFrame]:
    tables = {name: pd.read_parquet(path) for name, path in result.manifests.items()}
    tables["quarantine"] = pd.read_parquet(result.quarantine_path)
    return tables


def test_adding_4_clips_to_200_probes_only_the_4(clips200, tmp_path, monkeypatch):
    root, sources = clips200
    state = tmp_path / "state"
    first, probed = _validate(root, tmp_path / "out", state, monkeypatch)
    assert probed == 199 and first.counts["videos_accepted"] == 198  # 200 clips; the empty one is never decoded
    assert first.counts["videos_rejected"] == 2

    _add_clips(root, sources, 198, 4)
    again, probed = _validate(root, tmp_path / "out", state, monkeypatch)
    assert probed == 4, "only the new clips are decoded"
    assert again.counts["videos_accepted"] == 202 and STATS.probe_hits == 199  # the empty clip is never decoded

    scratch, probed = _validate(root, tmp_path / "scratch_out", tmp_path / "fresh_state", monkeypatch)
    assert probed == 203
    incremental, full = _outputs(again), _outputs(scratch)
    for name in full:
        pd.testing.assert_frame_equal(incremental[name], full[name], check_dtype=True)
    q = full["quarantine"].set_index("item")["reason"].to_dict()
    assert q["truncated.mp4"] == "undecodable_video" and q["empty.mp4"] == "zero_byte_file"


def test_a_changed_clip_is_probed_again(clips200, tmp_path, monkeypatch):
    root, _ = clips200
    _validate(root, tmp_path / "out", tmp_path / "state", monkeypatch)
    clip = root / "videos" / "clip0007.mp4"
    clip.write_bytes(clip.read_bytes()[:200])  # now truncated
    result, probed = _validate(root, tmp_path / "out", tmp_path / "state", monkeypatch)
    assert probed == 1
    q = pd.read_parquet(result.quarantine_path).set_index("item")["reason"].to_dict()
    assert q["clip0007.mp4"] == "undecodable_video"
