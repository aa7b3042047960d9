"""Top-down 2D pool physics with an event log.

A deliberately simple simulator (no spin, no rolling/sliding distinction): balls decelerate at a
constant rate, bounce off cushions with restitution, collide elastically with each other and
drop into pockets when their centre comes within the pocket's capture radius. What matters for
the dataset is that every caption and QA answer can be derived from the *event log* the
simulation records, so facts are checkable.

Coordinates: the playing surface spans x in [0, TABLE_LENGTH] and y in [0, TABLE_WIDTH], with
y growing downwards (the same orientation as image rows), in metres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TABLE_LENGTH = 2.0
TABLE_WIDTH = 1.0
# Balls are drawn large relative to the table (a 2:1 table with balls of 6.5% of its width; a real pool ball is
# 2.2%): at the demo's 96-px model input a real-proportioned ball is ~1.5 px across, too small for a camera at
# that resolution to show its colour. Pockets scale with the balls.
BALL_RADIUS = 0.065
DECELERATION = 0.55  # m/s^2, rolling friction
CUSHION_RESTITUTION = 0.8
BALL_RESTITUTION = 0.95
CORNER_CAPTURE = 0.13
SIDE_CAPTURE = 0.115

# name -> (x, y, capture radius)
POCKETS: dict[str, tuple[float, float, float]] = {
    "top left corner pocket": (0.0, 0.0, CORNER_CAPTURE),
    "top side pocket": (TABLE_LENGTH / 2, -0.01, SIDE_CAPTURE),
    "top right corner pocket": (TABLE_LENGTH, 0.0, CORNER_CAPTURE),
    "bottom left corner pocket": (0.0, TABLE_WIDTH, CORNER_CAPTURE),
    "bottom side pocket": (TABLE_LENGTH / 2, TABLE_WIDTH + 0.01, SIDE_CAPTURE),
    "bottom right corner pocket": (TABLE_LENGTH, TABLE_WIDTH, CORNER_CAPTURE),
}
POCKET_NAMES = tuple(POCKETS)
CUSHION_NAMES = ("left cushion", "right cushion", "top cushion", "bottom cushion")


@dataclass
class Event:
    """One thing that happened in the simulation, at time ``t`` seconds."""

    t: float
    kind: str  # "strike" | "collision" | "cushion" | "pocket"
    ball: str
    other: str | None = None  # the other ball (collision), cushion or pocket name

    def to_dict(self) -> dict:
        return {"t": round(self.t, 4), "kind": self.kind, "ball": self.ball, "other": self.other}


@dataclass
class Simulation:
    """Result of a simulation: per-frame positions (NaN once pocketed) and the event log."""

    names: list[str]
    positions: np.ndarray  # [F, N, 2] metres, NaN for pocketed balls
    events: list[Event] = field(default_factory=list)

    def pocketed(self) -> list[tuple[str, str]]:
        """(ball, pocket) in the order they dropped."""
        return [(e.ball, e.other) for e in self.events if e.kind == "pocket"]

    def first_contact(self, ball: str) -> str | None:
        """The first ball that ``ball`` collided with, if any."""
        for e in self.events:
            if e.kind == "collision" and ball in (e.ball, e.other):
                return e.other if e.ball == ball else e.ball
        return None

    def touched(self) -> set[str]:
        """Balls that were struck or collided with anything."""
        out: set[str] = set()
        for e in self.events:
            if e.kind in ("strike", "collision"):
                out.add(e.ball)
                if e.kind == "collision":
                    out.add(e.other)
        return out

    def final_positions(self) -> dict[str, tuple[float, float] | None]:
        last = self.positions[-1]
        return {
            n: (None if np.isnan(last[i, 0]) else (float(last[i, 0]), float(last[i, 1])))
            for i, n in enumerate(self.names)
        }


def simulate(
    names: list[str],
    positions: np.ndarray,
    velocities: np.ndarray,
    *,
    fps: int,
    n_frames: int,
    substeps_per_second: int = 600,
    strike_ball: str | None = None,
) -> Simulation:
    """Integrate ball motion and record positions at ``fps`` for ``n_frames`` frames.

    Args:
        names: ball names, ``[N]``.
        positions: initial centres ``[N, 2]`` in metres.
        velocities: initial velocities ``[N, 2]`` in m/s.
        fps: output frame rate.
        n_frames: number of frames to record (frame 0 is the initial state).
        substeps_per_second: integration rate; high enough that no ball moves more than a
            fraction of its radius per substep at break speed.
        strike_ball: ball that receives the cue strike at t=0 (logged as a ``strike`` event).
    """
    pos = np.asarray(positions, dtype=np.float64).copy()
    vel = np.asarray(velocities, dtype=np.float64).copy()
    n = len(names)
    alive = np.ones(n, dtype=bool)
    events: list[Event] = []
    if strike_ball is not None:
        events.append(Event(0.0, "strike", strike_ball))
    substeps = max(1, round(substeps_per_second / fps))
    dt = 1.0 / (fps * substeps)
    frames = np.full((n_frames, n, 2), np.nan)
    frames[0] = pos
    touching = np.zeros((n, n), dtype=bool)  # pairs currently in contact (log each contact once)
    t = 0.0
    quiet = 0  # coming substeps in which no ball can reach a pocket, a cushion or another ball
    for frame in range(1, n_frames):
        for _ in range(substeps):
            t += dt
            if not alive.any():
                break
            speed = _norm(vel, 1)
            moving = alive & (speed > 1e-9)
            if not moving.any():
                break
            # friction: constant deceleration, never reversing direction
            new_speed = np.maximum(speed - DECELERATION * dt, 0.0)
            scale = np.divide(new_speed, speed, out=np.zeros_like(speed), where=speed > 0)
            vel *= scale[:, None]
            pos += vel * dt  # a pocketed ball's velocity is 0, so only the live balls move
            if quiet:  # the three checks below would find nothing and change nothing
                quiet -= 1
                continue
            _pockets(names, pos, vel, alive, _POCKET_XY, _POCKET_R, t, events)
            _cushions(names, pos, vel, alive, t, events)
            _collisions(names, pos, vel, alive, touching, t, events)
            quiet = _quiet_substeps(pos, vel, alive, touching, _POCKET_XY, _POCKET_R, dt)
        frames[frame] = np.where(alive[:, None], pos, np.nan)
    return Simulation(names=list(names), positions=frames, events=events)


_POCKET_XY = np.array([[p[0], p[1]] for p in POCKETS.values()])  # [6, 2] pocket centres
_POCKET_R = np.array([p[2] for p in POCKETS.values()])  # [6] capture radii
_MARGIN = 1e-7  # metres: far above the rounding of a few thousand position updates, far below any distance that matters


def _quiet_substeps(pos, vel, alive, touching, pocket_xy, pocket_r, dt) -> int:
    """How many of the next substeps certainly leave ``_pockets``, ``_cushions`` and ``_collisions`` with nothing to
    do, so the simulation can skip them there and stay bit for bit the same: between events only friction acts, so
    no ball travels more than its current speed times ``dt`` per substep, and each check's distance (to a pocket, a
    cushion, another ball) can shrink by at most that. A contact not yet separated (``touching``) or a pair already
    overlapping gives 0. Most substeps of a shot are quiet; the three checks are most of a substep's cost."""
    idx = np.flatnonzero(alive)
    p, step = pos[idx], _norm(vel[idx], 1) * dt  # [n, 2], [n]: the most a ball moves per substep
    moving = step > 0

    def steps(gap: np.ndarray, closing: np.ndarray, still_ok: np.ndarray) -> float:
        """Substeps until ``gap`` (metres of room) can close at ``closing`` per substep; where nothing closes, room
        forever if ``still_ok``, none otherwise."""
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.where(closing > 0, np.floor((gap - _MARGIN) / closing), np.where(still_ok, np.inf, -1.0))
        return float(n.min(initial=np.inf))

    d = _norm(p[:, None, :] - pocket_xy[None], 2)  # [n, 6]
    bound = steps(d - pocket_r[None], np.broadcast_to(step[:, None], d.shape), d >= pocket_r[None])
    # a still ball is never due at a cushion (it needs velocity into it); a moving one needs room on both sides
    room = np.concatenate([p - BALL_RADIUS, _CUSHION_LIMITS - p], axis=1)  # [n, 4]
    bound = min(bound, steps(room[moving], np.broadcast_to(step[moving, None], room[moving].shape),
                             np.ones(room[moving].shape, bool)))
    if idx.size >= 2:
        if touching[np.ix_(idx, idx)].any():
            return 0
        iu, ju = np.triu_indices(idx.size, k=1)
        dist = _norm(p[iu] - p[ju], 1)
        bound = min(bound, steps(dist - 2 * BALL_RADIUS, step[iu] + step[ju], dist >= 2 * BALL_RADIUS))
    return int(max(0.0, min(bound, 1e9)))


