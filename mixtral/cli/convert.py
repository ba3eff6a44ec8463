"""`mixtral convert`: Mistral <-> Hugging Face checkpoints, or GGUF for llama.cpp."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mixtral.cli.common import DTYPES
from mixtral.errors import MixtralError


def _check_flags(dst: str, target: str, dtype: str | None, outtype: str | None) -> None:
    """Refuse flag combinations that would be ignored, and a GGUF destination that is not a file path."""
    if target == "gguf":
        if dtype is not None:
            raise MixtralError(f"--dtype {dtype} casts hf/mistral checkpoints; with --to gguf choose the "
                               "tensor type with --outtype f32|f16|q8_0")  # fmt: skip
        if dst.endswith(("/", os.sep)) or Path(dst).is_dir():
            raise MixtralError(f"--to gguf writes one .gguf file, but {dst!r} is a directory; "
                               f"give a file path such as {str(Path(dst) / 'model.gguf')!r}")  # fmt: skip
    elif outtype is not None:
        raise MixtralError(f"--outtype {outtype} is a GGUF tensor type and means nothing with --to {target}; "
                           "use --to gguf, or --dtype to cast an hf/mistral checkpoint")  # fmt: skip


def cmd_convert(
    src: str, dst: str, to: str | None, dtype: str | None, overwrite: bool, outtype: str | None = None
) -> None:
    """`outtype` None: f32 for GGUF; given with another target it is refused, as is `dtype` with GGUF."""
    from mixtral.checkpoint import convert, read_config

    if not Path(src).exists():
        raise MixtralError(f"source {src!r} does not exist")
    from mixtral.train.sharded_io import export_sharded, is_sharded

    if is_sharded(src):  # a step directory of a torchrun training run
        target = to or "hf"
        if target == "gguf":
            raise MixtralError("convert a sharded training checkpoint to hf first, then that to gguf")
        t0 = time.perf_counter()
        try:
            export_sharded(
                src, dst, format=target, dtype=DTYPES[dtype] if dtype else None, overwrite=overwrite
            )
        except FileExistsError as e:
            raise FileExistsError(str(e).replace("pass overwrite=True", "pass --overwrite")) from None
        print(f"converted sharded training checkpoint {src} -> {target} checkpoint {dst} in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        return
    _, fmt = read_config(src)
    target = to or ("mistral" if fmt == "hf" else "hf")
    _check_flags(dst, target, dtype, outtype)
    t0 = time.perf_counter()
    try:
        if target == "gguf":
            try:
                from mixtral.checkpoint.gguf_export import export_gguf
            except ModuleNotFoundError as e:  # the optional gguf package; its message says how to install it
                raise MixtralError(str(e)) from None

            export_gguf(src, dst, outtype, overwrite=overwrite)
            target = "gguf" + (f" ({outtype})" if outtype else " (its own int4/int8 blocks)")
        else:
            convert(src, dst, to=target, dtype=DTYPES[dtype] if dtype else None, overwrite=overwrite)
    except FileExistsError as e:  # the library names its argument; the user knows the flag
        raise FileExistsError(str(e).replace("pass overwrite=True", "pass --overwrite")) from None
    print(
        f"converted {fmt} checkpoint {src} -> {target} checkpoint {dst} in {time.perf_counter() - t0:.1f} s"
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint: Mistral <-> Hugging Face, or to GGUF for llama.cpp"
    )
    p.add_argument(
        "src",
        help="source checkpoint directory (format detected; also a step directory of a "
        "torchrun training run, RUN/checkpoints/step-N, whose sharded weights are gathered)",
    )
    p.add_argument("dst", help="destination directory (a .gguf file with --to gguf), written atomically")
    p.add_argument("--to", choices=("hf", "mistral", "gguf"), default=None,
                   help="target format (default: the other of hf/mistral)")  # fmt: skip
    p.add_argument("--outtype", choices=("f32", "f16", "q8_0", "q4_0"), default=None,
                   help="GGUF tensor type, with --to gguf only (default f32; a checkpoint from `mixtral quantize` "
                   "exports its own blocks, q4_0 or q8_0)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast weights, with --to hf/mistral only (default: keep)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=lambda a: cmd_convert(a.src, a.dst, a.to, a.dtype, a.overwrite, a.outtype))
