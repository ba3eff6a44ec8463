"""mixtral: the Mixtral sparse mixture-of-experts language model in plain PyTorch.

Public API: `load_model`, `save_model`, `convert`, `load_tokenizer`, `generate`, `stream`,
`encode_chat`, `Transformer` (`model(tokens).logits` / `.router_logits`), `MixtralConfig`, presets.
"""

from .chat import encode_chat
from .checkpoint import convert, load_model, read_config, save_model
from .config import PRESETS, MixtralConfig, get_preset
from .generate import Generation, GenerationStats, generate, generate_ids, stream
from .model import KVCache, ModelOutput, Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PRESETS",
    "Generation",
    "GenerationStats",
    "KVCache",
    "MixtralConfig",
    "ModelOutput",
    "SamplingParams",
    "Tokenizer",
    "Transformer",
    "convert",
    "encode_chat",
    "generate",
    "generate_ids",
    "get_preset",
    "load_model",
    "load_tokenizer",
    "read_config",
    "save_model",
    "stream",
]
