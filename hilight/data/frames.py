"""Video frames for the towers: uniform sampling with decord and CLIP preprocessing.

Matches CLIP-ViP / HiLight (reference §1.6): ``linspace(0, n-1, T)`` frame indices; /255; bicubic resize of the
whole frame to S×S (the aspect ratio is *not* kept — both codebases squash); normalise with CLIP's mean/std.
Written with torch rather than ``CLIPImageProcessor`` because that one keeps the aspect ratio (shortest-edge resize
+ crop), which would not match the released weights' training, and works frame by frame in numpy. As in the
references, the resized frames are not clamped to [0, 1] (bicubic overshoots slightly at edges).

One departure, for memory: a video whose frames are more than ``DECODE_FACTOR`` × S on their longer side is decoded
by FFmpeg at that size (aspect kept) before the same bicubic resize, so a 4000×3000 clip costs 12 frames of 896×672
(22 MB) instead of 12 full frames (432 MB, 1.7 GB as float). Measured on a noisy 1280×960 clip at S = 224, the model
input then differs from the full-size path by 0.003 on average (max 0.05) in [0, 1] units; clips up to 4·S are decoded
exactly as the references do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hilight.data.probe import frame_indices  # the same frames the ingestion probe decodes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DECODE_FACTOR = 4  # larger videos are decoded at DECODE_FACTOR × the model's frame size (module docstring)


class VideoReadError(RuntimeError):
    """A video could not be decoded; names the file."""


def read_frames(path: str | Path, num: int, *, jitter: np.random.Generator | None = None,
                max_side: int | None = None) -> torch.Tensor:
    """[T, H, W, 3] uint8 frames of ``path``: a video, or a ``.npy`` array of frames (``[T, 3, H, W]`` or
    ``[T, H, W, 3]``; uint8 0-255 or float 0-1), the array input the data contract accepts. A video whose longer
    side exceeds ``max_side`` is decoded at a size whose longer side is ``max_side`` (aspect kept)."""
    if Path(path).suffix == ".npy":
        return _array_frames(Path(path), num, jitter)
    import decord  # imported here: decord pulls in its native library, which forked workers load lazily

    try:
        reader = decord.VideoReader(str(path), num_threads=1, **_decode_size(path, max_side))
        frames = reader.get_batch(frame_indices(len(reader), num, jitter=jitter).tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError, ValueError) as exc:
        raise VideoReadError(f"cannot decode {path}: {exc}") from exc
    return torch.from_numpy(frames)


def _decode_size(path: str | Path, max_side: int | None) -> dict[str, int]:
    """decord's ``width``/``height`` for a video larger than ``max_side`` (read from the container header with
    PyAV, without decoding); empty (native size) otherwise."""
    if max_side is None:
        return {}
    import av

    try:
        with av.open(str(path)) as container:
            codec = container.streams.video[0].codec_context
            width, height = codec.width, codec.height
    except (av.error.FFmpegError, IndexError) as exc:
        raise VideoReadError(f"cannot decode {path}: {exc}") from exc
    longer = max(width, height)
    if longer <= max_side:
        return {}
    scale = max_side / longer
    return {"width": max(2, round(width * scale / 2) * 2), "height": max(2, round(height * scale / 2) * 2)}


def _array_frames(path: Path, num: int, jitter: np.random.Generator | None) -> torch.Tensor:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)  # never a pickle
    if arr.ndim != 4 or 3 not in (arr.shape[1], arr.shape[3]):
        raise VideoReadError(f"{path}: array must be [T,3,H,W] or [T,H,W,3], got shape {list(arr.shape)}")
    frames = np.asarray(arr[frame_indices(len(arr), num, jitter=jitter)])
    if frames.shape[1] == 3 and frames.shape[3] != 3:
        frames = frames.transpose(0, 2, 3, 1)
    if frames.dtype != np.uint8:
        frames = np.clip(frames.astype(np.float32) * (255.0 if frames.max() <= 1.0 else 1.0), 0, 255).round()
    return torch.from_numpy(np.ascontiguousarray(frames.astype(np.uint8)))


def preprocess(frames: torch.Tensor, size: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 → [T, 3, size, size] float32, CLIP-normalised."""
    x = frames.permute(0, 3, 1, 2).float().div_(255.0)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)  # no clamp: as the references
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_clip_frames(path: str | Path, num: int, size: int, *, jitter: np.random.Generator | None = None) -> torch.Tensor:
    """``path`` → [T, 3, size, size] model input."""
    return preprocess(read_frames(path, num, jitter=jitter, max_side=DECODE_FACTOR * size), size)
