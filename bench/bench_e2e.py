"""End to end vs transformers on the same random weights: prefill, decode, training step, roofline.

Ours in fp32, in bf16 (weights and compute, as `--dtype bf16` loads it) and bf16 with int8
weight-only experts / all matrices, against transformers' MixtralForCausalLM in fp32 (the issue's
baseline) and in bf16 (`.to(torch.bfloat16)`, the same-precision reference for our bf16). The
training step runs in fp32 and under CPU bf16 autocast (fp32 master weights) on both sides.
Checks first (logits agree, greedy tokens identical for fp32; the other variants' logit error and
greedy agreement are reported), then times all variants side by side in one process, interleaving
repeats; medians and ratios. The machine's memory bandwidth and fp32 and bf16 matmul peaks are
measured in the same run, giving decode bandwidth utilisation from ACTIVE weight bytes and prefill
FLOP utilisation from ACTIVE FLOPs. Last line: one JSON object.

    python bench/bench_e2e.py                      # bench-791m config, 2 threads
    python bench/bench_e2e.py --preset tiny --repeats 2 --new-tokens 8 --prefill-len 64   # smoke run
"""

from __future__ import annotations

import argparse
import copy
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
from mixtral.checkpoint.configs import config_to_hf
from mixtral.config import get_preset
from mixtral.inference import GenerationStats, generate_ids, prefill
from mixtral.model import KVCache


def hf_model(cfg, seed: int):
    """transformers' MixtralForCausalLM with random weights, configured by our config.json writer."""
    import transformers

    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**config_to_hf(cfg, torch.float32))
    ).eval()


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
    cache = KVCache.allocate(model.config, B, T, dtype=model.tok_embeddings.weight.dtype)
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


def ours_decode(model, tokens, n: int, compile: bool = False) -> tuple[float, list[list[int]]]:
    stats = GenerationStats()
    rows: list[list[int]] = [[] for _ in range(tokens.shape[0])]
    for step in generate_ids(model, tokens.tolist(), max_new_tokens=n, stats=stats, compile=compile):
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


