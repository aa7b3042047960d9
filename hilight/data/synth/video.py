"""Writing frames to MP4 with PyAV (libx264), byte-for-byte deterministic."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_mp4(path: Path, frames: np.ndarray, fps: int, crf: int = 20) -> None:
    """Encode ``frames`` ``[F, H, W, 3]`` uint8 RGB to an H.264 MP4 at ``path``.

    The dataset must be identical for a given seed on every machine and every run, so x264 runs
    single-threaded (its output depends on the thread count) and without macroblock-tree rate control:
    with it, these small frames encoded to bytes that changed with whatever the process's heap held
    (16 different files from 40 encodes of one clip's frames, interleaved with other allocations; without
    it, 1 from 100), so two runs of the same synthesis differed in a few clips of 800. Whatever the
    encoder reads uninitialised there, mbtree is where it reaches the bitstream.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 with yuv420p needs even frame sizes, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
