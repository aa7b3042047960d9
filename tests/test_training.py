"""Training loop, alignment job, sampler, tokenizer and tracker: behaviour with numbers, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hilight.data.samplers import CaptionBatchSampler
from hilight.eval.retrieval import retrieval_metrics
from hilight.tracking import ResilientTracker
from hilight.train.checkpoint import list_checkpoints, save_checkpoint
from hilight.train.loop import NonFiniteLossError, TrainSettings, fit
from tests.conftest import alignment_config


# ---------------------------------------------------------------------------------------------- a toy task


class ToyData(torch.utils.data.Dataset):
    """y = x @ w_true; ``bad`` steps return NaN inputs."""

    def __init__(self, n=64, bad_rows=()):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.bad = set(bad_rows)
        self.epoch = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i].clone()
        if i in self.bad:
            x[0] = float("nan")
        return x, self.y[i]

    def collate(self, items):
        return {"x": torch.stack([a for a, _ in items]), "y": torch.stack([b for _, b in items])}


def toy_objective(model, batch):
    loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])
    return {"loss": loss, "mse_loss": loss}


def toy_fit(tmp_path, data, **kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    settings = TrainSettings(**{"max_steps": 20, "batch_size": 8, "lr": 0.3, "weight_decay": 0.0, "ckpt_every": 5,
                                "val_every": 5, "progress": False, "select_metric": "val/mse", "select_mode": "min", **kw})
    sampler = CaptionBatchSampler(np.arange(len(data)), 8, mode="random", seed=1)
    evaluate = lambda m: {"val/mse": toy_objective(m, data.collate([data[i] for i in range(8)]))["loss"].item()}  # noqa: E731
    return model, fit(model, toy_objective, data, sampler, settings, tmp_path, evaluate=evaluate)


def test_fit_learns_and_checkpoints(tmp_path):
    model, result = toy_fit(tmp_path, ToyData())
    assert result.history[-1]["val/mse"] < 0.1 * result.history[0]["val/mse"] or result.history[-1]["val/mse"] < 1e-2
    steps = [s for s, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert steps[-1] == 20 and len(steps) <= 3  # keep_last=2 plus the protected best
    ckpt = result.final_checkpoint
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.pt", "rng.safetensors",
                                                "trainer_state.json", "config.json"}
    torch.testing.assert_close(load_file(ckpt / "model.safetensors")["weight"], model.weight.detach())
    assert result.best_metric == min(h["val/mse"] for h in result.history)


def test_select_mode_picks_the_checkpoint_and_a_missing_metric_is_an_error(tmp_path):
    # max on an MSE that falls: the first validation is "best"; last: the final step is, whatever its value
    _, worst = toy_fit(tmp_path / "max", ToyData(), select_mode="max")
    _, last = toy_fit(tmp_path / "last", ToyData(), select_mode="last")
    assert worst.best_step == 5 and worst.best_metric == max(h["val/mse"] for h in worst.history)
    assert last.best_step == last.step == 20 and last.best_metric == last.history[-1]["val/mse"]
    assert last.best_checkpoint == last.final_checkpoint and worst.best_checkpoint != worst.final_checkpoint
    with pytest.raises(ValueError, match=r"'val/mae' is not among this stage's validation metrics \['val/mse'\]"):
        toy_fit(tmp_path / "typo", ToyData(), select_metric="val/mae")


class TwoPart(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_lr_scale_trains_a_prefix_at_its_factor_of_the_rate(tmp_path):
    """One AdamW step moves every element by about lr (m / sqrt(v) = sign(g) at step 1), so with {head: 4} the head's
    elements move 4x as far as the body's."""
    data = ToyData()
    sampler = CaptionBatchSampler(np.arange(len(data)), 8, mode="random", seed=1)
    settings = TrainSettings(max_steps=1, batch_size=8, lr=1e-3, weight_decay=0.0, progress=False, eps=1e-12,
                             max_grad_norm=None, lr_scale={"head": 4.0})
    torch.manual_seed(0)
    model = TwoPart()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, toy_objective, data, sampler, settings, tmp_path)
    step = {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}
    for name, moved in step.items():
        torch.testing.assert_close(moved, torch.full_like(moved, 4e-3 if name.startswith("head.") else 1e-3),
                                   rtol=1e-3, atol=0)

    with pytest.raises(ValueError, match=r"lr_scale prefix\(es\) \['heads'\] match no trained parameter.*'body.weight'"):
        fit(TwoPart(), toy_objective, data, sampler, settings.model_copy(update={"lr_scale": {"heads": 4.0}}),
            tmp_path / "typo")
    with pytest.raises(ValueError, match=r"lr_scale \{'head': 0.0\}: every factor must be positive"):
        TrainSettings(max_steps=1, lr_scale={"head": 0.0})


