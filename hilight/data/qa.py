"""Video QA samples from a validated manifest, tokenised with the chat template, for the VLM stages.

The manifest's ``qa`` table (LLaVA/VideoInstruct conversations that passed the ``video_qa`` contract) has no split
column; a sample takes the split of its video in the same dataset's caption table, matched by content hash (a QA
file naming the reference's ``.pkl`` caches and a caption table naming the ``.mp4`` files agree on the video), and
videos without captions (QA-only sets such as Valley) count as ``train`` — give held-out QA as its own dataset entry
(e.g. ``valley_val``), or a stage-2 source ``holdout``.

Conversations are encoded either up front (``encode_samples``: a sample the template cannot fit in ``max_length``
is rejected before training with its reason) or lazily (``lazy_samples``: each sample on first use, by the same
rules, so start-up time and memory do not grow with the dataset — Valley-703K; a sample rejected then is left out
of its batch and reported with its reason, optionally memoised in SQLite so later epochs and runs skip the work).
Each sample holds exactly one video, as in the reference's training.

A batch carries the video either as cached tower features (``video_features``, ``frame_features``) or as decoded
clips (``pixel_values``) for the towers to run on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from hilight.data.captions import ManifestError, select_rows
from hilight.data.conversations import IGNORE_INDEX, ConversationError, Encoded, encode, parse_conversation, strip_video
from hilight.data.feature_cache import FeatureCache
from hilight.data.frames import load_clip_frames
from hilight.data.manifest import open_manifest
from hilight.env import resolve_path

log = logging.getLogger(__name__)

FEATURE_NAMES = ("video", "frames")  # CLIP-ViP hidden states, Long-CLIP frame vectors


@dataclass(frozen=True)
class QAManifest:
    rows: pd.DataFrame  # dataset, id, video_file (absolute), video_sha256, conversations (JSON), split
    fingerprint: str

    def select(self, datasets: list[str] | None, splits: list[str]) -> pd.DataFrame:
        return select_rows(self.rows, datasets, splits, "QA samples")


def read_qa_manifest(manifest_dir) -> QAManifest:
    """Validated QA conversations with absolute video paths and the split of their video, from the current manifest
    (``open_manifest``: a missing or failed manifest is refused)."""
    manifest_dir, meta = open_manifest(manifest_dir)
    qa = pd.read_parquet(manifest_dir / meta["files"]["qa"])
    if qa.empty:
        raise ManifestError(f"{manifest_dir} has no QA samples; list QA files under datasets[].qa in the "
                            "data_validation config")
    # by content, not by the annotation's file name: VideoInstruct-style QA names .pkl caches that the validation
    # resolved to the .mp4 the captions name, and a name match left held-out videos' QA in "train"
    captions = pd.read_parquet(manifest_dir / meta["files"]["captions"], columns=["dataset", "video_sha256", "split"])
    split_of = captions.drop_duplicates(["dataset", "video_sha256"]).set_index(["dataset", "video_sha256"])["split"]
    roots = {name: resolve_path(d["root"]) for name, d in meta["datasets"].items()}
    keys = pd.MultiIndex.from_frame(qa[["dataset", "video_sha256"]])
    rows = pd.DataFrame({
        "dataset": qa["dataset"].astype(str),
        "id": qa["id"].astype(str),
        "video_file": [str(roots[d] / p) for d, p in zip(qa["dataset"], qa["video_path"], strict=True)],
        "video_sha256": qa["video_sha256"].astype(str),
        "conversations": qa["conversations"].astype(str),
        "split": split_of.reindex(keys).fillna("train").to_numpy(),
    })
    return QAManifest(rows, meta["data_fingerprint"])


DESCRIBE_PROMPT = "What's happened in this video?"  # the research notes' evaluation question (§6)


def describe_rows(captions: pd.DataFrame, prompt: str = DESCRIBE_PROMPT) -> pd.DataFrame:
    """One "describe the video" sample per video of a caption table (``CaptionManifest`` rows), in the QA rows'
    format: the question is ``prompt``, the answer the video's captions as sentences, in table order. This turns
    caption data (table1k, MSR-VTT) into instruction data, as VideoInstruct's descriptions are."""
    def sentence(text: str) -> str:
        text = text.strip()
        return text if text.endswith((".", "!", "?")) else text + "."

    out = []
    for (dataset, video_id), group in captions.groupby(["dataset", "video_id"], sort=False):
        answer = " ".join(sentence(c) for c in group["caption"])
        conv = [{"from": "human", "value": f"<video>\n{prompt}"}, {"from": "gpt", "value": answer}]
        first = group.iloc[0]
        out.append({"dataset": dataset, "id": f"describe:{video_id}", "video_file": first["video_file"],
                    "video_sha256": first["video_sha256"], "conversations": json.dumps(conv), "split": first["split"]})
    return pd.DataFrame(out, columns=["dataset", "id", "video_file", "video_sha256", "conversations", "split"])


