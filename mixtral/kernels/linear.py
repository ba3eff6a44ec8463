"""A bias-free linear layer whose few-row inference streams its weight through the CPU kernel.

`KernelLinear` is an `nn.Linear(bias=False)` (same parameter, same state dict) that
`apply_kernels` swaps in for the attention projections and the output head. Training, large
batches and machines without the compiled kernels use `F.linear`. Decode multiplies 1–8 rows by
each weight, where the kernel reads the weight once at close to memory bandwidth (see
cpu_kernels.cpp); `mixtral.kernels.policy` decides when.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.kernels import ops, policy


def kernel_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as 2-D kernel input: bf16 stays bf16 for bf16 weights (bf16 dot products), else fp32."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 else x.float()


def kernel_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] · weight [N, K]ᵀ through the kernel (int8 weight with per-row `scale`), in x's dtype."""
    y = ops.linear(kernel_input(x, weight), weight, scale)
    return y.to(x.dtype).view(*x.shape[:-1], -1)


class KernelLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    @classmethod
    def wrap(cls, linear: nn.Linear) -> KernelLinear:
        """A KernelLinear holding `linear`'s own weight Parameter (no copy; gradients still flow)."""
        if linear.bias is not None:
            raise ValueError("KernelLinear has no bias; Mixtral's linear layers have none")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features)
        new.weight = linear.weight
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if policy.linear_uses_kernel(x, self.weight):
            return kernel_linear(x, self.weight)
        return F.linear(x, self.weight)
