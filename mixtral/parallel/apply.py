"""Turn a one-process model into its share of a distributed one: experts split over EP, FSDP2 on the rest.

`parallelize(model, layout)` on every rank, with the same full weights everywhere (one seed, or a
loaded checkpoint): each MoE layer's experts become DTensors split by expert over the EP mesh with an
`ExpertParallelDispatch`; then FSDP2 (`fully_shard`) shards each expert stack over
("dp_replicate", "dp_shard_mod_ep") and each block, and the model's root (embeddings, final norm,
output head), over ("dp_replicate", "dp_shard").

Gradients: FSDP2 averages a gradient over the ranks of its mesh. A dense weight's gradient is each
rank's own (its slice of the batch), so averaging over all W ranks gives the gradient of the global
mean loss. An expert's gradient already sums, through the all-to-all's backward, what every rank of
its EP group sent it; averaged over only the W / ep ranks of its FSDP mesh it would be ep times too
large, so the dispatcher scales it by 1 / ep on the way back: Σ / W, divided by the global
data-parallel size like every other gradient. (Not FSDP2's gradient divide factor: on a mesh of one
rank, EP over every rank, FSDP2 does not reduce and would not divide.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from mixtral.parallel.ep import shard_experts
from mixtral.parallel.layout import Layout


def parallelize(model: nn.Module, layout: Layout, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place for `layout` (see the module docstring); returns it."""
    if layout.ep > 1:
        shard_experts(model, layout.ep_mesh)
    for layer in model.layers:
        experts = layer.feed_forward.experts
        if layout.ep > 1:
            layer.feed_forward.dispatcher.grad_scale = 1.0 / layout.ep
        fully_shard(experts, mesh=layout.expert_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(layer, mesh=layout.dense_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=layout.dense_mesh, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, layout: Layout) -> float:
    """The global gradient norm over every rank's shards (dense and expert weights live on different
    meshes, which torch's clip_grad_norm_ cannot mix), then every gradient scaled by
    min(1, max_norm / norm). Each weight is held dp_replicate times, so its squares are counted once."""
    local = torch.zeros((), dtype=torch.float64, device=layout.device)
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        g_local = g.to_local() if isinstance(g, DTensor) else g
        local += g_local.double().square().sum()
    dist.all_reduce(local)
    total = float((local / layout.config.dp_replicate).sqrt())
    coef = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_
    if coef < 1.0:
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return total
