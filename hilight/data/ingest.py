"""Data ingestion: fingerprint -> load -> probe -> validate -> write manifest and quarantine.

Each stage is a plain function so ZenML steps stay thin and tests can call them directly.
Nothing is dropped silently: every input row ends up either in a validated manifest or in the
quarantine table with the reason (and detail) it was rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field, field_validator

from hilight.data import importers
from hilight.data.contracts import ROW_ID, ContractResult, DataContract, validate_table
from hilight.data.hashcache import HashCache
from hilight.data.manifest import ACCEPTED_WITH_REJECTS, FAILED, PASSED, READABLE, current_dir, new_version_dir, publish, prune_versions
from hilight.data.probe import PICKLE_SUFFIXES, probe_files, resolve_video_path
from hilight.data.tokens import TokenCounter
from hilight.env import resolve_path

TABLES = ("videos", "captions", "qa")


class DatasetSpec(BaseModel):
    """One dataset on disk: a root holding annotation files and a video folder."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    domain: str = "billiards"
    root: str  # relative paths are relative to the project root
    video_dir: str = "videos"
    captions: list[str] = Field(default_factory=list)  # caption-table files, relative to root
    qa: list[str] = Field(default_factory=list)  # LLaVA/VideoInstruct JSON files, relative to root
    # Opt-in: resolve a reference to "x.pkl" to an existing "x<suffix>" (the reference's stage-2
    # behaviour). The substitution is recorded in the manifest's ``video`` / ``video_ref`` columns.
    pkl_fallback_suffixes: list[str] = Field(default_factory=list)

    @field_validator("captions", "qa", "video_dir")
    @classmethod
    def _relative(cls, v: list[str] | str) -> list[str] | str:
        bad = [p for p in ([v] if isinstance(v, str) else v) if os.path.isabs(p) or ".." in Path(p).parts]
        if bad:
            raise ValueError(f"paths inside a dataset must be relative to its root without '..': {bad}")
        return v


class ProbeSettings(BaseModel):
    model_config = {"extra": "forbid"}

    workers: int = Field(2, ge=1, le=256)
    decode_frames: int = Field(12, ge=0, le=256)  # frames decoded per video; 0 = header only
    # processes: a decoder crash on a hostile file kills one worker, not the run; threads: no start-up cost (decord
    # releases the GIL), see hilight.data.probe.probe_files and benchmarks/ingest.py --realistic
    executor: Literal["processes", "threads"] = "processes"


class DataValidationConfig(BaseModel):
    """Config of the ``data_validation`` pipeline (``configs/data_validation_*.yaml``)."""

    model_config = {"extra": "forbid"}

    pipeline: Literal["data_validation"] = "data_validation"
    datasets: list[DatasetSpec] = Field(min_length=1)
    contracts_dir: str = "data_contracts"
    output_dir: str = "outputs/data_validation"  # holds versions/<run>/ and `current` (hilight.data.manifest)
    # accept a dataset whose reject fraction exceeds a contract's threshold (the rejected rows stay quarantined);
    # the manifest's status is then "accepted_with_rejects". A dataset with 0 accepted rows still fails.
    allow_rejects: bool = False
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    tokenizer_dir: str | None = None  # local CLIP tokenizer for exact caption token counts
    progress: bool = True
    enable_cache: bool = True
    experiment_name: str = "data_validation"
    # True: ignore the stat-keyed hash cache and read every file again (``hilight validate --rehash``); needed only
    # after a content change whose size and mtime were restored by hand (hilight.data.hashcache)
    rehash: bool = False

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, v: list[DatasetSpec]) -> list[DatasetSpec]:
        names = [d.name for d in v]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return v


# --------------------------------------------------------------------------------------------
# fingerprint


