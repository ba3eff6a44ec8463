"""`mixtral quantize`: what weight-only compression costs in quality and gains in decode speed, measured."""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from mixtral.cli.common import (
    QUANT_TARGETS,
    ModelOptions,
    add_device_option,
    int_at_least,
    load_for_inference,
    non_negative_int,
)


def target_list(text: str) -> str:
    """argparse type of --targets: a non-empty comma list of experts, attention, output."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(t not in QUANT_TARGETS for t in names):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(QUANT_TARGETS)}, got {text!r}")
    return ",".join(names)


def _held_out_ppl(model, tok, max_tokens: int) -> float | None:
    """Perplexity on the bundled corpus' validation split (all domains, up to max_tokens per domain)."""
    from mixtral.data.corpus import load_corpus
    from mixtral.data.packing import tokenize_documents
    from mixtral.eval.lm import evaluate_lm

    valid = {d: tokenize_documents(s.valid, tok) for d, s in load_corpus().items()}
    seq = min(256, model.config.max_seq_len)
    return evaluate_lm(model, valid, seq, batch_size=8, max_batches=max(1, max_tokens // (8 * seq)))[
        "all/ppl"
    ]


def _decode_speed(model, tok, new_tokens: int) -> float:
    from mixtral.inference import GenerationStats, generate_ids

    stats = GenerationStats()
    prompt = tok.encode("The history of the region begins with", bos=True)
    for _ in generate_ids(model, [prompt], max_new_tokens=new_tokens, stats=stats):
        pass
    return stats.decode_tokens_per_s


def cmd_quantize(
    path: str, storage: str, targets: str, ppl_tokens: int, new_tokens: int, device: str = "auto"
) -> None:
    """Both models on `device`; the decode kernels that read int8/bf16 storage run on the CPU only, so
    elsewhere the speed figure is that of torch's dequantise-then-matmul paths."""
    from mixtral.quant import quantize_model

    model, tok = load_for_inference(path, ModelOptions(device=device))
    q = quantize_model(copy.deepcopy(model), storage, tuple(t for t in targets.split(",") if t))
    probe = torch.tensor(
        [tok.encode("def main():\n    print('hello, world')\nLa ville de Paris est", bos=True)],
        device=next(model.parameters()).device,
    )
    with torch.no_grad():
        a, b = model(probe).logits, q(probe).logits
    report = {
        "storage": storage, "targets": targets,
        "max_abs_logit_err": (a - b).abs().max().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "decode_tok_s": {"fp32": _decode_speed(model, tok, new_tokens), storage: _decode_speed(q, tok, new_tokens)},
    }  # fmt: skip
    if ppl_tokens:
        report["held_out_ppl"] = {
            "fp32": _held_out_ppl(model, tok, ppl_tokens),
            storage: _held_out_ppl(q, tok, ppl_tokens),
        }
    print(f"{storage} weight-only ({targets}) on {path}:")
    print(f"  logits: max |fp32 - {storage}| = {report['max_abs_logit_err']:.4g}, "
          f"top-1 agreement {report['top1_agreement']:.1%}")  # fmt: skip
    if "held_out_ppl" in report:
        p = report["held_out_ppl"]
        print(f"  held-out perplexity: fp32 {p['fp32']:.3f}, {storage} {p[storage]:.3f} "
              f"({100 * (p[storage] / p['fp32'] - 1):+.2f}%)")  # fmt: skip
    d = report["decode_tok_s"]
    print(f"  decode batch 1: fp32 {d['fp32']:.1f} tok/s, {storage} {d[storage]:.1f} tok/s "
          f"({d[storage] / d['fp32'] if d['fp32'] else math.nan:.2f}x)")  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if not (isinstance(v, float) and math.isnan(v))}))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="measure the quality cost and speed gain of int8/bf16 weight-only storage"
    )
    p.add_argument("path", help="checkpoint directory")
    p.add_argument("--storage", choices=("int8", "bf16"), default="int8")
    p.add_argument("--targets", type=target_list, default="experts,attention,output",
                   help="comma list of experts, attention, output (default all three)")  # fmt: skip
    p.add_argument("--ppl-tokens", type=non_negative_int, default=16384,
                   help="validation tokens per domain for perplexity (0 to skip; needs the model's own tokenizer)")  # fmt: skip
    p.add_argument("--new-tokens", type=int_at_least(2), default=32,
                   help="tokens generated for the speed figure, >= 2: the first comes from prefill (default 32)")  # fmt: skip
    add_device_option(p)
    p.set_defaults(func=lambda a: cmd_quantize(a.path, a.storage, a.targets, a.ppl_tokens, a.new_tokens,
                                               a.device))  # fmt: skip
