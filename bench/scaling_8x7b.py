"""The 8x7B beyond this machine, by arithmetic, and the EP load imbalance from routing traces (docs/scaling.md).

Part 1 (arithmetic, the reference's 8x7B shape): training FLOPs per token and per step, memory per
rank (fp32 weights, gradients and AdamW moments, FSDP2-sharded; experts split by EP), all-to-all and
FSDP bytes per rank per step, for EP8 × DP(N) on N = 8..64 GPUs at a stated batch, and the step time
those imply at a stated utilisation and link speed (stated below; change them with the flags).

Part 2 (imbalance): max / mean expert load over the ranks of an EP group, from
- the traces `mixtral routing MODEL --keep-traces` wrote (traces.npz), in three orders: sequences of
  all domains shuffled together (pretraining-like), whole domains one after the other (a rank reading
  one source), and tokens shuffled (no temporal locality);
- a synthetic 32-layer trace with the paper's Table 5 first-choice repetition (14 % at layer 0, 27 %
  at 15, 23 % at 31; interpolated) and the same in random order.

    mixtral routing models/mini --keep-traces --out /tmp/rt --max-tokens 40000
    python bench/scaling_8x7b.py --traces /tmp/rt/traces.npz
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mixtral.config import get_preset
from mixtral.parallel.imbalance import (
    ep_imbalance,
    first_choice_repetition,
    interleave_sequences,
    shuffle_tokens,
    synthetic_trace,
)

GIB = 2**30


def arithmetic(args) -> list[dict]:
    c = get_preset("mixtral-8x7b")
    L, D, F, E = c.n_layers, c.dim, c.hidden_dim, c.n_experts
    expert_params = L * E * 3 * D * F
    dense_params = c.total_params - expert_params
    S = args.seq_len
    # training FLOPs per token: 6 x active params (forward 2, backward 4) + causal attention 6 x 2 x L x S/2 x (H x hd)
    attn = 6 * 2 * L * (S / 2) * c.n_heads * c.head_dim
    flops_token = 6 * c.active_params + attn
    rows = []
    for n in args.gpus:
        ep, edp = args.ep, n // args.ep
        tokens_rank = args.micro_batch * S
        state_bytes = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
        mem = (expert_params / (ep * edp) + dense_params / n) * state_bytes
        # activations kept with per-block checkpointing: the block inputs (bf16) + one block's working set
        act = tokens_rank * D * 2 * L + tokens_rank * (10 * D + 4 * F) * 2
        # all-to-all: each token's k rows of D (bf16) out and back, forward and backward; (ep-1)/ep leave
        a2a = tokens_rank * c.top_k * D * 2 * 2 * 2 * L * (ep - 1) / ep
        # FSDP2: all-gather forward + backward and reduce-scatter of bf16 weights, per rank (n-1)/n of each
        fsdp_dense = 3 * dense_params * 2 * (n - 1) / n
        fsdp_expert = 3 * expert_params / ep * 2 * (edp - 1) / edp if edp > 1 else 0.0
        compute_s = tokens_rank * flops_token / (args.peak_tflops * 1e12 * args.mfu)
        a2a_s = a2a / (args.intra_gbs * 1e9)  # EP inside a node (NVLink)
        fsdp_s = fsdp_dense / (args.inter_gbs * 1e9 if n > 8 else args.intra_gbs * 1e9) + fsdp_expert / (
            args.inter_gbs * 1e9
        )  # edp spans nodes
        rows.append({"gpus": n, "ep": ep, "expert_dp": edp, "tokens_per_rank": tokens_rank,
                     "global_batch_tokens": tokens_rank * n, "weights_state_gib": mem / GIB,
                     "activations_gib": act / GIB, "a2a_gb": a2a / 1e9, "fsdp_gb": (fsdp_dense + fsdp_expert) / 1e9,
                     "compute_s": compute_s, "a2a_s": a2a_s, "fsdp_s": fsdp_s,
                     "step_s_no_overlap": compute_s + a2a_s + fsdp_s,
                     "step_s_fsdp_overlapped": compute_s + a2a_s + max(0.0, fsdp_s - compute_s),
                     "tokens_per_s_per_gpu": tokens_rank / (compute_s + a2a_s + max(0.0, fsdp_s - compute_s))})  # fmt: skip
    print(f"\n8x7B: {c.total_params / 1e9:.1f}B total ({expert_params / 1e9:.1f}B in experts), {c.active_params / 1e9:.1f}B "
          f"active; training {flops_token / 1e9:.1f} GFLOP/token at seq {S}; micro-batch {args.micro_batch} x {S} "
          f"per GPU; {args.peak_tflops:.0f} TFLOP/s peak at {args.mfu:.0%} utilisation; links {args.intra_gbs:.0f} "
          f"GB/s in a node, {args.inter_gbs:.0f} GB/s between nodes")  # fmt: skip
    print(f"{'GPUs':>5} {'EP':>3} {'EDP':>4} {'weights+opt GiB':>16} {'act GiB':>8} {'a2a GB':>7} {'FSDP GB':>8} "
          f"{'compute s':>10} {'a2a s':>6} {'FSDP s':>7} {'step s':>7} {'tok/s/GPU':>10}")  # fmt: skip
    for r in rows:
        print(f"{r['gpus']:5d} {r['ep']:3d} {r['expert_dp']:4d} {r['weights_state_gib']:16.1f} {r['activations_gib']:8.1f} "
              f"{r['a2a_gb']:7.2f} {r['fsdp_gb']:8.1f} {r['compute_s']:10.3f} {r['a2a_s']:6.3f} {r['fsdp_s']:7.3f} "
              f"{r['step_s_fsdp_overlapped']:7.3f} {r['tokens_per_s_per_gpu']:10.0f}")  # fmt: skip
    return rows


def imbalance_table(
    name: str, ids: np.ndarray, n_experts: int, eps: list[int], tokens_per_rank: int
) -> list[dict]:
    rows = []
    for ep in eps:
        r = ep_imbalance(ids, n_experts, ep, ep * tokens_per_rank)
        rows.append({"trace": name, "ep": ep, "tokens_per_rank": tokens_per_rank, "mean": float(r.mean()),
                     "p95": float(np.percentile(r, 95)), "max": float(r.max()),
                     "worst_layer_mean": float(r.mean(1).max())})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default=None, help="traces.npz from `mixtral routing --keep-traces`")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per GPU per step")
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--gpus", default="8,16,32,64")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.35, help="utilisation of the peak")
    ap.add_argument("--intra-gbs", type=float, default=400.0, help="GB/s per GPU inside a node")
    ap.add_argument("--inter-gbs", type=float, default=45.0, help="GB/s per GPU between nodes")
    ap.add_argument("--tokens-per-rank", type=int, default=1024, help="tokens per rank for the imbalance")
    args = ap.parse_args()
    args.gpus = [int(x) for x in args.gpus.split(",")]
    out = {"arithmetic": arithmetic(args), "imbalance": []}
    print(f"\nEP load imbalance (max / mean slots per EP rank), {args.tokens_per_rank} tokens per rank")
    print(f"{'trace':<46} {'EP':>3} {'mean':>6} {'p95':>6} {'max':>6} {'worst layer':>12}")
    rows = []
    if args.traces:
        traces = dict(np.load(args.traces))
        E = 8
        seq = 256
        mixed = interleave_sequences(traces, seq)
        whole = np.concatenate(list(traces.values()), axis=1)
        rep = first_choice_repetition(whole)
        print(f"(mini trace: {whole.shape[1]} tokens, {whole.shape[0]} layers; first-choice repetition by layer "
              f"{', '.join(f'{x:.0%}' for x in rep)})")  # fmt: skip
        rows += imbalance_table(
            "mini: sequences of all domains, shuffled", mixed, E, [2, 4, 8], args.tokens_per_rank
        )
        rows += imbalance_table("mini: one domain after another", whole, E, [2, 4, 8], args.tokens_per_rank)
        rows += imbalance_table(
            "mini: tokens shuffled", shuffle_tokens(whole), E, [2, 4, 8], args.tokens_per_rank
        )
    rates = np.interp(np.arange(32), [0, 15, 31], [0.140, 0.268, 0.226]).tolist()
    synth = synthetic_trace(64 * args.tokens_per_rank, rates, seed=0)
    rows += imbalance_table("synthetic 8x7B (paper's repetition)", synth, 8, [8], args.tokens_per_rank)
    rows += imbalance_table(
        "synthetic 8x7B, tokens shuffled", shuffle_tokens(synth), 8, [8], args.tokens_per_rank
    )
    for r in rows:
        print(
            f"{r['trace']:<46} {r['ep']:3d} {r['mean']:6.3f} {r['p95']:6.3f} {r['max']:6.3f} {r['worst_layer_mean']:12.3f}"
        )
    out["imbalance"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
