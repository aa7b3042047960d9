"""Caption-score evaluation pieces (fact checks, text scores, summaries) and the selection rule, model-free."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hilight.eval.facts import ClipFacts, check_answer, read_events
from hilight.experiments.selection import Guard, MetricOrder, SelectionRule, decide, paired_difference
from hilight.eval.vlm import summarise, text_scores

POT = ClipFacts("billiards", first_contact="red", pocketed=[("red", "bottom side pocket")], scenario="pot")
MISS = ClipFacts("billiards", first_contact="black", pocketed=[], scenario="miss")
BREAK = ClipFacts("billiards", first_contact="yellow", pocketed=[], scenario="break")
SHAPES = ClipFacts("general", movers=[{"shape": "square", "colour": "white", "direction": "downwards"},
                                      {"shape": "triangle", "colour": "blue", "direction": "from right to left"}])


@pytest.mark.parametrize("facts, question, answer, expected", [
    (MISS, "Which ball did the white cue ball hit first?", "The white cue ball hit the black ball first.", {"colour": True}),
    (MISS, "Which ball did the white cue ball hit first?", "The white cue ball hit the red ball first.", {"colour": False}),
    (MISS, "Which ball did the white cue ball hit first?", "It hit the black ball, then the red ball.", {"colour": False}),
    (POT, "What color ball was pocketed by the white cue ball?", "The red ball was pocketed.", {"colour": True}),
    (POT, "What color ball was pocketed by the white cue ball?",
     "The white cue ball hit the red ball, and the red ball rolled into the pocket.", {"colour": True}),
    (POT, "What color ball was pocketed by the white cue ball?",
     "The white cue ball hit the blue ball, and the red ball rolled into the pocket.", {"colour": True}),
    (POT, "What color ball was pocketed by the white cue ball?",
     "The white cue ball hit the red ball, and the blue ball rolled into the pocket.", {"colour": False}),
    (POT, "What color ball was pocketed by the white cue ball?",
     "The red ball and the blue ball rolled into the pocket.", {"colour": False}),
    (POT, "What color ball was pocketed by the white cue ball?", "The blue ball.", {"colour": False}),
    (POT, "Which pocket did the red ball go into?", "The red ball went into the bottom side pocket.", {"pocket": True}),
    (POT, "Which pocket did the red ball go into?", "The red ball went into the top side pocket.", {"pocket": False}),
    (MISS, "Was any ball pocketed?", "No, no ball was pocketed.", {"action": True}),
    (POT, "Was any ball pocketed?", "No, no ball was pocketed.", {"action": False}),
    (BREAK, "How many balls were pocketed on the break?", "No balls were pocketed on the break.", {"count": True}),
    (BREAK, "How many balls were pocketed on the break?", "Two balls were pocketed on the break.", {"count": False}),
    (SHAPES, "What color is the square?", "The square is white.", {"colour": True}),
    (SHAPES, "What color is the square?", "The square is blue.", {"colour": False}),
    (SHAPES, "Which way does the blue triangle move?", "It moves from right to left.", {"direction": True}),
    (SHAPES, "Which way does the blue triangle move?", "It moves left.", {"direction": True}),
    (SHAPES, "Which way does the blue triangle move?", "It moves upwards.", {"direction": False}),
    (SHAPES, "How many shapes are moving?", "Two shapes are moving.", {"count": True}),
    (SHAPES, "How many shapes are moving?", "One shape is moving.", {"count": False}),
])
def test_fact_checks_of_questions(facts, question, answer, expected):
    assert check_answer(facts, question, answer) == expected


def test_a_fact_the_conversation_already_stated_is_not_scored():
    hit = "Which ball did the white cue ball hit first?"
    # on a pot the earlier turns name the ball: any model "knows" the first contact from the text alone
    told = ("What color ball was pocketed by the white cue ball? The red ball was pocketed. "
            "Which pocket did the red ball go into? The red ball went into the bottom side pocket.")
    assert check_answer(POT, hit, "The white cue ball hit the red ball first.", told) == {}
    assert check_answer(POT, hit, "The white cue ball hit the blue ball first.", told) == {}
    # a history that does not state the fact leaves the check in, right or wrong
    asked = "Was any ball pocketed? No, no ball was pocketed."
    assert check_answer(MISS, hit, "The white cue ball hit the black ball first.", asked) == {"colour": True}
    assert check_answer(MISS, hit, "The white cue ball hit the red ball first.", asked) == {"colour": False}
    # "no ball was pocketed" already answers "how many?" with zero
    assert check_answer(BREAK, "How many balls were pocketed on the break?", "No balls were pocketed on the break.",
                        asked) == {}


def test_fact_checks_of_descriptions():
    q = "What's happened in this video?"
    good = "The white cue ball hits the red ball. The red ball is knocked into the bottom side pocket."
    assert check_answer(POT, q, good) == {"colour": True, "pocket": True, "action": True}
    wrong = "The white cue ball hits the green ball. The green ball misses the pocket. No ball is pocketed."
    assert check_answer(POT, q, wrong) == {"colour": False, "pocket": False, "action": False}
    assert check_answer(MISS, q, "The white cue ball hits the black ball. The black ball misses the pocket.") == {
        "colour": True, "pocket": True, "action": True}
    assert check_answer(BREAK, q, "The triangle of balls is scattered by the white cue ball.") == {
        "pocket": True, "action": True}
    assert check_answer(SHAPES, q, "A white square moves downwards. A blue triangle moves from right to left.") == {
        "colour": True, "direction": True}
    assert check_answer(SHAPES, q, "A white square moves downwards.") == {"colour": False, "direction": False}


def test_read_events_of_the_synthetic_datasets(billiards_dir, general_dir):
    bil = read_events(billiards_dir / "events.json", "billiards")
    gen = read_events(general_dir / "events.json", "general")
    records = json.loads((billiards_dir / "events.json").read_text())
    first = bil[f"billiards/{records[0]['video_id']}"]
    assert first.domain == "billiards" and first.scenario == records[0]["scenario"]
    assert all("white" not in [b for b, _ in f.pocketed] for f in bil.values())  # the cue ball is not an object ball
    assert all(f.domain == "general" and f.movers for f in gen.values())
    with pytest.raises(FileNotFoundError, match="evaluation.events"):
        read_events(billiards_dir / "nope.json", "billiards")


def test_text_scores_and_summary():
    scores = text_scores(["The red ball was pocketed.", "nothing alike here"],
                         [["The red ball was pocketed."], ["The white cue ball hit the red ball first."]])
    assert scores.loc[0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert (scores.loc[1] < 0.2).all()
    # paraphrase captions (MSR-VTT): one of them said exactly scores 1 against them as references; against all of
    # them joined into one reference the same answer scores far lower
    paraphrases = ["a man is playing pool", "someone plays billiards in a bar", "a person hits a ball with a cue"]
    multi = text_scores([paraphrases[0]], [paraphrases]).loc[0]
    joined = text_scores([paraphrases[0]], [[". ".join(paraphrases)]]).loc[0]
    assert multi.tolist() == pytest.approx([1.0, 1.0, 1.0]) and joined["rougeL"] < 0.6 and joined["bleu"] < 0.5
    answers = pd.DataFrame({
        "dataset": ["billiards"] * 3, "kind": ["qa", "qa", "describe"], "answer": ["a", "", "c"],
        "rougeL": [1.0, 0.0, 0.5], "bleu": [1.0, 0.0, 0.2], "chrf": [1.0, 0.0, 0.3],
        "fact_colour": pd.array([True, False, pd.NA], dtype="boolean"),
        "fact_pocket": pd.array([pd.NA, pd.NA, True], dtype="boolean"),
        "fact_action": pd.array([pd.NA, pd.NA, True], dtype="boolean"),
        "fact_count": pd.array([pd.NA] * 3, dtype="boolean"), "fact_direction": pd.array([pd.NA] * 3, dtype="boolean")})
    m = summarise(answers)
    assert m["billiards/fact_accuracy"] == pytest.approx(3 / 4)  # every check counts once
    assert m["billiards/fact/colour"] == 0.5 and "billiards/fact/count" not in m
    assert m["billiards/qa/rougeL"] == 0.5 and m["billiards/describe/rougeL"] == 0.5
    assert m["billiards/qa/empty_answers"] == 1 and m["billiards/qa/answers"] == 2


RULE = SelectionRule(primary=MetricOrder(metric="billiards/fact_accuracy"),
                     guards=[Guard(metric="general/fact_accuracy", tolerance=0.05)],
                     tie_breakers=[MetricOrder(metric="billiards/describe/rougeL")])


def test_rule_prefers_billiards_within_the_general_guard():
    table = pd.DataFrame({"candidate": ["original", "table1k"], "billiards/fact_accuracy": [0.40, 0.55],
                          "general/fact_accuracy": [0.60, 0.57], "billiards/describe/rougeL": [0.5, 0.5]})
    d = decide(table, RULE)
    assert (d["winner"], d["runner_up"]) == ("table1k", "original") and d["margin"] == pytest.approx(0.15)
    # the billiards gain bought with a general collapse does not win
    table.loc[1, "general/fact_accuracy"] = 0.50
    d = decide(table, RULE)
    assert d["winner"] == "original" and d["guards"]["general/fact_accuracy"]["table1k"]["passed"] is False
    assert [r["passed_guards"] for r in d["ranking"]] == [True, False]
    # a tie on the primary metric goes to the tie-breaker
    table = pd.DataFrame({"candidate": ["a", "b"], "billiards/fact_accuracy": [0.5, 0.5],
                          "general/fact_accuracy": [0.5, 0.5], "billiards/describe/rougeL": [0.1, 0.2]})
    assert decide(table, RULE)["winner"] == "b"
    with pytest.raises(ValueError, match="were not measured"):
        decide(table.drop(columns=["general/fact_accuracy"]), RULE)


def test_paired_difference_pairs_the_same_questions():
    def answers(facts):
        return pd.DataFrame({"dataset": "billiards", "video_id": [f"v{i}" for i in range(len(facts))], "kind": "qa",
                             "question": "q", "fact_colour": pd.array(facts, dtype="boolean")})

    mean, low, high = paired_difference(answers([True] * 8 + [False] * 2), answers([False] * 10),
                                        "billiards/fact_accuracy")
    assert mean == pytest.approx(0.8) and 0.5 <= low <= 0.8 <= high <= 1.0


def test_paired_difference_pools_checks_like_the_summary_metric():
    a = pd.DataFrame({"dataset": "billiards", "video_id": ["v0", "v1"], "kind": "describe", "question": "q",
                      "fact_colour": pd.array([True, False], dtype="boolean"),
                      "fact_pocket": pd.array([True, pd.NA], dtype="boolean"),
                      "fact_action": pd.array([True, pd.NA], dtype="boolean"),
                      "fact_count": pd.array([pd.NA] * 2, dtype="boolean"),
                      "fact_direction": pd.array([pd.NA] * 2, dtype="boolean")})
    b = a.assign(fact_colour=pd.array([False, False], dtype="boolean"))
    mean, _, _ = paired_difference(a, b, "billiards/fact_accuracy")
    assert mean == pytest.approx(summarise(a.assign(answer="x"))["billiards/fact_accuracy"]
                                 - summarise(b.assign(answer="x"))["billiards/fact_accuracy"])  # 3/4 - 2/4


def test_paraphrase_datasets_keep_each_caption_as_a_reference(caption_manifest):
    """``evaluation.paraphrase_datasets``: a description of such a dataset's clip is scored against each of its
    captions; other datasets' captions (each about another object) stay one joined reference."""
    from hilight.eval.vlm import VLMEvalSpec, eval_items

    spec = VLMEvalSpec(manifest_dir=str(caption_manifest), splits=["train"], questions=False, max_videos=4,
                       paraphrase_datasets=["general"])
    items = eval_items(spec)
    for row in items.itertuples(index=False):
        refs = json.loads(row.references)
        if row.dataset == "general":
            assert len(refs) > 1 and " ".join(r if r.endswith(".") else r + "." for r in refs) == row.reference
        else:
            assert refs == [row.reference]
    assert set(items["dataset"]) == {"billiards", "general"}
