"""mixtral: the Mixtral sparse mixture-of-experts language model in plain PyTorch."""

from .config import PRESETS, MixtralConfig, get_preset
from .model import KVCache, ModelOutput, Transformer

__all__ = ["PRESETS", "KVCache", "MixtralConfig", "ModelOutput", "Transformer", "get_preset"]
