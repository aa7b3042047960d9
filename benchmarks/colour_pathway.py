"""Where between the pixels and the VLM's answer does a clip's colour get lost? (issue 15 item 4)

On fresh synthetic billiards clips (a seed the demo never trains on), each pot and miss asks one 6-way question,
"which colour is the ball the white cue ball hit first?", at each point of the chain. Every row is an accuracy
with a 95% bootstrap interval over clips, against chance 1/6:

1. ``tower zero-shot``: the CLIP-ViP candidate's own choice among the clip's cue-ball caption with each colour;
2. ``tower probe``: an attention-pooling probe (4 learned queries + a linear read-out, the kind of pooling
   TokenMining does) trained on the demo's training clips' frozen CLIP-ViP tokens, i.e. what TokenMining reads;
3. ``VLM <input>``: teacher-forced, the reference answer ("The white cue ball hit the red ball first.", or the
   pocketed-ball answer on a pot) scored with each colour, given in the video's place
   ``video`` (the TokenMining tokens of the clip), ``zeroed`` (all-zero tokens: the text prior),
   ``captions`` (the clip's captions, embedded as text) and ``colour word`` (the colour word repeated); the last
   two are the LLM's reading ceiling, the first against them is what TokenMining delivers.

It also prints how much TokenMining's tokens vary between clips and between the tokens of one clip, relative to
their size: tokens that are nearly the same for every clip cannot carry a clip's colour; and how much of its
attention lands on CLIP-ViP's CLS + proxy tokens, where the tower keeps the clip's colours (runs that learnt them
put 0.58-1.0 of a query token's attention there, runs left at chance 0.03-0.05). Needs `make demo` first.

    .venv/bin/python benchmarks/colour_pathway.py                     # the demo's table1k candidate after stage 1
    .venv/bin/python benchmarks/colour_pathway.py --merged outputs/selection/table1k/merged    # after stage 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hilight.data.conversations import IGNORE_INDEX, Turn, encode  # noqa: E402
from hilight.data.frames import load_clip_frames  # noqa: E402
from hilight.data.synth import generate_dataset  # noqa: E402
from hilight.data.synth.billiards import BALL_COLOURS  # noqa: E402
from hilight.experiments.bootstrap import ratio_interval  # noqa: E402
from hilight.train.vlm_parts import attention_stats, global_attention  # noqa: E402

COLOURS = list(BALL_COLOURS)
QUESTION = {"pot": "What color ball was pocketed by the white cue ball?",
            "miss": "Which ball did the white cue ball hit first?"}


def answer(scenario: str, colour: str) -> str:
    """The generator's reference answer to QUESTION[scenario] (hilight.data.synth.billiards.questions)."""
    if scenario == "pot":
        return f"The white cue ball hit the {colour} ball, and the {colour} ball rolled into the pocket."
    return f"The white cue ball hit the {colour} ball first."


def clips_of(root: Path, split: str | None = None) -> list[dict]:
    """Pots and misses of a synthetic billiards dataset: video path, scenario, colour index, cue-ball caption."""
    events = {e["video_id"]: e for e in json.loads((root / "events.json").read_text())}
    out = []
    for c in json.loads((root / "captions.json").read_text()):
        e = events[c["video_id"]]
        if (split and c["split"] != split) or e["scenario"] == "break" or not e.get("first_contact"):
            continue
        out.append({"video": str(root / "videos" / c["video"]), "scenario": e["scenario"],
                    "colour": COLOURS.index(e["first_contact"]), "caption": c["captions"][0]["caption"],
                    "captions": " ".join(x["caption"] + "." for x in c["captions"])})
    return out


def score(ok) -> dict:
    iv = ratio_interval(pd.DataFrame({"num": np.asarray(ok, float), "den": 1.0}))
    return {"accuracy": iv.estimate, "low": iv.low, "high": iv.high, "clips": iv.items}


@torch.no_grad()
def tower_outputs(vlm, clips: list[dict], frames: int, size: int, batch: int = 32):
    """(CLIP-ViP last hidden states, Long-CLIP frame vectors, CLIP-ViP joint-space video embeddings) per clip."""
    hidden, frame_vecs, embeds = [], [], []
    for i in range(0, len(clips), batch):
        px = torch.stack([load_clip_frames(c["video"], frames, size) for c in clips[i:i + batch]])
        out = vlm.clipvip.encode_video(px)
        hidden.append(out.last_hidden_state)
        frame_vecs.append(vlm.longclip(px))
        embeds.append(vlm.clipvip.video_embeds(out))
    return torch.cat(hidden), torch.cat(frame_vecs), torch.cat(embeds)


