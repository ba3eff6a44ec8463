"""Small collectives the training loop needs on many ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks; backward: Σ over ranks of the incoming gradients (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum of `x` over the ranks of `group` (default: all).

    Used for statistics of the global batch inside a loss that every rank computes whole (the router
    balance): each rank then holds ∂loss/∂(the sum); the backward sums those, W equal terms, and the
    data-parallel average of the weights' gradients (÷W) leaves exactly ∂loss/∂weights."""
    return _AllReduceSum.apply(x, group)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Every value averaged over the ranks (one all-reduce)."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def sum_over_ranks(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())
