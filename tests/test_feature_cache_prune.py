"""Feature-cache housekeeping: every open stamps its directory, `cache_dirs` lists them by last use, and pruning
deletes only old cache directories (never anything else under the root), leaving a deleted key to be recomputed."""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from hilight.cli import app
from hilight.data.feature_cache import USED_FILE, FeatureCache, cache_dirs, prune_cache_dirs

DAY = 86400.0


def _cache(root, name: str, videos: int, used: float) -> FeatureCache:
    """A cache keyed by ``name`` holding ``videos`` entries, last used at ``used`` (epoch seconds)."""
    cache = FeatureCache(root, {"clipvip": name, "longclip": "lc"})
    if videos:
        cache.put({f"sha{i}": {"video": torch.full((3, 4), float(i))} for i in range(videos)})
    os.utime(cache.dir / USED_FILE, (used, used))
    return cache


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "features"
    now = 1_000 * DAY
    _cache(root, "old", 2, now - 40 * DAY)
    _cache(root, "mid", 1, now - 10 * DAY)
    _cache(root, "new", 3, now - 1 * DAY)
    (root / "notes").mkdir()  # not a cache directory (no key.json): never listed, never deleted
    (root / "notes" / "readme.txt").write_text("mine")
    (root / "stray.txt").write_text("mine too")
    return root


def _names(dirs) -> list[str]:
    return [d.key["clipvip"] for d in dirs]


def test_directories_are_listed_by_last_use_and_an_open_stamps_it(root):
    dirs = cache_dirs(root)
    assert _names(dirs) == ["new", "mid", "old"]
    assert [d.shards for d in dirs] == [1, 1, 1]
    assert all(d.bytes > 0 for d in dirs) and dirs[0].bytes > dirs[1].bytes  # three entries against one
    reopened = FeatureCache(root, {"clipvip": "old", "longclip": "lc"})  # a run reads the oldest one again
    assert len(reopened) == 2
    assert _names(cache_dirs(root)) == ["old", "new", "mid"]
    assert cache_dirs(root / "nothing-here") == []


def test_prune_keeps_the_most_recently_used_and_leaves_other_files_alone(root):
    now = 1_000 * DAY
    would = prune_cache_dirs(root, keep=1, dry_run=True, now=now)
    assert _names(would) == ["mid", "old"] and _names(cache_dirs(root)) == ["new", "mid", "old"]

    gone = prune_cache_dirs(root, keep=1, now=now)
    assert _names(gone) == ["mid", "old"]
    assert _names(cache_dirs(root)) == ["new"]
    assert sorted(p.name for p in root.iterdir()) == [cache_dirs(root)[0].digest, "notes", "stray.txt"]
    assert (root / "notes" / "readme.txt").read_text() == "mine"
    # the kept directory still serves its features
    kept = FeatureCache(root, {"clipvip": "new", "longclip": "lc"})
    assert torch.equal(kept.get("sha2", ("video",))[0], torch.full((3, 4), 2.0))
    # a deleted key opens as a new, empty directory: its features are computed again, never half read
    again = FeatureCache(root, {"clipvip": "old", "longclip": "lc"})
    assert len(again) == 0 and again.missing(["sha0"]) == ["sha0"]


def test_prune_by_age_and_both_rules(root):
    now = 1_000 * DAY
    assert _names(prune_cache_dirs(root, unused_days=30, dry_run=True, now=now)) == ["old"]
    # both: beyond the newest one AND unused for 5 days
    assert _names(prune_cache_dirs(root, keep=1, unused_days=5, dry_run=True, now=now)) == ["mid", "old"]
    assert _names(prune_cache_dirs(root, keep=0, unused_days=20, now=now)) == ["old"]
    assert _names(cache_dirs(root)) == ["new", "mid"]


def test_prune_refuses_to_guess(root):
    with pytest.raises(ValueError, match="say what to keep"):
        prune_cache_dirs(root)
    with pytest.raises(ValueError, match="keep must be >= 0, got -1"):
        prune_cache_dirs(root, keep=-1)
    assert len(cache_dirs(root)) == 3


def test_cache_commands(root):
    listed = CliRunner().invoke(app, ["cache", "list", "--dir", str(root)])
    assert listed.exit_code == 0, listed.output
    assert "3 directories" in listed.output and listed.output.count(" MiB ") == 3

    refused = CliRunner().invoke(app, ["cache", "prune", "--dir", str(root)])
    assert refused.exit_code == 2 and "--keep N" in refused.output
    assert len(cache_dirs(root)) == 3

    pruned = CliRunner().invoke(app, ["cache", "prune", "--keep", "2", "--dir", str(root)])
    assert pruned.exit_code == 0, pruned.output
    assert "deleted 1 directories" in pruned.output
    assert _names(cache_dirs(root)) == ["new", "mid"]
