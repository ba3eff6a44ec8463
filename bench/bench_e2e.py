"""End to end: prefill and greedy-decode tokens/s of our model vs transformers', same random weights.

Checks first (logits agree, greedy tokens identical), then times both side by side in one process,
interleaving repeats, and reports medians and ratios; the last line printed is one JSON object.

    python bench/bench_e2e.py                      # bench-791m config, fp32, 2 threads
    python bench/bench_e2e.py --preset tiny --repeats 3 --new-tokens 8   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mixtral.checkpoint import load_model
from mixtral.config import get_preset
from mixtral.generate import GenerationStats, generate_ids, prefill
from mixtral.model import KVCache


def hf_model(cfg, seed: int):
    import transformers

    hc = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(hc).eval()


class _StepClock:
    """A transformers LogitsProcessor that timestamps every decode step inside `generate`."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_prefill(hf, tokens) -> float:
    from transformers import DynamicCache

    t0 = time.perf_counter()
    with torch.no_grad():
        hf(tokens, past_key_values=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


def ours_prefill(model, tokens) -> float:
    B, T = tokens.shape
    cache = KVCache.allocate(model.config, B, T)
    t0 = time.perf_counter()
    prefill(model, tokens, torch.arange(T).expand(B, T), cache, chunk_size=T)
    return time.perf_counter() - t0


def hf_decode(hf, tokens, n: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s (steps 2..n, all rows) and the generated ids."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    with torch.no_grad():
        out = hf.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          logits_processor=LogitsProcessorList([clock]))  # fmt: skip
    # clock.times[i] is when step i's logits are ready; steps 1..n-1 are decode steps.
    return tokens.shape[0] * (n - 1) / (clock.times[-1] - clock.times[0]), out[:, tokens.shape[1] :].tolist()


def ours_decode(model, tokens, n: int) -> tuple[float, list[list[int]]]:
    stats = GenerationStats()
    rows: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    for step in generate_ids(model, tokens.tolist(), max_new_tokens=n, stats=stats):
        for r, t in zip(rows, step, strict=True):
            r.append(t)
    return stats.decode_tokens_per_s, rows


def versions() -> dict[str, str]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "commit": commit, "machine": platform.machine(), "threads": str(torch.get_num_threads())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-791m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt length for the decode runs")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)

    hf = hf_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp).eval()  # through our real loader

    # ---- check before timing --------------------------------------------------------------
    gen = torch.Generator().manual_seed(1)
    probe = torch.randint(3, cfg.vocab_size, (2, 48), generator=gen)
    with torch.no_grad():
        diff = (hf(probe).logits - ours(probe).logits).abs().max().item()
    assert diff < 1e-3, f"logits differ from transformers by {diff}"
    _, ref_ids = hf_decode(hf, probe[:1, :16], 8)
    _, our_ids = ours_decode(ours, probe[:1, :16], 8)
    assert ref_ids == our_ids, f"greedy tokens differ: {ref_ids} vs {our_ids}"
    print(f"check: max |logit diff| = {diff:.2e}, greedy tokens identical", file=sys.stderr)

    # ---- time, interleaved ----------------------------------------------------------------
    rows = []
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prefill_len), generator=gen)
    ours_prefill(ours, prompt[:, :32]), hf_prefill(hf, prompt[:, :32])  # warm-up
    p_ours, p_hf = [], []
    for _ in range(args.repeats):
        p_ours.append(args.prefill_len / ours_prefill(ours, prompt))
        p_hf.append(args.prefill_len / hf_prefill(hf, prompt))
    rows.append((f"prefill 1x{args.prefill_len}", statistics.median(p_ours), statistics.median(p_hf)))
    for b in (int(x) for x in args.batches.split(",")):
        toks = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=gen)
        d_ours, d_hf = [], []
        for _ in range(args.repeats):
            rate, ids_ours = ours_decode(ours, toks, args.new_tokens)
            d_ours.append(rate)
            rate, ids_hf = hf_decode(hf, toks, args.new_tokens)
            d_hf.append(rate)
        agree = sum(a == c for a, c in zip(ids_ours, ids_hf, strict=True))
        rows.append((f"decode batch {b} ({agree}/{b} rows identical)", statistics.median(d_ours),
                     statistics.median(d_hf)))  # fmt: skip

    print(f"\n{args.preset}: {cfg.total_params / 1e6:.0f}M total / {cfg.active_params / 1e6:.0f}M active params, "
          f"fp32, {args.threads} threads, median of {args.repeats}")  # fmt: skip
    print(f"{'case':<40} {'ours tok/s':>11} {'HF tok/s':>10} {'ratio':>7}")
    for name, a, c in rows:
        print(f"{name:<40} {a:>11.1f} {c:>10.1f} {a / c:>6.2f}x")
    result = {"bench": "e2e", "preset": args.preset, "dtype": "fp32", "repeats": args.repeats,
              "logit_max_abs_diff": diff, **versions(),
              "results": [{"case": n, "ours_tok_s": round(a, 2), "hf_tok_s": round(c, 2), "ratio": round(a / c, 3)}
                          for n, a, c in rows]}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
