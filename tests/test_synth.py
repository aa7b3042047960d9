"""Generator invariants: physics, text/event agreement, hard negatives, determinism, real MP4s."""

from __future__ import annotations

import json
import re

import decord
import numpy as np
import pytest

from hilight.data.synth import billiards, generate_dataset
from hilight.data.synth import physics as ph
from hilight.data.synth.text import Caption, Fact, hard_negatives


def _clips(n: int, seed: int = 11):
    for i in range(n):
        yield billiards.make_clip(np.random.default_rng([seed, i]), width=64, height=48, fps=10, duration_s=3.0)


def test_balls_stay_on_table_unless_pocketed():
    r = ph.BALL_RADIUS
    for clip in _clips(40):
        pos = clip.sim.positions
        alive = ~np.isnan(pos[..., 0])
        x, y = pos[..., 0][alive], pos[..., 1][alive]
        # a ball may overshoot by at most one integration substep before the cushion reflects it
        assert x.min() >= r - 0.02 and x.max() <= ph.TABLE_LENGTH - r + 0.02
        assert y.min() >= r - 0.02 and y.max() <= ph.TABLE_WIDTH - r + 0.02
        # a ball disappears exactly when a pocket event names it, and never comes back
        gone = {clip.sim.names[i] for i in range(len(clip.sim.names)) if np.isnan(pos[-1, i, 0])}
        assert gone == {b for b, _ in clip.sim.pocketed()}
        for i in range(pos.shape[1]):
            col = np.isnan(pos[:, i, 0])
            assert not np.any(col[:-1] & ~col[1:]), "a pocketed ball reappeared"


def test_scenarios_cover_break_pot_and_miss():
    seen = {clip.scenario for clip in _clips(30)}
    assert seen == {"break", "pot", "miss"}


def test_ball_collision_conserves_momentum_along_line_of_centres():
    sim = ph.simulate(["white", "red"], np.array([[0.5, 0.5], [1.0, 0.5]]), np.array([[2.0, 0.0], [0.0, 0.0]]),
                      fps=50, n_frames=40, strike_ball="white")
    assert sim.first_contact("white") == "red"
    last = sim.positions[-1]
    assert last[1, 0] > 1.1 and last[0, 0] < last[1, 0]  # red was driven forward past the cue ball


def test_the_simulations_norm_is_numpys_bit_for_bit():
    # the speed-up must not change a single clip's bytes: same seed, same dataset, before and after it
    x = np.random.default_rng(0).normal(size=(16, 6, 2)) * np.logspace(-6, 2, 16)[:, None, None]
    for axis in (1, 2):
        assert np.array_equal(ph._norm(x, axis), np.linalg.norm(x, axis=axis))


def test_skipping_quiet_substeps_changes_no_clip(monkeypatch):
    # the simulation skips the pocket/cushion/collision checks on substeps where no ball can reach anything; with
    # every substep checked (the skip disabled) each clip's frames and event log must be the same, bit for bit
    fast = [(c.frames, c.metadata()) for c in _clips(24)]
    monkeypatch.setattr(ph, "_quiet_substeps", lambda *args: 0)
    slow = [(c.frames, c.metadata()) for c in _clips(24)]
    assert {c[1]["scenario"] for c in slow} == {"break", "pot", "miss"}
    for (f_fast, m_fast), (f_slow, m_slow) in zip(fast, slow):
        assert np.array_equal(f_fast, f_slow) and m_fast == m_slow


def test_quiet_substeps_stop_before_a_ball_can_reach_anything():
    r, dt = ph.BALL_RADIUS, 1 / 600
    alive, touching = np.ones(2, bool), np.zeros((2, 2), bool)

    def quiet(pos, vel, touching=touching):
        return ph._quiet_substeps(np.array(pos, float), np.array(vel, float), alive, touching, ph._POCKET_XY,
                                  ph._POCKET_R, dt)

    # white at 1 m/s towards a still red 0.5 m away (0.37 m of room): at most 0.37 / (1/600) = 222 quiet substeps
    assert quiet([[0.5, 0.5], [1.0, 0.5]], [[1.0, 0.0], [0.0, 0.0]]) == 221
    assert quiet([[0.5, 0.5], [1.0, 0.5]], [[0.0, 0.0], [0.0, 0.0]]) > 10**6  # nothing moves: nothing can happen
    assert quiet([[0.5, 0.5], [0.5 + 1.9 * r, 0.5]], [[0.0, 0.0], [0.0, 0.0]]) == 0  # an overlap to push apart
    assert quiet([[0.5, 0.5], [1.0, 0.5]], [[1.0, 0.0], [0.0, 0.0]], touching=~np.eye(2, dtype=bool)) == 0
    assert quiet([[r + 0.01, 0.5], [1.0, 0.2]], [[-1.0, 0.0], [0.0, 0.0]]) == 5  # 0.01 m from the left cushion


