"""Evaluation files through the data contracts, like every other input: hard negatives and probe pairs of the
ablation's caption-score evaluation, and the synthetic event logs the VLM evaluation checks facts against.

``validate_eval_file`` reads one file (JSON list, JSON Lines, CSV or Parquet) into one row per record, computes the
facts each rule needs as columns (``parse_error``, ``schema_error``, ``utf8_ok``, ``empty_field``, ``same_text``,
``duplicate_of``), lets the file kind's contract (``data_contracts/{hard_negatives,probe_pairs,event_logs}.yaml``)
decide, and writes the accepted records and the quarantined ones (with reason, message and detail) under
``out_dir``. Too many rejects for the contract's ``max_reject_fraction`` is an error naming the top reasons.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hilight.data.contracts import ROW_ID, DataContract, validate_table
from hilight.data.importers import printable, utf8_ok

log = logging.getLogger(__name__)

# file kind -> (contract table, required string fields, optional string fields)
KINDS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "negatives": ("hard_negatives", ("video_id", "caption", "negative", "changed"), ()),
    "probes": ("probes", ("video_id", "short", "long"), ("changed",)),
    "events": ("events", ("video_id",), ()),
}
CONTRACT_FILES = {"negatives": "hard_negatives.yaml", "probes": "probe_pairs.yaml", "events": "event_logs.yaml"}
# the two texts that must differ, and the fields that identify a duplicate
_PAIRS = {"negatives": ("caption", "negative"), "probes": ("short", "long")}


class EvalFileRejected(ValueError):
    """An evaluation file has more rejected records than its contract allows."""


@dataclass
class EvalFileResult:
    kind: str
    dataset: str
    source: Path
    accepted: Path  # the accepted records, as a JSON list: what the evaluation reads
    quarantine: Path  # rejected records with reason, message, detail
    counts: dict[str, int]  # accepted, rejected, and per reason

    def summary(self) -> dict:
        return {"kind": self.kind, "dataset": self.dataset, "source": str(self.source), "accepted": str(self.accepted),
                "quarantine": str(self.quarantine), **self.counts}


def read_raw_records(path: Path) -> tuple[list[Any], str | None]:
    """The file's records as parsed (anything: validation judges them), or a file-level parse error."""
    if not path.is_file():
        return [], f"{path} does not exist"
    try:
        if path.suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records"), None
        if path.suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records"), None
        text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    except (OSError, ValueError) as exc:
        return [], f"cannot read {path.name}: {exc}"
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    records.append(_Unparsed(f"unreadable JSON on line {lineno}: {exc.msg}"))
        return records, None
    if path.suffix != ".json":
        return [], f"unsupported format {path.suffix!r}; use .json, .jsonl, .csv or .parquet"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], f"unreadable JSON in {path.name} at line {exc.lineno} column {exc.colno}: {exc.msg}"
    if not isinstance(data, list):
        return [], f"{path.name} must hold a JSON list of records, got {type(data).__name__}"
    return data, None


@dataclass
class _Unparsed:
    error: str


def _schema_error(kind: str, rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"record must be an object, got {type(rec).__name__}"
    _, required, optional = KINDS[kind]
    for key in required:
        if key not in rec:
            return f"missing key {key!r}"
    for key in (*required, *optional):
        if key in rec and not isinstance(rec[key], str):
            return f"{key!r} must be a string, got {type(rec[key]).__name__}"
    return _event_schema_error(rec) if kind == "events" else None


def _event_schema_error(rec: dict) -> str | None:
    if "movers" in rec:  # the general domain
        movers = rec["movers"]
        if not isinstance(movers, list) or not movers:
            return "'movers' must be a non-empty list"
        for i, m in enumerate(movers):
            if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("shape", "colour", "direction")):
                return f"mover {i} needs string 'shape', 'colour' and 'direction'"
        return None
    if not isinstance(rec.get("scenario"), str):
        return "a billiards record needs a string 'scenario' (a general one a 'movers' list)"
    pocketed = rec.get("pocketed")
    if not isinstance(pocketed, list):
        return "'pocketed' must be a list of {ball, pocket}"
    for i, p in enumerate(pocketed):
        if not isinstance(p, dict) or not isinstance(p.get("ball"), str) or not isinstance(p.get("pocket"), str):
            return f"pocketed entry {i} needs string 'ball' and 'pocket'"
    if rec.get("first_contact") is not None and not isinstance(rec["first_contact"], str):
        return "'first_contact' must be a string or null"
    return None


