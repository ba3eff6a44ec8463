"""llama.cpp vs ours: batch-1 greedy decode tokens/s on the same weights: f32, Q8_0 and Q4_0.

The model (random weights from torch.manual_seed(0), or --model) is saved with our save_model,
exported to GGUF with mixtral.checkpoint.gguf_export, and loaded in llama.cpp through llama-cpp-python.
Checks first: the first-step logits of llama.cpp f32 and ours fp32 agree (max |diff| <= 1e-3 of
max |logit|, asserted) and their greedy tokens are compared (reported, not asserted: fp summation
order may flip a near-tie late in a sequence). Then times both, interleaving repeats; medians.

Timing, the same on both sides: wall clock of decode steps 2..n from Python, each step one
forward of one token plus its argmax. Ours: GenerationStats.decode_tokens_per_s of generate_ids.
llama.cpp: perf_counter around `Llama.eval([token])` + argmax of its last logits; llama.cpp's own
perf counter (t_eval_ms over n_eval: the same single-token steps, without Python) is reported beside
it as a cross-check. Both KV caches are fp32. The quantized cases run the very same weights on both
sides: `mixtral quantize` writes int8 / int4 groups of 32 (experts, attention, output head; the
embedding and router stay float), ours loads that checkpoint, and llama.cpp its GGUF export, whose
Q8_0 / Q4_0 blocks are the stored bytes.
Each side loads its weights its own default way: ours `load_model` (large matrices copied into
transparent huge pages where Linux offers them, mixtral/kernels/hugepages.py), llama.cpp an mmap of
the GGUF (the page cache's 4 KiB pages); the JSON line records which (`weights_pages`). Ours decodes
through `generate_ids`, i.e. the step bound once (`make_decode_step`) and its greedy tokens from C++.
The quantized rows also report first-step logit differences and greedy agreement with ours fp32;
with random weights these are dominated by expert-routing flips (the router's top-2 logits are
near ties), so they show that a flip happened, not how good the quantization is.
Both runtimes spin-wait between ops; on a shared machine a busy neighbour core slows llama.cpp
(OpenMP barriers) far more than torch, so the 1-minute load average is recorded before and after.

    python bench/bench_llamacpp.py                      # bench-791m, 2 threads
    python bench/bench_llamacpp.py --preset tiny --repeats 3 --new-tokens 8   # quick smoke run
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import versions as base_versions  # noqa: E402

from mixtral.checkpoint import load_model, read_config, save_model
from mixtral.checkpoint.gguf_export import export_gguf
from mixtral.config import get_preset
from mixtral.inference import GenerationStats, generate_ids
from mixtral.kernels.hugepages import huge_pages_available
from mixtral.model import Transformer
from mixtral.text.tokenizer import load_tokenizer


class LlamaCpp:
    """One GGUF loaded in llama.cpp; greedy decode timed per step."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False,
        )  # fmt: skip
        self.n_vocab = self.llm.n_vocab()

    def last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def decode(self, prompt: list[int], n: int) -> tuple[float, float, list[int], np.ndarray]:
        """(wall tokens/s, llama.cpp perf-counter tokens/s, greedy ids, first-step logits)."""
        self.llm.reset()
        self.llm.eval(prompt)
        first = self.last_logits()
        ids = [int(first.argmax())]
        self.lib.llama_perf_context_reset(self.llm.ctx)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([ids[-1]])
            ids.append(int(self.last_logits().argmax()))
        wall = time.perf_counter() - t0
        perf = self.lib.llama_perf_context(self.llm.ctx)
        return (n - 1) / wall, 1e3 * perf.n_eval / perf.t_eval_ms, ids, first

    def close(self) -> None:
        self.llm.close()


def ours_decode(model: Transformer, prompt: list[int], n: int) -> tuple[float, list[int]]:
    stats = GenerationStats()
    ids = [step[0] for step in generate_ids(model, [prompt], max_new_tokens=n, stats=stats)]
    return stats.decode_tokens_per_s, ids


