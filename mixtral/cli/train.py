"""`mixtral train` and `mixtral tokenizer train`: the training side of the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from mixtral.cli.common import add_device_option, job_rank, leave_process_group, resolve_device


def cmd_train(
    recipe_name: str,
    overrides: list[str],
    out: str | None,
    resume: bool,
    list_only: bool,
    device: str = "auto",
) -> None:
    from mixtral.train.recipes import RECIPES, apply_overrides, get_recipe
    from mixtral.train.run import run_recipe

    if list_only:
        for name, r in RECIPES.items():
            print(f"{name:<12} {r.model.total_params / 1e6:6.1f}M total / {r.model.active_params / 1e6:5.1f}M active,"
                  f" {r.train.steps} steps x {r.train.batch_size}x{r.data.seq_len} tokens: {r.description}")  # fmt: skip
        return
    dev = resolve_device(device)
    recipe = apply_overrides(get_recipe(recipe_name), overrides)
    out_dir = Path(out or f"runs/{recipe.name}")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), job_rank()
    where = (
        f"{world} processes (torchrun), parallel {dataclasses.asdict(recipe.parallel)}" if world > 1 else dev
    )
    if rank == 0:
        print(f"training recipe {recipe.name!r} into {out_dir}/ on {where} (resume={resume})", flush=True)
    try:
        report = run_recipe(recipe, out_dir, resume=resume, device=dev, progress=rank == 0)
    finally:
        leave_process_group()
    if rank != 0:
        return
    ev = report["eval"]
    print(f"done: {report['steps']} steps, {report['tokens_seen']:,} tokens; held-out loss {ev['all/loss']:.3f} "
          f"(ppl {ev['all/ppl']:.1f}); model in {out_dir / 'model'}, curve {out_dir / 'curve.png'}")  # fmt: skip
    print(json.dumps({k: round(v, 4) for k, v in ev.items()}))


def cmd_tokenizer_train(
    out: str, vocab_size: int, inputs: list[str], max_chars: int, seed: int, overwrite: bool = False
) -> None:
    from mixtral.data.tokenizer_train import train_tokenizer

    tok = train_tokenizer([Path(p) for p in inputs] or None, vocab_size, out, max_chars=max_chars, seed=seed,
                          overwrite=overwrite)  # fmt: skip
    print(f"trained a {tok.vocab_size}-piece SentencePiece BPE tokenizer (byte fallback) into {out}/")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain a model from a recipe on the bundled corpus or your files")
    p.add_argument("--recipe", default="mini", help="recipe name (see --list; default mini)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field, e.g. --set train.steps=200 --set model.n_layers=4 "
                   "--set data.inputs=code=my/dir (repeatable; types are checked). Under torchrun: "
                   "--set parallel.ep=K (experts split over K ranks), parallel.dp_shard (FSDP2 shard group, "
                   "-1: all), parallel.dp_replicate (HSDP replicas); train.batch_size is the global batch")  # fmt: skip
    p.add_argument("--out", default=None, help="run directory (default runs/RECIPE)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start afresh even if the run directory holds a checkpoint")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the recipes and exit")
    add_device_option(p)
    p.set_defaults(func=lambda a: cmd_train(a.recipe, a.overrides, a.out, a.resume, a.list, a.device))

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tok_command", required=True
    )
    p = tok.add_parser("train", help="train a SentencePiece BPE tokenizer with byte fallback")
    p.add_argument("out", help="output directory (tokenizer.model, tokenizer.json, tokenizer_config.json)")
    p.add_argument("--vocab-size", type=int, default=8192, help="pieces (default 8192)")
    p.add_argument("--input", dest="inputs", action="append", default=[],
                   help="text/JSONL/Parquet file or directory (repeatable; default: the bundled corpus)")  # fmt: skip
    p.add_argument("--max-chars", type=int, default=8_000_000, help="characters sampled for training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the tokenizer files OUT already holds (refused without this flag)")  # fmt: skip
    p.set_defaults(
        func=lambda a: cmd_tokenizer_train(a.out, a.vocab_size, a.inputs, a.max_chars, a.seed, a.overwrite)
    )
