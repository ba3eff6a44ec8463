"""The compiled CPU kernel ops: built on first use, loaded once, callable as torch.ops.mixtral_cpu.*.

`cpu_kernels.cpp` is compiled once per machine with torch's JIT extension builder (needs a C++
compiler and ninja; cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). If that
fails, or `MIXTRAL_NO_KERNELS=1` is set, `available()` is False and callers use ATen (the
decisions live in `mixtral.kernels.policy`).
The ops are registered with torch.library (`torch.ops.mixtral_cpu.*`) with fake implementations,
so a decode step that calls them can be captured by torch.compile.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}


def _build() -> bool:
    from torch.utils import cpp_extension

    here = Path(__file__).parent
    cpp_extension.load(
        name="mixtral_cpu_kernels",
        sources=[str(here / "cpu_kernels.cpp"), str(here / "cpu_dots.cpp")],
        # -fopenmp: at::parallel_for is an inline OpenMP loop, serial unless we compile with it.
        extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    _register_fakes()
    return True


def _register_fakes() -> None:
    @torch.library.register_fake("mixtral_cpu::linear")
    def _linear(x, w, scale):
        return x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32)

    @torch.library.register_fake("mixtral_cpu::dequantize")
    def _dequantize(q, scale, dtype):
        return torch.empty(q.shape, dtype=dtype, device=q.device)

    @torch.library.register_fake("mixtral_cpu::moe")
    def _moe(x, ids, weights, w1, w3, w2, s1, s3, s2):
        return torch.empty_like(x)


def available() -> bool:
    """True once the kernels are built and loaded (builds them on the first call)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                if os.environ.get("MIXTRAL_NO_KERNELS") == "1":
                    _state["ok"] = False
                else:
                    try:
                        _state["ok"] = _build()
                    except Exception as e:  # no compiler, no ninja, unsupported platform...
                        log.warning("mixtral CPU kernels unavailable, using ATen: %s", e)
                        _state["ok"] = False
    return bool(_state["ok"])


def has_w8a16() -> bool:
    """True if int8 weights multiply 16-bit quantised activations with AVX-512 VNNI in this build.

    x is then quantised per row and per block of 256 to int16 (error at most 1/65534 of the
    block's largest |x|); MIXTRAL_NO_W8A16=1 selects the exact fp32 widening path instead.
    """
    return available() and bool(torch.ops.mixtral_cpu.has_w8a16())


def has_bf16_dot() -> bool:
    """True if bf16 weights times bf16 activations use AVX512-BF16 dot products in this build."""
    if "bf16_dot" not in _state:  # fixed at build time; asked on every bf16 Linear call
        _state["bf16_dot"] = available() and bool(torch.ops.mixtral_cpu.has_bf16_dot())
    return bool(_state["bf16_dot"])


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] fp32 or bf16 · w [N, K]ᵀ (fp32, bf16, or int8 with per-row fp32 scale [N]) → [M, N] fp32.

    bf16 x with bf16 w uses bf16 dot products (fp32 accumulation) where the CPU has them; fp32 x is
    multiplied exactly by widened weights (int8: see `has_w8a16`).
    """
    return torch.ops.mixtral_cpu.linear(x, w, scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 q [..., N, K] · fp32 scale [..., N] as float32 or bfloat16 (one rounding), rows in parallel."""
    return torch.ops.mixtral_cpu.dequantize(q, scale, dtype)


def moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: torch.Tensor,
    w3: torch.Tensor,
    w2: torch.Tensor,
    s1: torch.Tensor | None = None,
    s3: torch.Tensor | None = None,
    s2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_k weights[t, k] · SwiGLU_{ids[t, k]}(x[t]) for a few tokens, each expert streamed once.

    x fp32 or bf16; the result has x's dtype. bf16 x with bf16 experts computes with bf16 dot products.
    """
    return torch.ops.mixtral_cpu.moe(x, ids, weights, w1, w3, w2, s1, s3, s2)