def _files_to_hash(spec: DatasetSpec) -> list[tuple[str, str, os.stat_result | None]]:
    """(key, absolute path, lstat or None) of the annotation files and every file under the video dir, by key.

    ``os.scandir`` on strings, not ``pathlib``, and each file's lstat taken from its directory entry (relative to the
    open directory): a warm fingerprint is one stat per file, and at 20,000 files pathlib's parsing cost more than
    the stats. As ``os.walk`` (used before): hidden names are skipped, symlinks to directories are neither followed
    nor listed."""
    root = resolve_path(spec.root)
    entries = [(f"ann/{a}", str(root / a), _lstat(root / a)) for a in [*spec.captions, *spec.qa]]
    video_root = str(root / spec.video_dir)
    if os.path.isdir(video_root):
        pending = [("", video_root)]
        while pending:
            prefix, folder = pending.pop()
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        if not entry.is_symlink():
                            pending.append((f"{prefix}{entry.name}/", entry.path))
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # removed while we listed: "missing", as before
                        st = None
                    entries.append((f"vid/{prefix}{entry.name}", entry.path, st))
    return sorted(entries, key=lambda e: e[0])


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _tree_signature(entries: list[tuple[str, str, os.stat_result | None]]) -> tuple[str, int, int]:
    """(sha256 over every entry's key and stat key, newest mtime, number of regular files): what the hash cache's
    whole-tree memo is keyed by. Any change the per-file cache would see changes it."""
    lines, newest, n_files = [], 0, 0
    for key, _, st in entries:
        if st is None:
            lines.append(f"{key}\0missing\n")
            continue
        lines.append(f"{key}\0{st.st_mode}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\n")
        newest = max(newest, st.st_mtime_ns)
        n_files += stat.S_ISREG(st.st_mode)
    return hashlib.sha256("".join(lines).encode()).hexdigest(), newest, n_files


def _entry_digests(entries: list[tuple[str, str, os.stat_result | None]], cache: HashCache) -> list[str]:
    """Per entry: the content hash of a regular file (through ``cache``), ``symlink:<target>`` or ``missing``."""
    out, files, paths, stats = [], [], [], []
    for i, (_, path, st) in enumerate(entries):
        if st is None:
            out.append("missing")
            continue
        if stat.S_ISLNK(st.st_mode):
            out.append("symlink:" + os.readlink(path))  # never follow: the target may be outside the root
        elif stat.S_ISREG(st.st_mode):
            out.append("")
            files.append(i)
            paths.append(path)
            stats.append(st)
        else:
            out.append("missing")
    for i, digest in zip(files, cache.digests(paths, stats)):
        out[i] = digest
    return out


def fingerprint_dataset(spec: DatasetSpec, workers: int = 4, *, cache: HashCache | None = None,
                        rehash: bool | None = None) -> str:
    """sha256 over (relative path, content hash) of the annotations and every file in the video dir.

    Independent of where the dataset lives: only paths relative to its root enter the hash. Content hashes come
    from the stat-keyed cache (``hilight.data.hashcache``): unchanged files are ``stat``-ed, not read; ``rehash``
    (default: ``HILIGHT_REHASH``) reads every file again.
    """
    if cache is None:
        with HashCache(rehash=rehash, workers=workers) as own:
            return fingerprint_dataset(spec, cache=own)
    started = time.time_ns()  # before any stat: the memo is trusted only for files older than this (racy rule)
    entries = _files_to_hash(spec)
    signature, newest, n_files = _tree_signature(entries)
    if (known := cache.tree_fingerprint(signature, newest, n_files)) is not None:
        return known  # nothing changed since a pass that hashed this exact listing
    digests = _entry_digests(entries, cache)
    lines = "".join(f"{rel}\0{digest}\n" for (rel, _, _), digest in zip(entries, digests))
    fingerprint = hashlib.sha256(lines.encode()).hexdigest()  # the bytes the per-entry updates hashed before
    cache.store_tree_fingerprint(signature, fingerprint, started)
    return fingerprint


