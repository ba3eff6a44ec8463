"""What the `mixtral` subcommands share: dtype and device names, loading a model with its tokenizer onto
a device, argparse value checks, option mapping, and reading text that may not be UTF-8."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixtral.errors import GenerationError, MixtralError, TokenizerNotFoundError
from mixtral.inference import GenerationConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")
QUANT_TARGETS = ("experts", "attention", "output")  # --quantize compresses every matrix but the embedding


@dataclass(frozen=True)
class ModelOptions:
    """How to load a model for inference: weight dtype, optional weight-only compression, device."""

    dtype: str = "fp32"
    quantize: str | None = None
    device: str = "auto"
    offload: str | None = None  # "auto" (the model's own experts) or a quantized checkpoint directory
    expert_cache: str = "2"  # experts per layer, or a byte budget ("6GiB")
    prefetch: bool = True


def load_for_inference(path: str, options: ModelOptions | None = None):
    """(model in eval mode on the --device, tokenizer): the checkpoint's own tokenizer; the bundled
    Mixtral one only when the checkpoint has no tokenizer file at all and its vocabulary is the
    bundled one's size (a tokenizer file that cannot be read is an error naming it). An absent device
    or path, or a tokenizer problem, is a one-line MixtralError before the weights load."""
    options = options or ModelOptions()
    from mixtral.checkpoint import load_model, read_config
    from mixtral.text import load_tokenizer

    device = resolve_device(options.device)
    if not Path(path).exists():
        raise MixtralError(f"model path {path!r} does not exist")
    try:
        tok = load_tokenizer(path)
    except TokenizerNotFoundError:
        tok, vocab = load_tokenizer(None), read_config(path)[0].vocab_size
        if vocab != tok.vocab_size:
            raise MixtralError(
                f"no tokenizer in {path}, and the model's vocabulary ({vocab}) is not the bundled Mixtral "
                f"tokenizer's ({tok.vocab_size}): copy the model's tokenizer.model or tokenizer.json there"
            ) from None
        print(f"note: no tokenizer in {path}; using the bundled Mixtral tokenizer", file=sys.stderr)
    if options.offload:
        model = load_offloaded_for_cli(path, options, device)
    else:
        model = load_model(path, dtype=DTYPES[options.dtype], device=device).eval()
    if options.quantize and getattr(model, "quant_layout", None) is not None:
        raise MixtralError(
            f"{path} is already quantized ({model.quant_layout.storage}); load it without --quantize"
        )
    if options.quantize:
        from mixtral.quant import quantize_model

        quantize_model(model, options.quantize, QUANT_TARGETS)
    if tok.vocab_size > model.config.vocab_size:
        raise MixtralError(
            f"tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {model.config.vocab_size}"
        )
    return model, tok


def load_offloaded_for_cli(path: str, options: ModelOptions, device: torch.device):
    """The model with offloaded experts (`--offload`), or a one-line error saying why not."""
    if device.type not in ("cpu", "cuda"):
        raise MixtralError(f"--offload runs on the CPU or a CUDA GPU, not {device.type}; use --device cpu")
    if options.quantize:
        raise MixtralError("--offload reads experts quantized ahead of time; drop --quantize")
    from mixtral.offload import load_offloaded

    source = None if options.offload == "auto" else options.offload
    if source is not None and not Path(source).is_dir():
        raise MixtralError(f"--offload {source!r}: not a directory (give a quantized checkpoint, or 'auto')")
    model = load_offloaded(
        path,
        options.expert_cache,
        options.prefetch,
        DTYPES[options.dtype],
        experts_from=source,
        device=device,
    )
    return model.eval()


def offload_report(model) -> str | None:
    """One line of the expert cache's figures and the process's peak RSS, for a model with `--offload`."""
    cache = getattr(model, "expert_cache", None)
    if cache is None:
        return None
    import resource

    s = cache.stats.summary()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (f"offload: {cache.capacity} of {cache.n_experts} experts cached per layer, hit rate {s['hit_rate']:.1%}, "
            f"prefetch precision {s['prefetch_precision']:.1%} (misses read ahead {s['misses_prefetched']:.1%}), "
            f"{s['bytes_read_per_token'] / 2**20:.1f} MiB read per token, waited {s['wait_s']:.2f} s for reads, "
            f"peak RSS {peak / 2**30:.2f} GiB")  # fmt: skip


def add_device_option(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--device; `help` replaces the default text (for a command whose auto is not the default rule)."""
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help=help or "where the model runs: auto (cuda if available, else mps, else cpu), cpu, cuda "
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


