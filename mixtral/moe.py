"""Sparse mixture-of-experts feed-forward layer: fp32 top-k router, stacked SwiGLU experts, dispatch.

Paper Section 2.1 (Jiang et al. 2024): G(x) = Softmax(TopK(x · W_g)), y = Σ_i G(x)_i · SwiGLU_i(x),
SwiGLU_i(x) = w2_i(silu(w1_i x) ⊙ w3_i x). Dropless: every token reaches exactly `top_k` experts.

Dispatch strategies share one signature, `(x_TD, ids_TK, weights_TK, experts) -> y_TD`:
- `dispatch_loop`: the slow, obvious reference (mask tokens per expert), used by tests;
- `dispatch_sorted`: token slots sorted by expert, one matmul triple per non-empty expert group on
  contiguous rows, no per-token weight copies; prefill and training (differentiable; for stacked
  `Experts` through `grouped.grouped_swiglu`, whose backward writes the stacked weight gradients
  in place);
- `dispatch_kernel`: the compiled decode kernel (mixtral.kernels): experts grouped in C++ and each
  selected expert's weights streamed once for all its rows; no host sync, inference only.
`choose_dispatch` picks kernel for few tokens without autograd, sorted otherwise. All are tested
equal to the reference (forward; and backward for the differentiable ones), including experts that
receive no token. `experts` is any module with `weights()` (per-expert fp32/bf16 views, or
dequantised copies for compressed storage) and `kernel_weights()` (raw storage and scales).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .grouped import grouped_swiglu

KERNEL_MAX_SLOTS = 64  # token·k slots up to which the streaming kernel beats sorted matmuls here


class ExpertWeights(Protocol):
    n_experts: int

    def weights(self) -> Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Indexable by expert e: (w1 [F, D], w3 [F, D], w2 [D, F]) in the compute dtype."""
        ...

    def kernel_weights(self) -> tuple[torch.Tensor | None, ...]:
        """(w1, w3, w2, s1, s3, s2): stacked storage and per-row scales (None unless int8)."""
        ...


Dispatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertWeights], torch.Tensor]


def route(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights_TK, ids_TK); weights are the softmax over the k kept logits.

    Equal to HF's softmax-over-all, top-k, renormalise form up to rounding; ids are ordered by
    decreasing logit, so column 0 is each token's first-choice expert.
    """
    top_logits_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
    return torch.softmax(top_logits_TK, dim=-1), ids_TK


def _swiglu(
    x_ND: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor
) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


def dispatch_loop(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Reference: for each expert, gather its tokens, apply it, add the weighted result back."""
    y_TD = torch.zeros_like(x_TD)
    weights = experts.weights()
    for e in range(experts.n_experts):
        tok_N, slot_N = torch.where(ids_TK == e)
        if tok_N.numel() == 0:
            continue
        out_ND = _swiglu(x_TD[tok_N], *weights[e])
        y_TD = y_TD.index_add(0, tok_N, out_ND * weights_TK[tok_N, slot_N, None])
    return y_TD


def dispatch_sorted(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Sort the T·K (token, expert) slots by expert, run each expert once on its contiguous rows.

    One host sync (the per-expert counts) per call. Results are un-sorted with a gather and the k
    contributions of a token are summed in slot order, so no scatter-add is needed in either pass.
    """
    T, K = ids_TK.shape
    E = experts.n_experts
    flat_ids_S = ids_TK.reshape(-1)  # S = T*K slots, slot s belongs to token s // K
    order_S = torch.argsort(flat_ids_S, stable=True)
    counts = torch.bincount(flat_ids_S, minlength=E).tolist()
    x_SD = x_TD[order_S // K]
    if isinstance(experts, Experts):  # stacked parameters: one grouped op, gradients written in place
        y_sorted_SD = grouped_swiglu(x_SD, counts, experts.w1, experts.w3, experts.w2)
    else:
        ws = experts.weights()
        outs = [_swiglu(rows_ND, *ws[e]) for e, rows_ND in enumerate(x_SD.split(counts)) if counts[e]]
        y_sorted_SD = torch.cat(outs) if len(outs) > 1 else outs[0]
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    y_SD = y_sorted_SD[inverse_S] * weights_TK.reshape(-1, 1)
    return y_SD.view(T, K, -1).sum(dim=1)


def dispatch_kernel(
    x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """The compiled streaming kernel (fp32 or bf16 activations; fp32, bf16 or int8 weights); no autograd."""
    if not kernels.available():
        raise RuntimeError("the mixtral CPU kernels are not available on this machine (see mixtral.kernels)")
    weights = experts.kernel_weights()
    # A bf16 model with bf16 experts keeps bf16 activations: the kernel uses bf16 dot products.
    x = x_TD if x_TD.dtype == torch.bfloat16 and weights[0].dtype == torch.bfloat16 else x_TD.float()
    return kernels.moe(x, ids_TK, weights_TK.float(), *weights).to(x_TD.dtype)


DISPATCH: dict[str, Dispatch] = {"loop": dispatch_loop, "sorted": dispatch_sorted, "kernel": dispatch_kernel}


def choose_dispatch(x_TD: torch.Tensor, top_k: int, experts: nn.Module) -> Dispatch:
    """Kernel for a few tokens at inference (decode), sorted matmuls otherwise (prefill, training)."""
    needs_grad = torch.is_grad_enabled() and (
        x_TD.requires_grad or any(p.requires_grad for p in experts.parameters())
    )
    if not needs_grad and x_TD.shape[0] * top_k <= KERNEL_MAX_SLOTS and kernels.available():
        return dispatch_kernel
    return dispatch_sorted


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1, w3 [E, F, D] and w2 [E, D, F]."""

    def __init__(self, n_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        # unbind, not w[e]: the backward of E `select`s would materialise E zero-filled [E, F, D]
        # gradients per weight (gigabytes per step at 8x7B shapes); unbind's backward stacks once.
        return list(zip(self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0), strict=True))

    def kernel_weights(self) -> tuple[torch.Tensor | None, ...]:
        return self.w1, self.w3, self.w2, None, None, None


class MoE(nn.Module):
    """Router (`gate`, no bias) plus experts; `dispatch` names a strategy in DISPATCH or is "auto"."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, hidden_dim)
        self.dispatch = "auto"
        self.jitter = 0.0  # training only: router input × U(1 - jitter, 1 + jitter)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (y_BTD in x's dtype, router_logits_BTE in fp32)."""
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        # NOTE: the router runs in fp32 whatever the model dtype: bf16 logits flip near-tied top-k
        # choices, and the aux losses and routing analysis read these logits.
        router_in = x_TD.float()
        if self.training and self.jitter > 0:
            # Jitter the router's input only (Switch Transformer); HF also jitters the experts' input.
            router_in = router_in * torch.empty_like(router_in).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits_TE = F.linear(router_in, self.gate.weight.float())
        weights_TK, ids_TK = route(logits_TE, self.top_k)
        if self.dispatch == "auto":
            fn = choose_dispatch(x_TD, self.top_k, self.experts)
        else:
            fn = DISPATCH[self.dispatch]
        y_TD = fn(x_TD, ids_TK, weights_TK.to(x_TD.dtype), self.experts)
        return y_TD.view(B, T, D), logits_TE.view(B, T, -1)
