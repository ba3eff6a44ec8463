"""`mixtral demo`: the README's first command, on the shipped mini model (or one trained on the spot)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from mixtral.cli.common import (
    ModelOptions,
    add_device_option,
    load_for_inference,
    positive_int,
    resolve_device,
)
from mixtral.cli.info import cmd_info

# One prompt per domain of the bundled corpus.
DOMAIN_PROMPTS = {
    "code": "class Parser(object):\n    def __init__(self, text):\n        self.",
    "math": "Question: Calculate 17 + 25.\nAnswer:",
    "literature": "It is a truth universally acknowledged",
    "encyclopedic": "The Linux kernel is",
    "latex": "\\begin{theorem}",
    "fr": "La commande suivante permet de",
    "de": "Die folgende Option",
    "es": "El siguiente comando",
    "it": "Il comando seguente",
}


def shipped_model() -> Path:
    """The committed mini model (models/mini in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "models" / "mini"


def _random_fallback(out: Path) -> Path:
    from mixtral.checkpoint import save_model
    from mixtral.config import get_preset
    from mixtral.model import Transformer
    from mixtral.text import load_tokenizer

    print(
        f"note: no shipped model at {shipped_model()}; building a random 'tiny' model instead",
        file=sys.stderr,
    )
    torch.manual_seed(0)
    save_model(
        Transformer(get_preset("tiny")),
        out / "random-tiny",
        tokenizer_src=load_tokenizer(None),
        overwrite=True,
    )
    return out / "random-tiny"


def cmd_demo(
    model_path: str | None, train: bool, out: str, max_new_tokens: int, device: str = "auto"
) -> None:
    """Generation and the routing analysis run on `device`; `--train` trains on the CPU."""
    from mixtral.inference import generate

    resolve_device(device)  # an absent device fails before any training or loading
    out_dir = Path(out)
    if train:
        from mixtral.train.recipes import get_recipe
        from mixtral.train.run import run_recipe

        print(f"== training the 'demo' recipe from scratch into {out_dir}/ ==")
        t0 = time.perf_counter()
        report = run_recipe(get_recipe("demo"), out_dir, resume=False)
        print(f"trained in {time.perf_counter() - t0:.0f} s: held-out loss {report['eval']['all/loss']:.3f}")
        path = out_dir / "model"
    elif model_path:
        path = Path(model_path)
    else:
        path = shipped_model() if (shipped_model() / "config.json").exists() else _random_fallback(out_dir)
    print(f"== model: {path} ==")
    cmd_info(str(path))
    model, tok = load_for_inference(str(path), ModelOptions(device=device))
    from mixtral import kernels

    t0 = time.perf_counter()
    if kernels.available() and time.perf_counter() - t0 > 1:  # built now: the first run on this machine
        print(f"(compiled the CPU decode kernels in {time.perf_counter() - t0:.0f} s; cached from now on)")
    print("== one prompt per domain, batched (temperature 0.7, top-p 0.9, seed 0) ==")
    prompts = list(DOMAIN_PROMPTS.values())
    outs = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=0)
    for (domain, prompt), g in zip(DOMAIN_PROMPTS.items(), outs, strict=True):
        print(f"-- {domain}\n{prompt}{g.text}\n")
    s = outs[0].stats
    print(f"{len(prompts)} prompts: prefill {s.prefill_tokens_per_s:.0f} tok/s, "
          f"decode {s.decode_tokens_per_s:.0f} tok/s (all rows together)")  # fmt: skip
    _routing(model, tok, out_dir / "routing")
    print("== for scale: the real Mixtral 8x7B (nothing is allocated) ==")
    cmd_info("mixtral-8x7b")


def _routing(model, tok, out: Path, tokens_per_domain: int = 4096) -> None:
    """A quick routing analysis (paper Section 5) over the bundled held-out text; `mixtral routing` does more."""
    from mixtral.analysis.routing import analyze_routing
    from mixtral.analysis.routing_report import write_report
    from mixtral.analysis.summary import print_summary
    from mixtral.data.domains import load_domains

    print(f"== routing analysis: {tokens_per_domain} held-out tokens per domain (paper Section 5) ==")
    domains, _ = load_domains(tok, {})
    seq = min(512, model.config.max_seq_len, tokens_per_domain)
    report = analyze_routing(model, domains, tok, max_tokens=tokens_per_domain, seq_len=seq, n_resamples=100,
                             progress=False).to_json()  # fmt: skip
    html = write_report(report, out)
    print_summary(report)
    print(f"report: {html}  (full run: mixtral routing MODEL --out DIR)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="show the shipped mini model: sizes, text in every corpus domain, routing report"
    )
    p.add_argument("--model", default=None, help="a checkpoint to show instead of the shipped mini model")
    p.add_argument(
        "--train", action="store_true", help="first train a small SMoE from scratch (a few minutes)"
    )
    p.add_argument("--out", default="runs/demo",
                   help="where --train writes its run and the routing report goes (default runs/demo)")  # fmt: skip
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=40, help="tokens per prompt, >= 1 (default 40)"
    )
    add_device_option(p, help="where the demo generates: auto (cuda if available, else mps, else cpu), cpu, "
                      "cuda or mps; --train and the routing report run on the CPU")  # fmt: skip
    p.set_defaults(func=lambda a: cmd_demo(a.model, a.train, a.out, a.max_new_tokens, a.device))
