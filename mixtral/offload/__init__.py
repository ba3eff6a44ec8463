"""Expert offloading: run a model whose experts do not fit in memory from a quantized checkpoint,
with a per-layer LRU cache of experts, background reads and next-layer prefetch (docs/offloading.md)."""

from mixtral.offload.cache import ExpertCache, OffloadStats
from mixtral.offload.model import OffloadDispatch, load_offloaded, parse_cache_size
from mixtral.offload.store import ExpertStore

__all__ = [
    "ExpertCache",
    "ExpertStore",
    "OffloadDispatch",
    "OffloadStats",
    "load_offloaded",
    "parse_cache_size",
]
