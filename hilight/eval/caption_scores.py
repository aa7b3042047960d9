"""Caption-score evaluation: each held-out video scored against a candidate set, as in the research notes'
10-caption tests (§2.1.2, §3.1.2), plus the "say more, wrong more" probe (§1.5).

A video's candidates are its ground-truth captions (``gt``), hard negatives that change one fact of one of them
(``hard_negative``, with the kind of fact in ``changed`` and the caption it came from in ``ref``), captions of other
held-out videos (``other_video``) and captions from outside the domain (``unrelated``). A score is the model's
logit scale x cosine similarity, the number the notes print. Everything here is model-free: ``build_suite`` turns
tables into an :class:`EvalSuite`; ``caption_metrics`` and ``probe_metrics`` turn scored tables into numbers.

Ties always count against the model (a ground truth ranks below a negative with an equal score; a short caption
must score strictly higher), so a collapsed model that gives every text the same score gets no credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CATEGORIES = ("gt", "hard_negative", "other_video", "unrelated")
NEGATIVE_COLUMNS = ("video_id", "caption", "negative", "changed")
PROBE_COLUMNS = ("video_id", "short", "long")


class EvalDataError(ValueError):
    """An evaluation file is missing, unreadable, lacks columns, or matches no held-out video."""


@dataclass(frozen=True)
class EvalSuite:
    videos: pd.DataFrame  # video_id, video_file: the held-out videos, in evaluation order
    captions: pd.DataFrame  # video_id, caption: every ground-truth caption (the retrieval queries)
    candidates: pd.DataFrame  # video_id, text, category, changed, ref: the score matrix's rows
    probes: pd.DataFrame  # video_id, short, long, changed

    def texts(self) -> list[str]:
        """Every distinct text to embed, in a stable order."""
        parts = [self.captions["caption"], self.candidates["text"], self.probes["short"], self.probes["long"]]
        return list(dict.fromkeys(t for p in parts for t in p))


def read_records(path: str | Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """A JSON list, JSONL, CSV or Parquet table with at least the ``required`` columns (as strings); ``optional``
    columns are kept when present and filled with "" when not."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"evaluation file {path} does not exist")
    readers = {".json": lambda p: pd.read_json(p, orient="records", dtype=False),
               ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
               ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False), ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise EvalDataError(f"{path}: unsupported format {path.suffix!r}; use one of {sorted(readers)}")
    try:
        table = readers[path.suffix](path)
    except ValueError as exc:
        raise EvalDataError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise EvalDataError(f"{path} lacks columns {missing} (has {sorted(map(str, table.columns))}); "
                            f"each record needs {list(required)}")
    empty = table.index[(table[list(required)].astype(str).apply(lambda col: col.str.strip()) == "").any(axis=1)
                        | table[list(required)].isna().any(axis=1)]
    if len(empty):
        raise EvalDataError(f"{path}: records {empty[:5].tolist()} have an empty value in {list(required)}")
    for col in optional:
        if col not in table.columns:
            table[col] = ""
    return table[list(required) + list(optional)].fillna("").astype(str).reset_index(drop=True)


def _held_out(table: pd.DataFrame, dataset: str, known: set[str], path: str) -> pd.DataFrame:
    """Prefix ids with the dataset (the manifest's ``dataset/video_id``) and keep held-out videos only."""
    table = table.assign(video_id=dataset + "/" + table["video_id"])
    kept = table[table["video_id"].isin(known)]
    if kept.empty:
        raise EvalDataError(f"none of the {len(table)} records of {path} names a held-out video of dataset "
                            f"{dataset!r} (e.g. {table['video_id'].iloc[0]!r}); check the dataset key and the splits")
    return kept


