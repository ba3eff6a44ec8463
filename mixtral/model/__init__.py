"""The Mixtral model in plain single-device PyTorch: decoder, KV cache, MoE layer, dispatch strategies.

Imports only torch, `mixtral.config` and `mixtral.errors`; kernels, quantization, parallelism and
offloading are applied to a built model from outside.
"""

from mixtral.model.cache import KVCache, LayerCache
from mixtral.model.dispatch import Dispatcher, ExpertWeights, LoopDispatch, SortedDispatch
from mixtral.model.moe import Experts, MoE, route
from mixtral.model.transformer import ModelOutput, Transformer

__all__ = [
    "Dispatcher",
    "ExpertWeights",
    "Experts",
    "KVCache",
    "LayerCache",
    "LoopDispatch",
    "MoE",
    "ModelOutput",
    "SortedDispatch",
    "Transformer",
    "route",
]
