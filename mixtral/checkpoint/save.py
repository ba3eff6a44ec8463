"""Saving and converting checkpoints: our model or another checkpoint written as HF or Mistral format.

Both walk the name table (`mixtral.checkpoint.table`) and write tensor by tensor into a temporary
directory that is renamed into place only when complete (`mixtral.atomic`), so memory beyond the
source is about one tensor and a killed write leaves nothing half-written. HF output loads in
transformers' MixtralForCausalLM; sharded above `max_shard_bytes`, with an index.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from mixtral.atomic import atomic_directory
from mixtral.checkpoint.configs import config_to_hf, config_to_params
from mixtral.checkpoint.reader import CheckpointReader
from mixtral.checkpoint.safetensors_io import check_dtype, shard_plan, write_safetensors
from mixtral.checkpoint.table import Slot, our_shapes, plan, to_interleaved
from mixtral.config import MixtralConfig
from mixtral.errors import MissingTensorError, ShapeMismatchError, UnexpectedTensorError

if TYPE_CHECKING:
    from mixtral.text.tokenizer import Tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the hub's usual shard size (transformers 5 defaults to 50 GB)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v*", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tekken.json")  # fmt: skip


# A tokenizer file, a directory whose tokenizer files are copied, a callable that writes into the
# output directory, or a mixtral.text.Tokenizer (written with its save_tokenizer).
TokenizerSource = Union[str, Path, Callable[[Path], object], "Tokenizer", None]


def copy_tokenizer(tokenizer: TokenizerSource, out: Path) -> None:
    """Write `tokenizer` (see TokenizerSource) into directory `out`."""
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        files = [src] if src.is_file() else [p for pat in TOKENIZER_FILES for p in sorted(src.glob(pat))]
        for f in files:
            shutil.copy2(f, out / f.name)
        if files:  # what transformers needs beside a bare tokenizer.model, and the chat template
            from mixtral.text.tokenizer import complete_tokenizer_files

            complete_tokenizer_files(out)
    elif callable(tokenizer):
        tokenizer(out)
    else:
        from mixtral.text.tokenizer import (
            save_tokenizer,  # only when asked: it needs sentencepiece/tokenizers
        )

        save_tokenizer(tokenizer, out)


# What a checkpoint directory we write may hold: replacing one with overwrite=True deletes only these.
OWNED_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "params.json",
               "generation_config.json", *TOKENIZER_FILES)  # fmt: skip


def check_destination(dst: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse a destination that would destroy something: the source itself or a directory inside or
    around it, or (with overwrite) a directory holding files a checkpoint writer does not own."""
    dst = Path(dst).resolve()
    if source is not None:
        src = Path(source).resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            where = "is" if dst == src else "is inside" if src in dst.parents else "contains"
            raise FileExistsError(f"destination {dst} {where} the source {src}; write the result elsewhere")
    if not (dst.is_dir() and overwrite):
        return  # a file, or overwrite=False: atomic_directory refuses anything non-empty
    foreign = [p.name + ("/" if p.is_dir() else "") for p in sorted(dst.iterdir())
               if p.is_dir() or not any(p.match(pattern) for pattern in OWNED_FILES)]  # fmt: skip
    if foreign:
        raise FileExistsError(
            f"{dst} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} a checkpoint does not "
            f"({', '.join(foreign[:5])}); overwriting would delete them. Remove them or choose another destination"
        )


