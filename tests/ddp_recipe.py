"""Runs one stage's real recipe (or the stage-0 objective on one fixed batch) in the processes that torchrun starts;
used by ``tests/test_ddp_recipes.py``. With ``ACCELERATE_USE_CPU=true`` accelerate runs DDP over gloo.

    python tests/ddp_recipe.py train CONFIG.json      # stage from the config's `pipeline`
    python tests/ddp_recipe.py loss OUT.json          # stage-0 loss terms on a fixed global batch, averaged over ranks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def train(config_path: Path) -> None:
    raw = json.loads(config_path.read_text())
    if raw["pipeline"] == "clipvip_alignment":
        from hilight.train.alignment import AlignmentConfig, AlignmentRecipe as Recipe
        config = AlignmentConfig.model_validate(raw)
    elif raw["pipeline"] == "tokenmining_pretrain":
        from hilight.train.tokenmining import TokenMiningPretrainConfig, TokenMiningRecipe as Recipe
        config = TokenMiningPretrainConfig.model_validate(raw)
    else:
        from hilight.train.lora import LoRAFinetuneConfig, LoRARecipe as Recipe
        config = LoRAFinetuneConfig.model_validate(raw)
    Recipe(config).run()


def fixed_batch(n: int = 8) -> dict[str, torch.Tensor]:
    """A global batch of ``n`` (clip, caption) pairs for the tiny preset; pairs 2k and 2k+1 share a video id."""
    from hilight.models.clipvip import load_preset

    cfg = load_preset("tiny")
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    ids = torch.randint(3, cfg.text.vocab_size - 1, (n, 12), generator=g)
    ids[:, 0] = cfg.text.bos_token_id
    lengths = torch.randint(4, 12, (n,), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    ids[torch.arange(n), lengths - 1] = cfg.text.eos_token_id
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, cfg.text.eos_token_id))
    return {"pixel_values": torch.randn(n, cfg.num_frames, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": mask, "video_index": torch.arange(n), "groups": torch.arange(n) // 2,
            # hard negatives (NegCLIP) for some rows: the caption with one token changed; on two ranks, three on
            # the first and one on the second (the pairwise term's mean must not weight ranks equally)
            "negative_of": torch.tensor([0, 1, 3, 6])}


def rank_rows(batch: dict[str, torch.Tensor], rank: int, n: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s ``n`` pairs of the global batch, with their hard negatives after them (as collate lays out)."""
    rows = slice(rank * n, (rank + 1) * n)
    owners = batch["negative_of"][(batch["negative_of"] >= rank * n) & (batch["negative_of"] < (rank + 1) * n)]
    negatives = batch["input_ids"][owners].clone()
    negatives[:, 1] = (negatives[:, 1] + 7) % 1000 + 3  # one word changed
    return {"pixel_values": batch["pixel_values"][rows], "groups": batch["groups"][rows],
            "input_ids": torch.cat([batch["input_ids"][rows], negatives]),
            "attention_mask": torch.cat([batch["attention_mask"][rows], batch["attention_mask"][owners]]),
            "video_index": torch.cat([torch.arange(n), owners - rank * n]), "negative_of": owners - rank * n}


def loss_terms(out: Path) -> None:
    """Every rank takes its rows of the fixed batch; the rank-averaged terms must equal one process's."""
    from accelerate import Accelerator

    from hilight.models.clipvip import build_clipvip, load_preset
    from hilight.train.alignment import AlignmentObjective, LossSpec

    state = Accelerator()  # reads ACCELERATE_USE_CPU (a bare PartialState would not run multi-CPU)
    batch = fixed_batch()
    n = len(batch["input_ids"]) // state.num_processes
    local = rank_rows(batch, state.process_index, n)
    model = build_clipvip(load_preset("tiny"), seed=0)
    spec = LossSpec.model_validate({"group_aware": True, "hard_negative_weight": 0.5,
                                    "local": {"keep": 12, "placement": "all_hidden_states"},
                                    "token_similarity_weight": 0.1, "patch_similarity_weight": 0.1})
    terms = AlignmentObjective(spec, model.config)(model, local)
    terms["loss"].backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    values = {k: v.detach().float().reshape(1) for k, v in terms.items() if k != "logit_scale"}
    values["grad_norm"] = grad.norm().reshape(1)
    if state.num_processes > 1:
        import torch.distributed as dist

        for v in values.values():
            dist.all_reduce(v)
            v /= state.num_processes
        dist.all_reduce(grad)
        grad /= state.num_processes
        values["grad_norm"] = grad.norm().reshape(1)  # DDP's averaged gradient
    if state.is_main_process:
        out.write_text(json.dumps({k: v.item() for k, v in values.items()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["train", "loss"])
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    train(args.path) if args.mode == "train" else loss_terms(args.path)
