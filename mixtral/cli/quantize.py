"""`mixtral quantize`: what weight-only compression costs in quality and gains in decode speed, measured."""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch

from mixtral.cli.common import (
    QUANT_TARGETS,
    ModelOptions,
    add_device_option,
    int_at_least,
    load_for_inference,
    non_negative_int,
    quant_storage,
)
from mixtral.errors import MixtralError


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


def group_arg(text: str) -> int:
    """argparse type of --group: a positive multiple of 32, or `row` (0: int8 per-row scales)."""
    if text == "row":
        return 0
    try:
        g = int(text)
    except ValueError:
        g = -1
    if g <= 0 or g % 32:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 32 or 'row', got {text!r}")
    return g


def cmd_write(a: argparse.Namespace) -> None:
    """`mixtral quantize SRC DST`: write a quantized checkpoint that loads without re-quantizing."""
    from mixtral.checkpoint.quantized import quantize_checkpoint
    from mixtral.cli.common import DTYPES
    from mixtral.quant import storage_name

    fmt = a.format or "int4"
    storage = storage_name(int(fmt[3:]), a.group)
    targets = ("experts",) if a.experts_only else QUANT_TARGETS
    try:
        quantize_checkpoint(a.path, a.dst, storage, targets, dtype=DTYPES[a.dtype] if a.dtype else None,
                            overwrite=a.overwrite)  # fmt: skip
    except FileExistsError as e:  # the library names its argument; the user knows the flag
        raise FileExistsError(str(e).replace("pass overwrite=True", "pass --overwrite")) from None
    size = sum(f.stat().st_size for f in Path(a.dst).glob("*.safetensors"))
    print(f"wrote {a.dst}: {storage} ({', '.join(targets)}), {size / 2**20:.1f} MiB of weights")


def cmd(a: argparse.Namespace) -> None:
    if a.dst is not None:
        return cmd_write(a)
    if a.format is not None or a.experts_only or a.overwrite:
        raise MixtralError(
            "--format, --experts-only and --overwrite write a checkpoint: give a destination DST"
        )
    cmd_quantize(a.path, a.storage, a.targets, a.ppl_tokens, a.new_tokens, a.device)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an int4/int8 checkpoint (SRC DST), or measure what weight-only storage costs and gains (SRC)",
        description="With DST: quantize checkpoint SRC into DST, our safetensors layout of packed int4 or int8 "
        "weights with one fp16 scale per group of --group inputs (llama.cpp's Q4_0/Q8_0 blocks for group 32; "
        "docs/offloading.md), which every mixtral command loads as stored. Without DST: load SRC, compress it "
        "in memory with --storage and report the logit error, held-out perplexity and decode speed.",
    )
    p.add_argument("path", metavar="SRC", help="checkpoint directory (HF or Mistral, float weights)")
    p.add_argument(
        "dst", metavar="DST", nargs="?", default=None, help="where to write the quantized checkpoint"
    )
    p.add_argument("--format", choices=("int4", "int8"), default=None,
                   help="with DST: the integer width (default int4)")  # fmt: skip
    p.add_argument("--group", type=group_arg, default=32,
                   help="with DST: inputs per scale, a multiple of 32 (default 32), or 'row' for int8 with one "
                   "scale per output row")  # fmt: skip
    p.add_argument("--experts-only", action="store_true",
                   help="with DST: quantize only the experts (attention and output head stay float)")  # fmt: skip
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="with DST: dtype of the tensors left float (default: the source's)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="with DST: replace an existing checkpoint there")
    p.add_argument("--storage", type=quant_storage, default="int8",
                   help="without DST: int8 (per-row scales, default), bf16, int4 (groups of 32), int8-g32, "
                   "int4-gN / int8-gN")  # fmt: skip
    p.add_argument("--targets", type=target_list, default="experts,attention,output",
                   help="without DST: comma list of experts, attention, output (default all three)")  # fmt: skip
    p.add_argument("--ppl-tokens", type=non_negative_int, default=16384,
                   help="validation tokens per domain for perplexity (0 to skip; needs the model's own tokenizer)")  # fmt: skip
    p.add_argument("--new-tokens", type=int_at_least(2), default=32,
                   help="tokens generated for the speed figure, >= 2: the first comes from prefill (default 32)")  # fmt: skip
    add_device_option(p)
    p.set_defaults(func=cmd)