def fingerprint_datasets(config: DataValidationConfig) -> dict[str, str]:
    """Per-dataset fingerprints plus ``"combined"`` over all of them (in config order)."""
    with HashCache(rehash=config.rehash or None, workers=max(2, config.probe.workers)) as cache:
        out = {d.name: fingerprint_dataset(d, cache=cache) for d in config.datasets}
    out["combined"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    return out


# --------------------------------------------------------------------------------------------
# load


@dataclass
class Tables:
    """The three tables under validation; each has a unique ``row_id``."""

    videos: pd.DataFrame
    captions: pd.DataFrame
    qa: pd.DataFrame

    def as_dict(self) -> dict[str, pd.DataFrame]:
        return {"videos": self.videos, "captions": self.captions, "qa": self.qa}


def load_tables(config: DataValidationConfig) -> Tables:
    """Read every annotation file, compute the facts the contracts check, list referenced videos."""
    counter = TokenCounter(resolve_path(config.tokenizer_dir) if config.tokenizer_dir else None)
    caps, qas = [], []
    for spec in config.datasets:
        root = resolve_path(spec.root)
        caps += [importers.read_caption_table(root / f, spec.name) for f in spec.captions]
        qas += [importers.read_qa(root / f, spec.name) for f in spec.qa]
    captions = pd.concat(caps, ignore_index=True) if caps else pd.DataFrame(columns=importers.CAPTION_COLUMNS)
    qa = pd.concat(qas, ignore_index=True) if qas else pd.DataFrame(columns=importers.QA_COLUMNS)
    captions.insert(0, ROW_ID, range(len(captions)))
    qa.insert(0, ROW_ID, range(len(qa)))

    captions["caption_stripped"] = [c.strip() if isinstance(c, str) else None for c in captions["caption"]]
    captions["caption_tokens"] = pd.array([counter(c) if isinstance(c, str) else None for c in captions["caption"]], dtype="Int64")
    captions["duplicate_of"] = importers.mark_duplicates(
        captions, lambda r: None if not isinstance(r["caption"], str) else (r["dataset"], r["caption_id"]))
    same_text = importers.mark_duplicates(
        captions, lambda r: None if not isinstance(r["caption"], str) else (r["dataset"], r["video"], r["caption_stripped"]))
    captions["duplicate_of"] = captions["duplicate_of"].where(captions["duplicate_of"].notna(), same_text)

    facts = pd.DataFrame([importers.conversation_facts(c) for c in qa["conversations"]], index=qa.index,
                         columns=list(importers.conversation_facts(None)))  # columns even when there is no QA file
    qa = pd.concat([qa, facts], axis=1)
    # a duplicate repeats a record: same id *and* conversation. VideoInstruct-100K's id is the video's, shared by
    # the ~8 QA pairs of each of its 13K videos, so an id alone would reject most of it
    qa["duplicate_of"] = importers.mark_duplicates(
        qa, lambda r: None if not isinstance(r["id"], str) else (r["dataset"], r["conversations"], r["id"]))

    videos = _referenced_videos(config, captions, qa)
    return Tables(videos=videos, captions=captions, qa=qa)


EXTENSIONLESS_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")  # tried in order for a reference without one


def _referenced_videos(config: DataValidationConfig, captions: pd.DataFrame, qa: pd.DataFrame) -> pd.DataFrame:
    specs = {d.name: d for d in config.datasets}
    refs = pd.concat([captions[["dataset", "video"]], qa[["dataset", "video"]]], ignore_index=True).dropna()
    refs = refs.drop_duplicates().reset_index(drop=True)
    rows = []
    for dataset, ref in refs.itertuples(index=False):
        spec = specs[dataset]
        root = resolve_path(spec.root)
        resolved_ref, note = ref, None
        alts, why = [], ""
        if Path(ref).suffix.lower() in PICKLE_SUFFIXES and spec.pkl_fallback_suffixes:
            alts, why = [str(Path(ref).with_suffix(suffix)) for suffix in spec.pkl_fallback_suffixes], "pkl_fallback_suffixes"
        elif not Path(ref).suffix:  # CLIP-ViP's caption files name clips without their container's suffix
            exact, err = resolve_video_path(root, spec.video_dir, ref)
            if err is not None or not exact.is_file():
                alts, why = [ref + suffix for suffix in EXTENSIONLESS_SUFFIXES], "a name without a suffix"
        if alts:
            note = f"no {' or '.join(alts)} beside it either ({why})"
            for alt in alts:
                alt_path, err = resolve_video_path(root, spec.video_dir, alt)
                if err is None and alt_path.is_file():
                    resolved_ref, note = alt, f"referenced as {ref}, resolved by {why}"
                    break
        path, error = resolve_video_path(root, spec.video_dir, resolved_ref)
        rows.append({"dataset": dataset, "video_ref": ref, "video": resolved_ref,
                     "video_path": (Path(spec.video_dir) / resolved_ref).as_posix() if error is None else None,
                     "abs_path": None if path is None else str(path), "path_error": error, "ref_note": note})
    videos = pd.DataFrame(rows, columns=["dataset", "video_ref", "video", "video_path", "abs_path", "path_error",
                                         "ref_note"])
    videos.insert(0, ROW_ID, range(len(videos)))
    return videos


# --------------------------------------------------------------------------------------------
# probe


def probe_videos(videos: pd.DataFrame, settings: ProbeSettings, progress: bool = True, *,
                 rehash: bool | None = None) -> pd.DataFrame:
    """``videos`` plus the probe facts (``hilight.data.probe.PROBE_COLUMNS``).

    Content hashes and decode results come from the project's cache (``hilight.data.hashcache``): a re-validation
    decodes only new or changed files, and its output equals a from-scratch run's."""
    paths = [p if isinstance(p, str) else None for p in videos["abs_path"]]
    with HashCache(rehash=rehash, workers=max(2, settings.workers)) as cache:
        facts = probe_files(paths, workers=settings.workers, decode_frames=settings.decode_frames,
                            progress=progress, cache=cache, executor=settings.executor)
    facts = facts.drop(columns=["path_error"])  # the resolver's path_error is authoritative
    out = pd.concat([videos.reset_index(drop=True), facts], axis=1)
    for col in ("n_frames", "width", "height", "min_side", "max_side", "size_bytes"):
        out[col] = pd.array(out[col], dtype="Int64")
    for col in ("fps", "duration_s"):
        out[col] = pd.array(out[col], dtype="Float64")
    out["file_detail"] = [_file_detail(r) for r in out.itertuples(index=False)]
    return out


def _file_detail(row: tuple) -> str | None:
    """What is wrong with the file itself, with its real path (the detail of missing / pickle / empty rejections)."""
    if not isinstance(row.abs_path, str):
        return None  # the reference never resolved: path_error says why
    if not row.exists:
        what = f"{row.abs_path} is not a regular file" if os.path.lexists(row.abs_path) else f"no file at {row.abs_path}"
    elif row.is_pickle:
        what = f"{row.abs_path} is a pickle"
    elif row.size_bytes == 0:
        what = f"0 bytes at {row.abs_path}"
    else:
        return None
    return what + (f"; {row.ref_note}" if isinstance(row.ref_note, str) else "")


def _video_id_conflicts(captions: pd.DataFrame) -> list[str | None]:
    """Per caption row: why its (dataset, video_id) is refused because it already names another accepted video file
    (the first file, in row order, keeps the id; e.g. clip.mp4 and sub/clip.mp4 both default to the stem "clip").
    Rows whose video was rejected take no id: they are quarantined for that."""
    owner: dict[tuple[str, str], str] = {}
    out: list[str | None] = []
    for dataset, vid, video, rejected in zip(captions["dataset"], captions["video_id"], captions["video"],
                                             captions["video_reject"]):
        if not isinstance(vid, str) or not isinstance(video, str) or isinstance(rejected, str):
            out.append(None)
            continue
        first = owner.setdefault((dataset, vid), video)
        out.append(None if first == video else f"video_id {vid!r} already names {first}, not {video}")
    return out


# --------------------------------------------------------------------------------------------
# validate


@dataclass
class Validation:
    """Validated rows, the quarantine, and the per-contract results."""

    valid: dict[str, pd.DataFrame]
    quarantine: pd.DataFrame
    summary: pd.DataFrame  # per (table, dataset): total, rejected, reject_fraction, threshold, exceeded
    ge_results: dict[str, dict]  # per table, Great Expectations' validation result as JSON
    table_failures: list[dict] = field(default_factory=list)

    @property
    def exceeded(self) -> pd.DataFrame:
        return self.summary[self.summary["exceeded"]]


QUARANTINE_COLUMNS = ["table", "contract", "dataset", ROW_ID, "source", "item", "reason", "all_reasons", "message", "detail"]


def validate_tables(tables: Tables, contracts: dict[str, DataContract]) -> Validation:
    """Apply the video contract, propagate rejected videos to their rows, then the row contracts."""
    missing = [t for t in TABLES if t not in contracts]
    if missing:
        raise ValueError(f"no data contract for tables {missing}; add them to the contracts directory")
    videos = tables.videos
    results = {"videos": validate_table(videos, contracts["videos"])}
    video_reason = _primary_reasons(results["videos"])
    rejected_video = {}
    for rid, reason, detail in video_reason.itertuples(index=False):
        row = videos.loc[videos[ROW_ID] == rid].iloc[0]
        name = row["video_ref"] if row["video"] == row["video_ref"] else f"{row['video_ref']} -> {row['video']}"
        rejected_video[(row["dataset"], row["video_ref"])] = f"{name}: {reason}" + (f" ({detail})" if detail else "")
    frames = {"videos": videos}
    for name in ("captions", "qa"):
        df = tables.as_dict()[name].copy()
        df["video_reject"] = [rejected_video.get((d, v)) for d, v in zip(df["dataset"], df["video"])]
        if name == "captions":
            df["video_id_conflict"] = _video_id_conflicts(df)
        frames[name] = df
        results[name] = validate_table(df, contracts[name])

    valid, quarantined, summary_rows, table_failures = {}, [], [], []
    for name, df in frames.items():
        res = results[name]
        rejected = res.rejected_ids()
        valid[name] = df[~df[ROW_ID].isin(rejected)].reset_index(drop=True)
        quarantined.append(_quarantine_rows(name, df, res))
        table_failures += [{"table": name, **f} for f in res.table_failures]
        for dataset in sorted(set(df["dataset"].dropna())):
            part = df[df["dataset"] == dataset]
            n_rej = int(part[ROW_ID].isin(rejected).sum())
            frac = n_rej / len(part) if len(part) else 0.0
            summary_rows.append({"table": name, "contract": res.contract.name, "contract_version": res.contract.version,
                                 "dataset": dataset, "total": len(part), "accepted": len(part) - n_rej, "rejected": n_rej,
                                 "reject_fraction": frac, "threshold": res.contract.max_reject_fraction,
                                 "exceeded": frac > res.contract.max_reject_fraction})
    quarantine = pd.concat(quarantined, ignore_index=True) if quarantined else pd.DataFrame(columns=QUARANTINE_COLUMNS)
    summary = pd.DataFrame(summary_rows, columns=["table", "contract", "contract_version", "dataset", "total", "accepted",
                                                  "rejected", "reject_fraction", "threshold", "exceeded"])
    return Validation(valid=valid, quarantine=quarantine, summary=summary,
                      ge_results={t: r.ge_result for t, r in results.items()}, table_failures=table_failures)


def _primary_reasons(res: ContractResult) -> pd.DataFrame:
    """First (highest-priority) reason per rejected row."""
    return res.failures.drop_duplicates(ROW_ID, keep="first")[[ROW_ID, "reason", "detail"]]


def _quarantine_rows(table: str, df: pd.DataFrame, res: ContractResult) -> pd.DataFrame:
    if res.failures.empty:
        return pd.DataFrame(columns=QUARANTINE_COLUMNS)
    grouped = res.failures.groupby(ROW_ID, sort=False)
    first = grouped.first().reset_index()
    first["all_reasons"] = grouped["reason"].agg(lambda s: ",".join(s)).values
    item_col = {"videos": "video", "captions": "caption", "qa": "id"}[table]  # videos: the file actually probed
    meta = df.set_index(ROW_ID)
    first["table"] = table
    first["contract"] = res.contract.name
    first["dataset"] = [meta.at[r, "dataset"] if "dataset" in meta else None for r in first[ROW_ID]]
    first["source"] = [meta.at[r, "source"] if "source" in meta else f"{meta.at[r, 'dataset']}:{meta.at[r, 'video_ref']}" for r in first[ROW_ID]]
    first["item"] = [importers.printable(meta.at[r, item_col]) for r in first[ROW_ID]]
    first["detail"] = [importers.printable(d) for d in first["detail"]]
    return first[QUARANTINE_COLUMNS]


# --------------------------------------------------------------------------------------------
# write


MANIFEST_COLUMNS = {
    "videos": ["dataset", "video", "video_ref", "video_path", "sha256", "size_bytes", "n_frames", "fps", "width",
               "height", "duration_s"],
    "captions": ["dataset", "video_id", "video", "video_path", "video_sha256", "caption_id", "caption", "object",
                 "split", "caption_tokens", "source"],
    "qa": ["dataset", "id", "video", "video_path", "video_sha256", "conversations", "n_turns", "source"],
}


class DataRejectedError(RuntimeError):
    """Too many rows failed a contract; the message names the top reasons and the report."""


@dataclass
class IngestResult:
    output_dir: Path
    fingerprints: dict[str, str]
    summary: pd.DataFrame
    manifests: dict[str, Path]
    quarantine_path: Path
    ge_results_path: Path
    report_path: Path
    counts: dict[str, int]
    status: str = PASSED  # hilight.data.manifest: passed, accepted_with_rejects or failed
    problems: list[str] = field(default_factory=list)
    current: Path | None = None  # the run directory readers use after this run (the last good one if this failed)

    @property
    def exceeded(self) -> pd.DataFrame:
        return self.summary[self.summary["exceeded"]]


def write_outputs(validation: Validation, fingerprints: dict[str, str], config: DataValidationConfig,
                  contracts: dict[str, DataContract], out_dir: Path) -> IngestResult:
    """Write the validated manifests (Parquet, fingerprint in the schema metadata), quarantine, GE JSON, report and
    ``manifest.json`` into a new run directory under ``out_dir``; make it the current manifest only when the
    contracts passed (or ``config.allow_rejects`` accepts the rejects). See ``hilight.data.manifest``."""
    accepted_problems, hard_problems = contract_problems(validation, config)
    if hard_problems or (accepted_problems and not config.allow_rejects):
        status = FAILED
    else:
        status = ACCEPTED_WITH_REJECTS if accepted_problems else PASSED
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = new_version_dir(out_dir, status)
    videos = validation.valid["videos"]
    by_ref = {(d, r): (p, s) for d, r, p, s in videos[["dataset", "video_ref", "video_path", "sha256"]].itertuples(index=False)}
    meta = {"hilight.data_fingerprint": fingerprints["combined"],
            "hilight.dataset_fingerprints": json.dumps({k: v for k, v in fingerprints.items() if k != "combined"}),
            "hilight.contracts": json.dumps({t: c.suite_name for t, c in contracts.items()})}
    manifests = {}
    for name in TABLES:
        df = validation.valid[name].copy()
        if name != "videos":
            df["video_path"] = [by_ref.get((d, v), (None, None))[0] for d, v in zip(df["dataset"], df["video"])]
            df["video_sha256"] = [by_ref.get((d, v), (None, None))[1] for d, v in zip(df["dataset"], df["video"])]
        df = df[MANIFEST_COLUMNS[name]]
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **{k.encode(): v.encode() for k, v in meta.items()}})
        manifests[name] = run_dir / f"{name}.parquet"
        pq.write_table(table, manifests[name])
    quarantine_path = run_dir / "quarantine.parquet"
    validation.quarantine.astype({"detail": object, "item": object}).to_parquet(quarantine_path, index=False)
    ge_results_path = run_dir / "ge_results.json"
    ge_results_path.write_text(json.dumps(validation.ge_results, indent=1, default=str))
    counts = {f"{t}_accepted": len(validation.valid[t]) for t in TABLES}
    counts.update({f"{t}_rejected": int((validation.quarantine["table"] == t).sum()) for t in TABLES})
    report_path = run_dir / "report.md"
    problems = accepted_problems + hard_problems
    result = IngestResult(run_dir, fingerprints, validation.summary, manifests, quarantine_path, ge_results_path,
                          report_path, counts, status, problems)
    report_path.write_text(render_report(result, validation, contracts), encoding="utf-8")
    (run_dir / "manifest.json").write_text(json.dumps({
        "status": status,
        "problems": problems,
        "allow_rejects": config.allow_rejects,
        "run": run_dir.name,  # versions/<UTC time>_<status>
        "data_fingerprint": fingerprints["combined"],
        "dataset_fingerprints": {k: v for k, v in fingerprints.items() if k != "combined"},
        "datasets": {d.name: {"root": d.root, "domain": d.domain, "video_dir": d.video_dir} for d in config.datasets},
        "contracts": {t: {"name": c.name, "version": c.version, "max_reject_fraction": c.max_reject_fraction}
                      for t, c in contracts.items()},
        "counts": counts,
        "files": {t: p.name for t, p in manifests.items()},
    }, indent=1) + "\n")
    if status in READABLE:
        publish(out_dir, run_dir)
    prune_versions(out_dir)
    result.current = current_dir(out_dir)
    return result


