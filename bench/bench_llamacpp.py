"""llama.cpp vs ours: batch-1 greedy decode tokens/s on the same weights, f32 / Q8_0 vs fp32 / int8.

The model (random weights from torch.manual_seed(0), or --model) is saved with our save_model,
exported to GGUF with mixtral.gguf_export, and loaded in llama.cpp through llama-cpp-python.
Checks first: the first-step logits of llama.cpp f32 and ours fp32 agree (max |diff| <= 1e-3 of
max |logit|, asserted) and their greedy tokens are compared (reported, not asserted: fp summation
order may flip a near-tie late in a sequence). Then times both, interleaving repeats; medians.

Timing, the same on both sides: wall clock of decode steps 2..n from Python, each step one
forward of one token plus its argmax. Ours: GenerationStats.decode_tokens_per_s of generate_ids.
llama.cpp: perf_counter around `Llama.eval([token])` + argmax of its last logits; llama.cpp's own
perf counter (t_eval_ms over n_eval, which includes the prompt-free steps only) is reported beside
it as a cross-check. Both KV caches are fp32. Ours int8 = mixtral.quantize.quantize_model on every
target it offers (llama.cpp's Q8_0 quantizes every matrix but the router); "n/a" without it.

    python bench/bench_llamacpp.py                      # bench-791m, 2 threads
    python bench/bench_llamacpp.py --preset tiny --repeats 3 --new-tokens 8   # quick smoke run
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mixtral.checkpoint import load_model, read_config, save_model
from mixtral.config import get_preset
from mixtral.generate import GenerationStats, generate_ids
from mixtral.gguf_export import export_gguf
from mixtral.model import Transformer
from mixtral.tokenizer import load_tokenizer

try:
    from mixtral.quantize import TARGETS as INT8_TARGETS
    from mixtral.quantize import quantize_model
except ImportError:
    quantize_model = None
    INT8_TARGETS = ()


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

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"torch": torch.__version__, "llama_cpp": llama_cpp.__version__,
            "gguf": importlib.metadata.version("gguf"), "python": platform.python_version(),
            "commit": commit, "machine": platform.machine(), "threads": str(torch.get_num_threads()),
            "llama_cpp_system": llama_cpp.llama_print_system_info().decode().strip()}  # fmt: skip


def time_pair(name, ours_fn, theirs: LlamaCpp, prompt, args, ref_ids) -> dict[str, object]:
    """Interleaved repeats of ours and llama.cpp (after one warm-up each); medians and agreement."""
    ours_fn(prompt, 4), theirs.decode(prompt, 4)  # warm-up: page in the mmap, build kernels
    r_ours, r_wall, r_perf = [], [], []
    for _ in range(args.repeats):
        rate, ids_ours = ours_fn(prompt, args.new_tokens)
        r_ours.append(rate)
        wall, perf, ids_theirs, _ = theirs.decode(prompt, args.new_tokens)
        r_wall.append(wall), r_perf.append(perf)
    return {"case": name, "ours_tok_s": statistics.median(r_ours), "llama_cpp_tok_s": statistics.median(r_wall),
            "llama_cpp_perf_tok_s": statistics.median(r_perf), "ours_vs_ref": agreement(ids_ours, ref_ids),
            "llama_cpp_vs_ref": agreement(ids_theirs, ref_ids)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-791m")
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: random --preset weights)")
    ap.add_argument("--tokenizer", type=Path, help="SentencePiece model for the GGUF (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.model is None:
            torch.manual_seed(0)
            save_model(Transformer(get_preset(args.preset)), tmp / "ckpt", tokenizer_src=load_tokenizer(None))
        src = args.model or tmp / "ckpt"
        cfg = read_config(src)[0]
        export_s = {}
        for outtype in ("f32", "q8_0"):
            t0 = time.perf_counter()
            export_gguf(src, tmp / f"{outtype}.gguf", outtype, tokenizer=args.tokenizer)
            export_s[outtype] = round(time.perf_counter() - t0, 1)
        print(f"export to GGUF: {export_s} s", file=sys.stderr)

        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
        n_ctx = args.prompt_len + args.new_tokens + 8
        ours = load_model(src).eval()

        def ours_fn(p: list[int], n: int) -> tuple[float, list[int]]:
            return ours_decode(ours, p, n)

        # ---- check before timing: f32 vs fp32 -------------------------------------------------
        theirs = LlamaCpp(tmp / "f32.gguf", args.threads, n_ctx)
        with torch.no_grad():
            ref_logits = ours(torch.tensor([prompt])).logits[0, -1].numpy()
        _, ref_ids = ours_fn(prompt, args.new_tokens)
        _, _, ids_f32, first = theirs.decode(prompt, args.new_tokens)
        rel = float(np.abs(first - ref_logits).max() / np.abs(ref_logits).max())
        assert rel <= 1e-3, f"first-step logits differ: max |diff| / max |logit| = {rel:.2e}"
        print(f"check: first-step logits rel diff {rel:.2e}; greedy f32 vs ours: {agreement(ids_f32, ref_ids)}",
              file=sys.stderr)  # fmt: skip

        # ---- time, interleaved --------------------------------------------------------------------
        rows = [time_pair("decode b1: ours fp32 | llama.cpp f32", ours_fn, theirs, prompt, args, ref_ids)]
        theirs.close()
        del theirs
        gc.collect()
        theirs = LlamaCpp(tmp / "q8_0.gguf", args.threads, n_ctx)
        if quantize_model is not None:
            quantize_model(ours, "int8", targets=INT8_TARGETS)
            rows.append(time_pair("decode b1: ours int8 | llama.cpp Q8_0", ours_fn, theirs, prompt, args, ref_ids))
        else:
            del ours
            gc.collect()
            rows.append(time_pair("decode b1: ours int8 | llama.cpp Q8_0", lambda p, n: (float("nan"), ref_ids),
                                  theirs, prompt, args, ref_ids))  # fmt: skip
        theirs.close()

    print(f"\n{args.preset if args.model is None else args.model}: {cfg.total_params / 1e6:.0f}M total / "
          f"{cfg.active_params / 1e6:.0f}M active params, batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    print(f"{'case':<40} {'ours tok/s':>11} {'llama.cpp tok/s':>16} {'(its perf)':>11} {'ours/llama':>11}")
    for r in rows:
        ratio = r["ours_tok_s"] / r["llama_cpp_tok_s"]
        print(f"{r['case']:<40} {r['ours_tok_s']:>11.2f} {r['llama_cpp_tok_s']:>16.2f} "
              f"{r['llama_cpp_perf_tok_s']:>11.2f} {ratio:>10.2f}x")  # fmt: skip
    for r in rows:
        print(f"greedy tokens vs ours fp32 ({r['case']}): ours {r['ours_vs_ref']}; llama.cpp {r['llama_cpp_vs_ref']}")
    results = []
    for r in rows:
        ours_rate = None if np.isnan(r["ours_tok_s"]) else round(r["ours_tok_s"], 2)
        results.append({**r, "ours_tok_s": ours_rate, "llama_cpp_tok_s": round(r["llama_cpp_tok_s"], 2),
                        "llama_cpp_perf_tok_s": round(r["llama_cpp_perf_tok_s"], 2),
                        "ratio": None if ours_rate is None else round(ours_rate / r["llama_cpp_tok_s"], 3)})  # fmt: skip
    result = {"bench": "llamacpp", "preset": args.preset if args.model is None else str(args.model),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "first_step_logit_rel_diff": rel, "export_s": export_s, "kv_cache": "fp32 both",
              "ours_int8_targets": list(INT8_TARGETS) if quantize_model is not None else None,
              **versions(), "results": results}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
