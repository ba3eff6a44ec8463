"""Sparse mixture-of-experts feed-forward layer: fp32 top-k router, stacked SwiGLU experts, a dispatcher.

Paper Section 2.1 (Jiang et al. 2024): G(x) = Softmax(TopK(x · W_g)), y = Σ_i G(x)_i · SwiGLU_i(x),
SwiGLU_i(x) = w2_i(silu(w1_i x) ⊙ w3_i x). Dropless: every token reaches exactly `top_k` experts.
How routed tokens reach the experts is the job of `MoE.dispatcher`, an object from
`mixtral.model.dispatch` (or the kernels, expert parallelism, offloading) that the layer only calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.model.dispatch import Dispatcher, SortedDispatch
from mixtral.model.grouped import grouped_swiglu


def route(logits_TE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: (weights_TK, ids_TK); weights are the softmax over the k kept logits.

    Equal to HF's softmax-over-all, top-k, renormalise form up to rounding; ids are ordered by
    decreasing logit, so column 0 is each token's first-choice expert.
    """
    top_logits_TK, ids_TK = torch.topk(logits_TE, top_k, dim=-1)
    return torch.softmax(top_logits_TK, dim=-1), ids_TK


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w1, w3 [E, F, D] and w2 [E, D, F] (`ExpertWeights`)."""

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

    def grouped(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # One autograd op whose backward writes the stacked weight gradients in place.
        return grouped_swiglu(x_SD, counts, self.w1, self.w3, self.w2)

    def stacked(self) -> tuple[torch.Tensor | None, ...]:
        return self.w1, self.w3, self.w2, None, None, None

    def forward(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, dispatcher: Dispatcher
    ) -> torch.Tensor:
        """`dispatcher` over these experts, called through the module so that hooks on it run (FSDP2
        gathers sharded weights in its pre-forward hook and frees them after)."""
        return dispatcher(x_TD, ids_TK, weights_TK, self)


class MoE(nn.Module):
    """Router (`gate`, no bias) plus experts; `dispatcher` (default `SortedDispatch`) runs them."""

    def __init__(
        self, dim: int, hidden_dim: int, n_experts: int, top_k: int, dispatcher: Dispatcher | None = None
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, hidden_dim)
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else SortedDispatch()
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
        w_TK = weights_TK.to(x_TD.dtype)
        if isinstance(self.experts, Experts):  # through Experts.__call__: its module hooks run
            y_TD = self.experts(x_TD, ids_TK, w_TK, self.dispatcher)
        else:  # quantized, offloaded: no forward of their own
            y_TD = self.dispatcher(x_TD, ids_TK, w_TK, self.experts)
        return y_TD.view(B, T, D), logits_TE.view(B, T, -1)
