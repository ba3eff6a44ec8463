"""Routing drift: how many tokens a fine-tuned model routes to other experts than its base model did.

For the same tokens run through both models, per layer: the share of tokens whose top-k expert
SET differs (order ignored) and the share whose first choice differs. Layers after the first see
different hidden states once anything upstream changed, so drift compounds with depth; that is the
quantity an engineer cares about (which experts a deployment must load), not a per-layer isolate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mixtral.eval.mode import eval_mode


@torch.no_grad()
def routing_drift(
    base: nn.Module, tuned: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, list[float] | int]:
    """`{"topk_changed": [L], "first_changed": [L], "tokens": N}` over (tokens [B, T], positions [B, T])
    batches; positions < 0 mark padding, which is not counted."""
    if (base.config.n_layers, base.config.n_experts, base.config.top_k) != (
        tuned.config.n_layers, tuned.config.n_experts, tuned.config.top_k,
    ):  # fmt: skip
        raise ValueError("routing drift compares models with the same layers, experts and top-k")
    k = base.config.top_k
    set_changed = first_changed = None
    n = 0
    with eval_mode(base, tuned):
        for tokens, positions in batches:
            real = positions >= 0
            a = base(tokens, positions=positions, keep_logits=1).router_logits.topk(k, dim=-1).indices
            b = tuned(tokens, positions=positions, keep_logits=1).router_logits.topk(k, dim=-1).indices
            diff_set = (a.sort(-1).values != b.sort(-1).values).any(-1)[:, real].sum(-1)  # [L]
            diff_first = (a[..., 0] != b[..., 0])[:, real].sum(-1)
            set_changed = diff_set if set_changed is None else set_changed + diff_set
            first_changed = diff_first if first_changed is None else first_changed + diff_first
            n += int(real.sum())
    if not n:
        raise ValueError("routing drift needs at least one real token")
    return {
        "topk_changed": (set_changed / n).tolist(),
        "first_changed": (first_changed / n).tolist(),
        "tokens": n,
    }
