"""Fingerprints see content, not location; probing is the same in parallel and in sequence."""

from __future__ import annotations

import json
import shutil

import numpy as np

from hilight.data.ingest import DatasetSpec, fingerprint_dataset
from hilight.data.probe import probe_files, resolve_video_path


def _spec(root):
    return DatasetSpec(name="d", root=str(root), captions=["captions.json"], qa=["qa.json"])


def test_fingerprint_is_path_independent_and_content_sensitive(billiards_dir, tmp_path):
    a = fingerprint_dataset(_spec(billiards_dir))
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(billiards_dir, moved)
    assert fingerprint_dataset(_spec(moved)) == a
    video = sorted((moved / "videos").iterdir())[0]
    data = bytearray(video.read_bytes())
    data[-1] ^= 1
    video.write_bytes(bytes(data))
    b = fingerprint_dataset(_spec(moved))
    assert b != a
    caps = json.loads((moved / "captions.json").read_text())
    caps[0]["captions"][0]["caption"] += "!"
    (moved / "captions.json").write_text(json.dumps(caps))
    assert fingerprint_dataset(_spec(moved)) not in (a, b)
    (moved / "videos" / "new.mp4").write_bytes(b"x")
    assert fingerprint_dataset(_spec(moved)) != b


def test_parallel_probe_matches_sequential(billiards_dir):
    paths = [str(p) for p in sorted((billiards_dir / "videos").glob("*.mp4"))] + [None]
    seq = probe_files(paths, workers=1, progress=False)
    par = probe_files(paths, workers=2, progress=False)
    threads = probe_files(paths, workers=2, progress=False, executor="threads")
    assert seq.equals(par) and seq.equals(threads)
    assert seq["decodable"].iloc[:-1].all() and seq["n_frames"].iloc[0] == 16 and seq["fps"].iloc[0] == 8.0
    assert len(seq["sha256"].iloc[0]) == 64 and seq["exists"].iloc[-1] is None


def test_npy_input_is_probed_without_pickle(tmp_path):
    np.save(tmp_path / "ok.npy", np.zeros((12, 32, 40, 3), np.uint8))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    np.save(tmp_path / "flat.npy", np.zeros((12, 32), np.uint8))
    rows = probe_files([str(tmp_path / n) for n in ("ok.npy", "obj.npy", "flat.npy")], workers=1, progress=False)
    assert rows.loc[0, ["decodable", "n_frames", "width", "height"]].tolist() == [True, 12, 40, 32]
    assert not rows.loc[1, "decodable"] and "Python objects" in rows.loc[1, "probe_error"]
    assert not rows.loc[2, "decodable"] and "[T,3,H,W]" in rows.loc[2, "probe_error"]


def test_path_resolution_guards_the_root(tmp_path):
    (tmp_path / "videos").mkdir()
    assert resolve_video_path(tmp_path, "videos", "a/b.mp4")[1] is None
    assert "contains '..'" in resolve_video_path(tmp_path, "videos", "../x.mp4")[1]
    assert "absolute path" in resolve_video_path(tmp_path, "videos", "/etc/passwd")[1]
    (tmp_path / "videos" / "link.mp4").symlink_to("/etc/hostname")
    assert "outside the data root" in resolve_video_path(tmp_path, "videos", "link.mp4")[1]
