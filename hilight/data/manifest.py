"""Where validated manifests live, and the rule that a failed validation never replaces a good one.

Each validation run writes into its own directory; a ``current`` link is switched to it, atomically, only when the
run's contracts passed (or rejects were explicitly allowed). Readers follow ``current``, so a typo, a broken
download or a failed run can never silently swap the data training reads::

    <output_dir>/
      versions/<UTC time>_<status>/   one per run: *.parquet, quarantine, ge_results.json, report.md, manifest.json
      current -> versions/<...>       symlink, replaced by rename (atomic on POSIX) only by a passing run
      manifest.json, captions.parquet, ... -> current/<same name>   stable links, so the old paths keep working

``manifest.json`` records the run's ``status`` (``passed``, ``accepted_with_rejects`` or ``failed``), its
``problems``, the contract names and versions, and the data fingerprint. A reader opens a manifest with
``open_manifest``, which refuses a failed, missing or status-less one with a message that says what to do.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from hilight.config import InputError
from hilight.env import resolve_path

log = logging.getLogger(__name__)

PASSED, ACCEPTED_WITH_REJECTS, FAILED = "passed", "accepted_with_rejects", "failed"
READABLE = (PASSED, ACCEPTED_WITH_REJECTS)
META_FILE = "manifest.json"
CURRENT = "current"
VERSIONS = "versions"
KEEP_VERSIONS = 20  # older run directories are pruned (the current one never is)


class ManifestError(InputError):
    """The manifest directory is missing or failed validation, or the selection it was asked for is empty."""


def new_version_dir(output_dir: Path, status: str) -> Path:
    """A fresh ``versions/<UTC time>_<status>`` directory under ``output_dir``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")
    path = output_dir / VERSIONS / f"{stamp}_{status}"
    path.mkdir(parents=True)
    return path


def current_dir(output_dir: Path) -> Path | None:
    """The run directory ``current`` points at, or None before the first passing run."""
    link = output_dir / CURRENT
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def publish(output_dir: Path, version_dir: Path) -> None:
    """Point ``current`` at ``version_dir`` (a rename, atomic on POSIX) and make sure every file of the run has a
    stable top-level link through ``current``. Legacy top-level files (written before versioning) are replaced."""
    tmp = output_dir / f".{CURRENT}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(Path(VERSIONS) / version_dir.name, tmp)
    os.replace(tmp, output_dir / CURRENT)
    for f in version_dir.iterdir():
        link = output_dir / f.name
        target = Path(CURRENT) / f.name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        elif link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(target, link)


def republish(version_dir: Path) -> Path:
    """Make a passing run directory the current manifest again and return its output directory. For a cached
    ``write_manifest`` (the data went back to an earlier version): the cache hands back that earlier run's
    directory without running the step, and ``current`` would go on pointing at the newer, different manifest."""
    version_dir = Path(version_dir)
    meta = version_dir / "manifest.json"
    if not meta.is_file():
        raise ManifestError(f"the cached manifest {version_dir} no longer exists (only the newest {KEEP_VERSIONS} runs "
                            f"are kept); rerun data_validation with --no-cache")
    status = json.loads(meta.read_text()).get("status")
    if status not in READABLE:
        raise ManifestError(f"{version_dir} has status {status!r}, not one of {READABLE}; it cannot be made current")
    output_dir = version_dir.parent.parent
    if current_dir(output_dir) != version_dir.resolve():
        log.info("data_validation: %s is current again", version_dir.name)
        publish(output_dir, version_dir)
    return output_dir


def prune_versions(output_dir: Path, keep: int = KEEP_VERSIONS) -> None:
    """Delete all but the ``keep`` newest run directories; the current one always stays."""
    current = current_dir(output_dir)
    runs = sorted((p for p in (output_dir / VERSIONS).iterdir() if p.is_dir()), reverse=True)
    for old in runs[keep:]:
        if current is None or old.resolve() != current:
            shutil.rmtree(old)


def latest_version(output_dir: Path) -> Path | None:
    """The newest run directory, whatever its status."""
    root = output_dir / VERSIONS
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return runs[-1] if runs else None


def open_manifest(manifest_dir: str | Path) -> tuple[Path, dict]:
    """(the run directory, its ``manifest.json``) for a data_validation output directory (its current manifest) or
    one run directory; ``ManifestError`` for a missing manifest, a failed run or a manifest without a status."""
    manifest_dir = resolve_path(manifest_dir)
    meta_path = manifest_dir / META_FILE
    if not meta_path.is_file():
        if not manifest_dir.is_dir():
            raise ManifestError(f"manifest directory {manifest_dir} does not exist; run `hilight run data_validation "
                                "-c <config>` (or `hilight validate -c <config>`) to create it, or fix `manifest_dir`")
        failed = latest_version(manifest_dir)
        why = (f"; its latest validation run, {failed}, did not pass (see {failed / 'report.md'})" if failed else "")
        raise ManifestError(f"{manifest_dir} holds no validated manifest{why}. Fix the data and re-run "
                            "`hilight run data_validation -c <config>`, or accept a partial dataset explicitly with "
                            "`hilight validate --allow-rejects` (or `allow_rejects: true` in the data_validation config)")
    run_dir = meta_path.resolve().parent  # through `current`, once: every file below comes from the same run
    meta = json.loads((run_dir / META_FILE).read_text())
    status = meta.get("status")
    if status is None:
        raise ManifestError(f"{run_dir / META_FILE} has no validation status (written before manifests recorded "
                            "one); re-run `hilight run data_validation -c <config> --no-cache` to rewrite it")
    if status not in READABLE:
        problems = "; ".join(meta.get("problems", [])) or "see its report"
        current = current_dir(run_dir.parent.parent) if run_dir.parent.name == VERSIONS else None
        instead = f" The last good manifest is {current}." if current else ""
        raise ManifestError(f"{run_dir} is a {status} validation run ({problems}); training and evaluation read only "
                            f"manifests that passed their contracts.{instead} Fix the data and re-run validation, or "
                            "accept a partial dataset explicitly with `hilight validate --allow-rejects` (or "
                            "`allow_rejects: true` in the data_validation config)")
    return run_dir, meta