def agreement(a: list[int], b: list[int]) -> str:
    prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)} same, first {prefix} identical"


def versions() -> dict[str, str]:
    import llama_cpp

    return {**base_versions(), "llama_cpp": llama_cpp.__version__, "gguf": importlib.metadata.version("gguf"),
            "llama_cpp_system": llama_cpp.llama_print_system_info().decode().strip()}  # fmt: skip


def first_logits(model: Transformer, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].float().numpy()


def rel_diff(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


# Both sides' worker threads (torch's OpenMP, llama.cpp's ggml pool) spin a while after their last
# work: each timed run starts after this pause, so it does not share the cores with the other's spinning.
SETTLE_S = 0.2


def time_pair(name: str, ours: Transformer | None, theirs: LlamaCpp, prompt, args, ref) -> dict[str, object]:
    """Interleaved repeats of ours and llama.cpp (after one warm-up each): medians, plus how far
    each side's greedy tokens and first-step logits are from ours fp32 (`ref`: ids, logits).
    `ours` None times llama.cpp alone (ours "n/a")."""
    ref_ids, ref_logits = ref
    _, _, _, theirs_first = theirs.decode(prompt, 4)  # warm-up: page in the mmap
    if ours is not None:
        ours_decode(ours, prompt, 4)  # warm-up: build or load the CPU kernels
    r_ours, r_wall, r_perf, ids_ours = [], [], [], None
    for _ in range(args.repeats):
        if ours is not None:
            time.sleep(SETTLE_S)
            rate, ids_ours = ours_decode(ours, prompt, args.new_tokens)
            r_ours.append(rate)
        time.sleep(SETTLE_S)
        wall, perf, ids_theirs, _ = theirs.decode(prompt, args.new_tokens)
        r_wall.append(wall), r_perf.append(perf)
    ours_rate = statistics.median(r_ours) if r_ours else None
    theirs_rate = statistics.median(r_wall)
    return {"case": name, "ours_tok_s": ours_rate and round(ours_rate, 2), "llama_cpp_tok_s": round(theirs_rate, 2),
            "llama_cpp_perf_tok_s": round(statistics.median(r_perf), 2),
            "ratio": ours_rate and round(ours_rate / theirs_rate, 3),
            "ours_vs_ref": ids_ours and agreement(ids_ours, ref_ids),
            "llama_cpp_vs_ref": agreement(ids_theirs, ref_ids),
            "ours_logit_rel_diff": None if ours is None else rel_diff(first_logits(ours, prompt), ref_logits),
            "llama_cpp_logit_rel_diff": rel_diff(theirs_first, ref_logits)}  # fmt: skip


def export_both(args, tmp: Path) -> tuple[Path, dict[str, float]]:
    """The checkpoint (saved from random --preset weights unless --model), its int8/int4 quantized
    checkpoints (tmp/q8_0, tmp/q4_0) and the f32 / q8_0 / q4_0 GGUFs of those same weights."""
    from mixtral.checkpoint.quantized import quantize_checkpoint

    if args.model is None:
        torch.manual_seed(0)
        save_model(Transformer(get_preset(args.preset)), tmp / "ckpt", tokenizer_src=load_tokenizer(None))
    src = args.model or tmp / "ckpt"
    export_s = {}
    for outtype, storage in (("f32", None), ("q8_0", "int8-g32"), ("q4_0", "int4")):
        t0 = time.perf_counter()
        source = src
        if storage is not None:
            source = tmp / outtype
            quantize_checkpoint(src, source, storage, ("experts", "attention", "output"), progress=False)
        export_gguf(source, tmp / f"{outtype}.gguf", None if storage else outtype, tokenizer=args.tokenizer)
        export_s[outtype] = round(time.perf_counter() - t0, 1)
    print(f"quantize and export to GGUF: {export_s} s", file=sys.stderr)
    return src, export_s


def check(ours: Transformer, theirs: LlamaCpp, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Assert llama.cpp f32's first-step logits match ours fp32; our greedy ids and logits (the reference)."""
    ref_logits = first_logits(ours, prompt)
    _, ref_ids = ours_decode(ours, prompt, n)
    _, _, ids, first = theirs.decode(prompt, n)
    rel = rel_diff(first, ref_logits)
    assert rel <= 1e-3, f"first-step logits differ: max |diff| / max |logit| = {rel:.2e}"
    print(f"check: first-step logits rel diff {rel:.2e}; greedy llama.cpp f32 vs ours fp32: {agreement(ids, ref_ids)}",
          file=sys.stderr)  # fmt: skip
    return ref_ids, ref_logits


def report(args, cfg, rows: list[dict[str, object]], extra: dict[str, object]) -> None:
    def fmt(x: object, width: int) -> str:
        return f"{x:>{width}.2f}" if isinstance(x, float) else f"{'n/a':>{width}}"

    name = args.preset if args.model is None else str(args.model)
    print(f"\n{name}: {cfg.total_params / 1e6:.0f}M total / {cfg.active_params / 1e6:.0f}M active params, batch 1, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    print(f"{'case':<40} {'ours tok/s':>11} {'llama.cpp tok/s':>16} {'(its perf)':>11} {'ours/llama':>11}")
    for r in rows:
        print(f"{r['case']:<40} {fmt(r['ours_tok_s'], 11)} {fmt(r['llama_cpp_tok_s'], 16)} "
              f"{fmt(r['llama_cpp_perf_tok_s'], 11)} {fmt(r['ratio'], 10) + ('x' if r['ratio'] else ' ')}")  # fmt: skip
    for r in rows:
        ours_diff = "n/a" if r["ours_logit_rel_diff"] is None else f"{r['ours_logit_rel_diff']:.1e}"
        print(f"vs ours fp32, {r['case']}: first-step logits rel diff ours {ours_diff}, llama.cpp "
              f"{r['llama_cpp_logit_rel_diff']:.1e}; greedy tokens ours {r['ours_vs_ref'] or 'n/a'}, "
              f"llama.cpp {r['llama_cpp_vs_ref']}")  # fmt: skip
    result = {"bench": "llamacpp", "preset": name, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "repeats": args.repeats, **extra, **versions(), "results": rows}  # fmt: skip
    print(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-791m")
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: random --preset weights)")
    ap.add_argument(
        "--tokenizer", type=Path, help="SentencePiece model for the GGUF (default: the checkpoint's)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        src, export_s = export_both(args, tmp)
        cfg = read_config(src)[0]
        prompt = torch.randint(
            3, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)
        )
        prompt, n_ctx = prompt.tolist(), args.prompt_len + args.new_tokens + 8
        ours = load_model(src).eval()
        theirs = LlamaCpp(tmp / "f32.gguf", args.threads, n_ctx)
        ref = check(ours, theirs, prompt, args.new_tokens)
        rows = [time_pair("decode b1: ours fp32 | llama.cpp f32", ours, theirs, prompt, args, ref)]
        theirs.close()
        for outtype, ours_name in (("q8_0", "int8 groups"), ("q4_0", "int4 groups")):
            del ours
            gc.collect()
            ours = load_model(tmp / outtype).eval()  # the quantized checkpoint: the GGUF's very blocks
            theirs = LlamaCpp(tmp / f"{outtype}.gguf", args.threads, n_ctx)
            rows.append(time_pair(f"decode b1: ours {ours_name} | llama.cpp {outtype.upper()}", ours, theirs,
                                  prompt, args, ref))  # fmt: skip
            theirs.close()

    extra = {"export_s": export_s, "kv_cache": "fp32 both",
             "weights_pages": {"ours": "2 MiB (THP)" if huge_pages_available() else "4 KiB",
                               "llama_cpp": "4 KiB (mmap of the GGUF)"},
             "quantized_targets": ["experts", "attention", "output"],
             "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}  # fmt: skip
    report(args, cfg, rows, extra)


if __name__ == "__main__":
    main()
