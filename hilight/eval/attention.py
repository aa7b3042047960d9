"""Attention maps: where the CLS and proxy tokens look in each frame, overlaid on the frames (research notes §2.1.3,
§3.1.2 compared variants and checkpoints by such pictures).

``frame_attention`` turns the proxy-row attention probabilities that ``CLIPViPModel.encode_video(...,
output_proxy_attentions=True)`` returns ([B, heads, M, S] per layer) into one [grid, grid] map per frame.
``overlay`` colours the maps onto the frames the model saw; ``save_gif`` writes one GIF per video and ``save_grid``
one PNG comparing models (rows) frame by frame (columns). Figures use matplotlib's object API (no pyplot state),
so rendering is safe in steps and threads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from hilight.data.frames import read_frames


def frame_attention(proxy_attentions: tuple[torch.Tensor, ...], *, num_frames: int, layer: int = -1,
                    queries: Literal["all", "cls"] = "all") -> torch.Tensor:
    """[B, T, g, g] attention mass on each frame's patches, averaged over heads and over the CLS + proxy queries
    (``all``) or the CLS query alone (``cls``)."""
    att = proxy_attentions[layer].float().mean(1)  # [B, M, S]
    b, m, s = att.shape
    patches = (s - m) // num_frames
    grid = int(round(patches**0.5))
    if m + num_frames * patches != s or grid * grid != patches:
        raise ValueError(f"attention over {s} tokens is not {m} proxies + {num_frames} frames of a square patch grid")
    att = att[:, 0] if queries == "cls" else att.mean(1)  # [B, S]
    return att[:, m:].reshape(b, num_frames, grid, grid)


def display_frames(path: str | Path, num_frames: int, size: int) -> np.ndarray:
    """[T, size, size, 3] uint8: the frames the model sees (same sampler, same squash-resize), not normalised."""
    x = read_frames(path, num_frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def overlay(frames: np.ndarray, maps: np.ndarray | torch.Tensor, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend ``maps`` [T, g, g] onto ``frames`` [T, H, W, 3] uint8. Maps are min-max scaled over the whole clip,
    so a shift of attention from one frame to another stays visible."""
    from matplotlib import colormaps

    maps = torch.as_tensor(maps, dtype=torch.float32)
    if frames.ndim != 4 or maps.ndim != 3 or maps.shape[0] != frames.shape[0]:
        raise ValueError(f"need frames [T, H, W, 3] and maps [T, g, g], got {frames.shape} and {tuple(maps.shape)}")
    lo, hi = maps.min(), maps.max()
    maps = (maps - lo) / (hi - lo) if hi > lo else torch.zeros_like(maps)
    up = F.interpolate(maps[:, None], size=frames.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
    heat = colormaps[cmap](up.clamp(0, 1).numpy())[..., :3] * 255.0
    return (frames.astype(np.float32) * (1 - alpha) + heat * alpha).round().astype(np.uint8)


def save_gif(frames: np.ndarray, path: str | Path, *, fps: float = 4.0) -> Path:
    """An endlessly looping GIF of ``frames`` [T, H, W, 3] uint8 (Pillow merges identical consecutive frames into
    one longer frame, so playback time stays T / fps)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def save_grid(rows: list[tuple[str, np.ndarray]], path: str | Path, *, title: str = "", cell_inches: float = 1.4) -> Path:
    """One PNG: a row per (label, frames [T, H, W, 3]), a column per frame."""
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("save_grid needs at least one row")
    cols = max(f.shape[0] for _, f in rows)
    fig = Figure(figsize=(cell_inches * cols + 1.6, cell_inches * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, frames) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < frames.shape[0]:
                ax.imshow(frames[c])
            else:
                ax.set_axis_off()
            if r == 0:
                ax.set_title(f"frame {c}", fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
