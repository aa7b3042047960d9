"""Importers: real annotation formats in, flat rows with the facts the contracts check out.

Importers never drop or "fix" anything silently. A file that cannot be parsed becomes one row
with ``parse_error`` set; a record with the wrong shape becomes a row with ``schema_error`` set;
every other record becomes one row per caption / conversation. The contracts decide.

Formats read:

* caption tables: JSON list of records (``{"video", "caption": str | [str], ...}`` or
  ``{"video", "captions": [str | {"caption", "object"}]}``), JSON Lines of such records, CSV and
  Parquet in long form (``video, caption[, video_id, caption_id, object, split]``), and MSR-VTT
  annotation JSON (``{"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption", "sen_id"}]}``).
* video QA: LLaVA / VideoInstruct JSON (a list of ``{"id", "video", "conversations": [{"from", "value"}]}``),
  as the HiLight reference reads it, or JSON Lines of the same records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from hilight.data.synth.text import VIDEO_TOKEN

CAPTION_COLUMNS = ["dataset", "source", "video_id", "video", "caption_id", "caption", "object", "split",
                   "parse_error", "schema_error", "utf8_ok"]
QA_COLUMNS = ["dataset", "source", "id", "video", "conversations", "parse_error", "schema_error", "utf8_ok"]
ROLES = ("human", "gpt")


def _read_text(path: Path) -> str:
    """File text; undecodable bytes survive as lone surrogates so only the rows holding them fail."""
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def utf8_ok(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(utf8_ok(v) for v in value.values()) and all(utf8_ok(k) for k in value)
    if isinstance(value, (list, tuple)):
        return all(utf8_ok(v) for v in value)
    return True


def printable(value: Any) -> Any:
    """A string safe to store in Parquet: invalid bytes shown as ``\\xNN``."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _parse_json(path: Path) -> tuple[Any, str | None]:
    try:
        text = _read_text(path)
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror or exc}"
    if path.suffix == ".jsonl":
        records: list[Any] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                records.append(_BadLine(lineno, exc.msg))
        return records, None
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"unreadable JSON in {path.name} at line {exc.lineno} column {exc.colno}: {exc.msg}"


class _BadLine:
    """A JSON Lines line that failed to parse: it becomes its own rejected row."""

    def __init__(self, lineno: int, msg: str):
        self.lineno, self.msg = lineno, msg


def _type_name(v: Any) -> str:
    return type(v).__name__


# --------------------------------------------------------------------------------------------
# caption tables


