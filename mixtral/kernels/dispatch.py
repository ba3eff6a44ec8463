"""MoE dispatchers that use the CPU kernel: the kernel itself, and the automatic choice made at each call.

Both follow `mixtral.model.dispatch.Dispatcher`. `KernelDispatch` groups a few tokens by expert in
C++ and streams each selected expert's weights once for all its rows (fp32 or bf16 activations;
fp32, bf16 or int8 storage read straight from `experts.stacked()`, or group-quantized int4/int8
experts through `ops.qmoe`); no autograd. `AutoDispatch`
uses it where `policy.moe_uses_kernel` says so (decode) and its fallback otherwise (prefill,
training). Tested equal to the reference loop (tests/unit/test_moe.py).
"""

from __future__ import annotations

import torch

from mixtral.kernels import ops, policy
from mixtral.model.dispatch import Dispatcher, ExpertWeights, SortedDispatch


class KernelDispatch:
    """The compiled streaming kernel; raises if the kernels are not available here."""

    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        if not ops.available():
            raise RuntimeError(
                "the mixtral CPU kernels are not available on this machine (see mixtral.kernels)"
            )
        stacked = experts.stacked()
        if getattr(experts, "kernel_format", None) == "group":  # packed int4/int8 groups (quant.groupwise)
            y = ops.qmoe(x_TD.float(), ids_TK, weights_TK.float(), *stacked, experts.bits)  # type: ignore[attr-defined]
            return y.to(x_TD.dtype)
        # A bf16 model with bf16 experts keeps bf16 activations: the kernel uses bf16 dot products.
        x = x_TD if x_TD.dtype == torch.bfloat16 and stacked[0].dtype == torch.bfloat16 else x_TD.float()
        return ops.moe(x, ids_TK, weights_TK.float(), *stacked).to(x_TD.dtype)

    def __repr__(self) -> str:
        return "KernelDispatch()"


class AutoDispatch:
    """`KernelDispatch` for a few tokens without autograd (decode), `fallback` otherwise."""

    def __init__(self, fallback: Dispatcher | None = None) -> None:
        self.kernel = KernelDispatch()
        self.fallback: Dispatcher = fallback if fallback is not None else SortedDispatch()

    def choose(self, x_TD: torch.Tensor, top_k: int, experts: ExpertWeights) -> Dispatcher:
        return self.kernel if policy.moe_uses_kernel(x_TD, top_k, experts) else self.fallback

    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: ExpertWeights
    ) -> torch.Tensor:
        return self.choose(x_TD, ids_TK.shape[1], experts)(x_TD, ids_TK, weights_TK, experts)

    def __repr__(self) -> str:
        return f"AutoDispatch(fallback={self.fallback!r})"
