"""Checkpoints: one name table for ours <-> Hugging Face <-> Mistral <-> GGUF, a validated lazy reader,
loading, saving and conversion. Safetensors only.
"""

from mixtral.checkpoint.load import build_meta, load_model, load_weights
from mixtral.checkpoint.reader import CheckpointReader, read_config, validate_checkpoint
from mixtral.checkpoint.save import convert, save_model, save_weights

__all__ = [
    "CheckpointReader",
    "build_meta",
    "convert",
    "load_model",
    "load_weights",
    "read_config",
    "save_model",
    "save_weights",
    "validate_checkpoint",
]
