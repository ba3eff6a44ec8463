"""The `mixtral` command line: one module per command, each a typed function over argparse.

Entry point only: this package (not the library) sets threads, seeds and logging. Every expected
failure (missing path, bad checkpoint, bad flag value, absent device) ends in one `error:` line and
exit code 2; a malformed command line (missing argument, unknown flag) gets argparse's usage, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from mixtral.cli import convert, demo, generate, info, instruct, quantize, routing, serve, train
from mixtral.cli.common import positive_int
from mixtral.errors import MixtralError

COMMANDS = (info, generate, serve, convert, demo, train, quantize, routing, instruct)  # in --help order


class FlagValueError(MixtralError):
    """A flag's value was refused at parse time (its type function, a choice, a missing value)."""


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad value of a named argument is a FlagValueError, which `main` prints as
    one `error:` line ("argument --top-p: top_p must lie in (0, 1], got 2.0"), instead of the usage.
    Subcommand parsers are of this class too (add_subparsers makes them with the parent's class)."""

    def error(self, message: str):  # type: ignore[override]
        failure = sys.exc_info()[1]  # argparse calls error() while handling the ArgumentError, if any
        if isinstance(failure, argparse.ArgumentError) and failure.argument_name:
            raise FlagValueError(message)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mixtral",
        description="Mixtral sparse mixture-of-experts models: inspect, generate, chat, convert, train, analyse.",
        epilog="examples:\n  mixtral info mixtral-8x7b\n  mixtral demo\n"
        '  mixtral generate models/mini "def fibonacci(n):" --max-new-tokens 64 --stream\n'
        "  mixtral convert Mixtral-8x7B-v0.1-consolidated Mixtral-8x7B-hf --to hf\n"
        "run 'mixtral COMMAND --help' for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads, >= 1 (default: torch's choice)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
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
