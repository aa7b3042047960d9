"""Batch samplers for caption tables, resumable mid-epoch.

``random``: rows shuffled each epoch (plain CLIP batches). ``grouped`` (research notes §1.4, option 1): videos are
shuffled, and all captions of a video are drawn together before the next video, so a batch holds several
descriptions of the same clip — the in-batch negatives are then mostly other videos' captions, and a video's
secondary captions are balanced by its other captions rather than contradicted.

The order depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would;
``skip`` drops the batches already consumed in the resumed epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np


class CaptionBatchSampler:
    def __init__(self, groups: Sequence[int], batch_size: int, *, mode: Literal["random", "grouped"] = "random",
                 seed: int = 0, drop_last: bool = True, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mode not in ("random", "grouped"):
            raise ValueError(f"sampler mode must be 'random' or 'grouped', got {mode!r}")
        self.groups = np.asarray(groups)
        self.batch_size, self.mode, self.seed = batch_size, mode, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch = 0
        self.skip = 0
        by_group = np.argsort(self.groups, kind="stable")
        _, starts = np.unique(self.groups[by_group], return_index=True)
        self._members = np.split(by_group, starts[1:])  # rows of each video, O(N log N) once
        if len(self) == 0:
            raise ValueError(f"{len(self.groups)} rows make no full batch of {batch_size}; lower batch_size")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.groups))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "random":
            return rng.permutation(len(self.groups))
        return np.concatenate([rng.permutation(self._members[v]) for v in rng.permutation(len(self._members))])

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        n = len(self)
        for b in range(self.skip, n):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        full, rest = divmod(len(self.groups), self.batch_size)
        return full + (0 if self.drop_last or not rest else 1)


class MixtureBatchSampler:
    """Batches over several sources (datasets) at fixed ratios, resumable mid-epoch like ``CaptionBatchSampler``.

    An epoch takes ``ratio × len(source)`` samples of each source (ratio 1: every sample once; 2: twice; 0.5: a
    random half, a different half each epoch). ``mix`` shuffles them together (the notes' "Mix101K": VideoInstruct
    and table QA in one pool); ``sequence`` keeps the sources in the given order, each shuffled within itself, so
    the run sees all of the first source's share before the second's (the notes' staged tuning, e.g. ratio 3 on
    VideoInstruct then 1 on the table QA). The order depends only on (seed, epoch).

    ``run_batches`` (the batches the whole run draws: steps x grad_accum x processes) makes ``sequence`` staged over
    the run rather than over each epoch: the single "epoch" is the run, and each source gets its ratio's share of
    it (in whole batches) in turn, as consecutive shuffled passes. Without it, a run longer than one epoch would
    start the sequence again (A, B, A, B, ...), and one shorter would never reach the last sources. A source whose
    share rounds to no batch is refused (``names`` label the sources in that message). ``mix`` ignores it.

    ``lengths`` (one per sample index, any unit that orders them: tokens, characters) batches samples of similar
    length together, as transformers' ``group_by_length``: the epoch's order is cut into megabatches of
    ``MEGABATCH`` batches, each sorted by length and cut into batches, and the batches are shuffled. An epoch
    holds the same samples; a batch pads to a length close to its samples' own. In ``sequence`` mode (with
    ``run_batches``) each source's share is grouped on its own, so the run stays staged.
    """

    MEGABATCH = 50  # batches per length-sorted group (transformers' mega_batch_mult)

    def __init__(self, sources: Sequence[Sequence[int]], ratios: Sequence[float], batch_size: int, *,
                 mode: Literal["mix", "sequence"] = "mix", seed: int = 0, run_batches: int | None = None,
                 lengths: Sequence[int] | None = None, names: Sequence[str] | None = None):
        if len(sources) != len(ratios) or not sources:
            raise ValueError(f"give one ratio per source: {len(sources)} sources, {len(ratios)} ratios")
        if mode not in ("mix", "sequence"):
            raise ValueError(f"mixture mode must be 'mix' or 'sequence', got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        bad = [r for r in ratios if not r > 0]
        if bad:
            raise ValueError(f"ratios must be > 0, got {list(ratios)}")
        self.sources = [np.asarray(s, dtype=np.int64) for s in sources]
        empty = [i for i, s in enumerate(self.sources) if not len(s)]
        if empty:
            raise ValueError(f"sources {empty} have no samples")
        self.ratios, self.batch_size, self.mode, self.seed = list(ratios), batch_size, mode, seed
        self.counts = [max(1, round(r * len(s))) for r, s in zip(self.ratios, self.sources, strict=True)]
        if run_batches is not None and mode == "sequence":
            if run_batches < 1:
                raise ValueError(f"run_batches must be >= 1, got {run_batches}")
            # the run's batches shared out by ratio, in whole batches (no batch spans two sources); cumulative
            # rounding keeps the sum
            bounds = np.round(np.cumsum([0, *self.counts]) / sum(self.counts) * run_batches).astype(int) * batch_size
            shares, self.counts = self.counts, np.diff(bounds).tolist()
            starved = [i for i, n in enumerate(self.counts) if not n]
            if starved:
                names = names or range(len(sources))
                label = [f"source {names[i]!r} ({shares[i]} samples per epoch)" for i in starved]
                raise ValueError(
                    f"{', '.join(label)} would get no batch of the run's {run_batches} in sequence mode (its share of "
                    f"{sum(shares)} samples per epoch rounds to zero batches); raise its ratio or train.max_steps, "
                    "or drop the source")
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and mode == "sequence" and run_batches is None:
            raise ValueError("grouping by length in sequence mode needs run_batches (each source's share in whole "
                             "batches, so that grouping keeps every batch within one source)")
        if self.lengths is not None:
            top = max(int(s.max()) for s in self.sources)
            if len(self.lengths) <= top:
                raise ValueError(f"lengths has {len(self.lengths)} entries but the sources index sample {top}; give one "
                                 "length per sample")
        self.epoch, self.skip = 0, 0
        if len(self) == 0:
            raise ValueError(f"{sum(self.counts)} samples per epoch make no full batch of {batch_size}; lower batch_size")

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        parts = []
        for src, n in zip(self.sources, self.counts, strict=True):
            if not n:
                continue
            whole, rest = divmod(n, len(src))
            parts.append(np.concatenate([*(rng.permutation(src) for _ in range(whole)), rng.permutation(src)[:rest]]))
        if self.lengths is not None:  # sequence: each part is whole batches (run_batches), grouped on its own
            pools = parts if self.mode == "sequence" else [rng.permutation(np.concatenate(parts))]
            return np.concatenate([self._grouped(p, rng) for p in pools])
        return np.concatenate(parts) if self.mode == "sequence" else rng.permutation(np.concatenate(parts))

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``order`` re-batched by length within consecutive megabatches, whose batches are then shuffled; the
        megabatches keep their place and an incomplete tail stays last."""
        bs = self.batch_size
        full = len(order) // bs * bs
        out = []
        for start in range(0, full, self.MEGABATCH * bs):
            chunk = order[start:min(start + self.MEGABATCH * bs, full)]
            batches = np.split(chunk[np.argsort(-self.lengths[chunk], kind="stable")], len(chunk) // bs)
            out += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate([*out, order[full:]])

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for b in range(self.skip, len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size].tolist()

    def __len__(self) -> int:
        return sum(self.counts) // self.batch_size