def _write(
    dst: Path,
    cfg: MixtralConfig,
    fmt: str,
    dtype: torch.dtype,
    piece: Callable[[Slot], torch.Tensor],
    max_shard_bytes: int,
    tokenizer: TokenizerSource,
    overwrite: bool,
    source: Path | None = None,
) -> None:
    """Write format `fmt` ("hf" or "mistral"), producing each file tensor from `piece(slot)`."""
    if fmt not in ("hf", "mistral"):
        raise ValueError(f"can save format 'hf' or 'mistral', not {fmt!r}")
    check_dtype(dtype)
    check_destination(dst, overwrite, source)
    if isinstance(tokenizer, (str, Path)):
        if not Path(tokenizer).exists():
            raise FileNotFoundError(f"tokenizer source {tokenizer} does not exist")
        if Path(tokenizer).is_file() or any(p for pat in TOKENIZER_FILES for p in Path(tokenizer).glob(pat)):
            from mixtral.text.tokenizer import load_tokenizer

            load_tokenizer(tokenizer)  # an unreadable tokenizer file is an error before any weight is written
    slots = {s.key: s for s in plan(cfg, fmt)}

    def tensors(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> Iterator[torch.Tensor]:
        for key, _, _ in specs:
            t, heads = piece(slots[key]), slots[key].rope_heads
            yield (to_interleaved(t, heads) if heads else t).to(dtype)

    specs = [(key, dtype, s.shape) for key, s in slots.items()]
    stem = "consolidated" if fmt == "mistral" else "model"
    shards = [specs] if fmt == "mistral" else shard_plan(specs, max_shard_bytes)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)
    ]  # fmt: skip
    with atomic_directory(Path(dst), overwrite) as out:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(out / name, shard, tensors(shard), {"format": "pt"})
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard}
            total = sum(math.prod(shape) * dtype.itemsize for _, _, shape in specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = config_to_params(cfg) if fmt == "mistral" else config_to_hf(cfg, dtype)
        (out / ("params.json" if fmt == "mistral" else "config.json")).write_text(
            json.dumps(config, indent=2) + "\n"
        )
        copy_tokenizer(tokenizer, out)


def _uniform_dtype(dtypes: set[torch.dtype], what: str) -> torch.dtype:
    if len(dtypes) != 1:
        raise ValueError(f"{what} mixes dtypes {sorted(map(str, dtypes))}; pass dtype= explicitly")
    return dtypes.pop()


def save_weights(
    state_dict: dict[str, torch.Tensor],
    cfg: MixtralConfig,
    path: str | Path,
    format: str = "hf",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_src: TokenizerSource = None,
    overwrite: bool = False,
) -> None:
    """Write our-named `state_dict` as an HF or Mistral checkpoint directory, atomically.

    `dtype` None keeps the state dict's (single) dtype. HF output is sharded (with an index) above
    `max_shard_bytes`; Mistral output is always one consolidated.safetensors. Tensors are written
    one at a time, so memory beyond the model is one tensor. `tokenizer_src`: a tokenizer file, a
    directory whose tokenizer files are copied, or a callable given the output directory.
    """
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    want = our_shapes(cfg)
    if missing := [k for k in want if k not in got]:
        raise MissingTensorError(f"state dict lacks {len(missing)} parameter(s): {', '.join(missing[:5])}")
    if extra := [k for k in got if k not in want]:
        raise UnexpectedTensorError(
            f"state dict has {len(extra)} unknown parameter(s): {', '.join(extra[:5])}"
        )
    if bad := [k for k in want if got[k] != want[k]]:
        raise ShapeMismatchError(
            f"state dict {bad[0]}: expected shape {list(want[bad[0]])}, got {list(got[bad[0]])}"
        )
    dtype = dtype or _uniform_dtype({t.dtype for t in state_dict.values()}, "the state dict")

    def piece(slot: Slot) -> torch.Tensor:
        t = state_dict[slot.ours]
        return t if slot.expert is None else t[slot.expert]

    _write(Path(path), cfg, format, dtype, piece, max_shard_bytes, tokenizer_src, overwrite)


def save_model(
    model: torch.nn.Module, path: str | Path, *, config: MixtralConfig | None = None, **options
) -> None:
    """Save our Transformer (its `config` attribute, unless `config` is given) as a checkpoint directory.

    `options` are those of `save_weights`: format ("hf" or "mistral"), dtype, max_shard_bytes,
    tokenizer_src, overwrite. Without `tokenizer_src`, a model from `load_model` takes the tokenizer
    of the checkpoint it was loaded from (`model.checkpoint_path`); a model with no known tokenizer is
    saved without one, with a warning (mixtral.load_tokenizer and transformers need one).
    """
    cfg = config or getattr(model, "config", None)
    if not isinstance(cfg, MixtralConfig):
        raise ValueError("model has no MixtralConfig `config` attribute; pass config=")
    if options.get("tokenizer_src") is None:
        source = getattr(model, "checkpoint_path", None)
        if source is not None and any(p for pattern in TOKENIZER_FILES for p in Path(source).glob(pattern)):
            options["tokenizer_src"] = Path(source)
        else:
            warnings.warn(f"saving {path} without a tokenizer: pass tokenizer_src= (a tokenizer, file or directory)",
                          stacklevel=2)  # fmt: skip
    save_weights(model.state_dict(), cfg, path, **options)


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "hf",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    check_finite: bool = True,
    overwrite: bool = False,
) -> None:
    """Rewrite checkpoint `src` as format `to` ("hf" or "mistral") in `dst`, tensor by tensor.

    Never builds the model: each destination tensor is read from its source slot through the
    shared table, so memory stays at about one tensor. Tokenizer files in `src` are copied along.
    `dtype` None keeps the source's (single) dtype; same-dtype conversion is bit-exact.
    """
    src = Path(src)
    with CheckpointReader(src) as reader:
        dtype = dtype or _uniform_dtype(reader.file_dtypes, f"checkpoint {src}")

        def piece(slot: Slot) -> torch.Tensor:
            return reader.read_piece(slot.ours, slot.expert, check_finite)

        _write(Path(dst), reader.config, to, dtype, piece, max_shard_bytes, src, overwrite, source=src)
