"""One video file checked with the rules validation applies, before a model is loaded for it (``hilight ask``).

The facts come from the same probe (``hilight.data.probe.probe_file``) and the rules, thresholds and messages from
the same contract file (``data_contracts/video_files.yaml``) as the data_validation pipeline. The contract's
row-level rules (``expect_column_values_to_be_null``, ``..._in_set``, ``..._between``) are evaluated here on the one
probed row in plain Python: Great Expectations takes tens of seconds to import, longer than the answer itself.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from hilight.config import InputError
from hilight.data.probe import probe_file

log = logging.getLogger(__name__)

VIDEO_CONTRACT = "video_files.yaml"


class VideoInputError(InputError):
    """The video given on the command line cannot be used; the message names the file, the rule and the fix."""


def check_video(path: Path, contracts_dir: Path) -> dict[str, Any]:
    """The probe facts of ``path``; ``VideoInputError`` with the contract's reason and message when a rule fails."""
    if not path.exists():
        raise VideoInputError(f"video {path} does not exist (paths on the command line are relative to the working "
                              f"directory, {Path.cwd()})")
    if path.is_dir():
        examples = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".mp4", ".mkv", ".mov", ".webm"))[:3]
        hint = f", e.g. {path / examples[0]}" if examples else ""
        raise VideoInputError(f"{path} is a directory; pass one video file{hint}")
    contract = _video_contract(contracts_dir)
    params = contract.get("params", {})
    facts = probe_file(str(path), decode_frames=int(params.get("min_frames", 12)))
    for rule in contract.get("expectations", []):
        if not _holds(rule, facts, params):
            detail = facts.get(rule.get("detail") or "") or _observed(rule, facts)
            raise VideoInputError(f"video {path} fails the data contract's rule {rule['reason']}"
                                  + (f" ({detail})" if detail else "") + f": {rule['message']}")
    return facts


def _video_contract(contracts_dir: Path) -> dict[str, Any]:
    path = contracts_dir / VIDEO_CONTRACT
    if not path.is_file():
        raise InputError(f"the video contract {path} does not exist; run from the project (or set "
                         "HILIGHT_PROJECT_ROOT) so the video can be checked with the validation rules")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _value(spec: Any, params: dict[str, Any]) -> Any:
    return params[spec["param"]] if isinstance(spec, dict) and set(spec) == {"param"} else spec


def _holds(rule: dict[str, Any], facts: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether the one probed row passes ``rule``. Like Great Expectations, the ``*_in_set`` and ``*_between`` rules
    ignore a null value (an earlier rule, e.g. missing_file, has already rejected that row)."""
    value, expect = facts.get(rule.get("column")), rule["expect"]
    if expect == "expect_column_values_to_be_null":
        return value is None
    if value is None:
        return True
    if expect == "expect_column_values_to_be_in_set":
        return value in _value(rule["value_set"], params)
    if expect == "expect_column_values_to_be_between":
        low, high = _value(rule.get("min_value"), params), _value(rule.get("max_value"), params)
        return (low is None or value >= low) and (high is None or value <= high)
    log.warning("`hilight ask` does not evaluate the contract rule %s (%s); validation does", rule["reason"], expect)
    return True


def _observed(rule: dict[str, Any], facts: dict[str, Any]) -> str:
    column = rule.get("column")
    return f"{column} = {facts.get(column)!r}" if column else ""