def read_caption_table(path: Path, dataset: str) -> pd.DataFrame:
    """Rows of ``CAPTION_COLUMNS`` from any supported caption-table file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows = _caption_rows_from_json(path, dataset)
    elif suffix in (".csv", ".parquet"):
        rows = _caption_rows_from_frame(path, dataset)
    else:
        rows = [_file_error(dataset, path, f"unsupported caption-table format {suffix!r} (use .json, .jsonl, .csv or .parquet)")]
    return _frame(rows, CAPTION_COLUMNS)


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """Rows -> DataFrame. Strings holding invalid UTF-8 are made printable (Arrow-backed strings
    cannot hold them) and the row is flagged ``utf8_ok=False`` for the contract to reject."""
    for row in rows:
        row["utf8_ok"] = utf8_ok([v for k, v in row.items() if k != "utf8_ok"])
        if not row["utf8_ok"]:
            for k, v in row.items():
                row[k] = printable(v)
    return pd.DataFrame(rows, columns=columns)


def _file_error(dataset: str, path: Path, msg: str, columns: list[str] = CAPTION_COLUMNS) -> dict:
    row = dict.fromkeys(columns)
    row.update(dataset=dataset, source=path.name, parse_error=msg)
    return row


def _caption_rows_from_json(path: Path, dataset: str) -> list[dict]:
    data, error = _parse_json(path)
    if error:
        return [_file_error(dataset, path, error)]
    if isinstance(data, dict) and "sentences" in data:
        return _msrvtt_rows(path, dataset, data)
    if not isinstance(data, list):
        return [_file_error(dataset, path, f"expected a JSON list of records or MSR-VTT {{'videos', 'sentences'}}, got {_type_name(data)}")]
    rows: list[dict] = []
    for i, rec in enumerate(data):
        rows.extend(_caption_record_rows(rec, dataset, f"{path.name}#{i}"))
    return rows


def _caption_record_rows(rec: Any, dataset: str, source: str) -> list[dict]:
    base = dict.fromkeys(CAPTION_COLUMNS)
    base.update(dataset=dataset, source=source)
    if isinstance(rec, _BadLine):
        return [{**base, "parse_error": f"unreadable JSON on line {rec.lineno}: {rec.msg}"}]
    if not isinstance(rec, dict):
        return [{**base, "schema_error": f"record must be an object, got {_type_name(rec)}"}]
    video = rec.get("video", rec.get("clip_name"))
    if video is None:
        return [{**base, "schema_error": "missing key 'video'"}]
    if not isinstance(video, str):
        return [{**base, "schema_error": f"'video' must be a string, got {_type_name(video)}"}]
    base.update(video=video, video_id=str(rec.get("video_id") or Path(video).stem), split=rec.get("split"))
    if "captions" in rec:
        items = rec["captions"]
    elif "caption" in rec:
        items = rec["caption"]
    else:
        return [{**base, "schema_error": "missing key 'caption' (or 'captions')"}]
    if isinstance(items, (str, dict)):
        items = [items]
    if not isinstance(items, list):
        return [{**base, "schema_error": f"'caption' must be a string or a list, got {_type_name(items)}"}]
    rows = []
    for j, item in enumerate(items):
        # generated ids embed the source position, so only ids given in the data can collide
        row = {**base, "source": f"{source}.{j}", "caption_id": f"{base['video_id']}@{source}.{j}"}
        if isinstance(item, dict):
            text, obj = item.get("caption"), item.get("object")
        else:
            text, obj = item, None
        if not isinstance(text, str):
            row["schema_error"] = f"caption {j} must be a string, got {_type_name(text)}"
        else:
            row.update(caption=text, object=obj if isinstance(obj, str) else None)
        rows.append(row)
    if not rows:
        rows.append({**base, "schema_error": "record has an empty caption list"})
    return rows


# MSR-VTT's own split names -> the ones the configs select (train_val_videodatainfo.json says "validate")
MSRVTT_SPLITS = {"validate": "val"}


def _msrvtt_rows(path: Path, dataset: str, data: dict) -> list[dict]:
    splits = {}
    for v in data.get("videos", []) or []:
        if isinstance(v, dict) and "video_id" in v:
            split = v.get("split")
            splits[str(v["video_id"])] = MSRVTT_SPLITS.get(split, split) if isinstance(split, str) else split
    rows = []
    for i, s in enumerate(data["sentences"] if isinstance(data["sentences"], list) else []):
        row = dict.fromkeys(CAPTION_COLUMNS)
        row.update(dataset=dataset, source=f"{path.name}#sentences[{i}]")
        if not isinstance(s, dict):
            row["schema_error"] = f"sentence must be an object, got {_type_name(s)}"
        elif not isinstance(s.get("video_id"), str):
            row["schema_error"] = "missing or non-string 'video_id'"
        elif not isinstance(s.get("caption"), str):
            row["schema_error"] = f"'caption' must be a string, got {_type_name(s.get('caption'))}"
        else:
            vid = s["video_id"]
            row.update(video_id=vid, video=f"{vid}.mp4", caption=s["caption"], split=splits.get(vid),
                       caption_id=str(s.get("sen_id", f"{vid}@{path.name}#{i}")))
        rows.append(row)
    if not isinstance(data["sentences"], list):
        rows.append(_file_error(dataset, path, "MSR-VTT 'sentences' must be a list"))
    return rows


def _caption_rows_from_frame(path: Path, dataset: str) -> list[dict]:
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
        else:
            df = pd.read_parquet(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        return [_file_error(dataset, path, f"cannot read {path.name}: {exc}")]
    missing = [c for c in ("video", "caption") if c not in df.columns]
    if missing:
        return [_file_error(dataset, path, f"table lacks required columns {missing}; has {list(df.columns)}")]
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        row = dict.fromkeys(CAPTION_COLUMNS)
        row.update(dataset=dataset, source=f"{path.name}#{i}")
        video, caption = rec.get("video"), rec.get("caption")
        if not isinstance(video, str) or not video:
            row["schema_error"] = "missing or non-string 'video'"
        elif not isinstance(caption, str):
            row["schema_error"] = f"'caption' must be a string, got {_type_name(caption)}"
        else:
            vid = str(rec.get("video_id") or Path(video).stem)
            row.update(video=video, caption=caption, video_id=vid,
                       caption_id=str(rec.get("caption_id") or f"{vid}@{path.name}#{i}"),
                       object=rec.get("object") or None, split=rec.get("split") or None)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# video QA conversations


def read_qa(path: Path, dataset: str) -> pd.DataFrame:
    """Rows of ``QA_COLUMNS`` (``conversations`` as a JSON string) from a LLaVA-style file."""
    path = Path(path)
    data, error = _parse_json(path)
    if error:
        return _frame([_file_error(dataset, path, error, QA_COLUMNS)], QA_COLUMNS)
    if not isinstance(data, list):
        msg = f"expected a JSON list of conversation records, got {_type_name(data)}"
        return _frame([_file_error(dataset, path, msg, QA_COLUMNS)], QA_COLUMNS)
    return _frame([_qa_row(rec, dataset, f"{path.name}#{i}") for i, rec in enumerate(data)], QA_COLUMNS)


def _qa_row(rec: Any, dataset: str, source: str) -> dict:
    row = dict.fromkeys(QA_COLUMNS)
    row.update(dataset=dataset, source=source)
    if isinstance(rec, _BadLine):
        row["parse_error"] = f"unreadable JSON on line {rec.lineno}: {rec.msg}"
        return row
    if not isinstance(rec, dict):
        row["schema_error"] = f"record must be an object, got {_type_name(rec)}"
        return row
    problems = []
    for key, kind in (("id", (str, int)), ("video", str), ("conversations", list)):
        if key not in rec:
            problems.append(f"missing key {key!r}")
        elif not isinstance(rec[key], kind):
            problems.append(f"{key!r} must be {kind.__name__ if isinstance(kind, type) else 'str or int'}, got {_type_name(rec[key])}")
    if not problems:
        for t, turn in enumerate(rec["conversations"]):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
                problems.append(f"turn {t} must be {{'from': str, 'value': str}}")
                break
            if turn["from"] not in ROLES:
                problems.append(f"turn {t} has unknown role {turn['from']!r} (expected one of {list(ROLES)})")
                break
    row.update(id=str(rec["id"]) if isinstance(rec.get("id"), (str, int)) else None,
               video=rec.get("video") if isinstance(rec.get("video"), str) else None)
    if problems:
        row["schema_error"] = "; ".join(problems)
    else:
        row["conversations"] = json.dumps(rec["conversations"], ensure_ascii=False)
    return row


def conversation_facts(conversations_json: object) -> dict:
    """Structural facts about one conversation for the QA contract."""
    if not isinstance(conversations_json, str):
        return {"n_turns": None, "n_video_markers": None, "marker_in_first_turn": None,
                "turns_alternate": None, "turns_nonempty": None}
    turns = json.loads(conversations_json)
    markers = [t["value"].count(VIDEO_TOKEN) for t in turns]
    roles = [t["from"] for t in turns]
    alternate = bool(turns) and len(turns) % 2 == 0 and all(r == ROLES[i % 2] for i, r in enumerate(roles))
    return {
        "n_turns": len(turns),
        "n_video_markers": sum(markers),
        "marker_in_first_turn": bool(markers) and markers[0] == sum(markers),
        "turns_alternate": alternate,
        "turns_nonempty": all(t["value"].replace(VIDEO_TOKEN, "").strip() for t in turns),
    }


def mark_duplicates(df: pd.DataFrame, key: Callable[[dict], Any]) -> pd.Series:
    """``row_id`` of the first row with the same key, for every later row; None otherwise."""
    first: dict[Any, int] = {}
    out = []
    for rec in df.to_dict("records"):
        k = key(rec)
        if k is None:
            out.append(None)
        elif k in first:
            out.append(f"row {first[k]} ({rec.get('dataset')}, {k[-1] if isinstance(k, tuple) else k})")
        else:
            first[k] = rec["row_id"]
            out.append(None)
    return pd.Series(out, index=df.index, dtype=object)

