"""Evaluation files through the data contracts (issue 15, item 6): hard negatives, probe pairs and event logs are
validated like every other input, accepted records are what evaluation reads, rejects are quarantined with reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hilight.data.contracts import load_contracts
from hilight.data.eval_files import EvalFileRejected, contract_for, validate_eval_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def contracts():
    return load_contracts(REPO / "data_contracts")


def _negative(i: int, **kw) -> dict:
    return {"video_id": f"v{i}", "caption": f"The cue ball hits the red ball {i}", "negative": f"The cue ball hits the blue ball {i}",
            "changed": "colour", **kw}


def test_negatives_reject_bad_records_and_keep_the_rest(tmp_path, contracts):
    records = [_negative(i) for i in range(20)]
    records += [_negative(1),  # duplicate of record 1
                {"video_id": "v30", "caption": "same", "negative": "same", "changed": "colour"},
                {"video_id": "v31", "caption": "a", "negative": " ", "changed": "colour"},
                {"video_id": "v32", "caption": "a", "changed": "colour"}]
    src = tmp_path / "negatives.json"
    src.write_text(json.dumps(records))
    with pytest.raises(EvalFileRejected, match=r"4 of 24 records rejected .* max_reject_fraction 0.1"):
        validate_eval_file("negatives", "billiards", src, contract_for("negatives", contracts), tmp_path / "out")
    src.write_text(json.dumps(records[:-3] + [_negative(i) for i in range(40, 60)]))
    result = validate_eval_file("negatives", "billiards", src, contract_for("negatives", contracts), tmp_path / "out")
    assert result.counts == {"records": 41, "accepted": 40, "rejected": 1, "rejected/duplicate_id": 1}
    assert len(json.loads(result.accepted.read_text())) == 40
    (q,) = json.loads(result.quarantine.read_text())
    assert (q["row"], q["reason"], q["detail"]) == (20, "duplicate_id", "record 1")


def test_each_rule_has_its_reason(tmp_path, contracts):
    records = [_negative(i) for i in range(2)] + [
        {"video_id": "v30", "caption": "same", "negative": "same", "changed": "colour"},
        {"video_id": "v31", "caption": "a", "negative": " ", "changed": "colour"},
        {"video_id": "v32", "caption": "a", "changed": "colour"},
        {"video_id": "v33", "caption": 3, "negative": "b", "changed": "colour"}, "not a record"]
    src = tmp_path / "negatives.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n{broken\n")
    with pytest.raises(EvalFileRejected):
        validate_eval_file("negatives", "billiards", src, contract_for("negatives", contracts), tmp_path)
    reasons = {q["row"]: (q["reason"], q["detail"]) for q in json.loads((tmp_path / "negatives-billiards.quarantine.json").read_text())}
    assert reasons == {2: ("not_a_change", None), 3: ("empty_text", "negative"), 4: ("wrong_schema", "missing key 'negative'"),
                       5: ("wrong_schema", "'caption' must be a string, got int"),
                       6: ("wrong_schema", "record must be an object, got str"),
                       7: ("unreadable_file", "unreadable JSON on line 8: Expecting property name enclosed in double quotes")}


def test_probes_and_the_generators_files_pass(tmp_path, contracts, billiards_dir, general_dir):
    for kind, dataset, path in (("negatives", "billiards", billiards_dir / "negatives.json"),
                                ("probes", "billiards", billiards_dir / "probes.json"),
                                ("events", "billiards", billiards_dir / "events.json"),
                                ("events", "general", general_dir / "events.json")):
        result = validate_eval_file(kind, dataset, path, contract_for(kind, contracts), tmp_path)
        assert result.counts["rejected"] == 0 and result.counts["accepted"] == len(json.loads(path.read_text()))
    probes = [{"video_id": "v0", "short": "a ball", "long": "a ball"}]
    (tmp_path / "p.json").write_text(json.dumps(probes))
    with pytest.raises(EvalFileRejected, match="not_a_change"):
        validate_eval_file("probes", "billiards", tmp_path / "p.json", contract_for("probes", contracts), tmp_path)


def test_one_bad_event_record_fails_the_evaluation_inputs(tmp_path, contracts, billiards_dir):
    records = json.loads((billiards_dir / "events.json").read_text())
    records[3]["pocketed"] = [{"ball": "red"}]
    (tmp_path / "events.json").write_text(json.dumps(records))
    with pytest.raises(EvalFileRejected, match=r"1 of 24 records rejected .*wrong_schema"):
        validate_eval_file("events", "billiards", tmp_path / "events.json", contract_for("events", contracts), tmp_path)
    (q,) = json.loads((tmp_path / "events-billiards.quarantine.json").read_text())
    assert q["detail"] == "pocketed entry 0 needs string 'ball' and 'pocket'"
    with pytest.raises(EvalFileRejected, match="does not exist"):
        validate_eval_file("events", "billiards", tmp_path / "nope.json", contract_for("events", contracts), tmp_path)