def measure_machine(threads: int) -> dict[str, float]:
    """Streaming read bandwidth (GB/s) and fp32 / bf16 matmul peaks (GFLOP/s), best of a few tries."""
    big = torch.randn(128 * 2**20 // 4 * 8)  # 1 GiB, far beyond the caches
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a16, b16 = a.bfloat16(), b.bfloat16()
    read = min(timeit_once(lambda: big.sum()) for _ in range(5))
    mm = min(timeit_once(lambda: a @ b) for _ in range(5))
    mm16 = min(timeit_once(lambda: a16 @ b16) for _ in range(5))
    return {"read_gb_s": big.numel() * 4 / read / 1e9, "matmul_gflop_s": 2 * 2048**3 / mm / 1e9,
            "bf16_matmul_gflop_s": 2 * 2048**3 / mm16 / 1e9}  # fmt: skip


def timeit_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def active_bytes_per_token(model, cfg) -> float:
    """Weight bytes one decode token reads: everything but unused experts and unused embedding rows."""
    total = 0.0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        size = t.numel() * t.element_size()
        if name == "tok_embeddings.weight":
            size /= cfg.vocab_size
        elif ".experts." in name:
            size *= cfg.top_k / cfg.n_experts
        total += size
    return total


def ours_train_step(model, tokens) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logits = model(tokens[:, :-1]).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return time.perf_counter() - t0


def hf_train_step(hf, tokens) -> float:
    hf.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    hf(tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()  # HF shifts labels inside
    return time.perf_counter() - t0


def variants(ours, ours_bf16, probe, hf_logits):
    """Our fp32 and bf16 models plus int8 copies of the bf16 one, with their logit error vs transformers."""
    import copy

    from mixtral.quant import quantize_model

    out = {"fp32": ours, "bf16": ours_bf16}
    out["int8-experts"] = quantize_model(copy.deepcopy(ours_bf16), "int8", ("experts",))
    out["int8"] = quantize_model(copy.deepcopy(ours_bf16), "int8", ("experts", "attention", "output"))
    quality = {}
    with torch.no_grad():
        for name, m in out.items():
            logits = m(probe).logits.float()
            quality[name] = {
                "max_abs_logit_err": (logits - hf_logits).abs().max().item(),
                "top1_agreement": (logits.argmax(-1) == hf_logits.argmax(-1)).float().mean().item(),
            }
    return out, quality


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-791m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt length for the decode runs")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--train-shape", default="8x256", help="BxT of the training step (0 to skip)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the prefill case")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also decode our fp32 model with the torch.compile'd static-cache step (fp32+compile)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset)

    hf = hf_model(cfg, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(tmp).eval()  # through our real loader
        ours_bf16 = load_model(tmp, dtype=torch.bfloat16).eval()

    # ---- check before timing --------------------------------------------------------------
    gen = torch.Generator().manual_seed(1)
    probe = torch.randint(3, cfg.vocab_size, (2, 48), generator=gen)
    with torch.no_grad():
        hf_logits = hf(probe).logits
        diff = (hf_logits - ours(probe).logits).abs().max().item()
    assert diff < 1e-3, f"logits differ from transformers by {diff}"
    _, ref_ids = hf_decode(hf, probe[:1, :16], 8)
    _, our_ids = ours_decode(ours, probe[:1, :16], 8)
    assert ref_ids == our_ids, f"greedy tokens differ: {ref_ids} vs {our_ids}"
    print(f"check: max |logit diff| = {diff:.2e}, greedy tokens identical", file=sys.stderr)
    models, quality = variants(ours, ours_bf16, probe, hf_logits)
    refs = {"transformers": hf, "transformers-bf16": copy.deepcopy(hf).to(torch.bfloat16)}
    with torch.no_grad():
        q = refs["transformers-bf16"](probe).logits.float()
    quality["transformers-bf16"] = {"max_abs_logit_err": (q - hf_logits).abs().max().item(),
                                    "top1_agreement": (q.argmax(-1) == hf_logits.argmax(-1)).float().mean().item()}  # fmt: skip
    machine = measure_machine(args.threads)

    # ---- time, interleaved ----------------------------------------------------------------
    rows = []  # (case, {impl: tok/s})
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prefill_len), generator=gen)
    if not args.no_prefill:
        for m in models.values():
            ours_prefill(m, prompt[:, :32])  # fp32+compile is added after prefill: same model, same prefill
        for h in refs.values():
            hf_prefill(h, prompt[:, :32])
        runs: dict[str, list[float]] = {k: [] for k in [*refs, *models]}
        for _ in range(args.repeats):
            for name, h in refs.items():
                runs[name].append(args.prefill_len / hf_prefill(h, prompt))
            for name, m in models.items():
                runs[name].append(args.prefill_len / ours_prefill(m, prompt))
        rows.append((f"prefill 1x{args.prefill_len}", {k: statistics.median(v) for k, v in runs.items()}))
    if args.compile:
        models["fp32+compile"] = ours
    for b in (int(x) for x in args.batches.split(",") if x):
        toks = torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=gen)
        runs = {k: [] for k in [*refs, *models]}
        agree = {}
        if args.compile:  # compile (and recompile for this batch's shapes) before timing
            ours_decode(ours, toks, args.new_tokens, compile=True)
        for _ in range(args.repeats):
            rate, ids_hf = hf_decode(hf, toks, args.new_tokens)
            runs["transformers"].append(rate)
            runs["transformers-bf16"].append(hf_decode(refs["transformers-bf16"], toks, args.new_tokens)[0])
            for name, m in models.items():
                rate, ids = ours_decode(m, toks, args.new_tokens, compile=name.endswith("+compile"))
                runs[name].append(rate)
                agree[name] = sum(a == c for a, c in zip(ids, ids_hf, strict=True))
        rows.append((f"decode batch {b}", {k: statistics.median(v) for k, v in runs.items()}))
        quality.setdefault("greedy_rows_identical", {})[f"batch {b}"] = {
            k: f"{v}/{b}" for k, v in agree.items()
        }
    bytes_tok = {n: active_bytes_per_token(m, cfg) for n, m in models.items()}
    names = list(models)
    if args.train_shape != "0":
        B, T = (int(v) for v in args.train_shape.split("x"))
        toks = torch.randint(3, cfg.vocab_size, (B, T + 1), generator=gen)
        del refs["transformers-bf16"]  # inference copies are not needed for training: free memory
        del models  # inference variants are not needed for training: free memory
        ours.train(), hf.train()
        ours.requires_grad_(True)
        times: dict[str, list[float]] = {k: [] for k in ["transformers", "transformers-bf16", "fp32", "bf16"]}
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        for _ in range(args.repeats):
            times["transformers"].append(hf_train_step(hf, toks))
            times["fp32"].append(ours_train_step(ours, toks))
            with autocast:
                times["transformers-bf16"].append(hf_train_step(hf, toks))
            with autocast:
                times["bf16"].append(ours_train_step(ours, toks))
        rows.append(
            (f"train step {B}x{T} (fwd+bwd)", {k: B * T / statistics.median(v) for k, v in times.items()})
        )

    report(args, cfg, rows, quality, machine, names, bytes_tok)