REJECTED_COLUMNS = ["dataset", "id", "reason"]


@dataclass
class EncodedSet:
    rows: pd.DataFrame  # the kept samples (lazily encoded: every row, rejections show on use)
    samples: Sequence[Encoded | None]  # a list, or LazySamples / ChainedSamples (None = rejected on use)
    rejected: pd.DataFrame  # dataset, id, reason (known up front)
    truncated: int

    def rejections(self) -> pd.DataFrame:
        """Every rejection known now: up front, plus those lazily encoded samples met so far."""
        seen = getattr(self.samples, "rejected", None)
        return self.rejected if not seen else pd.concat(
            [self.rejected, pd.DataFrame(seen, columns=REJECTED_COLUMNS)], ignore_index=True)


def encode_one(conversations: str, tokenizer, *, video_tokens: int, max_length: int,
               text_only: bool = False) -> Encoded:
    """One conversation with the chat template; ``ConversationError`` says why it cannot be a training sample.
    ``text_only`` drops the video markers (the no-video baseline: the same answers without the video)."""
    turns = parse_conversation(conversations, add_video=True)
    if text_only:
        turns = strip_video(turns)
    enc = encode(turns, tokenizer, video_tokens=video_tokens, max_length=max_length)
    if enc.num_videos != (0 if text_only else 1):
        raise ConversationError(f"{enc.num_videos} <video> markers survive truncation; a training sample "
                                "holds exactly one video")
    if enc.answer_tokens == 0:
        raise ConversationError("no answer token survives truncation")
    return enc


def encode_samples(rows: pd.DataFrame, tokenizer, *, video_tokens: int, max_length: int,
                   text_only: bool = False) -> EncodedSet:
    """Encode each conversation up front; samples that break the template or do not fit are rejected with a
    reason."""
    kept, samples, rejected = [], [], []
    for i, row in enumerate(rows.itertuples(index=False)):
        try:
            enc = encode_one(row.conversations, tokenizer, video_tokens=video_tokens, max_length=max_length,
                             text_only=text_only)
        except ConversationError as exc:
            rejected.append({"dataset": row.dataset, "id": row.id, "reason": str(exc)})
            continue
        kept.append(i)
        samples.append(enc)
    truncated = sum(s.truncated for s in samples)
    if rejected:
        log.warning("%d of %d QA samples rejected, e.g. %s", len(rejected), len(rows), rejected[0])
    if truncated:
        log.info("%d of %d QA samples truncated to max_length=%d", truncated, len(samples), max_length)
    return EncodedSet(rows.iloc[kept].reset_index(drop=True), samples,
                      pd.DataFrame(rejected, columns=REJECTED_COLUMNS), truncated)