def eval_file_table(kind: str, records: list[Any], file_error: str | None) -> pd.DataFrame:
    """One row per record with the columns the contract's rules read (a file that cannot be read is one row)."""
    if kind not in KINDS:
        raise ValueError(f"unknown evaluation file kind {kind!r}; one of {sorted(KINDS)}")
    _, required, _ = KINDS[kind]
    if file_error is not None:
        records = [_Unparsed(file_error)]
    rows, seen = [], {}
    for i, rec in enumerate(records):
        row = {ROW_ID: i, "parse_error": rec.error if isinstance(rec, _Unparsed) else None, "schema_error": None,
               "utf8_ok": True, "empty_field": None, "same_text": False, "duplicate_of": None}
        if row["parse_error"] is None:
            row["schema_error"] = _schema_error(kind, rec)
        if row["parse_error"] is None and row["schema_error"] is None:
            row["utf8_ok"] = utf8_ok(rec)
            row["empty_field"] = next((k for k in required if not rec[k].strip()), None)
            pair = _PAIRS.get(kind)
            row["same_text"] = bool(pair) and rec[pair[0]].strip() == rec[pair[1]].strip()
            key = (rec["video_id"], *(rec[k] for k in pair)) if pair else rec["video_id"]
            if key in seen:
                row["duplicate_of"] = f"record {seen[key]}"
            else:
                seen[key] = i
        rows.append(row)
    return pd.DataFrame(rows, columns=[ROW_ID, "parse_error", "schema_error", "utf8_ok", "empty_field", "same_text",
                                       "duplicate_of"]).astype({"parse_error": object, "schema_error": object,
                                                                "empty_field": object, "duplicate_of": object})


def validate_eval_file(kind: str, dataset: str, path: str | Path, contract: DataContract,
                       out_dir: str | Path) -> EvalFileResult:
    """Validate one evaluation file against its contract; write ``<kind>-<dataset>.json`` (accepted records) and
    ``<kind>-<dataset>.quarantine.json`` under ``out_dir``; raise :class:`EvalFileRejected` over the limit."""
    path, out_dir = Path(path), Path(out_dir)
    if KINDS[kind][0] != contract.table:
        raise ValueError(f"contract {contract.name!r} validates table {contract.table!r}, not {kind} files")
    records, file_error = read_raw_records(path)
    table = eval_file_table(kind, records, file_error)
    result = validate_table(table, contract)
    rejected = result.failures.drop_duplicates(ROW_ID)  # first reason per record, in contract priority
    bad = set(rejected[ROW_ID])
    accepted = [rec for i, rec in enumerate(records) if i not in bad] if file_error is None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{kind}-{dataset}"
    accepted_path, quarantine_path = out_dir / f"{stem}.json", out_dir / f"{stem}.quarantine.json"
    accepted_path.write_text(json.dumps(accepted, ensure_ascii=False, indent=0), encoding="utf-8")
    quarantined = [{"record": printable(json.dumps(records[r[ROW_ID]], default=str, ensure_ascii=False))
                    if r[ROW_ID] < len(records) and not isinstance(records[r[ROW_ID]], _Unparsed) else None,
                    "row": int(r[ROW_ID]), "reason": r["reason"], "message": r["message"], "detail": r["detail"]}
                   for r in rejected.to_dict("records")]
    quarantine_path.write_text(json.dumps(quarantined, ensure_ascii=False, indent=1), encoding="utf-8")
    reasons = rejected["reason"].value_counts()
    counts = {"records": len(table), "accepted": len(accepted), "rejected": len(bad),
              **{f"rejected/{r}": int(n) for r, n in reasons.items()}}
    fraction = len(bad) / max(len(table), 1)
    if fraction > contract.max_reject_fraction or not accepted:
        first = {r: g.iloc[0] for r, g in rejected.groupby("reason")}
        top = "; ".join(f"{r} ({n}): {first[r]['message']}" + (f" (record {first[r][ROW_ID]}: {first[r]['detail']})"
                                                               if first[r]["detail"] else "")
                        for r, n in reasons.head(3).items())
        raise EvalFileRejected(f"{kind} file {path} (dataset {dataset!r}): {len(bad)} of {len(table)} records "
                               f"rejected ({fraction:.0%}), over contract {contract.name!r}'s max_reject_fraction "
                               f"{contract.max_reject_fraction:g}: {top}. Rejected records with their reasons: "
                               f"{quarantine_path}")
    if bad:
        log.warning("%s file %s: %d of %d records rejected (%s); see %s", kind, path, len(bad), len(table),
                    ", ".join(f"{r} {n}" for r, n in reasons.items()), quarantine_path)
    return EvalFileResult(kind, dataset, path, accepted_path, quarantine_path, counts)


def contract_for(kind: str, contracts: dict[str, DataContract]) -> DataContract:
    """The contract that validates ``kind`` files, from ``load_contracts``' table -> contract map."""
    table = KINDS[kind][0]
    if table not in contracts:
        raise ValueError(f"no data contract validates {table!r} (the {kind} evaluation files); restore "
                         f"data_contracts/{CONTRACT_FILES[kind]}")
    return contracts[table]
