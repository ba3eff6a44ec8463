"""Weight-only compression of a built model: int8 with per-output-row scales, or bf16 storage.

Applied from outside the model (gpt-fast style): `quantize_model(model, "int8")` swaps each
`Experts` for `CompressedExperts` and, if asked, each attention/output `nn.Linear` for
`CompressedLinear`. Decode streams the compressed weights through the CPU kernel (4× fewer bytes
for int8, 2× for bf16; the activations as in `mixtral.kernels.ops.linear`: fp32, bf16 dot products
for a bf16 model with bf16 storage, int16-quantised for int8 on AVX-512 VNNI CPUs); prefill and any path without the kernel
dequantise one matrix at a time to the model's compute dtype (that of the weights replaced) and use
torch's matmul: quantize a bf16 model to get bf16 prefill matmuls, which CPUs with AVX512-BF16 or
AMX run about 3× faster than fp32 (measured in docs/performance.md).

int8 is symmetric per output channel (row): scale = max|w_row| / 127, q = round(w / scale), so
|w - q·scale| <= scale / 2 elementwise. Compressed models are for inference: no gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.kernels import ops, policy
from mixtral.kernels.linear import kernel_linear
from mixtral.model.dispatch import PerExpert, swiglu_groups
from mixtral.model.moe import Experts

ROWWISE = ("int8", "bf16")


def compress(w: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, per-row fp32 scale or None) for w [..., N, K]; rows are the last-but-one dim."""
    w = w.detach().float()
    if storage == "bf16":
        return w.to(torch.bfloat16).contiguous(), None
    if storage != "int8":
        raise ValueError(f"unknown storage {storage!r}; choose from {', '.join(ROWWISE)}")
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def decompress(
    q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight a stored (q, scale) pair represents, in `dtype` (scaled in fp32, then cast)."""
    if scale is None:
        return q.to(dtype)
    if q.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and ops.available():
        return ops.dequantize(q, scale, dtype)  # one pass, the same rounding (tested)
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


class CompressedExperts(nn.Module):
    """Experts with int8 or bf16 weights; the same `ExpertWeights` interface as `Experts`."""

    def __init__(self, experts: Experts, storage: str) -> None:
        super().__init__()
        self.storage = storage
        self.compute_dtype = experts.w1.dtype  # prefill dequantises to the dtype it replaces
        for name in ("w1", "w3", "w2"):
            q, s = compress(getattr(experts, name), storage)
            self.register_buffer(name, q)
            self.register_buffer(f"s{name[1]}", s)

    @classmethod
    def from_stored(
        cls, tensors: dict[str, torch.Tensor | None], storage: str, compute_dtype: torch.dtype
    ) -> CompressedExperts:
        """From stored w1, w3, w2 (and per-row scales s1, s3, s2), as a quantized checkpoint holds them."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.storage, self.compute_dtype = storage, compute_dtype
        for name in ("w1", "w3", "w2", "s1", "s3", "s2"):
            self.register_buffer(name, tensors[name])
        return self

    @property
    def n_experts(self) -> int:
        return self.w1.shape[0]

    def weights(self) -> PerExpert:
        def make(e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            scales = (getattr(self, f"s{n[1]}") for n in ("w1", "w3", "w2"))
            return tuple(  # type: ignore[return-value]
                decompress(getattr(self, n)[e], None if s is None else s[e], self.compute_dtype)
                for n, s in zip(("w1", "w3", "w2"), scales, strict=True)
            )

        return PerExpert(make)

    def grouped(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return swiglu_groups(x_SD, counts, self.weights())  # dequantises one expert at a time

    def stacked(self) -> tuple[torch.Tensor | None, ...]:
        return self.w1, self.w3, self.w2, self.s1, self.s3, self.s2


class CompressedLinear(nn.Module):
    """A bias-free linear layer with int8 or bf16 weight storage."""

    def __init__(self, linear: nn.Linear, storage: str) -> None:
        super().__init__()
        self.storage = storage
        q, s = compress(linear.weight, storage)
        self.register_buffer("weight", q)
        self.register_buffer("scale", s)

    @classmethod
    def from_stored(cls, weight: torch.Tensor, scale: torch.Tensor | None, storage: str) -> CompressedLinear:
        """From a stored weight (and per-row scale), as a quantized checkpoint holds them."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.storage = storage
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode reads the stored weight in the kernel (int8 up to more rows: see policy).
        if policy.linear_uses_kernel(x, self.weight, self.scale):
            return kernel_linear(x, self.weight, self.scale)
        return F.linear(x, decompress(self.weight, self.scale, x.dtype))


def quantize_rowwise(model: nn.Module, storage: str, targets: tuple[str, ...]) -> nn.Module:
    """Compress `targets` of a built Transformer in place with int8 per-row or bf16 storage."""
    model.requires_grad_(False)
    for layer in model.layers:
        if "experts" in targets and isinstance(layer.feed_forward.experts, Experts):
            layer.feed_forward.experts = CompressedExperts(layer.feed_forward.experts, storage)
        if "attention" in targets:
            for name in ("wq", "wk", "wv", "wo"):
                if isinstance(getattr(layer.attention, name), nn.Linear):
                    setattr(layer.attention, name, CompressedLinear(getattr(layer.attention, name), storage))
    if "output" in targets and isinstance(model.output, nn.Linear):
        model.output = CompressedLinear(model.output, storage)
    return model