@torch.no_grad()
def zero_shot(clipvip, tokenizer, clips: list[dict], embeds: torch.Tensor) -> list[bool]:
    ok = []
    for c, e in zip(clips, embeds, strict=True):
        true = COLOURS[c["colour"]]
        texts = [c["caption"].replace(f"hits the {true} ball", f"hits the {k} ball") for k in COLOURS]
        enc = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
        t = clipvip.text_embeds(clipvip.encode_text(enc["input_ids"], enc["attention_mask"]))
        ok.append(int((t @ e).argmax()) == c["colour"])
    return ok


class AttentionPoolProbe(torch.nn.Module):
    """Learned queries attend over the frozen tokens; a linear layer reads the colour from what they pool."""

    def __init__(self, dim: int, queries: int = 4):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.queries = torch.nn.Parameter(torch.randn(queries, dim) / dim**0.5)
        self.out = torch.nn.Linear(queries * dim, len(COLOURS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.norm(tokens)
        attn = (x @ self.queries.T).softmax(1)  # [B, S, Q]
        return self.out((attn.transpose(1, 2) @ x).flatten(1))


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, steps: int = 400) -> torch.Tensor:
    torch.manual_seed(0)
    model = AttentionPoolProbe(train_x.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-3)
    for _ in range(steps):  # full batch: a few hundred clips
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return model(test_x).argmax(-1)


@torch.no_grad()
def teacher_forced(vlm, tokenizer, clips: list[dict], tokens: torch.Tensor) -> list[bool]:
    """Per clip: does the reference answer with the true colour have the highest likelihood of the six?"""
    ok = []
    for c, v in zip(clips, tokens, strict=True):
        encs = [encode([Turn("<video>\n" + QUESTION[c["scenario"]], answer(c["scenario"], k))], tokenizer,
                       video_tokens=v.shape[0]) for k in COLOURS]
        width = max(len(e.input_ids) for e in encs)
        ids = torch.full((len(encs), width), tokenizer.pad_token_id)
        labels = torch.full((len(encs), width), IGNORE_INDEX)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, :len(e.input_ids)], labels[i, :len(e.labels)] = torch.tensor(e.input_ids), torch.tensor(e.labels)
            mask[i, :len(e.input_ids)] = 1
        s = vlm.splice(ids, mask, v[None].expand(len(encs), -1, -1), labels)
        logp = vlm.llm(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask,
                       position_ids=s.position_ids).logits[:, :-1].log_softmax(-1)
        target = s.labels[:, 1:]
        ll = (logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * (target != IGNORE_INDEX)).sum(1)
        ok.append(int(ll.argmax()) == c["colour"])
    return ok


def text_in_place(vlm, tokenizer, texts: list[str], n: int) -> torch.Tensor:
    """Each text's first ``n`` token embeddings (padded), unscaled, as video tokens: ``splice`` scales them again."""
    embed = vlm.llm.get_input_embeddings()
    rows = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:n]
        rows.append(embed(torch.tensor(ids + [tokenizer.pad_token_id] * (n - len(ids)))) / vlm.embed_scale)
    return torch.stack(rows)