def test_cushions_reflect_each_ball_moving_into_one_in_event_order():
    r = ph.BALL_RADIUS
    pos = np.array([[r / 2, 0.5], [ph.TABLE_LENGTH - r / 2, ph.TABLE_WIDTH - r / 3], [r / 2, 0.5], [1.0, 0.5]])
    vel = np.array([[-1.0, 0.0], [1.0, 2.0], [1.0, 0.0], [0.0, 0.0]])  # ball 2 leaves the cushion: no bounce
    events = []
    ph._cushions(["a", "b", "c", "d"], pos, vel, np.ones(4, bool), 0.0, events)
    assert [(e.ball, e.other) for e in events] == [("a", "left cushion"), ("b", "right cushion"), ("b", "bottom cushion")]
    assert pos[0, 0] == pytest.approx(1.5 * r) and vel[0, 0] == pytest.approx(ph.CUSHION_RESTITUTION)
    assert vel[1].tolist() == pytest.approx([-ph.CUSHION_RESTITUTION, -2 * ph.CUSHION_RESTITUTION])
    assert pos[2].tolist() == [r / 2, 0.5] and vel[2].tolist() == [1.0, 0.0]


def test_captions_and_answers_agree_with_event_log():
    for clip in _clips(40):
        pocketed = [(b, p) for b, p in clip.sim.pocketed() if b != "white"]
        hit = clip.sim.first_contact("white")
        texts = [c.text for c in clip.captions]
        for t in texts:
            if m := re.fullmatch(r"The (\w+) ball is knocked into the (.+)", t):
                assert (m.group(1), m.group(2)) in pocketed
            if m := re.fullmatch(r"The white cue ball (?:hits the (\w+) ball|scatters the triangle of balls|misses every "
                                 r"ball) and (?:stops near the (.+) of the table|falls into the (.+))", t):
                if m.group(1):
                    assert m.group(1) == hit and clip.scenario != "break"
                assert ("scatters" in t) == (clip.scenario == "break")
                end = clip.sim.final_positions()["white"]
                assert m.group(2) == (None if end is None else billiards.region(end))
                assert m.group(3) == dict(clip.sim.pocketed()).get("white")
            if m := re.fullmatch(r"The (\w+) ball stays still near the .+", t):
                assert m.group(1) not in clip.sim.touched()
        # "No ball is pocketed" unless a miss caption already says so
        assert ("No ball is pocketed" in texts) == (not pocketed and not (clip.scenario == "miss" and hit is not None))
        assert len({c.object for c in clip.captions}) == len(clip.captions), "each caption is about a different object"
        assert sum(t.startswith("The white cue ball") for t in texts) == 1, "one caption says what the cue ball did"
        for qa in clip.qa:
            if qa.kind == "pocketed_colour":
                assert [b for b, _ in pocketed] == [qa.answer_value]
                assert qa.answer.endswith(f"the {qa.answer_value} ball rolled into the pocket.")
                assert (f"hit the {hit} ball" in qa.answer) == (clip.scenario != "break")
            elif qa.kind == "pocket":
                assert qa.answer_value == pocketed[0][1]
            elif qa.kind == "first_contact":
                assert qa.answer_value == hit
            elif qa.kind == "count_pocketed":
                assert int(qa.answer_value) == len(pocketed)
            elif qa.kind == "any_pocketed":
                assert qa.answer_value == "no" and not pocketed
            assert qa.answer_value.split()[0].lower() in qa.answer.lower() or qa.kind == "count_pocketed"


def test_hard_negative_changes_exactly_one_fact():
    cap = Caption("The red ball is knocked into the top left corner pocket", "red ball",
                  [Fact("colour", "red", ["blue"]), Fact("pocket", "top left corner pocket", ["bottom side pocket"]),
                   Fact("action", "is knocked into", ["misses"])])
    negs = hard_negatives(cap, np.random.default_rng(0))
    assert [n["negative"] for n in negs] == [
        "The blue ball is knocked into the top left corner pocket",
        "The red ball is knocked into the bottom side pocket",
        "The red ball misses the top left corner pocket",
    ]
    # a fact that is not literally in the sentence (or is ambiguous) yields no negative
    assert hard_negatives(Caption("The triangle is scattered", "rack", [Fact("colour", "red", ["blue"])]),
                          np.random.default_rng(0)) == []


