"""Caption-video pairs from a validated manifest (the output of the ``data_validation`` pipeline).

One row per caption; a batch decodes each distinct video once, so grouped batches (several captions of one clip)
cost one decode and one video-tower pass per clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from hilight.data.frames import load_clip_frames
from hilight.data.manifest import ManifestError, open_manifest
from hilight.env import resolve_path


@dataclass(frozen=True)
class CaptionManifest:
    rows: pd.DataFrame  # dataset, video_id, video_file (absolute), video_sha256, caption, object, split
    fingerprint: str  # the data_validation fingerprint of the manifest

    def select(self, datasets: list[str] | None, splits: list[str]) -> pd.DataFrame:
        return select_rows(self.rows, datasets, splits, "captions")


def select_rows(rows: pd.DataFrame, datasets: list[str] | None, splits: list[str], what: str) -> pd.DataFrame:
    """Rows of the given datasets (None = all) and splits; an unknown dataset or an empty result is an error."""
    if datasets:
        unknown = sorted(set(datasets) - set(rows["dataset"]))
        if unknown:
            raise ManifestError(f"datasets {unknown} have no {what} in the manifest (datasets with {what}: "
                                f"{sorted(set(rows['dataset']))})")
        rows = rows[rows["dataset"].isin(datasets)]
    chosen = rows[rows["split"].isin(splits)]
    if chosen.empty:
        present = {("missing" if pd.isna(k) or k in ("None", "nan") else k): n
                   for k, n in rows["split"].value_counts(dropna=False).items()}
        hint = ""
        if set(present) == {"missing"}:  # a caption table without a split field
            hint = "; give the caption records a split field (train / val / test)"
        elif what == "QA samples" and set(present) == {"train"}:  # QA of videos without captions: all "train"
            hint = ("; QA of videos without captions is all 'train': validate on a held-out dataset of its own "
                    "(as valley_val) or, in stage 2, set the source's holdout")
        raise ManifestError(f"no {what} for datasets={datasets} splits={splits}: their rows have splits {present}{hint}")
    return chosen.reset_index(drop=True)


def read_caption_manifest(manifest_dir: str | Path) -> CaptionManifest:
    """Validated captions with absolute video paths, from the current manifest of a data_validation output
    directory (or one run directory); fails if the manifest is missing, failed validation or is incomplete."""
    run_dir, meta = open_manifest(manifest_dir)
    meta_path = run_dir / "manifest.json"
    captions = pd.read_parquet(run_dir / meta["files"]["captions"])
    roots = {name: resolve_path(d["root"]) for name, d in meta["datasets"].items()}
    missing = sorted(set(captions["dataset"]) - set(roots))
    if missing:
        raise ManifestError(f"{meta_path} lists no root for datasets {missing}")
    video_file = [str(roots[d] / p) for d, p in zip(captions["dataset"], captions["video_path"], strict=True)]
    rows = pd.DataFrame({
        "dataset": captions["dataset"].astype(str),
        "video_id": (captions["dataset"] + "/" + captions["video_id"]).astype(str),
        "video_file": video_file,
        "video_sha256": captions["video_sha256"].astype(str),
        "caption": captions["caption"].astype(str),
        "object": captions["object"].astype(str),
        "split": captions["split"].astype(str),
    })
    return CaptionManifest(rows, meta["data_fingerprint"])


def attach_hard_negatives(rows: pd.DataFrame, records: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``negatives`` column: per caption, the hard negatives ``records`` (``dataset``, ``video_id``
    without the dataset prefix, ``caption``, ``negative``) list for it, in file order (empty tuple: none)."""
    key = records["dataset"] + "/" + records["video_id"] + "\0" + records["caption"]
    found = records.assign(key=key).groupby("key", sort=False)["negative"].agg(tuple)
    keys = rows["video_id"] + "\0" + rows["caption"]
    return rows.assign(negatives=[found.get(k, ()) for k in keys])


class CaptionVideoDataset(Dataset):
    """Index → (video number, caption, hard negatives). ``collate`` decodes the batch's distinct videos and
    tokenises the captions, then the hard negatives after them (NegCLIP: each is an extra, wrong caption for its
    row's video; rows come with a ``negatives`` column from :func:`attach_hard_negatives`). Each item carries up to
    ``negatives_per_caption`` of its caption's negatives."""

    def __init__(self, rows: pd.DataFrame, tokenizer, *, num_frames: int, image_size: int, max_length: int,
                 jitter_seed: int | None = None, cache_frames: bool = False, negatives_per_caption: int = 1):
        self.rows = rows.reset_index(drop=True)
        self.video_files, self.groups = np.unique(self.rows["video_file"].to_numpy(), return_inverse=True)
        self.captions = self.rows["caption"].tolist()
        self.negatives: list[tuple[str, ...]] | None = (self.rows["negatives"].tolist()
                                                        if "negatives" in self.rows.columns else None)
        self.negatives_per_caption = negatives_per_caption
        self.tokenizer = tokenizer
        self.num_frames, self.image_size, self.max_length = num_frames, image_size, max_length
        self.jitter_seed = jitter_seed
        self.epoch = 0
        self._cache: dict[int, torch.Tensor] | None = {} if cache_frames and jitter_seed is None else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, str, tuple[str, ...]]:
        negs = self.negatives[i] if self.negatives is not None else ()
        k = min(self.negatives_per_caption, len(negs))
        # each epoch the next of the caption's negatives: deterministic, so a resumed run sees the same ones
        start = (self.epoch + i) * k
        return int(self.groups[i]), self.captions[i], tuple(negs[(start + j) % len(negs)] for j in range(k))

    def frames(self, video: int) -> torch.Tensor:
        """[T, 3, S, S] for video number ``video``; the jitter depends on (seed, epoch, video) only."""
        if self._cache is not None and video in self._cache:
            return self._cache[video]
        rng = None if self.jitter_seed is None else np.random.default_rng([self.jitter_seed, self.epoch, video])
        x = load_clip_frames(self.video_files[video], self.num_frames, self.image_size, jitter=rng)
        if self._cache is not None:
            self._cache[video] = x
        return x

    def collate(self, items: list[tuple[int, str, tuple[str, ...]]]) -> dict[str, torch.Tensor]:
        videos = [v for v, _, _ in items]
        unique, inverse = np.unique(videos, return_inverse=True)
        inverse = inverse.reshape(-1)
        negative_of = [i for i, (_, _, negs) in enumerate(items) for _ in negs]
        texts = [c for _, c, _ in items] + [n for _, _, negs in items for n in negs]
        text = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        return {
            "pixel_values": torch.stack([self.frames(int(v)) for v in unique]),  # [V, T, 3, S, S]
            "video_index": torch.from_numpy(np.concatenate([inverse, inverse[negative_of]])),  # [B+N] text → video
            "groups": torch.tensor(videos),  # [B] video number (same video ⇔ same number)
            "input_ids": text["input_ids"],  # [B+N, L]: the B captions, then the N hard negatives
            "attention_mask": text["attention_mask"],  # [B+N, L]
            "negative_of": torch.tensor(negative_of, dtype=torch.long),  # [N] the row each negative belongs to
        }
