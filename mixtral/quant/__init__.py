"""Weight-only compression applied to a built model from outside (int8 per-row scales, bf16 storage)."""

from mixtral.quant.rowwise import (
    STORAGE,
    TARGETS,
    CompressedExperts,
    CompressedLinear,
    compress,
    decompress,
    quantize_model,
)

__all__ = [
    "STORAGE",
    "TARGETS",
    "CompressedExperts",
    "CompressedLinear",
    "compress",
    "decompress",
    "quantize_model",
]
