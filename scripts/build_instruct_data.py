#!/usr/bin/env python3
"""Builds the committed instruction data, data/instruct/, from the bundled corpus and the math generator.

    python scripts/build_instruct_data.py [--out data/instruct] [--seed 0] [--n-sft-train 6000] ...

Writes sft_train.jsonl, sft_valid.jsonl, pref_train.jsonl, pref_valid.jsonl, eval.jsonl and
MANIFEST.json (see mixtral/data/instruct_gen.py). The output depends only on the arguments and the
corpus, so a rebuild with the defaults reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixtral.data.instruct_gen import build_instruct_data  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "instruct", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", type=Path, default=None, help="corpus root (default: data/corpus)")
    for name, default in [("sft-train", 6000), ("sft-valid", 300), ("pref-train", 4000), ("pref-valid", 300)]:
        parser.add_argument(f"--n-{name}", type=int, default=default, help=f"records (default {default})")
    parser.add_argument("--n-eval", type=int, default=500, help="eval questions (default 500)")
    args = parser.parse_args(argv)
    manifest = build_instruct_data(
        args.out,
        n_sft_train=args.n_sft_train,
        n_sft_valid=args.n_sft_valid,
        n_pref_train=args.n_pref_train,
        n_pref_valid=args.n_pref_valid,
        n_eval=args.n_eval,
        seed=args.seed,
        corpus_root=args.corpus,
    )
    total = 0
    for name, info in manifest["files"].items():
        total += info["bytes"]
        tasks = ", ".join(f"{t} {n}" for t, n in info["tasks"].items())
        print(f"{name:11s} {info['records']:6d} records {info['bytes'] / 1e6:6.2f} MB  ({tasks})")
    print(f"total {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