def load_vlm(args):
    """(HiLightVLM with towers, LLM tokenizer, CLIP tokenizer dir, frames, image size)."""
    from hilight.models.export import load_vlm_dir
    from hilight.models.token_mining import load_saved_token_mining
    from hilight.models.tokenizers import load_llm_tokenizer
    from hilight.models.vlm import HiLightVLM, load_llm
    from hilight.train.vlm_parts import VisionSpec, load_clipvip_tower, load_longclip_tower

    spec = VisionSpec(clipvip=str(args.clipvip), longclip_random_init=args.longclip_random_init)
    clipvip = load_clipvip_tower(spec)  # with its text tower, for the zero-shot row
    if args.merged:
        bundle = load_vlm_dir(args.merged, device="cpu")
        vlm, tokenizer = bundle.vlm, bundle.tokenizer
        merged_sd, given_sd = vlm.clipvip.vision_model.state_dict(), clipvip.vision_model.state_dict()
        if any(not torch.equal(merged_sd[k], given_sd[k]) for k in merged_sd):
            raise SystemExit(f"{args.merged} was trained on other CLIP-ViP weights than --clipvip {args.clipvip}; "
                             "pass the candidate's CLIP-ViP export as --clipvip")
        vlm.clipvip = clipvip  # the same frozen vision weights (checked above), with the text tower for zero-shot
        return vlm.eval(), tokenizer, bundle.num_frames, bundle.image_size
    llm = load_llm(args.llm, hidden_act="gelu")
    vlm = HiLightVLM(llm, load_saved_token_mining(args.token_mining), clipvip, load_longclip_tower(spec)).eval()
    return vlm, load_llm_tokenizer(args.llm), args.frames, clipvip.config.vision.image_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clipvip", type=Path, default=ROOT / "outputs/alignment/best")
    p.add_argument("--token-mining", type=Path, default=ROOT / "outputs/selection/table1k/tokenmining/best")
    p.add_argument("--llm", type=Path, default=ROOT / "outputs/llm_pretrain/model")
    p.add_argument("--merged", type=Path, help="a stage-2 merged model instead of --llm/--token-mining")
    p.add_argument("--longclip-random-init", default="tiny")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--train-data", type=Path, default=ROOT / "data/synth/billiards", help="the probe's training clips")
    p.add_argument("--clips", type=int, default=300, help="fresh clips to generate (about 60%% are pots or misses)")
    p.add_argument("--seed", type=int, default=1000, help="generator seed of the fresh clips (the demo uses 0)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/colour_pathway.json")
    args = p.parse_args()
    torch.manual_seed(0)

    from hilight.models.tokenizers import load_clip_tokenizer

    vlm, tokenizer, frames, size = load_vlm(args)
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp) / "fresh", domain="billiards", n_videos=args.clips, seed=args.seed, workers=2,
                         progress=False)
        test = clips_of(Path(tmp) / "fresh")
        hidden, frame_vecs, embeds = tower_outputs(vlm, test, frames, size)
        train = clips_of(args.train_data, split="train")
        train_hidden = tower_outputs(vlm, train, frames, size)[0]
        rows = {}
        rows["tower zero-shot"] = zero_shot(vlm.clipvip, load_clip_tokenizer(args.clipvip / "tokenizer", 32), test,
                                            embeds)
        pred = probe(train_hidden, torch.tensor([c["colour"] for c in train]), hidden)
        rows["tower probe"] = (pred == torch.tensor([c["colour"] for c in test])).tolist()
        with torch.no_grad():
            video = vlm.token_mining(hidden, frame_vecs)
            on_global, entropy = global_attention(vlm.token_mining.attention(hidden, frame_vecs),
                                                  vlm.clipvip.config.vision.num_proxies)
        n = video.shape[1]
        inputs = {"video": video, "zeroed": torch.zeros_like(video),
                  "captions": text_in_place(vlm, tokenizer, [c["captions"] for c in test], n),
                  "colour word": text_in_place(vlm, tokenizer, [" ".join([COLOURS[c["colour"]]] * n) for c in test], n)}
        for name, tokens in inputs.items():
            rows[f"VLM {name}"] = teacher_forced(vlm, tokenizer, test, tokens)
    size_ = video.norm(dim=-1).mean().item()
    spread = {"token_norm": size_, "between_clips": video.std(0).norm(dim=-1).mean().item() / size_,
              "within_clip": video.std(1).norm(dim=-1).mean().item() / size_}
    attention = attention_stats(on_global, entropy, vlm.clipvip.config.vision.num_proxies / hidden.shape[1])
    scenario = np.array([c["scenario"] for c in test])
    result = {"clips": len(test), "chance": 1 / len(COLOURS), "args": {k: str(v) for k, v in vars(args).items()},
              "token_mining_spread": spread, "token_mining_attention": attention, "rows": {}}
    print(f"{len(test)} fresh pots and misses (seed {args.seed}); chance {1 / len(COLOURS):.3f}\n")
    print("| where | first-contact colour [95% CI] | pots | misses |\n|---|---|---|---|")
    for name, ok in rows.items():
        ok = np.asarray(ok, bool)
        r = {"all": score(ok), "pot": score(ok[scenario == "pot"]), "miss": score(ok[scenario == "miss"])}
        result["rows"][name] = r
        print(f"| {name} | {r['all']['accuracy']:.3f} [{r['all']['low']:.3f}, {r['all']['high']:.3f}] | "
              f"{r['pot']['accuracy']:.2f} | {r['miss']['accuracy']:.2f} |")
    print(f"\nTokenMining tokens: norm {spread['token_norm']:.2f}; spread between clips {spread['between_clips']:.3f} "
          f"and within a clip {spread['within_clip']:.3f} of the norm")
    print(f"TokenMining attention on CLIP-ViP's CLS + proxies: {attention['global_mass']:.3f} over its query tokens, "
          f"{attention['global_mass_max']:.3f} for the one that looks there most (uniform "
          f"{attention['global_mass_uniform']:.3f}); entropy {attention['entropy']:.2f} of uniform's")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
