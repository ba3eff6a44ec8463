"""The `mixtral` command line: one module per command, each a typed function over argparse.

Entry point only: this package (not the library) sets threads, seeds and logging. Every expected
failure (missing path, bad checkpoint, bad flag value) ends in one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from mixtral.cli import convert, demo, generate, info, instruct, quantize, routing, train
from mixtral.errors import MixtralError

COMMANDS = (info, generate, convert, demo, train, quantize, routing, instruct)  # in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixtral",
        description="Mixtral sparse mixture-of-experts models: inspect, generate, chat, convert, train, analyse.",
        epilog="examples:\n  mixtral info mixtral-8x7b\n  mixtral demo\n"
        '  mixtral generate models/mini "def fibonacci(n):" --max-new-tokens 64 --stream\n'
        "  mixtral convert Mixtral-8x7B-v0.1-consolidated Mixtral-8x7B-hf --to hf\n"
        "run 'mixtral COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except BrokenPipeError:  # e.g. `mixtral generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (MixtralError, OSError, ValueError) as e:  # OSError: paths; ValueError: bad option values
        if os.environ.get("MIXTRAL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
