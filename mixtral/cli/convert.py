"""`mixtral convert`: Mistral <-> Hugging Face checkpoints, or GGUF for llama.cpp."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mixtral.cli.common import DTYPES
from mixtral.errors import MixtralError


def cmd_convert(
    src: str, dst: str, to: str | None, dtype: str | None, overwrite: bool, outtype: str = "f32"
) -> None:
    from mixtral.checkpoint import convert, read_config

    if not Path(src).exists():
        raise MixtralError(f"source {src!r} does not exist")
    _, fmt = read_config(src)
    target = to or ("mistral" if fmt == "hf" else "hf")
    t0 = time.perf_counter()
    if target == "gguf":
        from mixtral.checkpoint.gguf_export import export_gguf

        export_gguf(src, dst, outtype, overwrite=overwrite)
        target = f"gguf ({outtype})"
    else:
        convert(src, dst, to=target, dtype=DTYPES[dtype] if dtype else None, overwrite=overwrite)
    print(
        f"converted {fmt} checkpoint {src} -> {target} checkpoint {dst} in {time.perf_counter() - t0:.1f} s"
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint: Mistral <-> Hugging Face, or to GGUF for llama.cpp"
    )
    p.add_argument("src", help="source checkpoint directory (format detected)")
    p.add_argument("dst", help="destination directory (a .gguf file with --to gguf), written atomically")
    p.add_argument("--to", choices=("hf", "mistral", "gguf"), default=None,
                   help="target format (default: the other of hf/mistral)")  # fmt: skip
    p.add_argument(
        "--outtype", choices=("f32", "f16", "q8_0"), default="f32", help="GGUF tensor type (default f32)"
    )
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=lambda a: cmd_convert(a.src, a.dst, a.to, a.dtype, a.overwrite, a.outtype))
