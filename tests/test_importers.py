"""Importers read the real formats and turn every problem into a row-level fact."""

from __future__ import annotations

import json

import pandas as pd

from hilight.data import importers


def test_caption_records_in_all_shapes(tmp_path):
    recs = [
        {"video": "a.mp4", "caption": "one caption"},
        {"video": "b.mp4", "caption": ["first", "second"], "split": "val"},
        {"video_id": "c", "video": "c.mp4", "captions": [{"caption": "x", "object": "cue ball"}, "y"]},
    ]
    (tmp_path / "c.json").write_text(json.dumps(recs))
    df = importers.read_caption_table(tmp_path / "c.json", "d")
    assert df["caption"].tolist() == ["one caption", "first", "second", "x", "y"]
    assert df["video_id"].tolist() == ["a", "b", "b", "c", "c"]
    assert df["object"].tolist()[3] == "cue ball"
    assert df["split"].tolist()[1] == "val"
    assert df["schema_error"].isna().all() and df["parse_error"].isna().all()


def test_jsonl_bad_line_is_one_row(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"video": "a.mp4", "caption": "ok"}\n{broken\n{"video": "b.mp4", "caption": "ok2"}\n')
    df = importers.read_caption_table(tmp_path / "c.jsonl", "d")
    assert df["caption"].tolist()[0] == "ok" and df["caption"].tolist()[2] == "ok2"
    assert "line 2" in df["parse_error"].iloc[1]


def test_csv_and_parquet_long_form(tmp_path):
    frame = pd.DataFrame({"video": ["a.mp4", "a.mp4"], "caption": ["c1", "c2"], "object": ["ball", ""]})
    frame.to_csv(tmp_path / "c.csv", index=False)
    frame.to_parquet(tmp_path / "c.parquet")
    for name in ("c.csv", "c.parquet"):
        df = importers.read_caption_table(tmp_path / name, "d")
        assert df["caption"].tolist() == ["c1", "c2"] and df["video_id"].tolist() == ["a", "a"]
    pd.DataFrame({"clip": ["a.mp4"], "text": ["c"]}).to_csv(tmp_path / "bad.csv", index=False)
    bad = importers.read_caption_table(tmp_path / "bad.csv", "d")
    assert "lacks required columns ['video', 'caption']" in bad["parse_error"].iloc[0]


def test_msrvtt_annotation_json(tmp_path):
    data = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"},
                       {"video_id": "video2", "split": "validate"}],
            "sentences": [{"video_id": "video0", "caption": "a man plays pool", "sen_id": 0},
                          {"video_id": "video1", "caption": "a cat", "sen_id": 1},
                          {"video_id": "video1", "caption": 5, "sen_id": 2},
                          {"video_id": "video2", "caption": "a dog", "sen_id": 3}]}
    (tmp_path / "msr.json").write_text(json.dumps(data))
    df = importers.read_caption_table(tmp_path / "msr.json", "msrvtt")
    assert df["video"].tolist()[:2] == ["video0.mp4", "video1.mp4"]
    # MSR-VTT's "validate" is the configs' "val" (train_val_videodatainfo.json's names)
    assert df["split"].tolist()[:2] + df["split"].tolist()[3:] == ["train", "test", "val"]
    assert df["caption_id"].tolist()[:2] == ["0", "1"]
    assert "'caption' must be a string, got int" in df["schema_error"].iloc[2]


def test_llava_qa_and_conversation_facts(tmp_path):
    recs = [
        {"id": "v1", "video": "v1.pkl", "conversations": [{"from": "human", "value": "Q?\n<video>"}, {"from": "gpt", "value": "A."}]},
        {"id": 7, "video": "v2.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"}, {"from": "gpt", "value": "A"},
                                                        {"from": "human", "value": "<video> again"}, {"from": "gpt", "value": "B"}]},
        {"id": "v3", "video": "v3.mp4", "conversations": [{"from": "gpt", "value": "<video>"}, {"from": "human", "value": "x"}]},
        {"id": "v4", "video": "v4.mp4", "conversations": [{"from": "system", "value": "<video>"}]},
        {"video": "v5.mp4", "conversations": "not a list"},
    ]
    (tmp_path / "qa.json").write_text(json.dumps(recs))
    df = importers.read_qa(tmp_path / "qa.json", "d")
    assert df["id"].tolist()[:2] == ["v1", "7"]
    facts = [importers.conversation_facts(c) for c in df["conversations"]]
    assert facts[0] == {"n_turns": 2, "n_video_markers": 1, "marker_in_first_turn": True, "turns_alternate": True, "turns_nonempty": True}
    assert facts[1]["n_video_markers"] == 2 and facts[1]["marker_in_first_turn"] is False
    assert facts[2]["turns_alternate"] is False
    assert "unknown role 'system'" in df["schema_error"].iloc[3]
    assert "missing key 'id'" in df["schema_error"].iloc[4] and "'conversations' must be list" in df["schema_error"].iloc[4]


def test_invalid_utf8_only_fails_its_own_row(tmp_path):
    raw = b'[{"video": "a.mp4", "caption": "good"}, {"video": "b.mp4", "caption": "bad \xff\xfe text"}]'
    (tmp_path / "c.json").write_bytes(raw)
    df = importers.read_caption_table(tmp_path / "c.json", "d")
    assert df["utf8_ok"].tolist() == [True, False]
    assert df["caption"].tolist() == ["good", "bad \\xff\\xfe text"]


def test_unreadable_json_names_position(tmp_path):
    (tmp_path / "qa.json").write_text('[{"id": "x",, }]')
    df = importers.read_qa(tmp_path / "qa.json", "d")
    assert len(df) == 1 and df["parse_error"].iloc[0].startswith("unreadable JSON in qa.json at line 1 column")
