"""What the `mixtral` subcommands share: dtype names, loading a model with its tokenizer, option mapping."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mixtral.errors import MixtralError
from mixtral.inference import GenerationConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")
QUANT_TARGETS = ("experts", "attention", "output")  # --quantize compresses every matrix but the embedding


@dataclass(frozen=True)
class ModelOptions:
    """How to load a model for inference: weight dtype and optional weight-only compression."""

    dtype: str = "fp32"
    quantize: str | None = None


def load_for_inference(path: str, options: ModelOptions | None = None):
    """(model in eval mode, tokenizer): the checkpoint's own tokenizer, else the bundled Mixtral one."""
    options = options or ModelOptions()
    from mixtral.checkpoint import load_model
    from mixtral.text import load_tokenizer

    if not Path(path).exists():
        raise MixtralError(f"model path {path!r} does not exist")
    model = load_model(path, dtype=DTYPES[options.dtype]).eval()
    if options.quantize:
        from mixtral.quant import quantize_model

        quantize_model(model, options.quantize, QUANT_TARGETS)
    try:
        tok = load_tokenizer(path)
    except MixtralError:
        tok = load_tokenizer(None)
        print(f"note: no tokenizer in {path}; using the bundled Mixtral tokenizer", file=sys.stderr)
    if tok.vocab_size > model.config.vocab_size:
        raise MixtralError(
            f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {model.config.vocab_size}"
        )
    return model, tok


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model runs: auto (cuda if available, else mps, else cpu), cpu, cuda "
                   "(cuda:N via CUDA_VISIBLE_DEVICES) or mps; the CPU decode kernels run only on cpu")  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """The torch device for a --device value; a one-line MixtralError if that device is not here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MixtralError("--device cuda: no CUDA device is available to this torch build/process")
    if name == "mps" and not torch.backends.mps.is_available():
        raise MixtralError("--device mps: Apple's Metal backend is not available here")
    if name not in DEVICES:
        raise MixtralError(f"--device {name!r}: choose from {', '.join(DEVICES)}")
    return torch.device(name)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype to load (default fp32)")
    p.add_argument("--quantize", choices=("int8", "bf16"), default=None,
                   help="weight-only compression after loading: int8 with per-channel scales or bf16 "
                   "storage; decode streams the compressed weights, prefill dequantises to --dtype")  # fmt: skip


def model_options(a: argparse.Namespace) -> ModelOptions:
    return ModelOptions(dtype=a.dtype, quantize=a.quantize)


def add_sampling_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy; higher = more random (default {temperature})")  # fmt: skip
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1 = off)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def generation_config(a: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of a command's sampling flags (those it has; the rest keep defaults)."""
    fields = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "chunk_size", "compile")
    return GenerationConfig(**{f: getattr(a, f) for f in fields if hasattr(a, f)})
