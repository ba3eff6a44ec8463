"""`mixtral routing`: the paper's Section 5 routing analysis of any checkpoint, as a report directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

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


def load_domains(tok, data: dict[str, str], text_field: str = "text"):
    """Tokenized documents per domain: the given files, or the bundled corpus' validation splits."""
    from .data.corpus import load_corpus, read_documents
    from .data.packing import tokenize_documents
    from .errors import DataError

    if not data:
        return {d: tokenize_documents(s.valid, tok) for d, s in load_corpus().items()}, {
            "bundled corpus": "valid"
        }
    out = {}
    for domain, path in data.items():
        docs = [d for d in read_documents(path, text_field) if d.text.strip()]
        if not docs:
            raise DataError(f"--data {domain}={path}: no non-empty documents")
        out[domain] = tokenize_documents(docs, tok)
    return out, data


def cmd_routing(a: argparse.Namespace) -> None:
    import torch

    from .analysis.layerwise import LayerwiseModel
    from .analysis.routing import analyze_routing, parse_layers
    from .analysis.routing_report import write_report
    from .checkpoint import load_model, read_config
    from .tokenizer import load_tokenizer

    cfg = read_config(a.model)[0]
    parse_layers(a.layers, cfg.n_layers)  # fail on a bad --layers before loading anything
    data = _parse_data(a.data)
    tok = load_tokenizer(a.model)
    domains, source = load_domains(tok, data, a.text_field)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = LayerwiseModel(a.model, dtype) if a.layerwise else load_model(a.model, dtype=dtype)
    analysis = analyze_routing(model, domains, tok, layers=a.layers, max_tokens=a.max_tokens or None,
                               seq_len=min(a.seq_len, cfg.max_seq_len), batch_size=a.batch_size,
                               samples_per_domain=a.samples, n_resamples=a.bootstrap,
                               keep_traces=a.keep_traces, progress=not a.quiet)  # fmt: skip
    report = analysis.to_json()
    report["source"] = {"model_path": str(a.model), "data": source, "dtype": a.dtype}
    html = write_report(report, a.out)
    if a.keep_traces:
        tmp = Path(a.out) / "traces.tmp.npz"
        np.savez_compressed(tmp, **analysis.traces)
        os.replace(tmp, Path(a.out) / "traces.npz")
    print_summary(report)
    print(f"report: {html}")


def print_summary(r: dict) -> None:
    base, sp = r["baselines"], r["specialisation"]
    tokens = np.array([r["tokens"][d] for d in r["domains"]], dtype=float)
    w = tokens / tokens.sum()
    k = r["top_k"]
    print(f"{int(tokens.sum()):,} tokens over {len(r['domains'])} domains; E={r['n_experts']}, top-{k}")
    print(f"{'layer':>5} {'JS bits':>8} {'null p95':>9} {'same 1st':>9} {'(random)':>9} {'top-k ovl':>9} "
          f"{'(random)':>9} {'LRU hit c=' + str(k):>12} {'(random)':>9} {'token/domain':>13}")  # fmt: skip
    for layer in r["layers"]:
        same = sum(
            wi * r["repetition"][d]["same_first"][layer] for wi, d in zip(w, r["domains"], strict=True)
        )
        ovl = sum(
            wi * r["repetition"][d]["topk_overlap"][layer] for wi, d in zip(w, r["domains"], strict=True)
        )
        hit = sum(wi * r["cache"]["routed"][d][layer][k - 1] for wi, d in zip(w, r["domains"], strict=True))
        rnd = sum(wi * r["cache"]["random"][d][layer][k - 1] for wi, d in zip(w, r["domains"], strict=True))
        tvd = r.get("token_vs_domain")
        identity = f"{tvd['token_modal'][layer]:.0%}/{tvd['domain_modal'][layer]:.0%}" if tvd else "n/a"
        print(f"{layer:>5} {sp['js_bits'][layer]:>8.4f} {sp['null_p95'][layer]:>9.4f} {same:>9.1%} "
              f"{base['same_first']:>9.1%} {ovl:>9.1%} {base['topk_overlap']:>9.1%} {hit:>12.1%} {rnd:>9.1%} "
              f"{identity:>13}")  # fmt: skip
    print(
        "token/domain: share of tokens whose first choice is the one their token id usually gets / "
        "the one their domain usually gets"
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "routing",
        help="routing analysis (paper Section 5): expert share per domain, repetition, token colouring, cache",
        description="Runs MODEL over domain-labelled text and writes report.html, report.json and PNGs to "
        "--out: expert share per domain and layer with a Jensen-Shannon measure of specialisation "
        "(bootstrap interval, permutation null), repeated consecutive assignments vs random "
        "baselines, tokens coloured by expert, and an LRU expert-cache simulation. Every layer is "
        "measured; --layers picks the ones the figures show.",
    )
    p.add_argument("model", help="checkpoint directory (Hugging Face or Mistral format)")
    p.add_argument("--data", action="append", default=[], metavar="DOMAIN=PATH",
                   help="domain text (text/JSONL/Parquet file or directory; repeatable, at least two). "
                        "Default: the bundled corpus' held-out splits (9 domains)")  # fmt: skip
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default text)")
    p.add_argument("--layers", default="first,mid,last",
                   help="layers the figures show: integers, first, mid, last, all (default first,mid,last)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=100_000,
                   help="tokens per domain at most (default 100000; 0 = all)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=512, help="packed sequence length (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--samples", type=int, default=1, help="coloured text samples per domain (default 1)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap/permutation resamples (default 200)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (bf16 halves memory)")
    p.add_argument("--layerwise", action="store_true",
                   help="hold one layer's weights at a time (for checkpoints larger than memory, e.g. 8x7B: "
                        "one layer + the hidden states of all analysed tokens instead of the whole model)")  # fmt: skip
    p.add_argument("--keep-traces", action="store_true",
                   help="also save every token's top-k ids per layer as traces.npz (uint8 [L, N, k] per domain)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="report directory (created)")
    p.set_defaults(func=cmd_routing)
