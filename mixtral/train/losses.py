"""Router losses added to every training objective: load balancing (pooled and per-layer), router z-loss.

(The next-token cross-entropy, which evaluation shares, is `mixtral.eval.lm.masked_cross_entropy`.)

References (../shared/reference/mixtral.md section 5):
- Switch Transformer load balancing (Fedus et al. 2021): L = N · Σ_i f_i · P_i.
- transformers' Mixtral form (`load_balancing_loss_func`): all layers' router logits pooled, every
  one of the k choices counted: aux = E · Σ_k Σ_e f[k, e] · p̄[e]; exactly k under uniform routing.
- Per-layer form: the Switch loss per layer with f the share of the T·k slots routed to each expert
  (Σ_e f_e = 1), averaged over layers; exactly 1 under uniform routing, its minimum when p̄ is
  uniform too.
- ST-MoE router z-loss (Zoph et al. 2022): mean over tokens of logsumexp(router logits)².
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BALANCE_FORMS = ("pooled", "per_layer", "none")


def _flat(router_logits_LBTE: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    """[L, N, E] fp32 logits of the tokens that count (mask True)."""
    L, B, T, E = router_logits_LBTE.shape
    logits = router_logits_LBTE.float().reshape(L, B * T, E)
    return logits if mask_BT is None else logits[:, mask_BT.reshape(-1)]


def load_balancing_loss(
    router_logits_LBTE: torch.Tensor,
    top_k: int,
    mask_BT: torch.Tensor | None = None,
    form: str = "pooled",
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The auxiliary load-balancing loss in `form` ("pooled": HF's, min k; "per_layer": min 1).

    `reduce` (data-parallel training) sums a tensor over the ranks, differentiably: the routed shares f
    and mean probabilities p̄ are then those of the global batch, as one process with that batch
    computes them (the loss is not linear in them, so a mean of per-rank losses would differ)."""
    if form not in BALANCE_FORMS:
        raise ValueError(f"unknown load-balancing form {form!r}; choose from {', '.join(BALANCE_FORMS)}")
    logits = _flat(router_logits_LBTE, mask_BT)
    L, N, E = logits.shape
    if form == "none":
        return logits.new_zeros(())
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(logits.topk(top_k, dim=-1).indices, E).float()  # [L, N, k, E]
    if form == "pooled":
        f_sum, p_sum = chosen.sum(dim=1).sum(dim=0), probs.sum(dim=1).sum(dim=0)  # [k, E], [E]
        n = logits.new_tensor(float(L * N))
    else:
        f_sum, p_sum = chosen.sum(dim=(1, 2)) / top_k, probs.sum(dim=1)  # [L, E] each
        n = logits.new_tensor(float(N))
    if reduce is not None:
        f_sum, p_sum, n = reduce(f_sum.detach()), reduce(p_sum), reduce(n)
    n = n.clamp(min=1.0)  # no token: the sums are 0, so is the loss (no host sync to ask)
    f, p = f_sum / n, p_sum / n
    if form == "pooled":
        return E * (f * p).sum()
    return E * (f * p).sum(dim=-1).mean()


def router_z_loss(router_logits_LBTE: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(router logits)²."""
    logits = _flat(router_logits_LBTE, mask_BT)
    if logits.shape[1] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


@torch.no_grad()
def expert_load(
    router_logits_LBTE: torch.Tensor, top_k: int, mask_BT: torch.Tensor | None = None
) -> torch.Tensor:
    """[L, E] share of the routed slots each expert received per layer (rows sum to 1)."""
    logits = _flat(router_logits_LBTE, mask_BT)
    L, N, E = logits.shape
    counts = F.one_hot(logits.topk(top_k, dim=-1).indices, E).sum(dim=(1, 2)).float()
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1.0)
