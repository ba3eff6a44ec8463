"""Inference: sampling, prefill and decode steps, and batched, streamed generation from one GenerationConfig."""

from mixtral.inference.generate import (
    Generation,
    GenerationConfig,
    GenerationStats,
    decode_one_token,
    generate,
    generate_ids,
    make_decode_step,
    prefill,
    stream,
)
from mixtral.inference.sampling import SamplingParams, sample

__all__ = [
    "Generation",
    "GenerationConfig",
    "GenerationStats",
    "SamplingParams",
    "decode_one_token",
    "generate",
    "generate_ids",
    "make_decode_step",
    "prefill",
    "sample",
    "stream",
]