def report(args, cfg, rows, quality, machine, models: list[str], bytes_tok: dict[str, float]) -> None:
    impls = ["transformers", "transformers-bf16", *models]
    print(f"\n{args.preset}: {cfg.total_params / 1e6:.0f}M total / {cfg.active_params / 1e6:.0f}M active params, "
          f"{args.threads} threads, median of {args.repeats}; tokens/s (ratio to transformers fp32)")  # fmt: skip
    print(f"{'case':<28}" + "".join(f"{n:>20}" for n in impls) + f"{'bf16 / tf-bf16':>16}")
    for case, r in rows:
        cells = [f"{r[n]:8.1f} ({r[n] / r['transformers']:5.2f}x)" if n in r else "-" for n in impls]
        same = (
            f"{r['bf16'] / r['transformers-bf16']:.2f}x" if "bf16" in r and "transformers-bf16" in r else "-"
        )
        print(f"{case:<28}" + "".join(f"{c:>20}" for c in cells) + f"{same:>16}")
    d1 = dict(rows).get("decode batch 1", {})
    pre = next((r for c, r in rows if c.startswith("prefill")), {})
    flops_tok = 2 * (cfg.active_params - cfg.vocab_size * cfg.dim)  # embedding lookups are not FLOPs

    def peak(name: str) -> float:  # fp32 models against the fp32 peak, bf16-compute ones against bf16's
        return machine["matmul_gflop_s" if name in ("fp32", "transformers") else "bf16_matmul_gflop_s"]

    util = {
        "decode_b1_bandwidth_util": {n: d1[n] * bytes_tok[n] / 1e9 / machine["read_gb_s"] for n in d1 if n in bytes_tok},
        "prefill_flop_util": {n: pre[n] * flops_tok / 1e9 / peak(n) for n in pre},
    }  # fmt: skip
    print(f"machine: read {machine['read_gb_s']:.1f} GB/s, matmul fp32 {machine['matmul_gflop_s']:.0f} / bf16 "
          f"{machine['bf16_matmul_gflop_s']:.0f} GFLOP/s; active bytes/token: "
          + ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in bytes_tok.items()))  # fmt: skip
    print("decode batch 1, share of the active-bytes roofline: "
          + ", ".join(f"{n} {u:.0%}" for n, u in util["decode_b1_bandwidth_util"].items()))  # fmt: skip
    print("prefill, share of the matmul peak of its dtype (active FLOPs): "
          + ", ".join(f"{n} {u:.0%}" for n, u in util["prefill_flop_util"].items()))  # fmt: skip
    print("quality vs transformers fp32: " + ", ".join(
        f"{n}: max|dlogit| {q['max_abs_logit_err']:.3g}, top-1 agree {q['top1_agreement']:.1%}"
        for n, q in quality.items() if n in models or n == "transformers-bf16"))  # fmt: skip
    result = {"bench": "e2e", "preset": args.preset, "repeats": args.repeats, **versions(), "machine_measured": machine,
              "active_bytes_per_token": bytes_tok, **util, "quality": quality,
              "results": [{"case": c, "tok_s": {k: round(v, 2) for k, v in r.items()},
                           "ratio_vs_transformers": {k: round(v / r["transformers"], 3) for k, v in r.items()}}
                          for c, r in rows]}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