def test_keep_every_keeps_those_checkpoints_and_changes_nothing_else(tmp_path):
    model, result = toy_fit(tmp_path / "a", ToyData(), ckpt_every=2, keep_every=4, val_every=100)
    kept = [s for s, _ in list_checkpoints(tmp_path / "a" / "checkpoints")]
    assert kept == [4, 8, 12, 16, 18, 20]  # multiples of 4, plus the last two (keep_last=2)
    plain, _ = toy_fit(tmp_path / "b", ToyData(), ckpt_every=2, val_every=100)
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [18, 20]
    torch.testing.assert_close(model.weight, plain.weight, rtol=0, atol=0)  # the same training, bit for bit


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    data = ToyData(bad_rows={20})  # one bad row: only the batches holding it are skipped
    _, result = toy_fit(tmp_path, data)
    assert 1 <= result.skipped_steps < 20
    assert result.history[-1]["val/mse"] < 0.5 * result.history[0]["val/mse"]


def test_run_stops_after_too_many_nonfinite_steps(tmp_path):
    data = ToyData(bad_rows=set(range(64)))
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        toy_fit(tmp_path, data, max_nonfinite_in_row=3)


def test_in_process_resume_equals_uninterrupted(tmp_path):
    full_model, _ = toy_fit(tmp_path / "a", ToyData())
    toy_fit(tmp_path / "b", ToyData(), keep_last=10)
    # cut run b back to step 10 as if it had been killed there, then resume
    for step, path in list_checkpoints(tmp_path / "b" / "checkpoints"):
        if step > 10:
            import shutil
            shutil.rmtree(path)
    assert list_checkpoints(tmp_path / "b" / "checkpoints")[-1][0] == 10
    resumed_model, result = toy_fit(tmp_path / "b", ToyData(), keep_last=10)
    assert result.resumed_from == 10
    torch.testing.assert_close(resumed_model.weight, full_model.weight, rtol=0, atol=0)


def test_half_written_checkpoint_is_ignored(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 4, model_state=model.state_dict(), optimizer=opt, trainer_state={}, config={})
    (root / ".tmp-step-00000006-123").mkdir()  # a kill during a write leaves only this
    (root / "step-00000008").mkdir()  # or a directory without its state file
    assert [s for s, _ in list_checkpoints(root)] == [4]


# ---------------------------------------------------------------------------------------------- pieces


def test_grouped_sampler_draws_captions_of_a_video_together_and_resumes():
    groups = np.repeat(np.arange(10), 4)  # 10 videos x 4 captions
    s = CaptionBatchSampler(groups, 4, mode="grouped", seed=3)
    batches = list(s)
    assert all(len(set(groups[b])) == 1 for b in batches)  # each batch is one video's captions
    assert sorted(i for b in batches for i in b) == list(range(40))
    s.set_epoch(0, skip=3)
    assert list(s) == batches[3:]
    s.set_epoch(1)
    assert list(s) != batches
    r = CaptionBatchSampler(groups, 4, mode="random", seed=3)
    assert np.mean([len(set(groups[b])) for b in r]) > 2


def test_retrieval_metrics_known_answers():
    sim = torch.tensor([[0.9, 0.1, 0.0],   # caption 0 -> video 0: rank 1
                        [0.8, 0.5, 0.1],   # caption 1 -> video 1: rank 2
                        [0.1, 0.2, 0.3],   # caption 2 -> video 2: rank 1
                        [0.3, 0.2, 0.1]])  # caption 3 -> video 2: rank 3
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2, 2]), ks=(1, 2))
    assert m["t2v_r1"] == pytest.approx(0.5) and m["t2v_r2"] == pytest.approx(0.75)
    assert m["t2v_median_rank"] == 1.0  # torch's lower median of [1, 1, 2, 3]
    # each video's best own caption outscores every other caption in its column
    assert m["v2t_r1"] == pytest.approx(1.0)