def build_suite(rows: pd.DataFrame, *, negatives: dict[str, str | Path] | None = None,
                probes: dict[str, str | Path] | None = None, unrelated: list[str] = (), other_videos: int = 3,
                max_videos: int | None = None, seed: int = 0) -> EvalSuite:
    """The candidate sets of the held-out ``rows`` (manifest rows: dataset, video_id, video_file, caption).

    ``negatives`` / ``probes`` map a dataset name to a file of hard negatives (video_id, caption, negative,
    changed) / probe pairs (video_id, short, long). A dataset without a probe file gets pairs derived from its
    negatives: the video's shortest true caption against each hard negative with more words.
    """
    rows = rows.sort_values(["video_id", "caption"], kind="stable")
    video_ids = list(dict.fromkeys(rows["video_id"]))
    if max_videos is not None:
        video_ids = video_ids[:max_videos]
    rows = rows[rows["video_id"].isin(video_ids)]
    known = set(video_ids)
    gts = {v: list(dict.fromkeys(g["caption"])) for v, g in rows.groupby("video_id", sort=False)}

    negs = [_held_out(read_records(p, NEGATIVE_COLUMNS), d, known, str(p)) for d, p in (negatives or {}).items()]
    neg_table = pd.concat(negs, ignore_index=True) if negs else pd.DataFrame(columns=list(NEGATIVE_COLUMNS))
    probe_tables = [_held_out(read_records(p, PROBE_COLUMNS, ("changed",)), d, known, str(p))
                    for d, p in (probes or {}).items()]
    derived = [d for d in rows["dataset"].unique() if d not in (probes or {})]
    if derived:
        probe_tables.append(derive_probes(gts, neg_table[neg_table["video_id"].str.split("/").str[0].isin(derived)]))

    rng = np.random.default_rng(seed)
    all_captions = list(dict.fromkeys(rows["caption"]))
    candidates = []
    for v in video_ids:
        own = set(gts[v])
        candidates += [{"video_id": v, "text": t, "category": "gt", "changed": "", "ref": t} for t in gts[v]]
        for n in neg_table[neg_table["video_id"] == v].itertuples():
            if n.negative not in own:  # a "negative" that is another true caption of the clip is not a negative
                candidates.append({"video_id": v, "text": n.negative, "category": "hard_negative",
                                   "changed": n.changed, "ref": n.caption})
        pool = [t for t in all_captions if t not in own]
        for i in sorted(rng.choice(len(pool), size=min(other_videos, len(pool)), replace=False).tolist()):
            candidates.append({"video_id": v, "text": pool[i], "category": "other_video", "changed": "", "ref": ""})
        candidates += [{"video_id": v, "text": t, "category": "unrelated", "changed": "", "ref": ""}
                       for t in unrelated if t not in own]
    probe_table = (pd.concat(probe_tables, ignore_index=True) if probe_tables
                   else pd.DataFrame(columns=["video_id", "short", "long", "changed"]))
    return EvalSuite(
        videos=rows.drop_duplicates("video_id")[["video_id", "video_file"]].reset_index(drop=True),
        captions=rows[["video_id", "caption"]].drop_duplicates().reset_index(drop=True),
        candidates=pd.DataFrame(candidates, columns=["video_id", "text", "category", "changed", "ref"]),
        probes=probe_table[["video_id", "short", "long", "changed"]].fillna("").reset_index(drop=True),
    )


def derive_probes(gts: dict[str, list[str]], negatives: pd.DataFrame) -> pd.DataFrame:
    """Probe pairs from hard negatives alone: the video's shortest true caption vs each longer hard negative."""
    out = []
    for n in negatives.itertuples():
        short = min(gts[n.video_id], key=lambda t: (len(t.split()), t))
        if len(short.split()) < len(n.negative.split()):
            out.append({"video_id": n.video_id, "short": short, "long": n.negative, "changed": n.changed})
    return pd.DataFrame(out, columns=["video_id", "short", "long", "changed"])


# ------------------------------------------------------------------------------------------------ metrics


