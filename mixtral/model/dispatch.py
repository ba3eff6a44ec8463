"""MoE dispatch: how routed tokens reach their experts and come back, as interchangeable strategy objects.

Every dispatcher is called as `dispatcher(x_TD, ids_TK, weights_TK, experts) -> y_TD` with
y[t] = Σ_k weights[t, k] · SwiGLU_{ids[t, k]}(x[t]) (paper Section 2.1). The MoE layer holds one
(`MoE.dispatcher`) and knows nothing else about it, so other strategies plug in from outside the
model: the CPU decode kernel (`mixtral.kernels`), and later the all-to-all of expert parallelism
and an offloading expert store. Two live here, in plain torch:
- `LoopDispatch`: the slow, obvious reference (mask tokens per expert), used by tests;
- `SortedDispatch`: token slots sorted by expert, each expert run once on its contiguous rows
  (`experts.grouped`), no per-token weight copies; prefill and training (differentiable).
Every dispatcher is tested equal to `LoopDispatch`, forward (and backward where differentiable),
including experts that receive no token.

`experts` is any object with the `ExpertWeights` interface: stacked float `Experts`, the compressed
experts of `mixtral.quant`, later an offloading store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F


class ExpertWeights(Protocol):
    n_experts: int

    def weights(self) -> Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Indexable by expert e: (w1 [F, D], w3 [F, D], w2 [D, F]) in the compute dtype."""
        ...

    def grouped(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e's SwiGLU on rows [Σ counts[:e], Σ counts[:e+1]) of x: [S, D]."""
        ...

    def stacked(self) -> tuple[torch.Tensor | None, ...]:
        """(w1 [E, F, D], w3, w2 [E, D, F], s1, s3, s2): raw stacked storage and per-row scales
        (None for float storage), for kernels that read the stored bytes directly."""
        ...


class Dispatcher(Protocol):
    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor: ...


def swiglu(x_ND: torch.Tensor, w1_FD: torch.Tensor, w3_FD: torch.Tensor, w2_DF: torch.Tensor) -> torch.Tensor:
    """One expert: w2(silu(w1 x) ⊙ w3 x)."""
    return F.linear(F.silu(F.linear(x_ND, w1_FD)) * F.linear(x_ND, w3_FD), w2_DF)


class PerExpert:
    """An indexable `weights()` result whose item e, expert e's (w1, w3, w2), is made on access by `make(e)`
    (dequantized storage, a cache slot): nothing is materialised for experts no token uses."""

    def __init__(self, make: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.make = make

    def __getitem__(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.make(e)


def swiglu_groups(
    x_SD: torch.Tensor, counts: list[int], weights: Sequence[tuple[torch.Tensor, ...]]
) -> torch.Tensor:
    """`ExpertWeights.grouped` for any per-expert `weights()`: one matmul triple per non-empty group."""
    outs = [swiglu(rows_ND, *weights[e]) for e, rows_ND in enumerate(x_SD.split(counts)) if counts[e]]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class LoopDispatch:
    """Reference: for each expert, gather its tokens, apply it, add the weighted result back."""

    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        y_TD = torch.zeros_like(x_TD)
        weights = experts.weights()
        for e in range(experts.n_experts):
            tok_N, slot_N = torch.where(ids_TK == e)
            if tok_N.numel() == 0:
                continue
            out_ND = swiglu(x_TD[tok_N], *weights[e])
            y_TD = y_TD.index_add(0, tok_N, out_ND * weights_TK[tok_N, slot_N, None])
        return y_TD

    def __repr__(self) -> str:
        return "LoopDispatch()"


class SortedDispatch:
    """Sort the T·K (token, expert) slots by expert, run each expert once on its contiguous rows.

    One host sync (the per-expert counts) per call. Results are un-sorted with a gather and the k
    contributions of a token are summed in slot order, so no scatter-add is needed in either pass.
    """

    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        T, K = ids_TK.shape
        flat_ids_S = ids_TK.reshape(-1)  # S = T*K slots, slot s belongs to token s // K
        order_S = torch.argsort(flat_ids_S, stable=True)
        counts = torch.bincount(flat_ids_S, minlength=experts.n_experts).tolist()
        y_sorted_SD = experts.grouped(x_TD[order_S // K], counts)
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_SD = y_sorted_SD[inverse_S] * weights_TK.reshape(-1, 1)
        return y_SD.view(T, K, -1).sum(dim=1)

    def __repr__(self) -> str:
        return "SortedDispatch()"
