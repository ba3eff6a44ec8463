"""A bias-free linear layer whose few-row inference streams its weight through the CPU kernel.

Same parameters and state dict as `nn.Linear(bias=False)`; training, large batches and machines
without the compiled kernels use `F.linear`. Decode multiplies 1–8 rows by each weight, where the
kernel reads the weight once at close to memory bandwidth (see mixtral/kernels/cpu_kernels.cpp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

KERNEL_MAX_ROWS = 16  # rows of x up to which the streaming kernel beats torch's fp32 matmul here
# bf16 x and bf16 weights on a CPU with native bf16 dot products: torch's bf16 matmul (oneDNN) wins
# from 8 rows (32000x1024 head: 5.7 ms against the kernel's 8.4 at 8 rows; the kernel 1.6 against
# 4.8 ms at 1 row).
KERNEL_MAX_ROWS_BF16 = 4
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def use_kernel(x: torch.Tensor, *weights: torch.Tensor | None, max_rows: int = KERNEL_MAX_ROWS) -> bool:
    """Few rows (at most max_rows), CPU, no autograd needed, kernel built: the decode regime."""
    if x.device.type != "cpu" or x.numel() > max_rows * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (
        x.requires_grad or any(w is not None and w.requires_grad for w in weights)
    ):
        return False
    return kernels.available()


def max_kernel_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """Rows of x up to which the kernel beats torch's matmul for this pair of dtypes."""
    if x.dtype == weight.dtype == torch.bfloat16 and kernels.has_bf16_dot():
        return KERNEL_MAX_ROWS_BF16
    return KERNEL_MAX_ROWS


def kernel_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as 2-D kernel input: bf16 stays bf16 for bf16 weights (bf16 dot products), else fp32."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 else x.float()


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype in _KERNEL_DTYPES and x.dtype in _KERNEL_DTYPES and use_kernel(
            x, self.weight, max_rows=max_kernel_rows(x, self.weight)
        ):
            y = kernels.linear(kernel_input(x, self.weight), self.weight)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight)
