"""Typed exceptions: every user-facing failure names the problem, the field or the tensor."""

from __future__ import annotations


class MixtralError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MixtralError, ValueError):
    """An architecture config is invalid; the message names the field."""


class CheckpointError(MixtralError):
    """A checkpoint on disk cannot be loaded as asked; the message names the file or tensor."""


class MissingTensorError(CheckpointError):
    """A tensor the architecture needs is absent from the checkpoint."""


class UnexpectedTensorError(CheckpointError):
    """The checkpoint holds a tensor the architecture has no place for."""


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with what the config implies."""


class CorruptFileError(CheckpointError):
    """A safetensors file is truncated, has a bad header, or is not safetensors at all."""


class ConfigMismatchError(CheckpointError):
    """The config file and the weights describe different models (e.g. expert count)."""


class NonFiniteWeightError(CheckpointError):
    """A weight tensor holds NaN or Inf."""


class FormatError(CheckpointError):
    """A directory is neither a Hugging Face nor a Mistral checkpoint (or lacks its config)."""


class TokenizerError(MixtralError):
    """No usable tokenizer could be found or a chat conversation is malformed."""


class TokenizerNotFoundError(TokenizerError):
    """A directory holds no tokenizer file at all (as opposed to one that exists but cannot be read)."""


class GenerationError(MixtralError, ValueError):
    """Invalid generation request: bad sampling parameters, prompt too long for the context, ..."""


class DataError(MixtralError, ValueError):
    """Training data cannot be read or used as asked; the message names the file and line or row."""


class TrainingError(MixtralError):
    """A training run cannot continue as asked (non-finite values, a bad or mismatched checkpoint)."""
