"""Lazy vs up-front tokenisation of a Valley-sized QA manifest (issue 16): dataset construction + first batch time
and peak RSS, each mode in its own process (peak RSS is per process), in the same run.

    python benchmarks/tokenization.py --rows 700000          # the Valley-703K scale
    python benchmarks/tokenization.py --rows 20000 --batch 16

Rows only: conversations in the VideoInstruct shape, videos stubbed (the batch is built without video). The
manifest DataFrame is built in both modes; its RSS is printed separately so the ratio shows what tokenisation adds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What is happening in this video?", "Describe the shot in detail.", "Which ball is pocketed first?",
             "How many balls are on the table?", "What colour is the cue ball's target?"]
ANSWER = ("The player strikes the cue ball, which hits the red ball; the red ball rolls along the cushion and drops "
          "into the corner pocket while the blue ball stays near the centre of the table.")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def manifest(n: int):
    import pandas as pd

    conv = [json.dumps([{"from": "human", "value": "<video>\n" + q}, {"from": "gpt", "value": ANSWER}])
            for q in QUESTIONS]
    return pd.DataFrame({"dataset": "valley", "id": [f"v{i}" for i in range(n)],
                         "video_file": [f"videos/v{i}.mp4" for i in range(n)],
                         "video_sha256": [f"{i:064x}" for i in range(n)],
                         "conversations": [conv[i % len(conv)] for i in range(n)], "split": "train"})


def child(mode: str, rows: int, batch: int, tok_dir: str) -> dict:
    from hilight.data.qa import VideoQADataset, encode_samples, lazy_samples
    from hilight.models.tokenizers import load_llm_tokenizer

    tokenizer = load_llm_tokenizer(Path(tok_dir))
    df = manifest(rows)
    base = rss_mib()
    started = time.perf_counter()
    make = lazy_samples if mode == "lazy" else encode_samples
    encoded = make(df, tokenizer, video_tokens=384, max_length=1024)
    data = VideoQADataset(encoded, pad_token_id=tokenizer.pad_token_id, with_video=False)
    first = data.collate(list(range(batch)))
    seconds = time.perf_counter() - started
    return {"mode": mode, "rows": rows, "seconds": seconds, "peak_rss_mib": rss_mib(), "manifest_rss_mib": base,
            "first_batch_shape": list(first["input_ids"].shape)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=700_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--child", choices=["lazy", "upfront"], help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.batch, args.tokenizer)))
        return

    from hilight.models.tokenizers import build_gemma_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_gemma_tokenizer(QUESTIONS + [ANSWER], tmp, vocab_size=512)
        results = {}
        for mode in ("lazy", "upfront"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--rows", str(args.rows), "--batch",
                                  str(args.batch), "--tokenizer", tmp], capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    lazy, up = results["lazy"], results["upfront"]
    print(f"{args.rows} QA rows, first batch of {args.batch} (videos stubbed)")
    print(f"{'mode':<9}{'construction + first batch':>28}{'peak RSS':>12}{'of which manifest':>20}")
    for r in (lazy, up):
        print(f"{r['mode']:<9}{r['seconds']:>26.2f} s{r['peak_rss_mib']:>8.0f} MiB{r['manifest_rss_mib']:>16.0f} MiB")
    print(f"lazy/upfront time ratio: {lazy['seconds'] / up['seconds']:.5f}")
    added = lambda r: r["peak_rss_mib"] - r["manifest_rss_mib"]  # noqa: E731
    print(f"RSS added beyond the manifest: lazy {added(lazy):.0f} MiB, upfront {added(up):.0f} MiB")


if __name__ == "__main__":
    main()