def test_tokenizer_is_built_offline_and_deterministic(tmp_path):
    from hilight.models.tokenizers import build_clip_tokenizer, load_clip_tokenizer

    texts = ["The white cue ball hits the red ball", "A blue circle moves left", "No ball is pocketed"] * 5
    a = build_clip_tokenizer(texts, tmp_path / "a", vocab_size=1024, max_length=12)
    b = build_clip_tokenizer(texts, tmp_path / "b", vocab_size=1024, max_length=12)
    assert a.get_vocab() == b.get_vocab() and a.bos_token_id == 0 and a.eos_token_id == 1 == a.pad_token_id
    enc = a(["the red ball!", "ball"], padding="max_length", truncation=True, max_length=12)
    n = sum(enc["attention_mask"][1])
    assert enc["input_ids"][1][0] == 0 and enc["input_ids"][1][n - 1:] == [1] * (13 - n)  # EOS, then EOS padding
    assert enc["attention_mask"][1] == [1] * n + [0] * (12 - n)
    assert a.decode(enc["input_ids"][0], skip_special_tokens=True) == "the red ball !"
    assert 1 not in enc["input_ids"][0][1:4]  # an unseen character is a byte token, not <unk>=EOS
    with pytest.raises(ValueError, match="does not exist"):
        load_clip_tokenizer(tmp_path / "missing")


def test_a_trained_tokenizer_sees_the_training_captions_of_every_dataset_and_no_held_out_one(tmp_path):
    import pandas as pd

    from hilight.data.captions import CaptionManifest
    from hilight.train.alignment import AlignmentConfig, prepare_tokenizer

    def rows(dataset, split, caption):
        return {"dataset": dataset, "video_id": f"{dataset}{split}", "video_file": "x.mp4", "video_sha256": "0",
                "caption": caption, "object": "ball", "split": split}

    held_out = [rows("billiards", s, "the cue ball hits the turquoise ball") for s in ("val", "test", "eval")]
    manifest = CaptionManifest(pd.DataFrame([rows("general", "train", "a blue circle moves left")] * 5
                                            + [rows("billiards", "train", "the cue ball hits the maroon ball")] * 5
                                            + held_out * 5), "fp")
    config = AlignmentConfig(data={"train_datasets": ["general"]}, train={"max_steps": 1, "batch_size": 2})
    tok, _ = prepare_tokenizer(config, manifest, tmp_path)
    vocab = tok.get_vocab()
    # billiards words reach a tokenizer trained for general pretraining (alignment reuses it) ...
    assert "maroon</w>" in vocab and "circle</w>" in vocab
    # ... but a word only held-out captions use stays in pieces
    assert "turquoise</w>" not in vocab and len(tok.tokenize("turquoise")) > 1


def test_tracker_survives_an_outage_without_losing_metrics(monkeypatch):
    delivered = []

    class Flaky:
        down = True

        def log_batch(self, run_id, metrics):
            if self.down:
                raise ConnectionError("tracking server unreachable")
            delivered.extend((m.key, m.step) for m in metrics)

        def log_artifact(self, run_id, local, dest):
            if self.down:
                raise ConnectionError("tracking server unreachable")
            delivered.append(("artifact", local))

    flaky = Flaky()
    monkeypatch.setattr(ResilientTracker, "client", property(lambda self: flaky))
    tracker = ResilientTracker("run", flush_every_s=0)
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)  # each attempt fails; nothing raises
    tracker.log_artifacts(__file__, "checkpoints")
    assert delivered == [] and not tracker.flush()
    flaky.down = False
    assert tracker.flush()
    assert delivered == [("train/loss", 1), ("train/loss", 2), ("train/loss", 3), ("artifact", __file__)]


# ---------------------------------------------------------------------------------------------- the job