def contract_problems(validation: Validation, config: DataValidationConfig) -> tuple[list[str], list[str]]:
    """(problems ``allow_rejects`` may accept: reject fractions over a contract's threshold; problems nothing
    accepts: table-level contract failures and datasets that yield no accepted row)."""
    over = [f"{r.table}/{r.dataset}: {r.rejected}/{r.total} rejected ({r.reject_fraction:.1%} > {r.threshold:.0%})"
            for r in validation.summary[validation.summary["exceeded"]].itertuples(index=False)]
    hard = [f"{f['table']}: {f['reason']} ({f['message']})" for f in validation.table_failures]
    rows = validation.summary[validation.summary["table"].isin(["captions", "qa"])].groupby("dataset")["accepted"].sum()
    for spec in config.datasets:
        if int(rows.get(spec.name, 0)) == 0:
            hard.append(f"dataset {spec.name} yielded 0 accepted rows (captions {spec.captions}, qa {spec.qa}); "
                        "check its annotation files and video_dir")
    return over, hard


def top_reasons(quarantine: pd.DataFrame, n: int = 5) -> list[tuple[str, int]]:
    if quarantine.empty:
        return []
    counts = quarantine.groupby(["table", "reason"]).size().sort_values(ascending=False).head(n)
    return [(f"{t}:{r}", int(c)) for (t, r), c in counts.items()]


