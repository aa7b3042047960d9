"""Contracts: the shipped files are valid, compile to GE suites, and rank failing rows by priority."""

from __future__ import annotations

import pandas as pd
import pytest

from hilight.data.contracts import DataContract, build_suite, load_contract, load_contracts, validate_table
from tests.conftest import REPO


def test_shipped_contracts_load_and_compile():
    contracts = load_contracts(REPO / "data_contracts")
    assert set(contracts) == {"videos", "captions", "qa", "hard_negatives", "probes", "events"}
    for c in contracts.values():
        suite = build_suite(c)
        assert len(suite.expectations) == len(c.expectations)
        assert all(e.meta["reason"] for e in suite.expectations)
    assert contracts["videos"].expectations[5].kwargs(contracts["videos"].params)["min_value"] == 12


def _contract(**overrides) -> dict:
    base = {"name": "t", "version": "1", "table": "captions", "max_reject_fraction": 0.5, "params": {"lim": 3},
            "expectations": [
                {"reason": "not_null", "message": "m1", "expect": "expect_column_values_to_not_be_null", "column": "a"},
                {"reason": "small", "message": "m2", "expect": "expect_column_values_to_be_between", "column": "a",
                 "max_value": {"param": "lim"}, "detail": "why"},
                {"reason": "rows", "message": "m3", "expect": "expect_table_row_count_to_be_between", "min_value": 1},
            ]}
    base.update(overrides)
    return base


def test_validate_table_reports_rows_by_priority():
    c = DataContract.model_validate(_contract())
    df = pd.DataFrame({"row_id": [10, 11, 12, 13], "a": [1.0, None, 5.0, 9.0], "why": [None, None, "five", "nine"]})
    res = validate_table(df, c)
    assert not res.success
    assert res.failures[["row_id", "reason", "detail"]].values.tolist() == [[11, "not_null", None], [12, "small", "five"], [13, "small", "nine"]]
    assert res.rejected_ids() == {11, 12, 13} and res.table_failures == []


def test_bad_contracts_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="unknown Great Expectations expectation 'expect_values_to_be_nice'"):
        DataContract.model_validate(_contract(expectations=[{"reason": "x", "message": "m", "expect": "expect_values_to_be_nice"}]))
    with pytest.raises(ValueError, match="not in params"):
        DataContract.model_validate(_contract(params={}))
    dup = _contract()
    dup["expectations"][1]["reason"] = "not_null"
    with pytest.raises(ValueError, match="reason codes must be unique"):
        DataContract.model_validate(dup)
    (tmp_path / "c.yaml").write_text("name: x\n")
    with pytest.raises(ValueError, match=f"invalid data contract {tmp_path / 'c.yaml'}"):
        load_contract(tmp_path / "c.yaml")
    c = DataContract.model_validate(_contract())
    with pytest.raises(ValueError, match=r"lacks columns \['a'\]"):
        validate_table(pd.DataFrame({"row_id": [1]}), c)
