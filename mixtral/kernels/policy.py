"""Where the CPU kernels take over from torch: every row and slot threshold, and the choices made from them.

The thresholds were measured on this project's 2-core AVX-512 machine (docs/performance.md); a
CPU with more cores or AMX may move them, and this module is the one place to change them.
"""

from __future__ import annotations

import torch
from torch import nn

from mixtral.kernels import ops

# Rows of x up to which the streaming kernel beats torch's fp32 matmul.
KERNEL_MAX_ROWS = 16
# bf16 x and bf16 weights on a CPU with native bf16 dot products: torch's bf16 matmul (oneDNN) takes
# over from 5 rows (32000x1024 head: the kernel 1.6 ms against torch's 4.8 at 1 row, but 8.4 against
# 5.7 at 8 rows).
KERNEL_MAX_ROWS_BF16 = 4
# int8 matrices stay in the kernel for decode batches up to this; prefill dequantises. Dequantising
# a matrix costs more than several kernel passes over it (the 32000x1024 head: 135 ms dequantised +
# bf16 matmul, 14.5 ms in the kernel at 32 rows, 54 at 128).
INT8_KERNEL_MAX_ROWS = 128
# Token·k slots up to which the MoE kernel beats the sorted grouped matmuls.
KERNEL_MAX_SLOTS = 64
# Group-quantized (int4/int8) matrices: rows of x up to which the kernel (8-bit activations, VNNI)
# beats dequantizing the matrix and calling torch's matmul.
GROUP_KERNEL_MAX_ROWS = 32

FLOAT_DTYPES = (torch.float32, torch.bfloat16)  # activations and float weights the kernels take
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # stored weights the MoE kernel reads


def _needs_grad(x: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))


def use_kernel(x: torch.Tensor, *weights: torch.Tensor | None, max_rows: int = KERNEL_MAX_ROWS) -> bool:
    """Few rows (at most max_rows), CPU, no autograd needed, kernels built: the decode regime."""
    if x.device.type != "cpu" or x.numel() > max_rows * x.shape[-1]:
        return False
    if _needs_grad(x, [w for w in weights if w is not None]):
        return False
    return ops.available()


def linear_max_rows(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> int:
    """Rows of x up to which the kernel beats torch for this weight storage and pair of dtypes."""
    if scale is not None:
        return INT8_KERNEL_MAX_ROWS
    if x.dtype == weight.dtype == torch.bfloat16 and ops.has_bf16_dot():
        return KERNEL_MAX_ROWS_BF16
    return KERNEL_MAX_ROWS


def linear_uses_kernel(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether x · weightᵀ (weight int8 with `scale`, or fp32/bf16) should run in the kernel."""
    if x.dtype not in FLOAT_DTYPES or (scale is None and weight.dtype not in FLOAT_DTYPES):
        return False
    return use_kernel(x, weight, max_rows=linear_max_rows(x, weight, scale))


def group_linear_uses_kernel(x: torch.Tensor) -> bool:
    """Whether x · ŵᵀ for a group-quantized weight should run in the kernel (which takes fp32 x)."""
    return x.dtype in FLOAT_DTYPES and use_kernel(x, max_rows=GROUP_KERNEL_MAX_ROWS)


def moe_uses_kernel(x_TD: torch.Tensor, top_k: int, experts: object) -> bool:
    """The MoE kernel for a few tokens at inference (decode) with storage it reads; else torch."""
    if getattr(experts, "kernel_format", None) == "group":  # int4/int8 groups: the qmoe kernel
        return x_TD.shape[0] * top_k <= KERNEL_MAX_SLOTS and use_kernel(x_TD, max_rows=x_TD.shape[0])
    stacked = experts.stacked()  # type: ignore[attr-defined]
    if stacked[0].dtype not in WEIGHT_DTYPES or x_TD.shape[0] * top_k > KERNEL_MAX_SLOTS:
        return False
    params = list(experts.parameters()) if isinstance(experts, nn.Module) else []
    return use_kernel(x_TD, *params, max_rows=x_TD.shape[0])
