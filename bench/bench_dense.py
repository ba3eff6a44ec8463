"""The paper's efficiency claim: our SMoE vs dense models of equal ACTIVE and equal TOTAL parameters.

Three models of our own implementation, same attention and vocabulary as `bench-791m`:
- smoe: 8 experts of hidden 3584, top-2 (791M total / 263M active);
- dense-active: one FFN of hidden 7168 (= 2 × 3584), the same active parameters;
- dense-total: one FFN of hidden 28672 (= 8 × 3584), the same total parameters.
Decode (greedy, KV cache) latency at batch 1 and throughput for batch 1…64; each model is checked
(KV-cache decoding equals recomputation on a short prompt) before timing. Prints a table, writes a
PNG, ends with one JSON line.

    python bench/bench_dense.py --png docs/img/moe_vs_dense.png
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_e2e import ours_decode, versions  # noqa: E402

from mixtral.config import get_preset  # noqa: E402
from mixtral.model import Transformer  # noqa: E402


def build(name: str) -> Transformer:
    base = get_preset("bench-791m")
    cfg = {
        "smoe": base,
        "dense-active": base.replace(n_experts=1, top_k=1, hidden_dim=base.hidden_dim * base.top_k),
        "dense-total": base.replace(n_experts=1, top_k=1, hidden_dim=base.hidden_dim * base.n_experts),
    }[name]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.reset_parameters()
    return model.eval().requires_grad_(False)


def check(model: Transformer) -> None:
    prompt = torch.randint(3, model.config.vocab_size, (1, 12))
    _, ids = ours_decode(model, prompt, 4)
    seq = prompt[0].tolist()
    for t in ids[0]:  # greedy by full recomputation must pick the same tokens
        assert int(model(torch.tensor([seq])).logits[0, -1].argmax()) == t
        seq.append(t)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, r in results.items():
        batches = sorted(r["throughput"], key=int)
        a.plot([int(x) for x in batches], [r["throughput"][x] for x in batches], marker="o", label=name)
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s (all rows)",
          title="Decode throughput")  # fmt: skip
    a.set_xticks([int(x) for x in batches], labels=batches)
    a.legend()
    names = list(results)
    b.bar(names, [results[n]["latency_ms_b1"] for n in names], color=["C0", "C1", "C2"])
    b.set(ylabel="ms per token", title="Batch-1 decode latency")
    for n in names:
        p = results[n]["params"]
        b.annotate(f"{p['total'] / 1e6:.0f}M total\n{p['active'] / 1e6:.0f}M active",
                   (n, results[n]["latency_ms_b1"]), ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", default="docs/img/moe_vs_dense.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in ("smoe", "dense-active", "dense-total"):
        model = build(name)
        check(model)
        cfg = model.config
        tput = {}
        for b in (int(x) for x in args.batches.split(",")):
            toks = torch.randint(3, cfg.vocab_size, (b, args.prompt_len))
            tput[str(b)] = statistics.median(
                ours_decode(model, toks, args.new_tokens)[0] for _ in range(args.repeats)
            )
        results[name] = {"params": {"total": cfg.total_params, "active": cfg.active_params},
                         "throughput": tput, "latency_ms_b1": 1e3 / tput["1"]}  # fmt: skip
        del model
    print(
        f"\nDecode, fp32, {args.threads} threads, median of {args.repeats}: tokens/s (all rows) by batch size"
    )
    batches = list(results["smoe"]["throughput"])
    print(
        f"{'model':<14}{'total':>8}{'active':>8}{'b1 ms/tok':>11}" + "".join(f"{'b' + b:>9}" for b in batches)
    )
    for name, r in results.items():
        p = r["params"]
        print(f"{name:<14}{p['total'] / 1e6:>7.0f}M{p['active'] / 1e6:>7.0f}M{r['latency_ms_b1']:>11.1f}"
              + "".join(f"{r['throughput'][b]:>9.1f}" for b in batches))  # fmt: skip
    s, da, dt = (results[n]["latency_ms_b1"] for n in ("smoe", "dense-active", "dense-total"))
    print(f"batch-1 latency: smoe / dense-active = {s / da:.2f}, dense-total / smoe = {dt / s:.2f}")
    plot(results, Path(args.png))
    print(f"plot: {args.png}")
    print(json.dumps({"bench": "moe_vs_dense", **vars(args), **versions(), "results": results,
                      "latency_ratio_smoe_over_dense_active": s / da, "speedup_vs_dense_total": dt / s}))  # fmt: skip


if __name__ == "__main__":
    main()