def test_alignment_job_trains_exports_and_resumes(tmp_path, caption_manifest):
    from hilight.models.checkpoints import read_model_config
    from hilight.train.alignment import AlignmentConfig, run_alignment

    cfg = AlignmentConfig.model_validate(alignment_config(caption_manifest, tmp_path / "out"))
    result = run_alignment(cfg)
    assert result.fit.step == 6 and result.fit.resumed_from is None
    assert {h["step"] for h in result.fit.history} == {3, 6}
    assert (result.best_model / "model.safetensors").is_file() and (result.best_model / "tokenizer").is_dir()
    saved = read_model_config(result.best_model)
    assert saved["family"] == "clipvip" and saved["model"]["num_frames"] == 6
    assert 0.0 <= result.retrieval["t2v_r1"] <= 1.0 and "t2v_median_rank" in result.baseline

    again = run_alignment(cfg)  # same config + data: the finished run is found, nothing retrains
    assert again.fit.resumed_from == 6 and again.run_dir == result.run_dir

    # the exported model initialises the next stage (its tokenizer comes along)
    nxt = AlignmentConfig.model_validate({**alignment_config(caption_manifest, tmp_path / "next"),
                                          "model": {"preset": "tiny", "init": str(result.best_model)}})
    follow = run_alignment(nxt)
    assert follow.run_dir != result.run_dir
    state = json.loads((follow.fit.final_checkpoint / "config.json").read_text())
    assert state["data_fingerprint"] == json.loads((caption_manifest / "manifest.json").read_text())["data_fingerprint"]


@pytest.mark.parametrize("placement", ["after_embedding", "all_hidden_states"])
def test_other_placements_and_penalties_train(tmp_path, caption_manifest, placement):
    from hilight.train.alignment import AlignmentConfig, run_alignment

    raw = alignment_config(caption_manifest, tmp_path / "out", max_steps=2, val_every=2)
    raw["loss"].update({"token_similarity_weight": 0.1, "patch_similarity_weight": 0.1,
                        "local": {"keep": "88/100", "placement": placement, "language_mask": placement != "after_embedding"}})
    result = run_alignment(AlignmentConfig.model_validate(raw))
    assert result.fit.skipped_steps == 0 and result.fit.step == 2


def test_wrong_threshold_and_missing_manifest_fail_clearly(tmp_path, caption_manifest):
    from hilight.data.captions import ManifestError
    from hilight.train.alignment import AlignmentConfig, run_alignment

    raw = alignment_config(caption_manifest, tmp_path / "out")
    raw["loss"]["local"]["keep"] = "2320/2356"
    with pytest.raises(ValueError, match="written for 2356 patches but the model has 100"):
        run_alignment(AlignmentConfig.model_validate(raw))
    raw = alignment_config(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(ManifestError, match="run `hilight run data_validation"):
        run_alignment(AlignmentConfig.model_validate(raw))


@pytest.mark.parametrize("mode, uploaded", [("all", [5, 10, 15, 20]), ("best", ["best"]),
                                            ("best_and_final", ["best", 20]), ("none", [])])
def test_checkpoint_upload_policy(tmp_path, mode, uploaded):
    from hilight.train.loop import TrackingSpec

    class Recorder:
        def __init__(self):
            self.paths = []

        def log_artifacts(self, local_path, artifact_path=None):
            self.paths.append(artifact_path)

        def __getattr__(self, name):  # metrics, tags, flush: not under test
            return lambda *a, **k: None

    torch.manual_seed(0)
    model, data = torch.nn.Linear(4, 1), ToyData()
    settings = TrainSettings(max_steps=20, batch_size=8, lr=0.3, weight_decay=0.0, ckpt_every=5, val_every=5,
                             progress=False, select_metric="val/mse", select_mode="min")
    sampler = CaptionBatchSampler(np.arange(len(data)), 8, mode="random", seed=1)
    evaluate = lambda m: {"val/mse": toy_objective(m, data.collate([data[i] for i in range(8)]))["loss"].item()}  # noqa: E731
    recorder = Recorder()
    result = fit(model, toy_objective, data, sampler, settings, tmp_path, evaluate=evaluate, tracker=recorder,
                 tracking=TrackingSpec(checkpoints=mode))
    want = [f"checkpoints/step-{(result.best_step if s == 'best' else s):08d}" for s in uploaded]
    assert recorder.paths == list(dict.fromkeys(want))
