"""mixtral: the Mixtral sparse mixture-of-experts language model in plain PyTorch.

Public API: `load_model`, `save_model`, `convert`, `load_tokenizer`, `generate`, `stream`,
`GenerationConfig`, `encode_chat`, `Transformer` (`model(tokens).logits` / `.router_logits`),
`MixtralConfig`, presets. The packages: config, model, kernels, quant, checkpoint, text, inference,
data, train, eval, analysis, cli (docs/architecture.md).
"""

from mixtral.checkpoint import convert, load_model, read_config, save_model
from mixtral.config import PRESETS, MixtralConfig, get_preset
from mixtral.inference import (
    Generation,
    GenerationConfig,
    GenerationStats,
    SamplingParams,
    generate,
    generate_ids,
    stream,
)
from mixtral.model import KVCache, ModelOutput, Transformer
from mixtral.text import Tokenizer, encode_chat, load_tokenizer

__all__ = [
    "PRESETS",
    "Generation",
    "GenerationConfig",
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
