"""Group-wise int4/int8 weights in a built model: `GroupExperts` and `GroupLinear` (format: `quant.group`).

Decode (a few rows, no autograd, CPU kernels built) multiplies the packed weights directly in the
compiled kernels (`ops.qlinear`, `ops.qmoe`: 8-bit activations, exact integer block sums, the
arithmetic of `group.reference_linear`); everything else (prefill, other devices, no kernels)
dequantizes one matrix at a time to the compute dtype and uses torch's matmul. Inference only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.kernels import ops, policy
from mixtral.model.dispatch import PerExpert, swiglu_groups
from mixtral.model.moe import Experts
from mixtral.quant import group

NAMES = ("w1", "w3", "w2")


class GroupExperts(nn.Module):
    """E SwiGLU experts with group-quantized weights: buffers qw1, qw3 [E, F, D·bits/8], qw2 [E, D, F·bits/8]
    and fp16 scales sw1, sw3 [E, F, D/group], sw2 [E, D, F/group]."""

    kernel_format = "group"  # what `policy.moe_uses_kernel` and `KernelDispatch` look for

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        bits: int,
        group_size: int,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.bits, self.group_size, self.compute_dtype = bits, group_size, compute_dtype
        for name in NAMES:
            self.register_buffer(f"q{name}", tensors[f"q{name}"])
            self.register_buffer(f"s{name}", tensors[f"s{name}"])

    @classmethod
    def from_experts(cls, experts: Experts, bits: int, group_size: int = 32) -> GroupExperts:
        tensors = {}
        for name in NAMES:
            tensors[f"q{name}"], tensors[f"s{name}"] = group.quantize(
                getattr(experts, name), bits, group_size
            )
        return cls(tensors, bits, group_size, experts.w1.dtype)

    @property
    def n_experts(self) -> int:
        return self.qw1.shape[0]

    def weights(self) -> PerExpert:
        return PerExpert(lambda e: tuple(  # type: ignore[arg-type]
            group.dequantize(getattr(self, f"q{n}")[e], getattr(self, f"s{n}")[e], self.bits, self.compute_dtype)
            for n in NAMES
        ))  # fmt: skip

    def grouped(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return swiglu_groups(x_SD, counts, self.weights())

    def stacked(self) -> tuple[torch.Tensor, ...]:
        """(qw1, qw3, qw2, sw1, sw3, sw2): what `ops.qmoe` reads."""
        return self.qw1, self.qw3, self.qw2, self.sw1, self.sw3, self.sw2

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts, int{self.bits}, group {self.group_size}"


class GroupLinear(nn.Module):
    """A bias-free linear layer with group-quantized weight (`qweight`, fp16 `scales`)."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bits: int,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.bits, self.compute_dtype = bits, compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.group_size = qweight.shape[-1] * 8 // bits // scales.shape[-1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 32) -> GroupLinear:
        q, s = group.quantize(linear.weight, bits, group_size)
        return cls(q, s, bits, linear.weight.dtype)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-1] * 8 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"GroupLinear({self.extra_repr()}): the input's last dimension is {x.shape[-1]}, "
                f"not {self.in_features} (input shape {tuple(x.shape)})"
            )
        if policy.group_linear_uses_kernel(x):
            y = ops.qlinear(x.reshape(-1, x.shape[-1]).float(), self.qweight, self.scales, self.bits)
            return y.to(x.dtype).view(*x.shape[:-1], -1)
        return F.linear(x, group.dequantize(self.qweight, self.scales, self.bits, x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, int{self.bits}, group {self.group_size}"
