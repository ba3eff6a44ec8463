"""Expert parallelism and FSDP2 under torchrun (gloo on CPU), against one process.

Each case starts a real `torchrun --standalone` job of 2 or 4 processes running a worker from
tests/distributed/ (see their docstrings); the worker compares with the one-process computation itself
and exits 1 on a mismatch, and prints what it measured.
"""

from __future__ import annotations

import pytest
from helpers import json_lines, torchrun


@pytest.mark.parametrize(
    ("nproc", "ep", "router"),
    [(2, 2, "learned"), (2, 2, "one_rank"), (4, 4, "learned"), (4, 2, "learned"), (4, 4, "one_rank")],
)
def test_expert_parallel_forward_backward_equal_one_process(nproc, ep, router):
    run = torchrun(nproc, "worker_ep.py", ep, router)
    lines = json_lines(run.stdout)
    assert run.returncode == 0 and len(lines) == nproc, run.stdout[-3000:]
    assert all(r["max_rel"] <= 1e-6 for r in lines), lines
    assert {r["dispatch"] for r in lines} == {
        f"ExpertParallelDispatch(ep={ep}, rank={i}, experts=8)" for i in range(ep)
    }
    if router == "one_rank":  # EP rank 0 of each group took all of its group's 2 x 6 x 2 slots per rank
        for r in lines:
            want = (
                2 * 6 * 2 * ep if r["dispatch"].startswith(f"ExpertParallelDispatch(ep={ep}, rank=0,") else 0
            )
            assert r["received"] == [want, want], r


@pytest.mark.parametrize(
    ("nproc", "ep", "dp_shard", "dp_replicate"),
    [
        (2, 2, -1, 1),  # EP2 (experts split, the rest sharded over both ranks)
        (2, 1, -1, 1),  # DP2: FSDP2 only
        (4, 2, -1, 1),  # EP2 x DP: experts split over 2, each half sharded over 2
        (4, 2, 2, 2),  # EP2 x HSDP: shards of 2, replicated twice
    ],
)
def test_training_steps_equal_one_process(nproc, ep, dp_shard, dp_replicate):
    run = torchrun(nproc, "worker_train.py", ep, dp_shard, dp_replicate, 20)
    (line,) = json_lines(run.stdout)
    assert run.returncode == 0, run.stdout[-3000:]
    assert line["max_rel"] <= 1e-5 and line["world"] == nproc, line
    assert line["first"] - line["last"] > 0.05, line  # the run learns: the curves compared are not flat
