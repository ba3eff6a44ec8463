"""Training throughput on this machine: one process × 2 threads against torchrun jobs of 2 processes × 1 thread.

The model is the `mini` recipe's shape (dim 256, 6 layers, 8 experts top-2, hidden 512, vocab 8192),
a global batch of 8 × 256 tokens, AdamW, the pooled balance loss; steps run on random learnable
documents. Layouts: one process (2 threads, then 1 thread), and under
`torchrun --nproc-per-node 2` (gloo, OMP_NUM_THREADS=1): EP2 (experts split over the two ranks, the
rest FSDP2-sharded over both) and DP2 (FSDP2 only). Before timing, each distributed layout's first
losses are checked against the one-process run (≤ 1e-5 relative). Reported: tokens/s (median of the
timed steps), ratio to one process × 2 threads, and the share of the step each rank spends in the
all-to-all exchanges (`mixtral.parallel.ep.A2A_SECONDS`: counts and rows, forward and backward).
Prints a table and ends with one JSON line (also appended to bench/results/distributed.jsonl).

    python bench/bench_distributed.py                 # 3 warm-up + 6 timed steps per layout
    python bench/bench_distributed.py --steps 2 --warmup 1 --no-save   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_e2e import versions  # noqa: E402

from mixtral.config import MixtralConfig  # noqa: E402
from mixtral.data.packing import PackedStream, TokenizedDocs  # noqa: E402
from mixtral.model import Transformer  # noqa: E402
from mixtral.train.loop import TrainConfig, make_optimizer, train_step  # noqa: E402
from mixtral.train.pretrain import lm_objective  # noqa: E402

CONFIG = MixtralConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=512, n_experts=8,
                       top_k=2, vocab_size=8192, max_seq_len=2048)  # fmt: skip
SEQ, BATCH = 256, 8


def stream() -> PackedStream:
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 400, size=400)
    starts, strides = rng.integers(0, 8000, 400), rng.integers(1, 7, 400)
    body = [(s + d * np.arange(n - 2)) % 8000 + 3 for s, d, n in zip(starts, strides, lengths, strict=True)]
    tokens = np.concatenate([np.concatenate([[1], b, [2]]) for b in body]).astype(np.int32)
    docs = {"synthetic": TokenizedDocs(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))}
    return PackedStream(docs, SEQ, seed=1)


def run_steps(model, data, steps: int, layout=None) -> tuple[list[float], list[float], list[float]]:
    """(losses, seconds, all-to-all seconds) per step."""
    from mixtral.parallel import ep

    cfg = TrainConfig(steps=100, batch_size=BATCH, lr=1e-3, warmup_steps=2)
    optimizer = make_optimizer(model, cfg)
    model.train()
    losses, seconds, a2a = [], [], []
    for step in range(steps):
        ep.A2A_SECONDS[0] = 0.0
        t0 = time.perf_counter()
        losses.append(train_step(model, lm_objective, data, optimizer, cfg, step, layout)["loss"])
        seconds.append(time.perf_counter() - t0)
        a2a.append(ep.A2A_SECONDS[0])
    return losses, seconds, a2a


def worker(ep_size: int, steps: int) -> None:
    import torch.distributed as dist

    from mixtral.parallel import ParallelConfig, init_process_group, make_layout, parallelize
    from mixtral.parallel.data import RankSlice

    init_process_group()
    layout = make_layout(ParallelConfig(ep=ep_size), CONFIG.n_experts)
    torch.manual_seed(0)
    model = parallelize(Transformer(CONFIG), layout)
    losses, seconds, a2a = run_steps(model, RankSlice(stream(), layout.rank, layout.world), steps, layout)
    shares = [a / s for a, s in zip(a2a, seconds, strict=True)]
    everyone: list = [None] * layout.world
    dist.all_gather_object(everyone, shares)
    if layout.rank == 0:
        print(
            "RESULT " + json.dumps({"losses": losses, "seconds": seconds, "a2a_share_per_rank": everyone}),
            flush=True,
        )
    dist.destroy_process_group()


def one_process(threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    losses, seconds, _ = run_steps(Transformer(CONFIG), stream(), steps)
    return {"losses": losses, "seconds": seconds}


def distributed(ep_size: int, steps: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           "--worker", "--ep", str(ep_size), "--steps", str(steps), "--warmup", "0"]  # fmt: skip
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
        raise SystemExit(f"torchrun EP{ep_size} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per layout")
    ap.add_argument("--no-save", action="store_true", help="do not append to bench/results/distributed.jsonl")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    total = args.warmup + args.steps
    if args.worker:
        worker(args.ep, total)
        return
    tokens = BATCH * SEQ
    runs = {"1 process x 2 threads": one_process(2, total), "1 process x 1 thread": one_process(1, total)}
    torch.set_num_threads(2)
    runs["torchrun 2 x 1 thread, EP2 + FSDP2"] = distributed(2, total)
    runs["torchrun 2 x 1 thread, DP2 (FSDP2)"] = distributed(1, total)
    ref = runs["1 process x 2 threads"]["losses"]
    for name, r in runs.items():  # correctness before speed
        worst = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref, strict=True))
        r["max_rel_loss_vs_one_process"] = worst
        if worst > 1e-5:
            raise SystemExit(f"{name}: losses differ from one process by {worst:.2e} (> 1e-5)")
    base = tokens / statistics.median(runs["1 process x 2 threads"]["seconds"][args.warmup :])
    rows = []
    print(f"\n{CONFIG.total_params / 1e6:.1f}M total / {CONFIG.active_params / 1e6:.1f}M active params, global batch "
          f"{BATCH} x {SEQ} tokens, median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    print(f"{'layout':<40} {'tokens/s':>9} {'vs 1x2':>7} {'a2a share':>10} {'max rel loss':>13}")
    for name, r in runs.items():
        tps = tokens / statistics.median(r["seconds"][args.warmup :])
        share = r.get("a2a_share_per_rank")
        share_med = statistics.median(x for rank in share for x in rank[args.warmup :]) if share else None
        rows.append({"layout": name, "tokens_per_s": round(tps, 1), "vs_one_process_2_threads": round(tps / base, 3),
                     "a2a_share": share_med and round(share_med, 4), "max_rel_loss": r["max_rel_loss_vs_one_process"]})  # fmt: skip
        print(f"{name:<40} {tps:9.1f} {tps / base:6.2f}x {'' if share_med is None else f'{share_med:9.1%}':>10} "
              f"{r['max_rel_loss_vs_one_process']:13.1e}")  # fmt: skip
    result = {"bench": "distributed", "model": "mini shape", "global_batch": [BATCH, SEQ], "steps": args.steps,
              "warmup": args.warmup, "backend": "gloo", **versions(), "results": rows}  # fmt: skip
    line = json.dumps(result)
    if not args.no_save:
        with open(ROOT / "bench" / "results" / "distributed.jsonl", "a") as f:
            f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
