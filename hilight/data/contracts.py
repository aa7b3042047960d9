"""Declarative data contracts compiled to Great Expectations 1.x suites.

A contract (one YAML file per dataset kind in ``data_contracts/``) is an ordered list of
expectations over one table. Each expectation names a ``reason`` code and a human message, so a
failing row can be quarantined with *why* it failed. Order is priority: a row that fails several
expectations is quarantined under the first one (a missing file is "missing_file", not also
"undecodable"), and all of its reasons are kept.

Python (importers, the video prober) computes the facts a rule needs as columns; the contract
decides which values are acceptable; Great Expectations evaluates it and reports the failing
rows by ``row_id``.
"""

from __future__ import annotations

import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import yaml
from pydantic import BaseModel, Field, field_validator, model_validator

log = logging.getLogger(__name__)

ROW_ID = "row_id"


class ExpectationSpec(BaseModel):
    """One rule: a GE expectation type plus its arguments and the reason code it enforces.

    The expectation's own arguments (``value_set``, ``min_value``, ...) are written inline in the YAML; they are
    collected into ``args`` when they are fields of that GE expectation, and any other key is an error.
    """

    model_config = {"extra": "forbid"}

    reason: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    message: str
    expect: str = Field(pattern=r"^expect_[a-z_]+$")
    column: str | None = None
    # what explains a failure: a column (e.g. the decoder's error), or a template over the row's columns and the
    # contract's params, e.g. "{n_frames} frames found, {params[min_frames]} needed"
    detail: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_args(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("expect"), str):
            return data
        try:
            ge_fields = _expectation_fields(data["expect"])
        except ValueError:
            return data  # the unknown expectation is reported by DataContract's check
        own = set(cls.model_fields)
        inline = {k: v for k, v in data.items() if k not in own and k in ge_fields}
        return {**{k: v for k, v in data.items() if k not in inline}, "args": {**(data.get("args") or {}), **inline}}

    def detail_columns(self) -> set[str]:
        """Columns the detail names (none for params)."""
        if self.detail is None:
            return set()
        if "{" not in self.detail:
            return {self.detail}
        fields = {f for _, f, _, _ in string.Formatter().parse(self.detail) if f}
        return {re.split(r"[\[.]", f)[0] for f in fields} - {"params"}

    def render_detail(self, row: pd.Series, params: dict[str, Any]) -> str | None:
        """The detail of one failing row: the detail column's value, or the template filled in."""
        if self.detail is None:
            return None
        if "{" not in self.detail:
            value = row[self.detail]
            return None if _isnull(value) else str(value)
        values = {c: ("n/a" if _isnull(row[c]) else row[c]) for c in self.detail_columns()}
        return self.detail.format_map({**values, "params": params})

    def kwargs(self, params: dict[str, Any]) -> dict[str, Any]:
        """GE keyword arguments, with ``{param: name}`` references replaced by contract params."""
        out: dict[str, Any] = {} if self.column is None else {"column": self.column}
        for key, value in self.args.items():
            if isinstance(value, dict) and set(value) == {"param"}:
                if value["param"] not in params:
                    raise ValueError(f"expectation {self.reason!r} uses param {value['param']!r}, which is not in params")
                value = params[value["param"]]
            out[key] = value
        return out


