"""MoE layer alone: our dispatch strategies vs transformers' MixtralSparseMoeBlock, same weights.

For T = 1, 8, 64, 512, 4096 tokens: forward (inference) and forward+backward (training). Every
strategy is checked against the reference loop before timing. Median of --repeats, side by side.

    python bench/bench_moe.py                # dim 1024, hidden 3584, 8 experts, top-2, fp32, 2 threads
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import versions  # noqa: E402

from mixtral import kernels  # noqa: E402
from mixtral.kernels import KernelDispatch  # noqa: E402
from mixtral.model import LoopDispatch, MoE, SortedDispatch, route  # noqa: E402


def hf_block(ours: MoE, dim: int, hidden: int, n_experts: int, top_k: int):
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=n_experts,
                                     num_experts_per_tok=top_k)  # fmt: skip
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        block.experts.down_proj.copy_(ours.experts.w2)
    return block


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", default="1,8,64,512,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = MoE(args.dim, args.hidden, args.experts, args.top_k)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    hf = hf_block(ours, args.dim, args.hidden, args.experts, args.top_k)
    strategies = {"loop": LoopDispatch(), "sorted": SortedDispatch()}
    if kernels.available():
        strategies["kernel"] = KernelDispatch()

    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, T, args.dim)
        with torch.no_grad():
            ref = strategies["loop"](x[0], *reversed(route(ours.gate(x[0]), args.top_k)), ours.experts)
            assert (hf(x)[0] - ref).abs().max() < 1e-4, "transformers disagrees with the reference"
            fwd = {"transformers": timeit(lambda: hf(x), args.repeats)}
            for name, dispatcher in strategies.items():
                if name == "loop" and T > 512:
                    continue
                ours.dispatcher = dispatcher
                assert (ours(x)[0][0] - ref).abs().max() < 1e-4, f"{name} disagrees with the reference"
                fwd[name] = timeit(lambda: ours(x), args.repeats)
        xg = x.clone().requires_grad_()
        ours.dispatcher = strategies["sorted"]
        bwd = {
            "transformers": timeit(lambda: hf(xg).square().mean().backward(), args.repeats),
            "sorted": timeit(lambda: ours(xg)[0].square().mean().backward(), args.repeats),
        }
        rows.append({"tokens": T, "forward_ms": {k: v * 1e3 for k, v in fwd.items()},
                     "fwd_bwd_ms": {k: v * 1e3 for k, v in bwd.items()}})  # fmt: skip

    names = ["transformers", *strategies]
    print(f"\nMoE layer dim {args.dim}, hidden {args.hidden}, {args.experts} experts, top-{args.top_k}, fp32, "
          f"{args.threads} threads, median of {args.repeats} (ms; speed-up vs transformers in brackets)")  # fmt: skip
    print(f"{'T':>5} | forward: " + " ".join(f"{n:>18}" for n in names) + " | fwd+bwd: transformers, sorted")
    for r in rows:
        f, b = r["forward_ms"], r["fwd_bwd_ms"]
        cells = [f"{f[n]:9.2f} ({f['transformers'] / f[n]:4.1f}x)" if n in f else f"{'-':>18}" for n in names]
        print(f"{r['tokens']:>5} | forward: " + " ".join(cells) +
              f" | {b['transformers']:9.2f} {b['sorted']:9.2f} ({b['transformers'] / b['sorted']:.2f}x)")  # fmt: skip
    print(json.dumps({"bench": "moe_layer", **vars(args), **versions(), "results": rows}))


if __name__ == "__main__":
    main()