def _norm(x: np.ndarray, axis: int) -> np.ndarray:
    """``np.linalg.norm(x, axis=axis)`` for real ``x``, bit for bit (its own formula), without its per-call checks:
    the simulation calls it three times per substep on a handful of balls, where those checks cost more than the
    arithmetic."""
    return np.sqrt(np.add.reduce(x * x, axis=axis))


def _pockets(names, pos, vel, alive, pocket_xy, pocket_r, t, events) -> None:
    idx = np.flatnonzero(alive)
    if idx.size == 0:
        return
    d = _norm(pos[idx, None, :] - pocket_xy[None], 2)  # [n_alive, 6]
    hit = d < pocket_r[None]
    for row in np.flatnonzero(hit.any(axis=1)):
        i, p = idx[row], int(np.argmin(d[row]))
        alive[i] = False
        vel[i] = 0.0
        events.append(Event(t, "pocket", names[i], POCKET_NAMES[p]))


_CUSHIONS = ((0, "left cushion", "right cushion", TABLE_LENGTH), (1, "top cushion", "bottom cushion", TABLE_WIDTH))
_CUSHION_LIMITS = np.array([TABLE_LENGTH - BALL_RADIUS, TABLE_WIDTH - BALL_RADIUS])


def _cushions(names, pos, vel, alive, t, events) -> None:
    r = BALL_RADIUS
    idx = np.flatnonzero(alive)
    p, v = pos[idx], vel[idx]
    # the balls and axes that reach a cushion this substep, ball by ball then x before y (the event order); an axis
    # update never changes the other axis's test, so testing all first is the same as testing each in turn
    due = ((p < r) & (v < 0)) | ((p > _CUSHION_LIMITS) & (v > 0))
    for row, axis in zip(*np.nonzero(due)):
        i, (_, lo_name, hi_name, hi) = idx[row], _CUSHIONS[axis]
        if pos[i, axis] < r:  # and moving into it (due)
            pos[i, axis] = 2 * r - pos[i, axis]
            vel[i, axis] = -CUSHION_RESTITUTION * vel[i, axis]
            events.append(Event(t, "cushion", names[i], lo_name))
        else:
            pos[i, axis] = 2 * (hi - r) - pos[i, axis]
            vel[i, axis] = -CUSHION_RESTITUTION * vel[i, axis]
            events.append(Event(t, "cushion", names[i], hi_name))