class LazySamples(Sequence):
    """``rows``' conversations encoded on first access by ``encode_one``'s rules: an ``Encoded``, or ``None`` for a
    rejected sample (its reason goes to ``rejected``, logged once). Holds only the rows and the tokenizer, so
    construction is O(1) in work. With ``memo`` (a SQLite file) encodings persist across epochs, DataLoader workers
    and runs; its key covers the tokenizer's vocabulary, the settings and the conversation text."""

    def __init__(self, rows: pd.DataFrame, tokenizer, *, video_tokens: int, max_length: int,
                 text_only: bool = False, memo: Path | None = None):
        self.rows, self.tokenizer = rows, tokenizer
        self.settings = {"video_tokens": video_tokens, "max_length": max_length, "text_only": text_only}
        self.rejected: list[dict] = []
        self._seen: set[int] = set()
        self.memo = memo
        self._db: sqlite3.Connection | None = None
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False) if memo else ""
        self._salt = hashlib.sha256((vocab + json.dumps(self.settings, sort_keys=True)).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Encoded | None:
        conversations = self.rows["conversations"].iat[i]
        cached = self._recall(conversations)
        if cached is not None:
            enc, reason = cached
        else:
            try:
                enc, reason = encode_one(conversations, self.tokenizer, **self.settings), None
            except ConversationError as exc:
                enc, reason = None, str(exc)
            self._remember(conversations, enc, reason)
        if reason is not None and i not in self._seen:
            self._seen.add(i)
            row = {"dataset": self.rows["dataset"].iat[i], "id": self.rows["id"].iat[i], "reason": reason}
            self.rejected.append(row)
            log.warning("QA sample rejected on first use: %s", row)
        return enc

    # the memo: (salt, sha256 of the conversation) -> the encoding as JSON, or the rejection reason
    def _key(self, conversations: str) -> str:
        return hashlib.sha256((self._salt + conversations).encode()).hexdigest()

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:  # per process: DataLoader workers open their own
            self.memo.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.memo, timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS encoded (key TEXT PRIMARY KEY, sample TEXT, reason TEXT)")
        return self._db

    def _recall(self, conversations: str) -> tuple[Encoded | None, str | None] | None:
        if self.memo is None:
            return None
        row = self._connect().execute("SELECT sample, reason FROM encoded WHERE key = ?",
                                      (self._key(conversations),)).fetchone()
        if row is None:
            return None
        if row[0] is None:
            return None, row[1]
        fields = json.loads(row[0])
        fields.pop("answer_tokens", None)
        return Encoded(**fields), None

    def _remember(self, conversations: str, enc: Encoded | None, reason: str | None) -> None:
        if self.memo is None:
            return
        sample = json.dumps(asdict(enc)) if enc is not None else None
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO encoded VALUES (?, ?, ?)", (self._key(conversations), sample, reason))

    def __getstate__(self) -> dict:  # DataLoader workers: no open connection crosses a process boundary
        return {**self.__dict__, "_db": None}


class ChainedSamples(Sequence):
    """Several sample sequences as one, without encoding anything (stage 2's sources)."""

    def __init__(self, parts: list[Sequence]):
        self.parts = parts
        self._starts = [0]
        for p in parts:
            self._starts.append(self._starts[-1] + len(p))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int):
        for k, p in enumerate(self.parts):
            if i < self._starts[k + 1]:
                return p[i - self._starts[k]]
        raise IndexError(i)

    @property
    def rejected(self) -> list[dict]:
        return [r for p in self.parts for r in getattr(p, "rejected", [])]


def lazy_samples(rows: pd.DataFrame, tokenizer, *, video_tokens: int, max_length: int, text_only: bool = False,
                 memo: Path | None = None) -> EncodedSet:
    """Like ``encode_samples`` but nothing is encoded now (see ``LazySamples``)."""
    samples = LazySamples(rows.reset_index(drop=True), tokenizer, video_tokens=video_tokens, max_length=max_length,
                          text_only=text_only, memo=memo)
    return EncodedSet(samples.rows, samples, pd.DataFrame(columns=REJECTED_COLUMNS), 0)


class VideoQADataset(Dataset):
    """Index → sample number; ``collate`` pads ids/labels (right) and attaches the batch's videos."""

    def __init__(self, encoded: EncodedSet, *, pad_token_id: int, cache: FeatureCache | None = None,
                 num_frames: int = 12, image_size: int = 224, with_video: bool = True):
        self.rows, self.samples = encoded.rows, encoded.samples
        self.pad_token_id = pad_token_id
        self.cache, self.num_frames, self.image_size = cache, num_frames, image_size
        self.with_video = with_video
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        encoded = {i: self.samples[i] for i in items}
        items = [i for i in items if encoded[i] is not None]  # rejected on first use (lazy): left out, reported
        if not items:
            raise ConversationError(f"every sample of a batch was rejected, e.g. {self.samples.rejected[-1]}; fix "
                                    "the data (hilight validate) or raise data.max_length")
        ids = [torch.tensor(encoded[i].input_ids) for i in items]
        labels = [torch.tensor(encoded[i].labels) for i in items]
        batch = {
            "input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
            "attention_mask": pad_sequence([torch.ones_like(x) for x in ids], batch_first=True, padding_value=0),
            "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        }
        if not self.with_video:
            return batch
        if self.cache is not None:
            feats = [self.cache.get(self.rows["video_sha256"].iat[i], FEATURE_NAMES) for i in items]
            batch["video_features"] = torch.stack([f[0] for f in feats])
            batch["frame_features"] = torch.stack([f[1] for f in feats])
        else:
            batch["pixel_values"] = torch.stack([
                load_clip_frames(self.rows["video_file"].iat[i], self.num_frames, self.image_size) for i in items])
        return batch