def per_video(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per video: its best ground truth's rank among the negatives, the margin of the best ground truth
    over the best negative, whether a ground truth is the top candidate (``top1``), and every ground truth's rank
    (``gt_ranks``)."""
    rows = []
    for video_id, g in scores.groupby("video_id", sort=False):
        gt = g.loc[g["category"] == "gt", "score"].to_numpy()
        neg = g.loc[g["category"] != "gt", "score"].to_numpy()
        if not len(gt):
            raise ValueError(f"video {video_id} has no ground-truth candidate")
        ranks = 1 + (neg[None, :] >= gt[:, None]).sum(1)  # per ground truth: negatives at or above it, + 1
        margin = float(gt.max() - neg.max()) if len(neg) else float("inf")
        rows.append({"video_id": video_id, "best_gt_rank": int(ranks.min()), "mean_gt_rank": float(ranks.mean()),
                     "margin": margin, "top1": margin > 0, "num_gt": len(gt), "num_negatives": len(neg),
                     "gt_ranks": ranks.tolist()})
    return pd.DataFrame(rows)


def caption_metrics(scores: pd.DataFrame) -> dict[str, float]:
    """Aggregate caption-score metrics of a scored candidate table (columns of ``EvalSuite.candidates`` + score).

    ``top1_accuracy`` (a ground truth beats every negative), ``margin`` (best ground truth - best negative, mean
    over videos), ``gt_rank_mean`` / ``gt_rank_median`` (rank of each ground truth among the negatives, 1 = best),
    ``mrr`` (of the best ground truth), ``score/<category>`` (mean score per category) and
    ``hard_negative_accuracy[/<fact>]`` (a caption outscores its own one-fact-changed negative).
    """
    videos = per_video(scores)
    ranks = [r for video_ranks in videos["gt_ranks"] for r in video_ranks]
    out = {
        "top1_accuracy": float(videos["top1"].mean()),
        "margin": float(videos["margin"].replace(np.inf, np.nan).mean()),
        "gt_rank_mean": float(np.mean(ranks)),
        "gt_rank_median": float(np.median(ranks)),
        "mrr": float((1.0 / videos["best_gt_rank"]).mean()),
        "num_videos": float(len(videos)),
    }
    for cat in CATEGORIES:
        sel = scores.loc[scores["category"] == cat, "score"]
        if len(sel):
            out[f"score/{cat}"] = float(sel.mean())
    pairs = hard_negative_pairs(scores)
    if len(pairs):
        out["hard_negative_accuracy"] = float(pairs["correct"].mean())
        for kind, g in pairs.groupby("changed"):
            out[f"hard_negative_accuracy/{kind}"] = float(g["correct"].mean())
    return out


def hard_negative_pairs(scores: pd.DataFrame) -> pd.DataFrame:
    """Each hard negative next to the caption it was made from: ``correct`` when the caption scores higher."""
    gt = scores[scores["category"] == "gt"][["video_id", "text", "score"]].rename(columns={"text": "ref",
                                                                                           "score": "ref_score"})
    neg = scores[scores["category"] == "hard_negative"][["video_id", "ref", "changed", "score"]]
    pairs = neg.merge(gt, on=["video_id", "ref"], how="inner")
    return pairs.assign(correct=pairs["ref_score"] > pairs["score"])


def probe_metrics(probes: pd.DataFrame) -> dict[str, float]:
    """"Say more, wrong more": ``short_wins`` is the fraction of pairs whose short, all-true caption scores strictly
    higher than the longer caption with one wrong fact (columns short_score, long_score[, changed])."""
    if probes.empty:
        return {}
    wins = probes["short_score"] > probes["long_score"]
    out = {"short_wins": float(wins.mean()), "gap": float((probes["short_score"] - probes["long_score"]).mean()),
           "pairs": float(len(probes))}
    if "changed" in probes:
        for kind, g in probes[probes["changed"] != ""].groupby("changed"):
            out[f"short_wins/{kind}"] = float((g["short_score"] > g["long_score"]).mean())
    return out