def quant_storage(text: str) -> str:
    """argparse type of --quantize: a storage name of `mixtral.quant.parse_storage`."""
    from mixtral.quant import parse_storage

    try:
        return parse_storage(text).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--dtype, --quantize and the offloading options."""
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype to load (default fp32)")
    p.add_argument("--quantize", type=quant_storage, default=None, metavar="STORAGE",
                   help="weight-only compression after loading: int8 (per-channel scales), bf16 storage, int4 "
                   "(groups of 32, llama.cpp's Q4_0), int8-g32 (Q8_0), int4-gN/int8-gN; decode streams the "
                   "compressed weights, prefill dequantises to --dtype. A checkpoint written by `mixtral "
                   "quantize SRC DST` is already quantized: load it without this flag")  # fmt: skip
    add_offload_options(p)


def add_offload_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", metavar="DIR|auto", default=None,
                   help="keep the experts out of memory: read them from a quantized checkpoint (`mixtral quantize "
                   "SRC DST`; auto: the model itself) through a per-layer LRU cache, prefetching the next "
                   "layer's likely experts on a background thread (docs/offloading.md)")  # fmt: skip
    p.add_argument("--expert-cache", default="2", metavar="N|BYTES",
                   help="with --offload: experts per layer kept in memory, or a budget for all layers such as "
                   "6GiB (default 2)")  # fmt: skip
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="with --offload: read experts only when a layer needs them")  # fmt: skip


def model_options(a: argparse.Namespace) -> ModelOptions:
    return ModelOptions(dtype=a.dtype, quantize=a.quantize, device=getattr(a, "device", "auto"),
                        offload=getattr(a, "offload", None), expert_cache=getattr(a, "expert_cache", "2"),
                        prefetch=getattr(a, "prefetch", True))  # fmt: skip


# ---- argparse value checks: `type=` functions, so a bad value fails at parse time naming its flag
# ("argument --chunk-size: ..."); `mixtral.cli.main` prints that as one `error:` line, exit code 2.


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def generation_field(name: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type for a GenerationConfig field: `convert`, then the config's own validation, so
    the CLI and the library accept the same values (message: "argument --top-p: top_p must lie in ...")."""

    def parse(text: str) -> object:
        try:
            value = convert(text)
        except ValueError:
            kind = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        try:
            GenerationConfig(**{name: value})
        except GenerationError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = name
    return parse


def add_sampling_options(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=generation_field("max_new_tokens", int), default=128,
                   help="tokens to generate at most, >= 1 (default 128)")  # fmt: skip
    p.add_argument("--temperature", type=generation_field("temperature", float), default=temperature,
                   help=f"0 = greedy; higher = more random (default {temperature})")  # fmt: skip
    p.add_argument("--top-p", type=generation_field("top_p", float), default=1.0,
                   help="nucleus sampling mass in (0, 1] (default 1 = off)")  # fmt: skip
    p.add_argument("--seed", type=generation_field("seed", int), default=None,
                   help="seed for reproducible sampling, in [0, 2**63 - 1]")  # fmt: skip


# ---- text from argv and stdin that may not be UTF-8 --------------------------------------------


class TextCleaner:
    """Makes command-line and stdin text safe to tokenize: bytes that were not UTF-8 (which Python keeps
    as lone surrogates U+DC80..U+DCFF) become U+FFFD, with one note on stderr the first time."""

    def __init__(self) -> None:
        self.noted = False

    def __call__(self, text: str, source: str) -> str:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
        cleaned = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
        if not self.noted:
            self.noted = True
            print(
                f"note: {source} is not valid UTF-8; undecodable bytes were replaced by U+FFFD",
                file=sys.stderr,
            )
        return cleaned


def generation_config(a: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig of a command's sampling flags (those it has; the rest keep defaults)."""
    fields = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "chunk_size", "compile")
    return GenerationConfig(**{f: getattr(a, f) for f in fields if hasattr(a, f)})


def job_rank() -> int:
    """This process's rank in a torchrun job (0 outside one): only rank 0 prints a command's report."""
    return int(os.environ.get("RANK", "0"))


def leave_process_group() -> None:
    """Tear down the torch.distributed group a torchrun job joined, if any (after the command's run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
