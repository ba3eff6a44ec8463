"""`mixtral routing`: the paper's Section 5 routing analysis of any checkpoint, as a report directory."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mixtral.atomic import atomic_file
from mixtral.cli.common import (
    ModelOptions,
    add_device_option,
    add_offload_options,
    int_at_least,
    load_offloaded_for_cli,
    non_negative_int,
    offload_report,
    positive_int,
    resolve_device,
)

DTYPES = ("fp32", "bf16")


def _parse_data(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(
                f"--data takes DOMAIN=PATH (a text, JSONL or Parquet file or a directory), got {item!r}"
            )
        if name.strip() in out:
            raise ValueError(f"--data names domain {name.strip()!r} twice")
        out[name.strip()] = path.strip()
    return out


def cmd_routing(a: argparse.Namespace) -> None:
    """Runs MODEL over domain-labelled text and writes report.html, report.json and PNGs to --out:
    expert share per domain and layer with a Jensen-Shannon measure of specialisation (bootstrap
    interval, permutation null), repeated consecutive assignments vs random baselines, tokens
    coloured by expert, and an LRU expert-cache simulation. Every layer is measured; --layers picks
    the ones the figures show."""
    import torch

    from mixtral.analysis.layerwise import LayerwiseModel
    from mixtral.analysis.routing import analyze_routing, parse_layers
    from mixtral.analysis.routing_report import write_report
    from mixtral.analysis.summary import print_summary
    from mixtral.checkpoint import load_model, read_config
    from mixtral.data.domains import load_domains
    from mixtral.text import load_tokenizer

    device = resolve_device(a.device)
    cfg = read_config(a.model)[0]
    parse_layers(a.layers, cfg.n_layers)  # fail on a bad --layers before loading anything
    data = _parse_data(a.data)
    tok = load_tokenizer(a.model)
    domains, source = load_domains(tok, data, a.text_field)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if a.layerwise:
        model = LayerwiseModel(a.model, dtype, device=device)
    elif a.offload:
        model = load_offloaded_for_cli(
            a.model, ModelOptions(dtype=a.dtype, offload=a.offload, expert_cache=a.expert_cache,
                                  prefetch=a.prefetch), device)  # fmt: skip
    else:
        model = load_model(a.model, dtype=dtype, device=device)
    analysis = analyze_routing(model, domains, tok, layers=a.layers, max_tokens=a.max_tokens or None,
                               seq_len=min(a.seq_len, cfg.max_seq_len), batch_size=a.batch_size,
                               samples_per_domain=a.samples, n_resamples=a.bootstrap,
                               keep_traces=a.keep_traces, progress=not a.quiet)  # fmt: skip
    report = analysis.to_json()
    report["source"] = {"model_path": str(a.model), "data": source, "dtype": a.dtype}
    html = write_report(report, a.out)
    if a.keep_traces:
        with atomic_file(Path(a.out) / "traces.npz") as tmp:
            np.savez_compressed(tmp, **analysis.traces)
    print_summary(report)
    if line := offload_report(model):
        print(line)
    print(f"report: {html}")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "routing",
        help="routing analysis (paper Section 5): expert share per domain, repetition, token colouring, cache",
        description=cmd_routing.__doc__,
    )
    p.add_argument("model", help="checkpoint directory (Hugging Face or Mistral format)")
    p.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH",
                   help="domain text (text/JSONL/Parquet file or directory; repeatable, at least two). "
                        "Default: the bundled corpus' held-out splits (9 domains)")  # fmt: skip
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default text)")
    p.add_argument("--layers", default="first,mid,last",
                   help="layers the figures show: integers, first, mid, last, all (default first,mid,last)")  # fmt: skip
    p.add_argument("--max-tokens", type=non_negative_int, default=100_000,
                   help="tokens per domain at most (default 100000; 0 = all)")  # fmt: skip
    p.add_argument("--seq-len", type=int_at_least(2), default=512,
                   help="packed sequence length, >= 2 (default 512; at most the model's context)")  # fmt: skip
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="sequences per forward pass (default 8)"
    )
    p.add_argument("--samples", type=non_negative_int, default=1,
                   help="coloured text samples per domain (default 1; 0 = none)")  # fmt: skip
    p.add_argument("--bootstrap", type=positive_int, default=200,
                   help="bootstrap/permutation resamples, >= 1 (default 200)")  # fmt: skip
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (bf16 halves memory)")
    p.add_argument("--layerwise", action="store_true",
                   help="hold one layer's weights at a time (for checkpoints larger than memory, e.g. 8x7B: "
                        "one layer + the hidden states of all analysed tokens instead of the whole model)")  # fmt: skip
    add_offload_options(p)
    p.add_argument("--keep-traces", action="store_true",
                   help="also save every token's top-k ids per layer as traces.npz (uint8 [L, N, k] per domain)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_option(p)
    p.add_argument("--out", required=True, help="report directory (created)")
    p.set_defaults(func=cmd_routing)
