"""Synthetic video-text datasets: real MP4s with captions, hard negatives and QA from event logs.

``generate_dataset`` writes, under ``out_dir``::

    videos/<id>.mp4     H.264 clips
    captions.json       caption table: one record per video, several captions (each about one object)
    negatives.json      hard negatives: one fact of one caption changed (colour, pocket, action, ...)
    probes.json         "say more, wrong more" pairs: a short true caption vs a longer one with one wrong fact
    qa.json             LLaVA/VideoInstruct conversations ({"id", "video", "conversations"})
    events.json         per-video simulation log and facts (the ground truth behind every sentence)
    dataset.json        generator settings, for provenance

Output is a pure function of (domain, seed, settings): same seed, same bytes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from hilight.config import InputError
from hilight.data.synth import billiards, general
from hilight.data.synth.text import conversation, hard_negatives, probe_pairs
from hilight.data.synth.video import write_mp4

log = logging.getLogger(__name__)

Domain = Literal["billiards", "general"]
DOMAINS: dict[str, int] = {"billiards": 0, "general": 1}
GENERATOR_VERSION = "6"  # 2: probes.json; 3: large balls, six colours, 1-2 object balls, rack of 6;
# 4: one cue-ball caption (what it did + where it ended), no "No ball is pocketed" beside a miss, notes-style
# pocketed answer; 5: x264 without macroblock-tree rate control (hilight.data.synth.video: same seed, same bytes);
# 6: one object ball on aimed shots (billiards.MAX_OBJECT_BALLS)
SPLITS = ("train",) * 8 + ("val", "test")
# eval clips (split "eval", which no training run reads) are clips EVAL_OFFSET + j of the same seed: a fixed set
# whatever the number of other clips
EVAL_OFFSET = 50_000


class SynthSettings(BaseModel):
    """How clips look. Sizes must be even (H.264 4:2:0)."""

    width: int = Field(160, ge=32, le=1920, multiple_of=2)
    height: int = Field(96, ge=32, le=1080, multiple_of=2)
    fps: int = Field(10, ge=1, le=60)
    duration_s: float = Field(3.0, gt=0, le=60)


def _video_id(domain: str, seed: int, index: int) -> str:
    return f"{domain[:3]}{seed}_{index:05d}"


def _one(args: tuple[str, int, int, SynthSettings, str, int | None, bool]) -> dict:
    """Generate, render and write one clip; returns its text records. Runs in a worker."""
    domain, seed, index, settings, out_dir, heldout, is_eval = args
    rng = np.random.default_rng([seed, DOMAINS[domain], index])
    maker = billiards.make_clip if domain == "billiards" else general.make_clip
    clip = maker(rng, width=settings.width, height=settings.height, fps=settings.fps, duration_s=settings.duration_s)
    vid = _video_id(domain, seed, index)
    write_mp4(Path(out_dir) / "videos" / f"{vid}.mp4", clip.frames, settings.fps)
    split = SPLITS[int(rng.integers(len(SPLITS)))]  # drawn either way, so a clip's bytes do not depend on heldout
    if is_eval:
        split = "eval"
    elif heldout is not None:
        split = ("val", "test")[index % 2] if index < heldout else "train"
    captions = [{"caption": c.text, "object": c.object} for c in clip.captions]
    negatives, probes = [], []
    for ci, cap in enumerate(clip.captions):
        cap_negatives = hard_negatives(cap, rng)
        negatives += [{"video_id": vid, "caption_index": ci, "caption": cap.text, **neg} for neg in cap_negatives]
        probes += [{"video_id": vid, "caption_index": ci, **pair} for pair in probe_pairs(cap, cap_negatives)]
    qa = {
        "id": vid,
        "video": f"{vid}.mp4",
        "conversations": conversation(clip.qa, rng),
        "answers": [{"kind": p.kind, "value": p.answer_value} for p in clip.qa],
    }
    return {
        "caption_record": {"video_id": vid, "video": f"{vid}.mp4", "split": split, "captions": captions},
        "negatives": negatives,
        "probes": probes,
        "qa": qa,
        "events": {"video_id": vid, "split": split, **clip.metadata()},
    }


def generate_dataset(
    out_dir: Path,
    *,
    domain: Domain = "billiards",
    n_videos: int = 200,
    seed: int = 0,
    settings: SynthSettings | None = None,
    workers: int = 1,
    progress: bool = True,
    heldout: int | None = None,
    eval_clips: int = 0,
) -> Path:
    """Write a synthetic dataset of ``n_videos`` clips to ``out_dir`` (see module docstring).

    Splits: by default each clip draws train/val/test at 80/10/10. ``heldout=N`` makes the first N clips the held-out
    ones (val and test alternately) and every other clip train, so adding training clips leaves the evaluation set,
    and with it every held-out metric's meaning, unchanged. ``eval_clips=M`` adds M clips of split ``eval`` (clips
    ``EVAL_OFFSET + j``, so the same M whatever ``n_videos``): a set for comparisons between trained models that no
    training run reads, large enough for tight intervals without enlarging the val/test sets that training reports
    on."""
    if domain not in DOMAINS:  # InputError: the CLI reports these in one line and exits 2
        raise InputError(f"unknown domain {domain!r}; choose one of {sorted(DOMAINS)}")
    if n_videos < 1:
        raise InputError(f"n_videos must be >= 1, got {n_videos}")
    if heldout is not None and not 0 <= heldout < n_videos:
        raise InputError(f"heldout {heldout} leaves no training clips of {n_videos} videos; pass a heldout (--heldout) "
                         f"in [0, {n_videos}) or more videos (--videos)")
    if eval_clips and n_videos > EVAL_OFFSET:
        raise InputError(f"n_videos {n_videos} reaches the eval clips' indices (from {EVAL_OFFSET}); generate at most "
                         f"{EVAL_OFFSET} clips with eval_clips")
    settings = settings or SynthSettings()
    out_dir = Path(out_dir)
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(domain, seed, i, settings, str(out_dir), heldout, False) for i in range(n_videos)]
    jobs += [(domain, seed, EVAL_OFFSET + j, settings, str(out_dir), heldout, True) for j in range(eval_clips)]
    bar = dict(total=len(jobs), desc=f"synth {domain}", disable=not progress, unit="clip")
    if workers > 1:
        # forkserver: workers start from a clean process, never a fork of a threaded parent
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("forkserver")) as pool:
            results = list(tqdm(pool.map(_one, jobs, chunksize=4), **bar))
    else:
        results = [_one(j) for j in tqdm(jobs, **bar)]
    _dump(out_dir / "captions.json", [r["caption_record"] for r in results])
    _dump(out_dir / "negatives.json", [n for r in results for n in r["negatives"]])
    _dump(out_dir / "probes.json", [p for r in results for p in r["probes"]])
    _dump(out_dir / "qa.json", [r["qa"] for r in results])
    _dump(out_dir / "events.json", [r["events"] for r in results])
    _dump(out_dir / "dataset.json", {
        "generator": "hilight.data.synth", "version": GENERATOR_VERSION, "domain": domain,
        "seed": seed, "n_videos": n_videos, "heldout": heldout, "eval_clips": eval_clips, "settings": settings.model_dump(),
    })
    log.info("wrote %d %s clips to %s", len(jobs), domain, out_dir)
    return out_dir


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
