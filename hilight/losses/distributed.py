"""Collectives the losses need under data parallelism (DDP over NCCL or gloo; one process = identity).

Why hand-written wrappers around ``torch.distributed``: the losses must stay importable and exact in one process
without an initialised process group, and these two operations are all they need.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` [n, ...] on every rank → [world·n, ...], rank order, differentiable: the backward pass sums each
    rank's gradient for the rows it contributed (open_clip's ``gather_with_grad=True``)."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def gather_plain(x: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (group ids)."""
    _, size = world()
    if size == 1:
        return x
    out = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def tokens_per_rank(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The divisor that makes a causal-LM loss exact under DDP: (supervised next-token targets over all ranks) /
    world size. Each rank's summed token loss divided by it, averaged over ranks by DDP, is the token-weighted mean
    over the global batch; a per-rank mean would weight ranks with few answer tokens as much as ranks with many.
    Pass it as transformers' ``num_items_in_batch``. One process: the batch's own target count (the plain mean)."""
    count = (labels[:, 1:] != ignore_index).sum()
    _, size = world()
    return global_sum(count) / size if size > 1 else count


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (detached) count over all ranks, e.g. the tokens a token-weighted mean divides by."""
    _, size = world()
    if size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x
