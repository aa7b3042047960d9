"""Video QA samples from a validated manifest, tokenised with the chat template, for the VLM stages.

The manifest's ``qa`` table (LLaVA/VideoInstruct conversations that passed the ``video_qa`` contract) has no split
column; a sample takes the split of its video in the caption table, and videos without captions (QA-only sets such
as Valley) count as ``train`` — give held-out QA as its own dataset entry (e.g. ``valley_val``), as the reference did.

Every conversation is encoded up front, so a sample the template cannot fit in ``max_length`` is rejected before
training with its reason, never mid-epoch. Each sample holds exactly one video, as in the reference's training.

A batch carries the video either as cached tower features (``video_features``, ``frame_features``) or as decoded
clips (``pixel_values``) for the towers to run on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

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
    captions = pd.read_parquet(manifest_dir / meta["files"]["captions"], columns=["dataset", "video", "split"])
    split_of = captions.drop_duplicates(["dataset", "video"]).set_index(["dataset", "video"])["split"]
    roots = {name: resolve_path(d["root"]) for name, d in meta["datasets"].items()}
    keys = pd.MultiIndex.from_frame(qa[["dataset", "video"]])
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


@dataclass
class EncodedSet:
    rows: pd.DataFrame  # the kept samples
    samples: list[Encoded]
    rejected: pd.DataFrame  # dataset, id, reason
    truncated: int


def encode_samples(rows: pd.DataFrame, tokenizer, *, video_tokens: int, max_length: int,
                   text_only: bool = False) -> EncodedSet:
    """Encode each conversation; samples that break the template or do not fit are rejected with a reason.

    ``text_only`` drops the video markers (the no-video baseline: the same answers without the video)."""
    kept, samples, rejected = [], [], []
    for i, row in enumerate(rows.itertuples(index=False)):
        try:
            turns = parse_conversation(row.conversations, add_video=True)
            if text_only:
                turns = strip_video(turns)
            enc = encode(turns, tokenizer, video_tokens=video_tokens, max_length=max_length)
            if enc.num_videos != (0 if text_only else 1):
                raise ConversationError(f"{enc.num_videos} <video> markers survive truncation; a training sample "
                                        "holds exactly one video")
            if enc.answer_tokens == 0:
                raise ConversationError("no answer token survives truncation")
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
                      pd.DataFrame(rejected, columns=["dataset", "id", "reason"]), truncated)


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
        ids = [torch.tensor(self.samples[i].input_ids) for i in items]
        labels = [torch.tensor(self.samples[i].labels) for i in items]
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
