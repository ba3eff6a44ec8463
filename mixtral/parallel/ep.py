"""Expert parallelism: each rank of an EP group holds E/ep experts; routed tokens travel by all-to-all.

`ExpertParallelDispatch` is a `mixtral.model.dispatch` dispatcher, so the MoE layer does not know it
runs distributed. Per call, on every rank of the EP group (dropless, MegaBlocks-style):
1. the rank's T·k (token, expert) slots are sorted by expert, so by the rank that holds it;
2. the per-expert counts go round (`all_to_all_single` on a [ep, E/ep] tensor), so every rank knows
   what it will receive, from whom and for which of its experts: uneven and zero splits alike;
3. the sorted rows go to the experts' ranks (a differentiable `all_to_all_single`: its backward sends
   the gradients the reverse way), are regrouped by local expert, and run through the rank's stacked
   experts in one `grouped_swiglu`. Every rank always runs it, zero rows included, and always takes
   part in both exchanges, so no collective waits for a rank that had nothing to send;
4. the outputs come back by the reverse all-to-all, are un-sorted, weighted and summed per token in
   slot order, as `SortedDispatch` sums them.

The expert weights it reads are the layer's stacked `Experts`, whose parameters `shard_experts`
turned into DTensors split by expert over the EP mesh (`Shard(0)`): the checkpoint sees the whole
[E, ...] tensor, the dispatcher its local [E/ep, ...] rows (`to_local`, differentiable).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from mixtral.errors import ConfigError
from mixtral.model.dispatch import ExpertWeights
from mixtral.model.grouped import grouped_swiglu

# Wall seconds this process spent in the token exchanges (all-to-all of rows and of counts, forward
# and backward) since the last reset: bench_distributed reads it for the all-to-all's share of a step.
A2A_SECONDS = [0.0]


def _exchange(out: torch.Tensor, x: torch.Tensor, recv, send, group) -> None:
    t0 = time.perf_counter()
    dist.all_to_all_single(out, x, recv, send, group=group)
    A2A_SECONDS[0] += time.perf_counter() - t0


class _AllToAll(torch.autograd.Function):
    """rows [sum(send), ...] → [sum(recv), ...] over `group`; backward: the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        _exchange(out, x.contiguous(), recv, send, group)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        gx = g.new_empty((sum(ctx.send), *g.shape[1:]))
        _exchange(gx, g.contiguous(), ctx.send, ctx.recv, ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_single`: send[i] rows of x to rank i of `group`, recv[i] from it."""
    return _AllToAll.apply(x, send, recv, group)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` on the way back."""

    @staticmethod
    def forward(ctx, x, scale: float):  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * ctx.scale, None


def _local(t: torch.Tensor, grad_scale: float) -> torch.Tensor:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t if grad_scale == 1.0 else _ScaleGrad.apply(t, grad_scale)


class ExpertParallelDispatch:
    """Dropless MoE dispatch over an EP process group (see the module docstring); `n_experts` global."""

    def __init__(self, group, n_experts: int) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if n_experts % self.ep:
            raise ConfigError(f"{n_experts} experts do not split over {self.ep} expert-parallel ranks")
        self.n_experts = n_experts
        self.local = n_experts // self.ep
        # The experts' gradients are scaled by this on their way back (`parallelize` sets 1 / ep: FSDP2
        # then averages over the W / ep ranks of the expert mesh, so the result is Σ / W, the global mean).
        self.grad_scale = 1.0
        self.last_received = 0  # rows this rank's experts received in the last call

    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        T, K = ids_TK.shape
        D = x_TD.shape[1]
        ep, E_loc = self.ep, self.local
        flat_S = ids_TK.reshape(-1)
        order_S = torch.argsort(flat_S, stable=True)
        counts_E = torch.bincount(flat_S, minlength=self.n_experts)
        # [ep, E_loc]: how many rows this rank sends to each rank, per expert of that rank, and receives
        recv_counts = torch.empty_like(counts_E)
        _exchange(recv_counts, counts_E, None, None, self.group)
        send_rows = counts_E.view(ep, E_loc).sum(1).tolist()
        recv_EL = recv_counts.view(ep, E_loc)  # [source rank, local expert]
        recv_rows = recv_EL.sum(1).tolist()
        self.last_received = sum(recv_rows)
        x_recv = all_to_all(x_TD[order_S // K], send_rows, recv_rows, self.group)
        # received rows: by source rank, then local expert; regroup by local expert, then source rank
        seg = recv_EL.t().reshape(-1)  # segment sizes, expert-major
        starts = (torch.cumsum(recv_EL.reshape(-1), 0) - recv_EL.reshape(-1)).view(ep, E_loc).t().reshape(-1)
        first = torch.repeat_interleave(starts, seg)
        within = torch.arange(first.numel(), device=first.device) - torch.repeat_interleave(
            torch.cumsum(seg, 0) - seg, seg
        )
        perm = first + within
        w1, w3, w2 = (_local(w, self.grad_scale) for w in experts.stacked()[:3])
        y_local = grouped_swiglu(x_recv[perm], recv_EL.sum(0).tolist(), w1, w3, w2)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        y_sorted = all_to_all(y_local[inverse], recv_rows, send_rows, self.group)
        back = torch.empty_like(order_S)
        back[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_SD = y_sorted[back] * weights_TK.reshape(-1, 1)
        return y_SD.view(T, K, D).sum(dim=1)

    def __repr__(self) -> str:
        return f"ExpertParallelDispatch(ep={self.ep}, rank={self.ep_rank}, experts={self.n_experts})"


def shard_experts(model: nn.Module, ep_mesh) -> None:
    """Split every MoE layer's stacked experts by expert over `ep_mesh` (DTensor, Shard(0)) and give the
    layer an `ExpertParallelDispatch` over its group. Every rank must hold the same full weights first
    (built from one seed, or loaded): each keeps its own rows."""
    group = ep_mesh.get_group()
    for layer in model.layers:
        moe = layer.feed_forward
        experts = moe.experts
        for name in ("w1", "w3", "w2"):
            p = getattr(experts, name)
            if isinstance(p, DTensor):
                raise ConfigError("the experts are sharded already")
            sharded = distribute_tensor(p.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(sharded, requires_grad=p.requires_grad))
        moe.dispatcher = ExpertParallelDispatch(group, experts.w1.shape[0])
