"""Run under torchrun: N training steps of a sharded model against one process with the same global batch.

argv: EP DP_SHARD DP_REPLICATE STEPS. Every rank trains the one-process reference itself first
(global batch of 8 packed rows, AdamW, clipping, the pooled balance and z-loss), then the same model
`parallelize`d with `--set parallel.ep=EP ...`, reading its slice of each batch (RankSlice), and
compares the loss (averaged over ranks) step by step. Prints one JSON line (rank 0); exits 1 if any
step differs by more than 1e-5 relative.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from mixtral.config import MixtralConfig
from mixtral.data.packing import PackedStream, TokenizedDocs
from mixtral.model import Transformer
from mixtral.parallel import ParallelConfig, init_process_group, make_layout, parallelize
from mixtral.parallel.data import RankSlice
from mixtral.train.loop import TrainConfig, make_optimizer, train_step
from mixtral.train.pretrain import lm_objective

CONFIG = MixtralConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48, n_experts=8,
                       top_k=2, vocab_size=97, max_seq_len=64)  # fmt: skip


def docs(seed: int) -> dict[str, TokenizedDocs]:
    """Two domains of learnable documents: counting up by a per-document stride (mod 90)."""
    rng = np.random.default_rng(seed)
    out = {}
    for domain, stride in (("a", 1), ("b", 3)):
        lengths = rng.integers(5, 40, size=60)
        starts = rng.integers(0, 90, size=60)
        body = [(s + stride * np.arange(n - 2)) % 90 + 3 for s, n in zip(starts, lengths, strict=True)]
        tokens = np.concatenate([np.concatenate([[1], b, [2]]) for b in body]).astype(np.int32)
        out[domain] = TokenizedDocs(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return out


def run(model, stream, cfg, steps, layout=None) -> list[float]:
    optimizer = make_optimizer(model, cfg)
    model.train()
    return [train_step(model, lm_objective, stream, optimizer, cfg, s, layout)["loss"] for s in range(steps)]


def main() -> int:
    ep, dp_shard, dp_replicate, steps = (int(a) for a in sys.argv[1:5])
    init_process_group(timeout_s=120)
    layout = make_layout(ParallelConfig(ep=ep, dp_shard=dp_shard, dp_replicate=dp_replicate), n_experts=8)
    cfg = CONFIG
    train_cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-2, min_lr=2e-3, warmup_steps=3, grad_clip=0.5)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = copy.deepcopy(model)
    want = run(ref, PackedStream(docs(1), 16, seed=3), train_cfg, steps)
    parallelize(model, layout)
    got = run(
        model,
        RankSlice(PackedStream(docs(1), 16, seed=3), layout.rank, layout.world),
        train_cfg,
        steps,
        layout,
    )
    rel = [abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)]
    if dist.get_rank() == 0:
        print(json.dumps({"layout": layout.config.__dict__, "world": layout.world, "max_rel": max(rel),
                          "first": want[0], "last": want[-1], "got_last": got[-1], "rel": [f"{r:.1e}" for r in rel]}), flush=True)  # fmt: skip
    dist.destroy_process_group()
    return 0 if max(rel) <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
