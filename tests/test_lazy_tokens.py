"""Lazy tokenisation of the VLM stages' QA samples: the same encodings and rejections as up-front encoding, found on
first use; rejected samples leave their batch and are reported; the SQLite memo serves later epochs and runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from hilight.data import qa
from hilight.data.qa import ChainedSamples, VideoQADataset, encode_samples, lazy_samples
from hilight.models.tokenizers import build_gemma_tokenizer

QUESTIONS = ["What happens in this video?", "Which ball is pocketed?", "How many balls move?"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = QUESTIONS + ["The red ball goes into the corner pocket.", "Two balls move."]
    return build_gemma_tokenizer(corpus * 3, tmp_path_factory.mktemp("tok"), vocab_size=320)


def _rows(n: int = 12) -> pd.DataFrame:
    rows = []
    for i in range(n):
        question = QUESTIONS[i % 3] * (30 if i % 5 == 4 else 1)  # every 5th: the prompt alone is too long
        conv = [{"from": "human", "value": "<video>\n" + question},
                {"from": "gpt", "value": "The red ball goes into the corner pocket."}]
        if i == 7:
            conv = [{"from": "gpt", "value": "an answer with no question"}]  # breaks the template
        rows.append({"dataset": "billiards", "id": f"q{i}", "video_file": f"v{i}.mp4", "video_sha256": f"{i:064x}",
                     "conversations": json.dumps(conv), "split": "train"})
    return pd.DataFrame(rows)


def test_lazy_encodes_like_upfront_and_reports_rejections_on_first_use(tokenizer):
    rows = _rows()
    upfront = encode_samples(rows, tokenizer, video_tokens=4, max_length=64)
    lazy = lazy_samples(rows, tokenizer, video_tokens=4, max_length=64)
    assert len(lazy.samples) == len(rows) and lazy.rejections().empty  # nothing encoded yet
    kept = [s for s in (lazy.samples[i] for i in range(len(rows))) if s is not None]
    assert [s.input_ids for s in kept] == [s.input_ids for s in upfront.samples]
    assert [s.labels for s in kept] == [s.labels for s in upfront.samples]
    pd.testing.assert_frame_equal(lazy.rejections().sort_values("id").reset_index(drop=True),
                                  upfront.rejected.sort_values("id").reset_index(drop=True), check_dtype=False)
    assert set(upfront.rejected["id"]) == {"q4", "q7", "q9"}
    lazy.samples[4]  # met again: reported once
    assert len(lazy.rejections()) == 3


def test_a_rejected_sample_leaves_its_batch(tokenizer):
    lazy = lazy_samples(_rows(), tokenizer, video_tokens=4, max_length=64)
    data = VideoQADataset(lazy, pad_token_id=tokenizer.pad_token_id, with_video=False)
    batch = data.collate([3, 4, 5])
    assert len(batch["input_ids"]) == 2 and list(lazy.rejections()["id"]) == ["q4"]
    with pytest.raises(qa.ConversationError, match="every sample of a batch was rejected.*q4.*max_length"):
        data.collate([4])


def test_memo_serves_a_later_run_without_encoding(tokenizer, tmp_path, monkeypatch):
    rows, memo = _rows(), tmp_path / "tokens.sqlite"
    first = lazy_samples(rows, tokenizer, video_tokens=4, max_length=64, memo=memo)
    want = [first.samples[i] for i in range(len(rows))]

    def fail(*args, **kwargs):
        raise AssertionError("encoded again although memoised")

    monkeypatch.setattr(qa, "encode_one", fail)
    again = lazy_samples(rows, tokenizer, video_tokens=4, max_length=64, memo=memo)
    assert [again.samples[i] for i in range(len(rows))] == want
    assert set(again.rejections()["id"]) == {"q4", "q7", "q9"}  # rejections are remembered with their reason
    other = lazy_samples(rows, tokenizer, video_tokens=4, max_length=96, memo=memo)  # other settings, other key
    with pytest.raises(AssertionError, match="encoded again"):
        other.samples[0]


def test_chained_sources_stay_lazy(tokenizer):
    a = lazy_samples(_rows(5), tokenizer, video_tokens=4, max_length=64)
    b = encode_samples(_rows(3), tokenizer, video_tokens=4, max_length=64)
    chained = ChainedSamples([a.samples, b.samples])
    assert len(chained) == 5 + 3 and not chained.rejected
    assert chained[6].input_ids == b.samples[1].input_ids and chained[4] is None
    assert [r["id"] for r in chained.rejected] == ["q4"]
