"""Stage-1 benchmarks (CPU, fp32), each against a baseline measured in the same run.

    python benchmarks/stage1.py cache --videos 64 --epochs 2
    python benchmarks/stage1.py towers --clips 2

cache   one stage-1 epoch at the demo's tiny shapes on a freshly generated synthetic dataset, with the frozen-tower
        feature cache (filled once, then read) vs without it (every step decodes the clips and runs both towers).
        Prints the fill time, the epoch times and the ratio cached/uncached epoch (lower is better), and checks
        that both give the same loss on the first batch.
towers  the per-clip cost the cache removes at real shapes (random weights): decoding 12 frames + CLIP-ViP ViP-B/16
        (12x224 px, 2356 tokens) + Long-CLIP ViT-B/16 on the 12 frames, vs reading the cached [2356, 768] and
        [12, 512] tensors (bf16) back from a safetensors shard.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from hilight.env import apply_offline_defaults


def _dataset(root: Path, videos: int) -> Path:
    """Synthetic billiards + general clips → validated manifest (what the demo builds)."""
    from hilight.data.contracts import load_contracts
    from hilight.data.ingest import DataValidationConfig, run_ingest
    from hilight.data.synth import generate_dataset

    for domain in ("billiards", "general"):
        generate_dataset(root / domain, domain=domain, n_videos=videos // 2, seed=0, progress=False)
    config = DataValidationConfig.model_validate({
        "datasets": [{"name": d, "domain": d, "root": str(root / d), "captions": ["captions.json"], "qa": ["qa.json"]}
                     for d in ("billiards", "general")],
        "output_dir": str(root / "manifest"), "progress": False})
    run_ingest(config, load_contracts(Path(__file__).resolve().parents[1] / "data_contracts"))
    return root / "manifest"


def cache(videos: int, epochs: int) -> None:
    from hilight.data.feature_cache import fill_cache
    from hilight.data.qa import VideoQADataset, encode_samples, read_qa_manifest
    from hilight.models.checkpoints import save_model
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.models.vlm import freeze_all_but
    from hilight.train.text_lm import LLMPretrainConfig, run_llm_pretrain
    from hilight.train.vlm_parts import (
        FeatureCacheSpec,
        LLMSpec,
        TokenMiningSpec,
        VideoAnswerObjective,
        VisionSpec,
        build_vlm_parts,
        open_feature_cache,
        tower_encoder,
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _dataset(root, videos)
        cfg = load_preset("tiny", {"vision": {"image_size": 96, "patch_size": 16}})
        save_model(build_clipvip(cfg, seed=0), root / "clipvip", {"family": "clipvip", "model": cfg.model_dump(mode="json")})
        llm = run_llm_pretrain(LLMPretrainConfig.model_validate({
            "output_dir": str(root / "llm"), "data": {"manifest_dir": str(manifest)},
            "train": {"max_steps": 5, "batch_size": 8, "lr": 1e-3, "progress": False}})).model_dir
        parts = build_vlm_parts(VisionSpec(clipvip=str(root / "clipvip"), longclip_random_init="tiny"),
                                   LLMSpec(dir=str(llm)), TokenMiningSpec(expand=4))
        freeze_all_but(parts.vlm, ("token_mining.",))
        n_tokens = parts.vlm.token_mining.config.num_tokens(parts.num_frames)
        rows = read_qa_manifest(manifest).select(None, ["train", "val", "test"])
        encoded = encode_samples(rows, parts.tokenizer, video_tokens=n_tokens, max_length=160)
        feature_cache = open_feature_cache(FeatureCacheSpec(dir=str(root / "features")), parts)
        started = time.perf_counter()
        fill_cache(feature_cache, dict(zip(encoded.rows["video_sha256"], encoded.rows["video_file"], strict=True)),
                   tower_encoder(parts.vlm), num_frames=parts.num_frames, image_size=parts.image_size, progress=False)
        fill_s = time.perf_counter() - started

        def epoch_time(dataset: VideoQADataset, batch_size: int = 16) -> tuple[float, float]:
            objective = VideoAnswerObjective(parts.vlm)
            tm = parts.vlm.token_mining
            opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
            first = None
            started = time.perf_counter()
            for _ in range(epochs):
                for b in range(0, len(order) - batch_size + 1, batch_size):
                    loss = objective(tm, dataset.collate(order[b:b + batch_size]))["loss"]
                    first = float(loss) if first is None else first
                    loss.backward()
                    opt.zero_grad(set_to_none=True)  # no step: both runs see the same weights
            return (time.perf_counter() - started) / epochs, first

        make = lambda c: VideoQADataset(encoded, pad_token_id=parts.tokenizer.pad_token_id, cache=c,  # noqa: E731
                                        num_frames=parts.num_frames, image_size=parts.image_size)
        cached_s, cached_loss = epoch_time(make(feature_cache))
        decoded_s, decoded_loss = epoch_time(make(None))
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{len(encoded.samples)} QA samples of {videos} clips, tiny shapes (6 frames x 96 px; TokenMining {n_tokens} tokens)")
    print(f"cache fill (once): {fill_s:.2f} s")
    print(f"epoch with cache: {cached_s:.2f} s   without: {decoded_s:.2f} s   ratio cached/uncached {cached_s / decoded_s:.2f}")
    print(f"first-batch loss cached {cached_loss:.6f} vs decoded {decoded_loss:.6f} (diff {abs(cached_loss - decoded_loss):.1e})")


def towers(clips: int) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hilight.data.frames import load_clip_frames
    from hilight.data.synth import SynthSettings, generate_dataset
    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.models.longclip import LongCLIPImageTower
    from transformers import CLIPVisionConfig

    torch.manual_seed(0)
    clipvip = build_clipvip(load_preset("clipvip-b16")).eval()
    longclip = LongCLIPImageTower(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                   num_attention_heads=12, image_size=224, patch_size=16,
                                                   projection_dim=512, hidden_act="quick_gelu")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "d", domain="billiards", n_videos=clips, seed=0, progress=False,
                         settings=SynthSettings(width=320, height=240, fps=10, duration_s=3.0))
        files = sorted((root / "d" / "videos").glob("*.mp4"))
        started = time.perf_counter()
        with torch.no_grad():
            for f in files:
                x = load_clip_frames(f, 12, 224).unsqueeze(0)
                video = clipvip.encode_video(x).last_hidden_state[0]
                frames = longclip(x)[0]
        compute_s = (time.perf_counter() - started) / len(files)
        tensors = {}
        for i in range(len(files)):  # the last clip's features stand in for each clip's (same sizes)
            tensors[f"{i}/video"], tensors[f"{i}/frames"] = video.to(torch.bfloat16).clone(), frames.to(torch.bfloat16).clone()
        save_file(tensors, str(root / "shard.safetensors"))
        started = time.perf_counter()
        with safe_open(str(root / "shard.safetensors"), framework="pt") as h:
            for i in range(len(files)):
                h.get_tensor(f"{i}/video"), h.get_tensor(f"{i}/frames")
        read_s = (time.perf_counter() - started) / len(files)
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"per clip: decode + CLIP-ViP B/16 + Long-CLIP B/16 {compute_s:.2f} s; cached read {read_s * 1e3:.2f} ms "
          f"({video.shape[0]}x{video.shape[1]} + {frames.shape[0]}x{frames.shape[1]} bf16, "
          f"{(video.numel() + frames.numel()) * 2 / 2**20:.1f} MiB); ratio {read_s / compute_s:.5f}")


def main() -> None:
    apply_offline_defaults()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--videos", type=int, default=64)
    c.add_argument("--epochs", type=int, default=2)
    t = sub.add_parser("towers")
    t.add_argument("--clips", type=int, default=2)
    args = parser.parse_args()
    if args.cmd == "cache":
        cache(args.videos, args.epochs)
    else:
        towers(args.clips)


if __name__ == "__main__":
    main()
