"""Synthetic billiards clips: scenario set-up, rendering, and text derived from the event log.

Each clip is one shot on a top-down pool table: a break (the cue ball scatters the triangle),
a pot (a ball is aimed at a named pocket) or a miss. Scenario set-up only chooses the initial
state; *every* caption, hard negative and QA answer is derived from what the simulation's event
log says happened, so the text is true of the video by construction and checkable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hilight.data.synth import physics as ph
from hilight.data.synth.text import Caption, Fact, QAPair

CUE = "white"
# Object-ball colours and their RGB: six hues that stay distinct from each other, from the cloth, the rails and the
# pockets after H.264's 4:2:0 chroma at small sizes (a green ball on green cloth, a brown one on brown rails or a
# black one beside black pockets is invisible at the demo's resolution).
BALL_COLOURS: dict[str, tuple[int, int, int]] = {
    "yellow": (250, 215, 30),
    "blue": (30, 70, 230),
    "red": (225, 30, 30),
    "purple": (150, 40, 190),
    "orange": (250, 130, 20),
    "pink": (250, 140, 200),
}
CUE_RGB = (245, 245, 245)
FELT_RGB = (40, 140, 70)
RAIL_RGB = (95, 55, 25)
POCKET_RGB = (5, 5, 5)
SCENARIOS = ("break", "pot", "miss")
RACK_ROWS = 3
# on aimed shots, the target alone (v6; up to v5 also at most one other ball). With two, naming the colour of the ball
# the cue ball hit first needs the order of two contacts in six sampled frames: a v5 demo VLM named it in 0.17-0.46
# of its answers on two-ball clips against 0.54-0.69 on one-ball ones (benchmarks/RESULTS.md)
MAX_OBJECT_BALLS = 1


@dataclass
class Clip:
    """One simulated clip: frames plus everything the text is derived from."""

    frames: np.ndarray  # [F, H, W, 3] uint8
    scenario: str  # what actually happened: "break" | "pot" | "miss"
    sim: ph.Simulation
    captions: list[Caption]
    qa: list[QAPair]

    def metadata(self) -> dict:
        final = self.sim.final_positions()
        return {
            "scenario": self.scenario,
            "balls": self.sim.names,
            "events": [e.to_dict() for e in self.sim.events],
            "pocketed": [{"ball": b, "pocket": p} for b, p in self.sim.pocketed()],
            "first_contact": self.sim.first_contact(CUE),
            "final_positions": {k: (None if v is None else [round(v[0], 4), round(v[1], 4)]) for k, v in final.items()},
        }


def make_clip(rng: np.random.Generator, *, width: int, height: int, fps: int, duration_s: float) -> Clip:
    """Simulate and render one billiards clip with scenario chosen by ``rng``."""
    n_frames = max(2, round(fps * duration_s))
    scenario = SCENARIOS[int(rng.integers(len(SCENARIOS)))]
    if scenario == "break":
        names, pos, vel = _break_setup(rng)
        sim = ph.simulate(names, pos, vel, fps=fps, n_frames=n_frames, strike_ball=CUE)
    else:
        sim = _aimed_shot(rng, want_pot=scenario == "pot", fps=fps, n_frames=n_frames)
        scenario = "pot" if any(b != CUE for b, _ in sim.pocketed()) else "miss"
    frames = render(sim, width=width, height=height)
    captions = describe(sim, scenario, rng)
    qa = questions(sim, scenario)
    return Clip(frames=frames, scenario=scenario, sim=sim, captions=captions, qa=qa)


# --------------------------------------------------------------------------------------------
# scenario set-up


def _break_setup(rng: np.random.Generator):
    colours = list(BALL_COLOURS)
    rng.shuffle(colours)
    r = ph.BALL_RADIUS * 1.001
    apex = np.array([1.45, 0.5])
    rack = []
    for row in range(RACK_ROWS):  # 1 + 2 + 3 = 6 balls, one of each colour
        for k in range(row + 1):
            rack.append(apex + [row * r * math.sqrt(3), (k - row / 2) * 2 * r])
    cue = np.array([0.45, 0.5 + rng.uniform(-0.08, 0.08)])
    aim = apex - cue
    angle = math.atan2(aim[1], aim[0]) + rng.uniform(-0.015, 0.015)
    speed = rng.uniform(3.0, 4.0)
    names = [CUE] + colours[:len(rack)]
    pos = np.vstack([cue] + rack)
    vel = np.zeros_like(pos)
    vel[0] = speed * np.array([math.cos(angle), math.sin(angle)])
    return names, pos, vel


def _random_spots(rng: np.random.Generator, k: int, margin: float = 0.15) -> np.ndarray:
    spots: list[np.ndarray] = []
    while len(spots) < k:
        p = np.array([rng.uniform(margin, ph.TABLE_LENGTH - margin), rng.uniform(margin, ph.TABLE_WIDTH - margin)])
        if all(np.linalg.norm(p - q) > 4 * ph.BALL_RADIUS for q in spots):
            spots.append(p)
    return np.array(spots)


def _aimed_shot(rng: np.random.Generator, *, want_pot: bool, fps: int, n_frames: int) -> ph.Simulation:
    """Set up a cut shot at a named pocket (a pot) or a deliberately mis-aimed one (a miss).

    Layouts are re-drawn until the simulation agrees with the intent (at most 50 tries); the
    last simulation is returned either way and the caller labels the clip from its events.
    """
    sim = None
    for _ in range(50):
        k = int(rng.integers(1, MAX_OBJECT_BALLS + 1))
        colours = list(rng.choice(list(BALL_COLOURS), size=k, replace=False))
        spots = _random_spots(rng, k)
        target = int(rng.integers(k))
        pocket_name = ph.POCKET_NAMES[int(rng.integers(len(ph.POCKET_NAMES)))]
        pocket = np.array(ph.POCKETS[pocket_name][:2])
        to_pocket = pocket - spots[target]
        to_pocket /= np.linalg.norm(to_pocket)
        ghost = spots[target] - 2 * ph.BALL_RADIUS * to_pocket
        # cue ball behind the ghost ball, cut angle under ~45 degrees
        cut = rng.uniform(-0.7, 0.7)
        back = -np.array([math.cos(cut) * to_pocket[0] - math.sin(cut) * to_pocket[1],
                          math.sin(cut) * to_pocket[0] + math.cos(cut) * to_pocket[1]])
        cue = ghost + back * rng.uniform(0.25, 0.6)
        edge = 1.5 * ph.BALL_RADIUS
        if not (edge < cue[0] < ph.TABLE_LENGTH - edge and edge < cue[1] < ph.TABLE_WIDTH - edge):
            continue
        if any(np.linalg.norm(cue - s) < 3 * ph.BALL_RADIUS for s in spots):
            continue
        aim = ghost - cue
        angle = math.atan2(aim[1], aim[0])
        if not want_pot:
            angle += rng.choice([-1, 1]) * rng.uniform(0.06, 0.15)
        speed = rng.uniform(1.4, 2.4)
        names = [CUE] + colours
        pos = np.vstack([cue, spots])
        vel = np.zeros_like(pos)
        vel[0] = speed * np.array([math.cos(angle), math.sin(angle)])
        sim = ph.simulate(names, pos, vel, fps=fps, n_frames=n_frames, strike_ball=CUE)
        potted = [b for b, _ in sim.pocketed() if b != CUE]
        hit = sim.first_contact(CUE)
        if want_pot and (colours[target], pocket_name) in sim.pocketed() and hit == colours[target]:
            return sim
        if not want_pot and not sim.pocketed() and hit is not None:
            return sim
        if not want_pot and potted:
            continue
    assert sim is not None
    return sim


# --------------------------------------------------------------------------------------------
# rendering


def render(sim: ph.Simulation, *, width: int, height: int) -> np.ndarray:
    """Draw every recorded frame top-down: rails, felt, pockets, balls. ``[F, H, W, 3]`` uint8."""
    scale = min((width - 4) / (ph.TABLE_LENGTH + 0.16), (height - 4) / (ph.TABLE_WIDTH + 0.16))
    ox = (width - ph.TABLE_LENGTH * scale) / 2
    oy = (height - ph.TABLE_WIDTH * scale) / 2
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    base = np.empty((height, width, 3), np.uint8)
    base[:] = RAIL_RGB
    felt = (xs >= ox) & (xs <= ox + ph.TABLE_LENGTH * scale) & (ys >= oy) & (ys <= oy + ph.TABLE_WIDTH * scale)
    base[felt] = FELT_RGB
    for px, py, rad in ph.POCKETS.values():
        cx, cy = ox + px * scale, oy + py * scale
        base[(xs - cx) ** 2 + (ys - cy) ** 2 <= (rad * 0.8 * scale) ** 2] = POCKET_RGB
    rgb = [CUE_RGB if n == CUE else BALL_COLOURS[n] for n in sim.names]
    r_px = max(1.6, ph.BALL_RADIUS * scale * 1.15)
    frames = np.empty((len(sim.positions), height, width, 3), np.uint8)
    for f, positions in enumerate(sim.positions):
        img = base.copy()
        for (bx, by), colour in zip(positions, rgb):
            if np.isnan(bx):
                continue
            cx, cy = ox + bx * scale, oy + by * scale
            x0, x1 = max(0, int(cx - r_px - 1)), min(width, int(cx + r_px + 2))
            y0, y1 = max(0, int(cy - r_px - 1)), min(height, int(cy + r_px + 2))
            m = (xs[y0:y1, x0:x1] - cx) ** 2 + (ys[y0:y1, x0:x1] - cy) ** 2 <= r_px**2
            img[y0:y1, x0:x1][m] = colour
        frames[f] = img
    return frames


# --------------------------------------------------------------------------------------------
# text from events


def region(xy: tuple[float, float]) -> str:
    """Coarse, human-readable table region of a point, e.g. ``"top left"`` or ``"centre"``."""
    x, y = xy
    col = "left" if x < ph.TABLE_LENGTH / 3 else ("right" if x > 2 * ph.TABLE_LENGTH / 3 else "middle")
    row = "top" if y < ph.TABLE_WIDTH / 3 else ("bottom" if y > 2 * ph.TABLE_WIDTH / 3 else "middle")
    if row == col == "middle":
        return "centre"
    if row == "middle":
        return f"{col} side"
    if col == "middle":
        return f"{row} middle"
    return f"{row} {col}"


REGIONS = ("top left", "top middle", "top right", "left side", "centre", "right side",
           "bottom left", "bottom middle", "bottom right")


def _colours_absent(sim: ph.Simulation) -> list[str]:
    return [c for c in BALL_COLOURS if c not in sim.names]


def describe(sim: ph.Simulation, scenario: str, rng: np.random.Generator) -> list[Caption]:
    """Captions, each about a different object, derived from the event log."""
    caps: list[Caption] = []
    pocketed = sim.pocketed()
    potted = [(b, p) for b, p in pocketed if b != CUE]
    final = sim.final_positions()
    hit = sim.first_contact(CUE)
    other_colours = [c for c in BALL_COLOURS if c != CUE]
    # The cue ball's caption says what it did and where it ended ("... and stops near the top left of the table"):
    # one caption per object, as the notes annotate, so a clip's captions name a colour or the break together with a
    # place instead of "The white cue ball stops near the centre of the table" repeating across a quarter of the clips.
    cue_pocket = dict(pocketed).get(CUE)
    if cue_pocket is not None:
        end, end_facts = f"falls into the {cue_pocket}", [Fact("pocket", cue_pocket,
                                                                [p for p in ph.POCKET_NAMES if p != cue_pocket])]
    elif final[CUE] is not None:
        where = region(final[CUE])
        end, end_facts = f"stops near the {where} of the table", [Fact("region", where, [r for r in REGIONS if r != where])]
    else:
        end, end_facts = None, []
    if scenario == "break":
        did, facts = "scatters the triangle of balls", [Fact("action", "scatters", ["misses"])]
    elif hit is not None:
        did = f"hits the {hit} ball"
        facts = [Fact("colour", hit, [c for c in other_colours if c != hit]), Fact("action", "hits", ["misses"])]
    else:
        did, facts = "misses every ball", [Fact("action", "misses every ball", ["hits the red ball"])]
    shortened = end is not None and (scenario == "break" or hit is not None)  # "misses every ball" has no short form
    caps.append(Caption(f"The white cue ball {did}" + (f" and {end}" if end else ""), "cue ball", facts + end_facts,
                        short=f"The white cue ball {did}" if shortened else None))
    for ball, pocket in potted[:3]:
        caps.append(Caption(f"The {ball} ball is knocked into the {pocket}", f"{ball} ball",
                            [Fact("colour", ball, [c for c in other_colours if c != ball]),
                             Fact("pocket", pocket, [p for p in ph.POCKET_NAMES if p != pocket]),
                             Fact("action", "is knocked into", ["misses"])],
                            short=f"The {ball} ball is knocked into a pocket"))
    if scenario == "miss" and hit is not None:
        caps.append(Caption(f"The {hit} ball misses the pocket", f"{hit} ball",
                            [Fact("colour", hit, [c for c in other_colours if c != hit]),
                             Fact("action", "misses", ["is knocked into"])],
                            short=f"The {hit} ball misses"))
    elif not potted:  # a miss says so in its own caption
        caps.append(Caption("No ball is pocketed", "pockets",
                            [Fact("action", "No ball is pocketed", ["A ball is pocketed"])]))
    still = [n for n in sim.names if n not in sim.touched() and final[n] is not None]
    if still:
        ball = still[int(rng.integers(len(still)))]
        where = region(final[ball])
        caps.append(Caption(f"The {ball} ball stays still near the {where} of the table", f"{ball} ball",
                            [Fact("colour", ball, [c for c in other_colours if c != ball and c not in still]),
                             Fact("action", "stays still", ["rolls"])],
                            short=f"The {ball} ball stays still"))
    return caps


def questions(sim: ph.Simulation, scenario: str) -> list[QAPair]:
    """Question-answer pairs with checkable answers (``answer_value`` is the fact asked for)."""
    qa: list[QAPair] = []
    potted = [(b, p) for b, p in sim.pocketed() if b != CUE]
    hit = sim.first_contact(CUE)
    if potted:
        ball, pocket = potted[0]
        if len(potted) == 1:
            # the research notes' reference answer to this question says the shot first: "The white cue ball hit
            # the red ball, and the red ball rolled into the pocket."
            if scenario == "break":
                answer = f"The triangle of balls was scattered, and the {ball} ball rolled into the pocket."
            elif hit is not None:
                answer = f"The white cue ball hit the {hit} ball, and the {ball} ball rolled into the pocket."
            else:
                answer = f"The {ball} ball was pocketed."
            qa.append(QAPair("What color ball was pocketed by the white cue ball?", answer, "pocketed_colour", ball))
        qa.append(QAPair(f"Which pocket did the {ball} ball go into?",
                         f"The {ball} ball went into the {pocket}.", "pocket", pocket))
    else:
        qa.append(QAPair("Was any ball pocketed?", "No, no ball was pocketed.", "any_pocketed", "no"))
    if hit is not None and scenario != "break":
        qa.append(QAPair("Which ball did the white cue ball hit first?",
                         f"The white cue ball hit the {hit} ball first.", "first_contact", hit))
    if scenario == "break":
        n = len(potted)
        word = ["No", "One", "Two", "Three", "Four", "Five", "Six"][min(n, 6)]
        qa.append(QAPair("How many balls were pocketed on the break?",
                         f"{word} {'ball was' if n == 1 else 'balls were'} pocketed on the break.",
                         "count_pocketed", str(n)))
    return qa