def render_report(result: IngestResult, validation: Validation, contracts: dict[str, DataContract]) -> str:
    lines = ["# Data validation report", "", f"Data fingerprint: `{result.fingerprints['combined']}`", ""]
    lines += ["## Contracts", ""] + [f"- `{c.name}` v{c.version} on table `{t}` (max reject fraction {c.max_reject_fraction:.0%})"
                                     for t, c in contracts.items()]
    lines += ["", "## Accepted and rejected", "", "| table | dataset | total | accepted | rejected | reject % | threshold | status |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in validation.summary.itertuples(index=False):
        status = "**FAIL**" if r.exceeded else "ok"
        lines.append(f"| {r.table} | {r.dataset} | {r.total} | {r.accepted} | {r.rejected} | {r.reject_fraction:.1%} | {r.threshold:.0%} | {status} |")
    if validation.table_failures:
        lines += ["", "## Table-level failures", ""] + [f"- {f['table']}: {f['reason']}: {f['message']} (observed {f['observed']})"
                                                      for f in validation.table_failures]
    lines += ["", "## Rejections by reason", ""]
    q = validation.quarantine
    if q.empty:
        lines.append("No rows rejected.")
    else:
        for (table, reason), grp in q.groupby(["table", "reason"], sort=True):
            lines.append(f"### `{table}` / `{reason}` ({len(grp)})")
            lines.append("")
            lines.append(f"{grp['message'].iloc[0]}")
            lines.append("")
            for row in grp.head(10).itertuples(index=False):
                detail = f": {row.detail}" if row.detail else ""
                lines.append(f"- `{row.source}` {str(row.item)[:80]!r}{detail}")
            if len(grp) > 10:
                lines.append(f"- ... and {len(grp) - 10} more (see quarantine.parquet)")
            lines.append("")
    lines += ["", "## Files", ""] + [f"- {t}: `{p.name}`" for t, p in result.manifests.items()]
    lines += [f"- quarantine: `{result.quarantine_path.name}`", f"- Great Expectations results: `{result.ge_results_path.name}`", ""]
    return "\n".join(lines)


def check_thresholds(result: IngestResult, validation: Validation) -> None:
    """Raise ``DataRejectedError`` if the run failed its contracts (``result.status``): the problems, the top
    reasons, where the failed run is, and which manifest readers keep using."""
    if result.status != FAILED:
        return
    reasons = ", ".join(f"{k} x{v}" for k, v in top_reasons(validation.quarantine))
    kept = (f"the last good manifest, {result.current}, stays current" if result.current
            else "there is no validated manifest yet")
    raise DataRejectedError(
        "data rejected by contract: " + "; ".join(result.problems) + f". Top reasons: {reasons or 'n/a'}. "
        f"Report: {result.report_path} (quarantine: {result.quarantine_path}). This run was not published: {kept}. "
        "Fix the data, raise max_reject_fraction in the contract if these rejects are expected, or accept the partial "
        "dataset explicitly (`hilight validate --allow-rejects`, or `allow_rejects=true` after `hilight run "
        "data_validation -c ...`, or allow_rejects: true in the config).")


def run_ingest(config: DataValidationConfig, contracts: dict[str, DataContract], *, check: bool = True) -> IngestResult:
    """The whole ingestion in one call (used by ``hilight validate`` and tests; the pipeline runs it step by step)."""
    fingerprints = fingerprint_datasets(config)
    tables = load_tables(config)
    tables.videos = probe_videos(tables.videos, config.probe, progress=config.progress, rehash=config.rehash or None)
    validation = validate_tables(tables, contracts)
    result = write_outputs(validation, fingerprints, config, contracts, resolve_path(config.output_dir))
    if check:
        check_thresholds(result, validation)
    return result
