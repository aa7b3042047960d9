"""The stat-keyed content-hash cache: an unchanged tree is not read again, any stat change is, the fingerprint stays
content-based, ``--rehash`` reads everything, and concurrent writers do not corrupt the database."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hilight.data import hashcache
from hilight.data.hashcache import STATS, HashCache
from hilight.data.ingest import DatasetSpec, fingerprint_dataset
from tests.conftest import REPO


@pytest.fixture
def tree(dataset_copy, tmp_path, monkeypatch):
    """A private dataset whose files were last written a minute ago (not "racily clean"), and a private cache."""
    monkeypatch.setenv(hashcache.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setenv(hashcache.REHASH_ENV, "0")  # `--rehash` sets it for the rest of the process
    past = time.time() - 60
    files = [p for p in dataset_copy.rglob("*") if p.is_file()]
    for p in files:
        os.utime(p, (past, past))
    return DatasetSpec(name="d", root=str(dataset_copy), captions=["captions.json"], qa=["qa.json"]), files


def _fingerprint(spec, **kw) -> tuple[str, int, int]:
    """(fingerprint, files hashed, cache hits) of one pass."""
    STATS.reset()
    fp = fingerprint_dataset(spec, **kw)
    return fp, STATS.hashed, STATS.hits


def _videos(spec) -> list[Path]:
    return sorted((Path(spec.root) / "videos").glob("*.mp4"))


def test_unchanged_tree_is_not_read_again(tree):
    spec, files = tree
    hashed_files = [p for p in files if p.parent.name == "videos" or p.name in ("captions.json", "qa.json")]
    cold, n_cold, _ = _fingerprint(spec)
    assert n_cold == len(hashed_files) == 26
    warm, n_warm, hits = _fingerprint(spec)
    assert warm == cold and n_warm == 0 and hits == len(hashed_files)
    rehashed, n_rehash, hits = _fingerprint(spec, rehash=True)
    assert rehashed == cold and n_rehash == len(hashed_files) and hits == 0


def test_content_change_with_same_size_is_seen_through_the_mtime(tree):
    spec, _ = tree
    before, _, _ = _fingerprint(spec)
    video = _videos(spec)[0]
    data = bytearray(video.read_bytes())
    size = len(data)
    data[-1] ^= 1
    video.write_bytes(bytes(data))  # same size, new mtime
    assert video.stat().st_size == size
    after, n, hits = _fingerprint(spec)
    assert after != before and n == 1 and hits == 25


def test_touch_rehashes_one_file_and_keeps_the_fingerprint(tree):
    spec, _ = tree
    before, _, _ = _fingerprint(spec)
    os.utime(_videos(spec)[3])  # touch: mtime now, content unchanged
    after, n, _ = _fingerprint(spec)
    assert after == before and n == 1


def test_size_and_mtime_restored_by_hand_needs_rehash(tree, monkeypatch):
    """git's documented limit, kept on purpose: a same-size edit with the old mtime put back is not seen without
    --rehash (HILIGHT_REHASH=1 or rehash=True)."""
    spec, _ = tree
    before, _, _ = _fingerprint(spec)
    video = _videos(spec)[1]
    st = video.stat()
    data = bytearray(video.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(video, "r+b") as f:  # rewrite in place: same inode
        f.write(bytes(data))
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _fingerprint(spec)[:2] == (before, 0)
    monkeypatch.setenv(hashcache.REHASH_ENV, "1")
    after, n, _ = _fingerprint(spec)
    assert after != before and n == 26


def test_racily_clean_entries_are_not_trusted(tmp_path):
    """A file hashed within the mtime granularity of its last write is hashed again next time (git's racy-git rule),
    then trusted."""
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"x" * 100)
    with HashCache(tmp_path / "c.sqlite") as cache:
        first = cache.digest(f)
        cache.digest(f)
        assert cache.stats.hashed == 2
    old = time.time() - 60
    os.utime(f, (old, old))
    with HashCache(tmp_path / "c.sqlite") as cache:
        assert cache.digest(f) == first and cache.digest(f) == first
        assert cache.stats.hashed == 1 and cache.stats.hits == 1


_WRITER = """
import sys
from hilight.data.ingest import DatasetSpec, fingerprint_dataset
spec = DatasetSpec(name="d", root=sys.argv[1], captions=["captions.json"], qa=["qa.json"])
print(",".join(fingerprint_dataset(spec, rehash=True) for _ in range(int(sys.argv[2]))))
"""


def test_two_processes_writing_at_once_do_not_corrupt_it(tree, tmp_path):
    spec, _ = tree
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, spec.root, "8"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    fingerprints = {fp for out, _ in outs for fp in out.strip().split(",")}
    assert len(fingerprints) == 1
    with HashCache() as cache:
        assert cache.integrity() == "ok"
    warm, n, hits = _fingerprint(spec)
    assert {warm} == fingerprints and n == 0 and hits == 26


def test_validate_rehash_flag_reads_every_file_again(tree, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from hilight.cli import app

    spec, _ = tree
    cfg = tmp_path / "validation.yaml"
    cfg.write_text(yaml.safe_dump({"pipeline": "data_validation", "datasets": [spec.model_dump()], "progress": False,
                                   "contracts_dir": str(REPO / "data_contracts"), "output_dir": str(tmp_path / "out"),
                                   "probe": {"workers": 1}}))
    counts = []
    for flags in ([], [], ["--rehash"]):
        STATS.reset()
        result = CliRunner().invoke(app, ["validate", "-c", str(cfg), *flags])
        assert result.exit_code == 0, result.output
        counts.append((STATS.hashed, STATS.probed))
    # cold: 26 files hashed (fingerprint), 24 clips decoded; warm: nothing; --rehash: every file read once (the probe
    # step trusts what the fingerprint step of the same command just read), no clip decoded again (same content)
    assert counts == [(26, 24), (0, 0), (26, 0)]


def test_a_tree_written_just_now_is_hashed_again(tmp_path, monkeypatch):
    """The racy rule holds for the whole-tree memo too: files written within the window before a pass are read
    again by the next one (a same-size rewrite in the same mtime tick would otherwise go unseen)."""
    monkeypatch.setenv(hashcache.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setenv(hashcache.REHASH_ENV, "0")
    (tmp_path / "d" / "videos").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "d" / "videos" / f"{i}.bin").write_bytes(bytes([i]) * 10)
    spec = DatasetSpec(name="d", root=str(tmp_path / "d"))
    first, n1, _ = _fingerprint(spec)
    second, n2, _ = _fingerprint(spec)
    assert first == second and n1 == n2 == 5


def _used_days(db: Path, table: str = "files") -> list[int]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute(f"SELECT used_day FROM {table}")]


def test_rows_unused_for_memo_days_expire_and_used_ones_stay(tmp_path, monkeypatch):
    """A file deleted (or replaced) leaves its row keyed by an inode nobody stats again: rows unused for MEMO_DAYS
    go, once a day, while a file still looked up keeps its row (stamped at most once a day) and stays a hit."""
    past = time.time() - 60
    kept, gone = tmp_path / "kept.bin", tmp_path / "gone.bin"
    for p in (kept, gone):
        p.write_bytes(os.urandom(1000))
        os.utime(p, (past, past))
    db, day = tmp_path / "hashes.sqlite", hashcache.today()
    with HashCache(db) as cache:
        cache.digests([kept, gone])
        cache.store_probe_facts([("a" * 64, ".mp4", {"n_frames": 3})], "s", "p")
    assert _used_days(db) == [day, day]
    gone.unlink()
    monkeypatch.setattr(hashcache, "today", lambda: day + 60)  # 60 days on: `kept` is looked up again
    with HashCache(db) as cache:
        assert cache.digests([kept]) and cache.stats.hits == 1
    assert sorted(_used_days(db)) == [day, day + 60]  # nothing expired yet; `kept` stamped once
    monkeypatch.setattr(hashcache, "today", lambda: day + 60 + hashcache.MEMO_DAYS - 1)
    with HashCache(db) as cache:
        assert cache.digests([kept]) and cache.stats.hits == 1
    # the next use, MEMO_DAYS after the other rows' last: the deleted file's row and the probe row go
    assert _used_days(db) == [day + 60 + hashcache.MEMO_DAYS - 1]
    assert _used_days(db, "probes") == []


def test_a_version_2_database_gains_used_day_and_keeps_its_rows(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as con:  # the schema before expiry, one stored digest
        con.execute("CREATE TABLE files (dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns "
                    "INTEGER NOT NULL, sha256 TEXT NOT NULL, hashed_at_ns INTEGER NOT NULL, PRIMARY KEY (dev, ino)) "
                    "WITHOUT ROWID")
        con.execute("INSERT INTO files VALUES (1, 2, 3, 4, 'abc', 5)")
        con.execute("PRAGMA user_version = 2")
    HashCache(db).close()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == hashcache.SCHEMA_VERSION
        assert con.execute("SELECT sha256, used_day FROM files").fetchall() == [("abc", hashcache.today())]


def test_a_tree_memo_older_than_its_days_is_made_again(tree, monkeypatch):
    """A tree fingerprint is trusted for TREE_MEMO_DAYS; then the pass looks its files up again (all hits), which
    keeps their own rows from expiring behind a memo that never misses."""
    spec, _ = tree
    calls = []
    digests = HashCache.digests
    monkeypatch.setattr(HashCache, "digests", lambda self, paths, *a, **k: calls.append(len(paths))
                        or digests(self, paths, *a, **k))
    fp, _, _ = _fingerprint(spec)
    assert calls  # the first pass looks every file up
    calls.clear()
    assert _fingerprint(spec)[0] == fp and not calls  # then the tree's memo answers alone
    real = time.time_ns
    monkeypatch.setattr(hashcache.time, "time_ns", lambda: real() + (hashcache.TREE_MEMO_DAYS + 1) * 86_400 * 10**9)
    again, hashed, hits = _fingerprint(spec)
    assert again == fp and calls and hashed == 0 and hits > 0  # made again from the files' rows: all hits


def test_weight_digests_read_an_unchanged_file_once(tmp_path, monkeypatch):
    """The locate steps hash every weight a stage reads (Gemma-2B's shards: GBs) at every run: through the hash
    cache an unchanged file is stat-ed, not read; a changed one is read again."""
    from hilight.models.checkpoints import directory_digest, weights_digest

    monkeypatch.setenv(hashcache.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setenv(hashcache.REHASH_ENV, "0")
    model = tmp_path / "llm"
    model.mkdir()
    past = time.time() - 60
    for name in ("config.json", "model.safetensors"):
        (model / name).write_bytes(os.urandom(2000))
        os.utime(model / name, (past, past))
    STATS.reset()
    first = directory_digest(model), weights_digest(model)
    assert STATS.hashed == 2 and STATS.hashed_bytes == 4000
    STATS.reset()
    assert (directory_digest(model), weights_digest(model)) == first and STATS.hashed == 0 and STATS.hits == 3
    (model / "config.json").write_bytes(os.urandom(2000))
    os.utime(model / "config.json", (past + 1, past + 1))
    STATS.reset()
    assert directory_digest(model) != first[0] and STATS.hashed == 1