def _collisions(names, pos, vel, alive, touching, t, events) -> None:
    idx = np.flatnonzero(alive)
    if idx.size < 2:
        return
    p = pos[idx]
    diff = p[:, None, :] - p[None, :, :]
    dist = _norm(diff, 2)
    # forget contacts that separated
    if touching.any():
        separated = touching[idx][:, idx] & ~(dist < 2 * BALL_RADIUS * 1.02)
        for a, b in zip(*np.nonzero(separated)):
            touching[idx[a], idx[b]] = False
    rows, cols = np.nonzero(dist < 2 * BALL_RADIUS)
    upper = rows < cols  # each pair once, in row-major order (as np.triu(..., k=1) then np.nonzero)
    for a, b in zip(rows[upper], cols[upper]):
        i, j = idx[a], idx[b]
        normal = pos[j] - pos[i]
        d = np.linalg.norm(normal)
        if d < 1e-12:
            continue
        normal /= d
        rel = np.dot(vel[i] - vel[j], normal)
        if rel > 0:  # approaching: equal-mass collision along the line of centres
            # the ball moving into the other is named first, so "white hit red" reads naturally
            striker_first = np.dot(vel[i], normal) >= np.dot(vel[j], -normal)
            impulse = 0.5 * (1 + BALL_RESTITUTION) * rel
            vel[i] -= impulse * normal
            vel[j] += impulse * normal
            if not touching[i, j]:
                touching[i, j] = touching[j, i] = True
                first, second = (i, j) if striker_first else (j, i)
                events.append(Event(t, "collision", names[first], names[second]))
        # push apart so balls never overlap
        overlap = 2 * BALL_RADIUS - d
        if overlap > 0:
            pos[i] -= 0.5 * overlap * normal
            pos[j] += 0.5 * overlap * normal
