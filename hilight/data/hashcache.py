"""A stat-keyed content-hash cache and a probe-result cache, in one small SQLite database.

The idea is git's index (and DVC's state database): a file whose ``(st_dev, st_ino, st_size, st_mtime_ns)`` are
those recorded when it was last hashed is assumed to still have the recorded SHA-256, so an unchanged tree is
fingerprinted with one ``stat`` per file instead of reading every byte. Any change to one of the four fields
(a rewrite, a ``touch``, a copy, a replacement by another file) makes the entry miss and the file is read again;
the fingerprints built from these digests stay content-based, so a ``touch`` costs one rehash and changes nothing.

What the cache cannot see (as git's documentation says of its index): a content change made with the size *and*
the mtime restored by hand (``touch -d``, ``cp --preserve``, some sync tools). ``--rehash`` (or
``HILIGHT_REHASH=1``) hashes every file again and refreshes the entries.

"Racily clean" entries are handled as git does: an entry whose file was modified less than ``RACY_WINDOW_NS``
before it was hashed is not trusted (a write in the same timestamp tick could leave size and mtime unchanged), so
such a file is hashed again on the next pass, after which its entry is trusted.

Where: ``$HILIGHT_STATE_DIR/hashcache.sqlite``, by default ``<project>/.zenml/local_stores/hilight/`` beside the
ZenML and MLflow stores (git-ignored). Deleting it only makes the next pass cold. SQLite in WAL mode with a busy
timeout and upserts: concurrent runs (two validations, a retrain check beside a pipeline) read and write it
safely; it must be on a local disk (WAL needs shared memory, which network filesystems do not give).

A whole tree is memoised as well: the SHA-256 of its listing (every entry's name and stat key) maps to the
dataset fingerprint, under the same racy and rehash rules, so an unchanged dataset costs its directory walk, one
``stat`` per file and one lookup.

Probe results (``hilight.data.probe``) are cached in the same database by (content hash, file suffix, probe
settings, prober version): a re-validation decodes only new or changed files.

Rows expire. Each file and probe row records the day it was last used (written, or read as a hit; a read moves
the day at most once a day per row, so a warm pass writes nothing on most days). Rows unused for ``MEMO_DAYS``
are deleted, once a day, by the first cache that stamps a row: entries of deleted or replaced files (keyed by
inode, which the cache cannot stat again) and probe facts of content no dataset holds any more would otherwise
stay for ever as data churns under scheduled retrains. Tree fingerprints expire after ``TREE_MEMO_DAYS``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import stat as stat_mod
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from hilight.env import project_root

log = logging.getLogger(__name__)

STATE_DIR_ENV = "HILIGHT_STATE_DIR"
REHASH_ENV = "HILIGHT_REHASH"
DB_NAME = "hashcache.sqlite"
SCHEMA_VERSION = 3  # 2: trees; 3: used_day (expiry)
RACY_WINDOW_NS = 2_000_000_000  # coarsest common mtime granularity (FAT: 2 s); ext4/xfs/tmpfs are far finer
_CHUNK = 5000  # keys per SELECT (SQLite's default limit on bound parameters is 32766 since 3.32)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL, hashed_at_ns INTEGER NOT NULL, used_day INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dev, ino)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS probes (
    sha256 TEXT NOT NULL, suffix TEXT NOT NULL, settings TEXT NOT NULL, prober TEXT NOT NULL, facts TEXT NOT NULL,
    used_day INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (sha256, suffix, settings, prober)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS trees (
    signature TEXT NOT NULL PRIMARY KEY, fingerprint TEXT NOT NULL, made_at_ns INTEGER NOT NULL) WITHOUT ROWID;
"""
TREE_MEMO_DAYS = 30  # tree fingerprints not made again within this many days are dropped
MEMO_DAYS = 90  # file and probe rows not used within this many days are dropped


