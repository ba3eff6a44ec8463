"""Weight-only compression applied to a built model from outside: int8 per-row scales, bf16 storage,
and group-wise int4/int8 (llama.cpp's Q4_0/Q8_0 blocks)."""

from mixtral.quant.apply import STORAGE, TARGETS, Storage, parse_storage, quantize_model, storage_name
from mixtral.quant.groupwise import GroupExperts, GroupLinear
from mixtral.quant.rowwise import CompressedExperts, CompressedLinear, compress, decompress

__all__ = [
    "STORAGE",
    "TARGETS",
    "CompressedExperts",
    "CompressedLinear",
    "GroupExperts",
    "GroupLinear",
    "Storage",
    "compress",
    "decompress",
    "parse_storage",
    "quantize_model",
    "storage_name",
]