def test_dataset_files_and_videos(billiards_dir, tiny_settings):
    caps = json.loads((billiards_dir / "captions.json").read_text())
    qa = json.loads((billiards_dir / "qa.json").read_text())
    negs = json.loads((billiards_dir / "negatives.json").read_text())
    assert len(caps) == len(qa) == 24
    assert all(len(r["captions"]) >= 2 for r in caps)  # the cue ball, and what happened to an object ball or the pockets
    assert {n["changed"] for n in negs} >= {"colour", "pocket", "action"}
    assert all(n["negative"] != n["caption"] and n["from"] != n["to"] for n in negs)
    for rec in qa:
        turns = rec["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert sum(t["value"].count("<video>") for t in turns) == 1 and "<video>" in turns[0]["value"]
    vr = decord.VideoReader(str(billiards_dir / "videos" / caps[0]["video"]))
    assert len(vr) == round(tiny_settings.fps * tiny_settings.duration_s)
    assert vr[0].shape == (tiny_settings.height, tiny_settings.width, 3)
    assert abs(vr.get_avg_fps() - tiny_settings.fps) < 1e-6


@pytest.mark.parametrize("domain_dir", ["billiards_dir", "general_dir"])
def test_probe_pairs_are_short_true_vs_long_wrong(domain_dir, request):
    root = request.getfixturevalue(domain_dir)
    probes = json.loads((root / "probes.json").read_text())
    negs = {(n["video_id"], n["caption_index"], n["negative"]): n for n in json.loads((root / "negatives.json").read_text())}
    caps = {r["video_id"]: [c["caption"] for c in r["captions"]] for r in json.loads((root / "captions.json").read_text())}
    assert len(probes) >= 10
    for p in probes:
        neg = negs[(p["video_id"], p["caption_index"], p["long"])]  # the long side is a hard negative of that caption
        assert neg["caption"] == caps[p["video_id"]][p["caption_index"]] and p["changed"] == neg["changed"]
        assert len(p["short"].split()) < len(p["long"].split())
        assert not re.search(rf"\b{re.escape(neg['to'])}\b", p["short"])  # the wrong value is not in the short one
        assert re.search(rf"\b{re.escape(neg['from'])}\b", neg["caption"])


def test_rendered_cue_ball_is_where_the_simulation_says():
    clip = next(_clips(1, seed=5))
    frame = clip.frames[0].astype(int)
    x, y = clip.sim.positions[0, clip.sim.names.index("white")]
    h, w = frame.shape[:2]
    scale = min((w - 4) / (ph.TABLE_LENGTH + 0.16), (h - 4) / (ph.TABLE_WIDTH + 0.16))
    px = int((w - ph.TABLE_LENGTH * scale) / 2 + x * scale)
    py = int((h - ph.TABLE_WIDTH * scale) / 2 + y * scale)
    assert frame[py, px].min() > 200  # white


def test_same_seed_same_bytes_different_seed_different(tmp_path, tiny_settings):
    a = generate_dataset(tmp_path / "a", n_videos=3, seed=7, settings=tiny_settings, progress=False)
    b = generate_dataset(tmp_path / "b", n_videos=3, seed=7, settings=tiny_settings, workers=2, progress=False)
    c = generate_dataset(tmp_path / "c", n_videos=3, seed=8, settings=tiny_settings, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    for rel in files:
        if rel.name.startswith("bil7"):
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "captions.json").read_text() == (b / "captions.json").read_text()
    assert (a / "captions.json").read_text() != (c / "captions.json").read_text()


def test_a_clip_encodes_to_the_same_bytes_whatever_the_heap_holds(tmp_path):
    """Demo clip 273 (160x96): with x264's macroblock tree, its file changed with the allocations made between
    encodes (16 different files from 40), so two syntheses of one seed differed in a few clips."""
    from hilight.data.synth import DOMAINS, SynthSettings
    from hilight.data.synth.video import write_mp4

    s = SynthSettings()
    clip = billiards.make_clip(np.random.default_rng([0, DOMAINS["billiards"], 273]), width=s.width,
                               height=s.height, fps=s.fps, duration_s=s.duration_s)
    junk, files = np.random.default_rng(1), set()
    for i in range(12):
        held = [junk.integers(0, 255, int(junk.integers(1000, 200_000)), dtype=np.uint8) for _ in range(20)]
        write_mp4(tmp_path / f"{i}.mp4", clip.frames, s.fps)
        del held
        files.add((tmp_path / f"{i}.mp4").read_bytes())
    assert len(files) == 1


def test_fixed_heldout_keeps_clips_and_evaluation_set(tmp_path, tiny_settings):
    """heldout=N: the first N clips are val/test alternately, the rest train; the clips' bytes are those of the
    default split, so growing the training set leaves the evaluation set as it was."""
    drawn = generate_dataset(tmp_path / "drawn", n_videos=6, seed=7, settings=tiny_settings, progress=False)
    small = generate_dataset(tmp_path / "small", n_videos=4, seed=7, settings=tiny_settings, progress=False, heldout=2)
    large = generate_dataset(tmp_path / "large", n_videos=6, seed=7, settings=tiny_settings, progress=False, heldout=2)
    splits = {r["video_id"]: r["split"] for r in json.loads((large / "captions.json").read_text())}
    assert list(splits.values()) == ["val", "test", "train", "train", "train", "train"]
    assert [e["split"] for e in json.loads((large / "events.json").read_text())] == list(splits.values())
    held = [v for v, s in splits.items() if s != "train"]
    assert held == [r["video_id"] for r in json.loads((small / "captions.json").read_text()) if r["split"] != "train"]
    for vid in splits:
        assert (large / "videos" / f"{vid}.mp4").read_bytes() == (drawn / "videos" / f"{vid}.mp4").read_bytes()
    assert json.loads((large / "dataset.json").read_text())["heldout"] == 2
    with pytest.raises(ValueError, match=r"heldout 3 leaves no training clips of 3 videos; pass a heldout \(--heldout\) "
                                         r"in \[0, 3\) or more videos"):
        generate_dataset(tmp_path / "bad", n_videos=3, heldout=3, progress=False)


def test_eval_clips_are_the_same_whatever_the_training_set(tmp_path, tiny_settings, monkeypatch):
    """eval_clips=M: M more clips of split "eval", the same clips (ids and bytes) however many other clips there are;
    the other clips are those the call without eval_clips writes."""
    from hilight.data import synth

    small = generate_dataset(tmp_path / "small", n_videos=3, seed=7, settings=tiny_settings, progress=False,
                             heldout=1, eval_clips=2)
    large = generate_dataset(tmp_path / "large", n_videos=5, seed=7, settings=tiny_settings, progress=False,
                             heldout=1, eval_clips=2)
    plain = generate_dataset(tmp_path / "plain", n_videos=5, seed=7, settings=tiny_settings, progress=False, heldout=1)

    def splits(d):
        return {r["video_id"]: r["split"] for r in json.loads((d / "captions.json").read_text())}

    evals = [v for v, s in splits(large).items() if s == "eval"]
    assert evals == ["bil7_50000", "bil7_50001"] == [v for v, s in splits(small).items() if s == "eval"]
    assert {v: s for v, s in splits(large).items() if s != "eval"} == splits(plain)
    assert [e["split"] for e in json.loads((large / "events.json").read_text())] == list(splits(large).values())
    assert len(json.loads((large / "qa.json").read_text())) == 7
    for vid in evals:
        assert (large / "videos" / f"{vid}.mp4").read_bytes() == (small / "videos" / f"{vid}.mp4").read_bytes()
    assert json.loads((large / "dataset.json").read_text())["eval_clips"] == 2
    monkeypatch.setattr(synth, "EVAL_OFFSET", 4)
    with pytest.raises(ValueError, match="n_videos 5 reaches the eval clips' indices"):
        generate_dataset(tmp_path / "bad", n_videos=5, eval_clips=1, progress=False)
    # without eval clips, clips past EVAL_OFFSET are ordinary clips
    many = generate_dataset(tmp_path / "many", n_videos=5, seed=7, settings=tiny_settings, progress=False, heldout=1)
    assert splits(many) == splits(plain)


def test_general_domain(general_dir):
    caps = json.loads((general_dir / "captions.json").read_text())
    meta = {e["video_id"]: e for e in json.loads((general_dir / "events.json").read_text())}
    for rec in caps:
        movers = meta[rec["video_id"]]["movers"]
        for m in movers:
            assert any(c["caption"].endswith(f"{m['colour']} {m['shape']} moves {m['direction']}") for c in rec["captions"])


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown domain"):
        generate_dataset("unused", domain="tennis", n_videos=1)
    from hilight.data.synth import SynthSettings

    with pytest.raises(ValueError, match="multiple of 2"):
        SynthSettings(width=63)