def today() -> int:
    """Days since the epoch (UTC): the unit of ``used_day``."""
    return int(time.time() // 86_400)


@dataclass
class CacheStats:
    """Counters of one cache (and, in ``STATS``, of every cache in this process): tests and benchmarks read them."""

    lookups: int = 0  # files looked up
    hits: int = 0  # files whose digest came from the cache
    hashed: int = 0  # files read and hashed
    hashed_bytes: int = 0
    probe_hits: int = 0  # files whose probe facts came from the cache
    probed: int = 0  # files decoded by the prober

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            setattr(self, k, getattr(self, k) + v)

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


STATS = CacheStats()


def state_dir() -> Path:
    """``$HILIGHT_STATE_DIR`` or ``<project>/.zenml/local_stores/hilight``."""
    if env := os.environ.get(STATE_DIR_ENV):
        return Path(env).expanduser().resolve()
    return project_root() / ".zenml" / "local_stores" / "hilight"


_NEVER = 1 << 63  # a hashed_at_ns no entry reaches: trust nothing


def rehash_since_ns() -> int | None:
    """From ``HILIGHT_REHASH``: ``None`` (unset/0): trust the cache; ``1``/``true``: trust no entry; a ``time_ns``
    value (what ``request_rehash`` sets): trust only entries hashed since then, so one command that hashes the same
    file in two steps (fingerprint, then probe) reads it once."""
    value = os.environ.get(REHASH_ENV, "").strip().lower()
    if value in {"", "0", "false", "no"}:
        return None
    if value in {"1", "true", "yes"}:
        return _NEVER
    if value.isdigit():
        return int(value)
    raise ValueError(f"{REHASH_ENV}={value!r}: expected 1 (rehash everything), 0, or a time in ns since the epoch")


def request_rehash() -> None:
    """Make every cache opened from now on in this process (and its children) re-read files hashed before now."""
    os.environ[REHASH_ENV] = str(time.time_ns())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (hashlib releases the GIL on large buffers)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class HashCache:
    """SHA-256 of files, memoised by ``(st_dev, st_ino, st_size, st_mtime_ns)``; also the probe-result store.

    One instance holds one SQLite connection and is used from one thread (hashing runs in worker threads, the
    database is touched only by the caller's). ``rehash=True`` ignores every stored digest and refreshes it;
    ``None`` follows ``HILIGHT_REHASH`` (``rehash_since_ns``).
    """

    def __init__(self, path: Path | None = None, *, rehash: bool | None = None, workers: int = 4):
        self.path = Path(path) if path is not None else state_dir() / DB_NAME
        self.rehash_since = rehash_since_ns() if rehash is None else (_NEVER if rehash else None)
        self.workers = max(1, workers)
        self.stats = CacheStats()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE), so a writer waits on the busy timeout
        # instead of failing when it would have to upgrade a read lock
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 60000")
        if self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            log.warning("%s: SQLite refused WAL mode (network filesystem?); concurrent runs will wait on each other",
                        self.path)
        self._db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across crashes of the process
        if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            with self._write():  # concurrent first opens: IF NOT EXISTS, under the write lock
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                for table in ("files", "probes"):  # a version-2 database: its rows count as used today
                    if "used_day" not in {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN used_day INTEGER NOT NULL DEFAULT {today()}")
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._expired_on: int | None = None  # the day this cache last dropped expired rows

    def _write(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self, **counts: int) -> None:
        """Add to this cache's and the process-wide counters."""
        self.stats.add(**counts)
        STATS.add(**counts)

    # ----------------------------------------------------------------------------------------- content hashes

    def digests(self, paths: Sequence[str | Path], stats: Sequence[os.stat_result] | None = None) -> list[str]:
        """SHA-256 of each regular file in ``paths`` (``stats``: their ``os.stat`` results when the caller has them).

        Files whose stat key matches a trusted entry are not read; the others are hashed in ``workers`` threads and
        their entries upserted in one transaction.
        """
        stats = list(stats) if stats is not None else [os.stat(p) for p in paths]
        for p, st in zip(paths, stats):
            if not stat_mod.S_ISREG(st.st_mode):
                raise ValueError(f"{p} is not a regular file; only files are content-hashed")
        out: list[str | None] = [None] * len(paths)
        day, stale = today(), []
        if self.rehash_since != _NEVER:
            since = self.rehash_since or 0
            known = self._lookup(stats)
            for i, st in enumerate(stats):  # the hot loop of a warm pass: attribute reads only
                entry = known.get((st.st_dev, st.st_ino))
                if (entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns
                        and st.st_mtime_ns < entry[3] - RACY_WINDOW_NS and entry[3] >= since):
                    out[i] = entry[2]
                    if entry[4] < day:
                        stale.append((day, st.st_dev, st.st_ino))
        todo = [i for i, d in enumerate(out) if d is None]
        self.count(lookups=len(paths), hits=len(paths) - len(todo))
        if stale:  # hits not yet stamped today (the first pass of a day only)
            with self._write():
                self._db.executemany("UPDATE files SET used_day = ? WHERE dev = ? AND ino = ?", stale)
                self._expire(day)
        if todo:
            started = time.time_ns()  # before any byte is read: a write during hashing makes the entry racy
            with ThreadPoolExecutor(min(self.workers, len(todo))) as pool:
                hashed = list(pool.map(lambda i: sha256_file(paths[i]), todo))
            rows = []
            for i, digest in zip(todo, hashed):
                out[i] = digest
                after = os.stat(paths[i])
                if _key(after) == _key(stats[i]):  # unchanged while we read it: safe to remember
                    rows.append((*_key(after), digest, started))
            self.count(hashed=len(todo), hashed_bytes=sum(stats[i].st_size for i in todo))
            with self._write():
                self._db.executemany(
                    "INSERT INTO files (dev, ino, size, mtime_ns, sha256, hashed_at_ns, used_day) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dev, ino) DO UPDATE SET size = excluded.size, "
                    "mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, hashed_at_ns = excluded.hashed_at_ns, "
                    "used_day = excluded.used_day", [(*row, day) for row in rows])
                self._expire(day)
        return out  # type: ignore[return-value]

    def _expire(self, day: int) -> None:
        """Drop file and probe rows unused for ``MEMO_DAYS`` (inside a write transaction; once a day per cache)."""
        if self._expired_on == day:
            return
        self._expired_on = day
        gone = sum(self._db.execute(f"DELETE FROM {t} WHERE used_day < ?", (day - MEMO_DAYS,)).rowcount
                   for t in ("files", "probes"))
        if gone:
            log.info("hash cache %s: dropped %d entries unused for %d days", self.path, gone, MEMO_DAYS)

    def digest(self, path: Path) -> str:
        return self.digests([path])[0]

    def _lookup(self, stats: Sequence[os.stat_result]) -> dict[tuple[int, int], tuple[int, int, str, int, int]]:
        """(dev, ino) -> (size, mtime_ns, sha256, hashed_at_ns, used_day) for the stored entries of these files."""
        found: dict[tuple[int, int], tuple[int, int, str, int, int]] = {}
        by_dev: dict[int, list[int]] = {}
        for st in stats:
            by_dev.setdefault(st.st_dev, []).append(st.st_ino)
        for dev, inos in by_dev.items():
            for start in range(0, len(inos), _CHUNK):
                part = inos[start:start + _CHUNK]
                rows = self._db.execute(f"SELECT ino, size, mtime_ns, sha256, hashed_at_ns, used_day FROM files WHERE dev = ? "
                                        f"AND ino IN ({','.join('?' * len(part))})", (dev, *part)).fetchall()
                found.update({(dev, row[0]): row[1:] for row in rows})
        return found

    # ------------------------------------------------------------------------------------------ whole trees

    def tree_fingerprint(self, signature: str, newest_mtime_ns: int, n_files: int) -> str | None:
        """The fingerprint stored for a tree whose listing (every entry's name and stat key) hashes to
        ``signature``, trusted by the same rules as a file's entry (not racily clean, not older than a rehash);
        its ``n_files`` files count as hits. One lookup instead of one per file."""
        if self.rehash_since == _NEVER:
            return None
        row = self._db.execute("SELECT fingerprint, made_at_ns FROM trees WHERE signature = ?", (signature,)).fetchone()
        if row is None or newest_mtime_ns >= row[1] - RACY_WINDOW_NS or row[1] < (self.rehash_since or 0):
            return None
        if row[1] < time.time_ns() - TREE_MEMO_DAYS * 86_400 * 10**9:
            # made again at least every TREE_MEMO_DAYS: that pass looks up (and so keeps) the files' own rows,
            # which would otherwise expire after MEMO_DAYS behind a tree that never misses
            return None
        self.count(lookups=n_files, hits=n_files)
        return row[0]

    def store_tree_fingerprint(self, signature: str, fingerprint: str, made_at_ns: int) -> None:
        """Remember a tree's fingerprint; ``made_at_ns``: when its listing was taken (before any stat)."""
        with self._write():
            self._db.execute("INSERT INTO trees (signature, fingerprint, made_at_ns) VALUES (?, ?, ?) ON CONFLICT "
                             "(signature) DO UPDATE SET fingerprint = excluded.fingerprint, made_at_ns = "
                             "excluded.made_at_ns", (signature, fingerprint, made_at_ns))
            self._db.execute("DELETE FROM trees WHERE made_at_ns < ?", (made_at_ns - TREE_MEMO_DAYS * 86_400 * 10**9,))

    # ------------------------------------------------------------------------------------------ probe results

    def probe_facts(self, keys: Sequence[tuple[str, str]], settings: str, prober: str) -> dict[tuple[str, str], dict]:
        """Stored probe facts for (sha256, suffix) ``keys`` under these probe settings and prober version."""
        wanted = set(keys)
        shas = sorted({sha for sha, _ in wanted})
        found: dict[tuple[str, str], dict] = {}
        day, stale = today(), []
        for start in range(0, len(shas), _CHUNK):
            part = shas[start:start + _CHUNK]
            marks = ",".join("?" * len(part))
            for sha, suffix, facts, used in self._db.execute(
                    f"SELECT sha256, suffix, facts, used_day FROM probes WHERE settings = ? AND prober = ? AND sha256 "
                    f"IN ({marks})", (settings, prober, *part)):
                if (sha, suffix) in wanted:
                    found[(sha, suffix)] = json.loads(facts)
                    if used < day:
                        stale.append((day, sha, suffix, settings, prober))
        if stale:
            with self._write():
                self._db.executemany("UPDATE probes SET used_day = ? WHERE sha256 = ? AND suffix = ? AND settings = ? "
                                     "AND prober = ?", stale)
                self._expire(day)
        return found

    def store_probe_facts(self, rows: Sequence[tuple[str, str, dict]], settings: str, prober: str) -> None:
        """Upsert (sha256, suffix, facts) rows."""
        day = today()
        with self._write():
            self._db.executemany(
                "INSERT INTO probes (sha256, suffix, settings, prober, facts, used_day) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (sha256, suffix, settings, prober) DO UPDATE SET facts = excluded.facts, "
                "used_day = excluded.used_day",
                [(sha, suffix, settings, prober, json.dumps(facts, sort_keys=True), day) for sha, suffix, facts in rows])

    def integrity(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` ("ok" when the database is sound)."""
        return self._db.execute("PRAGMA integrity_check").fetchone()[0]


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up front, waiting on the busy
    timeout, so two writers never deadlock on a lock upgrade."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type | None, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
