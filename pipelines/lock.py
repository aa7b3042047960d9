"""The retrain lock, taken before anything heavy is imported, so a second ``hilight retrain`` exits 75 at once."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from hilight.config import read_yaml_mapping
from hilight.env import resolve_path

DEFAULT_LOCK_FILE = "outputs/retrain.lock"  # RetrainConfig.lock_file's default (tests/test_cli_errors.py checks both)


class RetrainLockedError(RuntimeError):
    """Another retrain holds the lock."""


def take_retrain_lock(config_path: Path) -> FileLock:
    """Acquire the lock file a retrain config names (``lock_file``, relative to the project root), without waiting;
    ``RetrainLockedError`` when another process holds it. Reads only that key: the config is validated later,
    under the lock."""
    lock_path = resolve_path(str(read_yaml_mapping(config_path).get("lock_file") or DEFAULT_LOCK_FILE))
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RetrainLockedError(f"another retrain holds {lock_path}; it runs one at a time. Wait for it to finish "
                                 "(a lock left by a killed process is released by the OS with the process)") from None
    return lock
