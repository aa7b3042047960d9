"""Multiple-choice fact scoring: which facts an answer offers as choices, the log-likelihood each option gets, and
the summary and paired metrics built on them."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from hilight.data.conversations import Turn, encode, encode_prompt
from hilight.data.synth.billiards import BALL_COLOURS
from hilight.data.synth.general import DIRECTIONS
from hilight.data.synth.physics import POCKET_NAMES
from hilight.eval.choice import (ChoiceRequest, answer_logprobs, batched_logprobs, choice_options, score_choices,
                                 wrong_videos)
from hilight.eval.vlm import VLMEvaluation, summarise
from hilight.experiments.selection import paired_difference, per_item
from hilight.models.token_mining import TokenMining, TokenMiningConfig
from hilight.models.tokenizers import build_gemma_tokenizer
from hilight.models.vlm import HiLightVLM, build_llm, gemma_config

COLOURS = list(BALL_COLOURS)
POT = "The white cue ball hit the red ball, and the red ball rolled into the pocket."


def test_a_pot_answer_is_a_six_way_colour_choice_with_every_mention_changed():
    got = choice_options("billiards", "What color ball was pocketed by the white cue ball?", POT)
    assert list(got) == ["colour"]
    truth, options = got["colour"]
    assert options[truth] == POT and truth == COLOURS.index("red") and len(options) == len(COLOURS)
    assert options[COLOURS.index("blue")] == POT.replace("red", "blue")


@pytest.mark.parametrize("question, reference, history, expected", [
    # the colour is in the question: only the pocket is the model's to know
    ("Which pocket did the red ball go into?", "The red ball went into the bottom side pocket.", "", {"pocket"}),
    # two colours named: no single fact to vary
    ("Which ball did the white cue ball hit first?", "It hit the red ball, then the blue ball.", "", set()),
    # a follow-up whose colour the conversation already gave
    ("Which ball did the white cue ball hit first?", "The white cue ball hit the red ball first.",
     "What color ball was pocketed by the white cue ball? The red ball was pocketed.", set()),
    ("Which ball did the white cue ball hit first?", "The white cue ball hit the red ball first.", "", {"colour"}),
    ("Was any ball pocketed?", "No, no ball was pocketed.", "", set()),
])
def test_which_facts_are_offered_as_choices(question, reference, history, expected):
    assert set(choice_options("billiards", question, reference, history)) == expected


def test_an_option_is_not_given_away_by_its_article_or_case():
    truth, options = choice_options("general", "What's happened in this video?", "An orange circle moves upwards.")["colour"]
    assert options[truth] == "An orange circle moves upwards." and "A red circle moves upwards." in options
    assert not any(o.startswith(("An red", "A orange")) for o in options)
    truth, options = choice_options("billiards", "q", "Red ball was pocketed.")["colour"]
    assert options[truth] == "Red ball was pocketed." and "Blue ball was pocketed." in options


def test_general_direction_choice_and_pocket_options():
    truth, options = choice_options("general", "Which way does the blue triangle move?",
                                    "The blue triangle moves from right to left.")["direction"]
    assert options[truth] == "The blue triangle moves from right to left."
    assert sorted(options) == sorted(f"The blue triangle moves {d}." for d in DIRECTIONS)
    truth, options = choice_options("billiards", "Which pocket did the red ball go into?",
                                    "The red ball went into the top side pocket.")["pocket"]
    assert len(options) == len(POCKET_NAMES) and POCKET_NAMES[truth] == "top side pocket"
    assert "The red ball went into the bottom side pocket." in options  # "top side" inside no other name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = build_gemma_tokenizer([POT, "Which ball did the white cue ball hit first?"] * 3,
                                tmp_path_factory.mktemp("tok"), vocab_size=320)
    llm = build_llm(gemma_config("tiny", vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=2), seed=0)
    torch.manual_seed(0)
    vlm = HiLightVLM(llm, TokenMining(TokenMiningConfig(video_dim=24, image_dim=16, llm_dim=64, expand=4))).eval()
    return vlm, tok


@torch.no_grad()
def _loss(vlm, tok, turns, video):
    enc = encode(turns, tok, video_tokens=video.shape[0])
    ids = torch.tensor([enc.input_ids])
    return vlm.token_loss(ids, torch.ones_like(ids), torch.tensor([enc.labels]), video[None])[0]


def test_answer_logprobs_is_the_answers_own_log_likelihood(tiny):
    vlm, tok = tiny
    video = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    q = "What color ball was pocketed by the white cue ball?"
    options = choice_options("billiards", q, POT)["colour"][1]
    ll = answer_logprobs(vlm, tok, video, q, options)
    assert ll.shape == (len(COLOURS),) and (ll < 0).all() and len(set(ll.tolist())) > 1
    for i in (0, 3):  # batched with padding == each option alone, and == minus the training loss
        assert float(ll[i]) == pytest.approx(-_loss(vlm, tok, [Turn("<video>\n" + q, options[i])], video), abs=1e-4)
    # after a history: only the last answer counts (the history's answers are context, not scored)
    hist = [Turn("Was any ball pocketed?", "Yes.")]
    follow = "Which ball did the white cue ball hit first?"
    ll = answer_logprobs(vlm, tok, video, follow, ["The white cue ball hit the red ball first."], hist)
    full = _loss(vlm, tok, [Turn("<video>\n" + hist[0].question, "Yes."), Turn(follow, "The white cue ball hit the red ball first.")], video)
    first = _loss(vlm, tok, [Turn("<video>\n" + hist[0].question, "Yes.")], video)
    assert float(ll[0]) == pytest.approx(-(full - first), abs=1e-4)
    assert len(encode_prompt(follow, tok, video_tokens=8, history=hist).input_ids) > 0


def test_batched_logprobs_pack_items_of_different_videos_and_lengths_as_each_alone(tiny):
    vlm, tok = tiny
    g = torch.Generator().manual_seed(2)
    q = "What color ball was pocketed by the white cue ball?"
    requests = [
        ChoiceRequest(torch.randn(8, 64, generator=g), q, choice_options("billiards", q, POT)["colour"][1]),
        ChoiceRequest(torch.randn(8, 64, generator=g), "Which ball did the white cue ball hit first?",
                      ["The white cue ball hit the red ball first.", "Red."], (Turn("Was any ball pocketed?", "Yes."),)),
        ChoiceRequest(torch.randn(8, 64, generator=g), q, ["A red ball.", "The blue ball went into the top left pocket."]),
    ]
    alone = [answer_logprobs(vlm, tok, r.video_tokens, r.question, r.answers, list(r.history)) for r in requests]
    for batch_rows in (1, 7, 64):  # a request never splits: 1 row means one request per pass
        got = batched_logprobs(vlm, tok, requests, batch_rows=batch_rows)
        assert [len(x) for x in got] == [len(r.answers) for r in requests]
        for a, b in zip(got, alone, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not torch.allclose(alone[0], answer_logprobs(vlm, tok, requests[1].video_tokens, q, requests[0].answers))


def test_score_choices_marks_the_most_likely_option(tiny, monkeypatch):
    vlm, tok = tiny
    items = pd.DataFrame({"dataset": "billiards", "video_id": ["v0", "v1", "v2"],
                          "question": ["What color ball was pocketed by the white cue ball?",
                                       "Which ball did the white cue ball hit first?", "Was any ball pocketed?"],
                          "reference": [POT, "The white cue ball hit the blue ball first.", "No, no ball was pocketed."],
                          "history": "[]"})
    tokens = {v: torch.zeros(8, 64) for v in items["video_id"]}
    prefer = {"v0": ["red"], "v1": ["pink"]}  # v0 right (red is the truth), v1 wrong (blue is)

    def fake(vlm_, tok_, requests, **kw):
        vid = [next(v for v, t in tokens.items() if t is r.video_tokens) for r in requests]
        return [torch.tensor([1.0 if any(c in a for c in prefer[v]) else 0.0 for a in r.answers])
                for v, r in zip(vid, requests, strict=True)]

    monkeypatch.setattr("hilight.eval.choice.batched_logprobs", fake)
    got = score_choices(vlm, tok, items, tokens)
    assert got["choice_colour"].tolist() == [True, False, pd.NA]
    prefer["v0"] = ["red", "blue"]  # a tie with the truth is not a right choice
    assert score_choices(vlm, tok, items, tokens)["choice_colour"].tolist() == [False, False, pd.NA]
    assert got["choice_colour_options"].tolist() == [6, 6, 0] and got["choice_pocket"].isna().all()


def test_choice_metrics_summarise_and_pair():
    def answers(right):
        return pd.DataFrame({"dataset": "billiards", "video_id": [f"v{i}" for i in range(len(right))], "kind": "qa",
                             "question": "q", "answer": "a", "choice_colour": pd.array(right, dtype="boolean"),
                             "choice_colour_options": 6, "choice_pocket": pd.array([True] + [pd.NA] * (len(right) - 1),
                                                                                     dtype="boolean"),
                             "choice_pocket_options": [6] + [0] * (len(right) - 1)})
    a, b = answers([True] * 6 + [False] * 4), answers([True] * 2 + [False] * 8)
    m = summarise(a)
    assert m["billiards/choice/colour"] == pytest.approx(0.6) and m["billiards/choice/pocket"] == 1.0
    assert m["billiards/choice_accuracy"] == pytest.approx(7 / 11)  # each choice made counts once
    assert m["billiards/choice_chance"] == pytest.approx(1 / 6)
    assert per_item(a, "billiards/choice_accuracy")["den"].tolist() == [2] + [1] * 9
    mean, low, high = paired_difference(a, b, "billiards/choice/colour")
    assert mean == pytest.approx(0.4) and 0.05 < low < 0.4 < high < 0.75
    with pytest.raises(ValueError, match="choice_count"):
        per_item(a, "billiards/choice/count")
    assert json.dumps(m)  # plain floats


def test_the_wrong_video_control_shows_each_item_another_clip_of_its_dataset(tiny, monkeypatch):
    vlm, tok = tiny
    items = pd.DataFrame({"dataset": ["billiards"] * 3 + ["general"], "video_id": ["b2", "b0", "b1", "g0"],
                          "question": ["What color ball was pocketed by the white cue ball?"] * 3 + ["What moved?"],
                          "reference": [POT] * 3 + ["A red circle moved."], "history": "[]"})
    assert wrong_videos(items) == {"b0": "b1", "b1": "b2", "b2": "b0"}  # a one-clip dataset has no other clip
    tokens = {v: torch.zeros(8, 64) for v in items["video_id"]}
    says = {"b0": "red", "b1": "blue", "b2": "red", "g0": "red"}  # what each clip's tokens make the model prefer

    def fake(vlm_, tok_, requests, **kw):
        vid = [next(v for v, t in tokens.items() if t is r.video_tokens) for r in requests]
        return [torch.tensor([1.0 if says[v] in a else 0.0 for a in r.answers]) for v, r in zip(vid, requests, strict=True)]

    monkeypatch.setattr("hilight.eval.choice.batched_logprobs", fake)
    right = score_choices(vlm, tok, items, tokens)
    control = score_choices(vlm, tok, items, tokens, prefix="wrong_video_choice", video_of=wrong_videos(items))
    assert right["choice_colour"].tolist() == [True, True, False, True]
    # b2 is shown b0 (red: right by luck), b0 is shown b1 (blue), b1 is shown b2 (red), g0 has no other clip
    assert control["wrong_video_choice_colour"].tolist() == [True, False, True, pd.NA]
    assert control["wrong_video_choice_colour_options"].tolist() == [6, 6, 6, 0]
    m = summarise(pd.concat([items.assign(kind="qa", answer="a"), right, control], axis=1))
    assert m["billiards/choice/colour"] == pytest.approx(2 / 3) == m["billiards/wrong_video_choice/colour"]
    assert m["billiards/wrong_video_choice_accuracy"] == pytest.approx(2 / 3) and "general/wrong_video_choice_accuracy" not in m
    assert "billiards/wrong_video_choice_chance" not in m and m["general/choice_accuracy"] == 1.0


def test_checks_as_mlflow_tables_hold_them_summarise_and_pair_the_same():
    answers = pd.DataFrame({"dataset": "billiards", "video_id": ["v0", "v1", "v2"], "kind": "qa", "question": "q",
                            "answer": "a", "choice_colour": pd.array([True, False, pd.NA], dtype="boolean"),
                            "choice_colour_options": [6, 6, 0],
                            "fact_colour": pd.array([pd.NA, True, True], dtype="boolean")})
    objects = VLMEvaluation(answers, {}).loggable_answers()  # True/False/pd.NA as objects
    assert objects["choice_colour"].dtype == object
    assert summarise(objects) == summarise(answers)
    for metric in ("billiards/choice_accuracy", "billiards/fact/colour"):
        pd.testing.assert_frame_equal(per_item(objects, metric), per_item(answers, metric))
