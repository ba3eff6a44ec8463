"""Train the test model into a run directory, resuming from its last checkpoint: under torchrun (any
layout) or as a plain process (one process). argv: EP DP_SHARD STOP RUN_DIR [SEED].

MIXTRAL_TEST_FAULT="kill:RANK:STEP" makes that rank SIGKILL itself in that step's forward (a crashed
node); "nan:RANK:STEP" makes layers.1.attention's output NaN on that rank from that step on.

The run is 12 steps of the 8-row global batch of worker_train, checkpoints every 4 steps; this
invocation stops after step STOP (as if killed there). SEED (default 0) seeds the fresh weights: a
resumed run must not depend on it. Rank 0 prints {"losses": {step: loss}} from metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from worker_train import CONFIG, docs

from mixtral.data.packing import PackedStream
from mixtral.model import Transformer
from mixtral.parallel import ParallelConfig, init_process_group, make_layout, parallelize
from mixtral.parallel.data import RankSlice
from mixtral.train.loop import TrainConfig, train
from mixtral.train.pretrain import lm_objective

TRAIN = TrainConfig(steps=12, batch_size=8, lr=2e-2, min_lr=2e-3, warmup_steps=3, grad_clip=0.5, log_every=1,
                    save_every=4, eval_every=1000)  # fmt: skip


def faulty(fault: str, model, layout):
    kind, rank, step = fault.split(":")
    mine = layout is not None and layout.rank == int(rank)
    calls = {"n": 0}

    def objective(m, batch):
        calls["n"] += 1  # one call per step (grad_accum 1), counted from this process's first step
        if mine and calls["n"] >= int(step):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            model.layers[1].attention.register_forward_hook(lambda mod, inp, out: out * float("nan"))
        return lm_objective(m, batch)

    return objective


def main() -> int:
    ep, dp_shard, stop, run_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    layout = None
    if "RANK" in os.environ:
        init_process_group(timeout_s=120)
        layout = make_layout(ParallelConfig(ep=ep, dp_shard=dp_shard), n_experts=CONFIG.n_experts)
    torch.manual_seed(seed)
    model = Transformer(CONFIG)
    stream = PackedStream(docs(1), 16, seed=3)
    if layout is not None:
        parallelize(model, layout)
        stream = RankSlice(stream, layout.rank, layout.world)
    objective = lm_objective
    if fault := os.environ.get("MIXTRAL_TEST_FAULT"):
        objective = faulty(fault, model, layout)
    train(
        model,
        objective,
        stream,
        TRAIN,
        run_dir,
        resume=True,
        progress=False,
        stop_after=stop,
        layout=layout,
    )
    if layout is None or layout.rank == 0:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"losses": {r["step"]: r["loss"] for r in rows}}), flush=True)
    if layout is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
