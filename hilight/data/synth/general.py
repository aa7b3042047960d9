"""Synthetic "general" clips: coloured shapes moving over varied backgrounds.

Stands in for MSR-VTT / VideoInstruct (open-domain video) so mixing and generalisation
experiments have a second domain. Like the billiards domain, all text is derived from the
generated motion log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hilight.data.synth.text import Caption, Fact, QAPair

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = ("plain", "striped", "checkered", "gradient")
BG_COLOURS: dict[str, tuple[int, int, int]] = {"grey": (128, 128, 128), "teal": (30, 120, 120), "beige": (200, 180, 140)}
# direction name -> unit vector in image coordinates (y down)
DIRECTIONS: dict[str, tuple[float, float]] = {
    "from left to right": (1.0, 0.0),
    "from right to left": (-1.0, 0.0),
    "upwards": (0.0, -1.0),
    "downwards": (0.0, 1.0),
}
SHORT_DIRECTION = {"from left to right": "right", "from right to left": "left", "upwards": "up", "downwards": "down"}


@dataclass
class Mover:
    shape: str
    colour: str
    direction: str
    start: tuple[float, float]  # normalised [0, 1] image coordinates
    size: float  # normalised half-size


@dataclass
class Clip:
    frames: np.ndarray  # [F, H, W, 3] uint8
    scenario: str
    movers: list[Mover]
    background: tuple[str, str]  # (pattern, colour)
    captions: list[Caption]
    qa: list[QAPair]

    def metadata(self) -> dict:
        return {
            "scenario": self.scenario,
            "background": {"pattern": self.background[0], "colour": self.background[1]},
            "movers": [m.__dict__ for m in self.movers],
        }


def make_clip(rng: np.random.Generator, *, width: int, height: int, fps: int, duration_s: float) -> Clip:
    n_frames = max(2, round(fps * duration_s))
    movers, pattern, bg_colour = _scene(rng)
    frames = _render(movers, pattern, bg_colour, width, height, n_frames)
    captions = _describe(movers, pattern, bg_colour)
    qa = _questions(movers)
    return Clip(frames, "shapes", movers, (pattern, bg_colour), captions, qa)


def text_scene(rng: np.random.Generator) -> tuple[list[Caption], list[QAPair]]:
    """A scene's captions and QA without rendering it: text-only corpora (the demo LLM's reading practice)."""
    movers, pattern, bg_colour = _scene(rng)
    return _describe(movers, pattern, bg_colour), _questions(movers)


def _scene(rng: np.random.Generator) -> tuple[list[Mover], str, str]:
    k = int(rng.integers(1, 3))
    shapes = list(rng.choice(SHAPES, size=k, replace=False))
    colours = list(rng.choice(list(COLOURS), size=k, replace=False))
    movers = []
    for i in range(k):
        direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
        dx, dy = DIRECTIONS[direction]
        # start on the side opposite to the motion so the whole path stays in frame
        sx = 0.2 if dx > 0 else (0.8 if dx < 0 else rng.uniform(0.25, 0.75))
        sy = 0.2 if dy > 0 else (0.8 if dy < 0 else rng.uniform(0.25, 0.75))
        movers.append(Mover(str(shapes[i]), str(colours[i]), direction, (float(sx), float(sy)), float(rng.uniform(0.08, 0.12))))
    pattern = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    bg_colour = list(BG_COLOURS)[int(rng.integers(len(BG_COLOURS)))]
    return movers, pattern, bg_colour


def _render(movers: list[Mover], pattern: str, bg_colour: str, width: int, height: int, n_frames: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = (xs + 0.5) / width, (ys + 0.5) / height
    base = np.empty((height, width, 3), np.float32)
    rgb = np.array(BG_COLOURS[bg_colour], np.float32)
    if pattern == "plain":
        base[:] = rgb
    elif pattern == "striped":
        base[:] = np.where(((u * 8).astype(int) % 2 == 0)[..., None], rgb, rgb * 0.55)
    elif pattern == "checkered":
        base[:] = np.where((((u * 8).astype(int) + (v * 6).astype(int)) % 2 == 0)[..., None], rgb, rgb * 0.55)
    else:  # gradient
        base[:] = rgb * (0.4 + 0.6 * u)[..., None]
    base = base.astype(np.uint8)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for f in range(n_frames):
        img = base.copy()
        progress = f / max(1, n_frames - 1)
        for m in movers:
            dx, dy = DIRECTIONS[m.direction]
            cx, cy = m.start[0] + 0.6 * progress * dx, m.start[1] + 0.6 * progress * dy
            # sizes in normalised units of the shorter side, so shapes are not squashed
            sx, sy = m.size * min(width, height) / width, m.size * min(width, height) / height
            if m.shape == "circle":
                mask = ((u - cx) / sx) ** 2 + ((v - cy) / sy) ** 2 <= 1
            elif m.shape == "square":
                mask = (np.abs(u - cx) <= sx * 0.85) & (np.abs(v - cy) <= sy * 0.85)
            else:  # triangle pointing up
                t = (v - (cy - sy)) / (2 * sy)
                mask = (t >= 0) & (t <= 1) & (np.abs(u - cx) <= sx * t)
            img[mask] = COLOURS[m.colour]
        frames[f] = img
    return frames


def _describe(movers: list[Mover], pattern: str, bg_colour: str) -> list[Caption]:
    caps = []
    other_shapes = lambda s: [x for x in SHAPES if x != s]  # noqa: E731
    for m in movers:
        caps.append(Caption(
            f"{_article(m.colour)} {m.colour} {m.shape} moves {m.direction}", f"{m.colour} {m.shape}",
            [Fact("colour", m.colour, [c for c in COLOURS if c != m.colour]),
             Fact("shape", m.shape, other_shapes(m.shape)),
             Fact("direction", m.direction, [d for d in DIRECTIONS if d != m.direction])],
            short=f"{_article(m.colour)} {m.colour} {m.shape} moves"))
    caps.append(Caption(f"The background is {pattern} {bg_colour}", "background",
                        [Fact("pattern", pattern, [p for p in BACKGROUNDS if p != pattern])],
                        short=f"The background is {pattern}"))
    if len(movers) == 2:
        caps.append(Caption("Two shapes move across the screen", "scene",
                            [Fact("count", "Two", ["Three", "Four"])], short="Two shapes move"))
    else:
        caps.append(Caption("A single shape moves across the screen", "scene",
                            [Fact("count", "single", ["second", "third"])],
                            short="A single shape moves"))
    return caps


def _questions(movers: list[Mover]) -> list[QAPair]:
    m = movers[0]
    qa = [
        QAPair(f"What color is the {m.shape}?", f"The {m.shape} is {m.colour}.", "colour", m.colour),
        QAPair(f"Which way does the {m.colour} {m.shape} move?",
               f"It moves {m.direction}.", "direction", SHORT_DIRECTION[m.direction]),
        QAPair("How many shapes are moving?",
               f"{'One shape is' if len(movers) == 1 else 'Two shapes are'} moving.", "count", str(len(movers))),
    ]
    return qa


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"