class DataContract(BaseModel):
    """A versioned contract over one table (``videos``, ``captions`` or ``qa``)."""

    model_config = {"extra": "forbid"}

    name: str
    version: str
    description: str = ""
    table: Literal["videos", "captions", "qa", "hard_negatives", "probes", "events"]  # the last three: evaluation files
    max_reject_fraction: float = Field(ge=0.0, le=1.0)
    params: dict[str, Any] = Field(default_factory=dict)
    expectations: list[ExpectationSpec]

    @field_validator("expectations")
    @classmethod
    def _unique_reasons(cls, v: list[ExpectationSpec]) -> list[ExpectationSpec]:
        seen = [e.reason for e in v]
        dupes = sorted({r for r in seen if seen.count(r) > 1})
        if dupes:
            raise ValueError(f"reason codes must be unique within a contract, repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _params_resolve(self) -> "DataContract":
        for e in self.expectations:
            e.kwargs(self.params)
            _expectation_class(e.expect)
            if e.detail and "{" in e.detail:
                try:
                    e.detail.format_map({**dict.fromkeys(e.detail_columns(), 0), "params": self.params})
                except (KeyError, IndexError, ValueError) as exc:
                    raise ValueError(f"expectation {e.reason!r}: detail template {e.detail!r} does not resolve: "
                                     f"{exc!r} (params has {sorted(self.params)})") from exc
        return self

    @property
    def suite_name(self) -> str:
        return f"{self.name}@{self.version}"


def load_contract(path: Path) -> DataContract:
    """Read and validate one contract YAML; errors name the file."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read data contract {path}: {exc}") from exc
    try:
        return DataContract.model_validate(raw)
    except ValueError as exc:
        raise ValueError(f"invalid data contract {path}:\n{exc}") from exc


def load_contracts(directory: Path) -> dict[str, DataContract]:
    """All contracts in ``directory``, keyed by the table they validate (one per table)."""
    contracts: dict[str, DataContract] = {}
    files = sorted(Path(directory).glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no data contracts (*.yaml) in {directory}")
    for f in files:
        c = load_contract(f)
        if c.table in contracts:
            raise ValueError(f"two contracts validate table {c.table!r}: {contracts[c.table].name} and {c.name} ({f})")
        contracts[c.table] = c
    return contracts


def _expectation_class(expect: str):
    import great_expectations as gx

    name = "".join(part.capitalize() for part in expect.split("_"))
    cls = getattr(gx.expectations, name, None)
    if cls is None:
        raise ValueError(f"unknown Great Expectations expectation {expect!r} (no gx.expectations.{name})")
    return cls


def _expectation_fields(expect: str) -> set[str]:
    """The arguments a GE expectation accepts (``meta`` and ``column`` are set by the contract)."""
    cls = _expectation_class(expect)
    fields = getattr(cls, "model_fields", None) or getattr(cls, "__fields__")  # GE 1.x: pydantic v1 models
    return set(fields) - {"meta", "column"}


def _ephemeral_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # it logs temp dirs at INFO
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def build_suite(contract: DataContract):
    """Compile a contract to a ``gx.ExpectationSuite``; each expectation's meta keeps its reason."""
    import great_expectations as gx

    _ephemeral_context()  # GE binds suites to the current data context

    suite = gx.ExpectationSuite(name=contract.suite_name, meta={"contract": contract.name, "version": contract.version})
    for spec in contract.expectations:
        cls = _expectation_class(spec.expect)
        suite.add_expectation(cls(**spec.kwargs(contract.params), meta={"reason": spec.reason, "message": spec.message}))
    return suite


@dataclass
class ContractResult:
    """Outcome of validating one table against its contract."""

    contract: DataContract
    success: bool
    failures: pd.DataFrame  # one row per (row_id, reason), in contract priority order
    table_failures: list[dict]  # table-level expectations that failed (no rows to blame)
    ge_result: dict  # the GE ExpectationSuiteValidationResult as JSON

    def rejected_ids(self) -> set[int]:
        return set(self.failures[ROW_ID].tolist())


def validate_table(df: pd.DataFrame, contract: DataContract) -> ContractResult:
    """Run the contract's suite over ``df`` (which must have a unique ``row_id`` column)."""
    if ROW_ID not in df.columns or not df[ROW_ID].is_unique:
        raise ValueError(f"table for contract {contract.name!r} needs a unique {ROW_ID!r} column")
    for kind, used in (("", {e.column for e in contract.expectations if e.column}),
                       ("detail ", set().union(*(e.detail_columns() for e in contract.expectations)))):
        missing = sorted(used - set(df.columns))
        if missing:
            raise ValueError(f"table for contract {contract.name!r} lacks {kind}columns {missing}; the importer must "
                             "compute them")
    specs = {e.reason: e for e in contract.expectations}
    if df.empty:
        empty = pd.DataFrame(columns=[ROW_ID, "reason", "message", "detail"])
        return ContractResult(contract, True, empty, [], {"success": True, "results": [], "note": "empty table"})
    ctx = _ephemeral_context()
    batch_def = (
        ctx.data_sources.add_pandas(f"src_{contract.name}")
        .add_dataframe_asset(contract.table)
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(build_suite(contract))
    # GE's pandas metrics choke on object columns mixing lists/dicts; validate only the columns rules use
    cols = sorted({ROW_ID} | {e.column for e in contract.expectations if e.column})
    batch = batch_def.get_batch(batch_parameters={"dataframe": df[cols].reset_index(drop=True)})
    res = batch.validate(suite, result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID]})
    detail_by_id = df.set_index(ROW_ID)
    rows, table_failures = [], []
    for r in res.results:
        reason = r.expectation_config.meta["reason"]
        spec = specs[reason]
        if r.success:
            continue
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"contract {contract.name!r} rule {reason!r} crashed in Great Expectations: "
                               f"{r.exception_info.get('exception_message')}")
        index_list = r.result.get("unexpected_index_list")
        if index_list is None:  # a table-level expectation: nothing row-specific to quarantine
            table_failures.append({"reason": reason, "message": spec.message, "observed": r.result.get("observed_value")})
            continue
        for item in index_list:
            rid = int(item[ROW_ID])
            detail = spec.render_detail(detail_by_id.loc[rid], contract.params)
            rows.append({ROW_ID: rid, "reason": reason, "message": spec.message, "detail": detail})
    order = {e.reason: i for i, e in enumerate(contract.expectations)}
    failures = pd.DataFrame(rows, columns=[ROW_ID, "reason", "message", "detail"]).astype({"detail": object})
    failures["detail"] = failures["detail"].where(failures["detail"].notna(), None)
    failures = failures.sort_values([ROW_ID, "reason"], key=lambda s: s.map(order) if s.name == "reason" else s, kind="stable")
    return ContractResult(contract, bool(res.success), failures.reset_index(drop=True), table_failures, res.to_json_dict())


def _isnull(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists/arrays are not scalars: treat as present
        return False
