"""CPU fast paths for few-row inference, applied to a built model from outside (`apply_kernels`).

- `ops`: the compiled C++ ops (`available`, `linear`, `moe`, `dequantize`), built on first use;
- `policy`: every threshold deciding when a kernel takes over from torch;
- `linear.KernelLinear`, `dispatch.KernelDispatch` / `AutoDispatch`: the modules and MoE
  dispatchers that call them, each tested equal to its torch reference;
- `apply.apply_kernels`: swaps them into a model (what `mixtral.load_model` does by default).
"""

from mixtral.kernels.apply import apply_kernels
from mixtral.kernels.dispatch import AutoDispatch, KernelDispatch
from mixtral.kernels.linear import KernelLinear
from mixtral.kernels.ops import available, dequantize, has_bf16_dot, has_w8a16, linear, moe

__all__ = [
    "AutoDispatch",
    "KernelDispatch",
    "KernelLinear",
    "apply_kernels",
    "available",
    "dequantize",
    "has_bf16_dot",
    "has_w8a16",
    "linear",
    "moe",
]
