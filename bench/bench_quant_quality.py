"""What weight quantization costs in quality: held-out perplexity per domain, ours and llama.cpp's.

On the shipped mini model (or --model), the same held-out documents of every domain of the bundled
corpus (each document from BOS, up to --seq-len tokens, scored on its own) are scored by:
- ours in bf16 (the checkpoint's weights), and in fp32 compute with weight-only int8 per row,
  int8 groups of 32 (Q8_0) and int4 groups of 32 (Q4_0), on experts, attention and output head
  (`mixtral.quant.quantize_model`; the embedding and router stay float);
- llama.cpp (llama-cpp-python) on the Q4_0 GGUF export of our int4 checkpoint, i.e. the very same
  int4 weights (`mixtral quantize` then `mixtral convert --to gguf`), and on the f32 export.
Ours run the prefill path (weights dequantized, activations float); llama.cpp multiplies Q4_0
weights by 8-bit activations, so the last rows also show what activation rounding adds.
Prints a table and ends with one JSON line.

    python bench/bench_quant_quality.py                  # models/mini, 24 documents per domain
    python bench/bench_quant_quality.py --docs 4 --no-llamacpp   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_e2e import versions  # noqa: E402

import mixtral  # noqa: E402
from mixtral.checkpoint.gguf_export import export_gguf  # noqa: E402
from mixtral.checkpoint.quantized import quantize_checkpoint  # noqa: E402
from mixtral.data.corpus import load_corpus  # noqa: E402
from mixtral.quant import quantize_model  # noqa: E402

TARGETS = ("experts", "attention", "output")


def documents(tok, per_domain: int, seq_len: int) -> dict[str, list[list[int]]]:
    out = {}
    for domain, split in load_corpus().items():
        docs = [
            tok.encode(d.text if hasattr(d, "text") else d, bos=True)[:seq_len]
            for d in split.valid[:per_domain]
        ]
        out[domain] = [d for d in docs if len(d) > 1]
    return out


def nll_ours(model, docs: list[list[int]]) -> tuple[float, int]:
    total, n = 0.0, 0
    with torch.no_grad():
        for d in docs:
            logits = model(torch.tensor([d])).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(d[1:]), reduction="sum").item()
            n += len(d) - 1
    return total, n


def nll_llamacpp(path: Path, docs: list[list[int]], seq_len: int, threads: int) -> tuple[float, int]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=seq_len, n_batch=seq_len, n_threads=threads, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # fmt: skip
    total, n = 0.0, 0
    try:
        for d in docs:
            llm.reset()
            llm.eval(d)
            logits = np.asarray(llm.scores[: len(d) - 1], dtype=np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            total -= float(logp[np.arange(len(d) - 1), d[1:]].sum())
            n += len(d) - 1
    finally:
        llm.close()
    return total, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "mini"))
    ap.add_argument("--docs", type=int, default=24, help="held-out documents per domain (default 24)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = mixtral.load_tokenizer(a.model)
    docs = documents(tok, a.docs, a.seq_len)
    base = mixtral.load_model(a.model)
    variants = {"bf16": lambda: copy.deepcopy(base).to(torch.bfloat16)}
    for name, storage in (("int8 per row", "int8"), ("int8 group 32", "int8-g32"), ("int4 group 32", "int4")):
        variants[name] = lambda s=storage: quantize_model(copy.deepcopy(base), s, TARGETS)
    rows: dict[str, dict[str, float]] = {}
    for name, make in variants.items():
        model = make()
        rows[name] = {d: nll_ours(model, ds) for d, ds in docs.items()}
        print(f"{name}: done", file=sys.stderr)
    if not a.no_llamacpp:
        with tempfile.TemporaryDirectory() as tmp:
            quantize_checkpoint(a.model, Path(tmp) / "q4", "int4", TARGETS, progress=False)
            q4 = export_gguf(Path(tmp) / "q4", Path(tmp) / "q4.gguf", progress=False)
            f32 = export_gguf(a.model, Path(tmp) / "f32.gguf", "f32", progress=False)
            rows["llama.cpp f32"] = {d: nll_llamacpp(f32, ds, a.seq_len, a.threads) for d, ds in docs.items()}
            rows["llama.cpp Q4_0 (our int4)"] = {
                d: nll_llamacpp(q4, ds, a.seq_len, a.threads) for d, ds in docs.items()
            }
    domains = list(docs)
    table = {}
    for name, per in rows.items():
        ppl = {d: math.exp(per[d][0] / per[d][1]) for d in domains}
        ppl["all"] = math.exp(sum(v[0] for v in per.values()) / sum(v[1] for v in per.values()))
        table[name] = ppl
    head = f"{'weights':>26} " + " ".join(f"{d[:9]:>9}" for d in [*domains, "all"])
    print(f"\nheld-out perplexity, {a.docs} documents per domain (<= {a.seq_len} tokens each), {a.model}")
    print(head)
    for name, ppl in table.items():
        print(f"{name:>26} " + " ".join(f"{ppl[d]:>9.3f}" for d in [*domains, "all"]))
    tokens = sum(v[1] for v in rows["bf16"].values())
    print(json.dumps({"bench": "quant_quality", "model": a.model, "docs": a.docs, "seq_len": a.seq_len,
                      "tokens": tokens, "ppl": table, **versions()}))  # fmt: skip


if __name__ == "__main__":
    main()
