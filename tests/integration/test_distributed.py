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


def _losses(run) -> dict[int, float]:
    assert run.returncode == 0, run.stdout[-3000:]
    return {int(k): v for k, v in json_lines(run.stdout)[-1]["losses"].items()}


def _one_process(*args: str):
    import subprocess
    import sys

    from helpers import DISTRIBUTED

    return subprocess.run([sys.executable, str(DISTRIBUTED / "worker_ckpt.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_checkpoints_reshard_across_layouts_and_one_process(tmp_path):
    """EP2 x DP (4 ranks) saves at step 4; EP4 resumes and saves at 8; one process resumes to 12: the
    loss curve is the uninterrupted one-process run's, whatever seed the resumed weights started from."""
    ref = _losses(_one_process(1, 1, 12, tmp_path / "ref"))
    run = tmp_path / "run"
    a = _losses(torchrun(4, "worker_ckpt.py", 2, 4, 4, run))
    b = _losses(torchrun(4, "worker_ckpt.py", 4, 4, 8, run, 7))
    c = _losses(_one_process(1, 1, 12, run, 9))
    assert sorted(c) == list(range(1, 13)) and a.items() <= b.items() and b.items() <= c.items()
    for step, loss in c.items():
        assert abs(loss - ref[step]) <= 1e-5 * abs(ref[step]), (step, loss, ref[step])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000008", "step-00000012"]
    assert (run / "checkpoints" / "step-00000008" / ".metadata").is_file()  # a DCP checkpoint


def test_resume_is_bit_exact_under_the_same_layout(tmp_path):
    whole = _losses(torchrun(2, "worker_ckpt.py", 2, 2, 8, tmp_path / "whole"))
    _losses(torchrun(2, "worker_ckpt.py", 2, 2, 4, tmp_path / "split"))
    resumed = _losses(torchrun(2, "worker_ckpt.py", 2, 2, 8, tmp_path / "split", 5))
    assert resumed == whole


def test_a_killed_rank_ends_the_job_and_the_run_resumes(tmp_path):
    """Rank 1 is SIGKILLed in step 6: torchrun stops rank 0 and exits non-zero within seconds; the next
    start resumes from step 4's checkpoint and follows the uninterrupted curve."""
    import time

    ref = _losses(_one_process(1, 1, 12, tmp_path / "ref"))
    t0 = time.monotonic()
    killed = torchrun(2, "worker_ckpt.py", 2, 2, 12, tmp_path / "run", env={"MIXTRAL_TEST_FAULT": "kill:1:6"})
    assert killed.returncode != 0 and time.monotonic() - t0 < 120, killed.stdout[-2000:]
    assert "SIGKILL" in killed.stdout or "exitcode: -9" in killed.stdout, killed.stdout[-2000:]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000004"]
    resumed = _losses(torchrun(2, "worker_ckpt.py", 2, 2, 12, tmp_path / "run", 3))
    assert sorted(resumed) == list(range(1, 13))
    for step, loss in resumed.items():
        assert abs(loss - ref[step]) <= 1e-5 * abs(ref[step]), (step, loss, ref[step])


def test_a_nan_on_one_rank_stops_every_rank_naming_the_module(tmp_path):
    run = torchrun(2, "worker_ckpt.py", 2, 2, 12, tmp_path / "run", env={"MIXTRAL_TEST_FAULT": "nan:1:3"})
    assert run.returncode != 0
    errors = [line for line in run.stdout.splitlines() if "TrainingError: non-finite loss" in line]
    assert {e.split("]")[0] for e in errors} == {"[rank0", "[rank1"}, run.stdout[-3000:]
    assert all("at step 2, before the update: rank 1: first non-finite output in module 'layers.1.attention'" in e
               for e in errors), errors  # fmt: skip
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_torchrun_mixtral_train_then_convert_the_sharded_checkpoint(tmp_path):
    """`torchrun -m mixtral train --set parallel.ep=2` as a user runs it: the same held-out loss as one
    process; the exported model and `mixtral convert` of a sharded step directory hold the same weights."""
    import json
    import subprocess
    import sys

    import torch

    from mixtral import load_model

    one = subprocess.run([sys.executable, "-m", "mixtral", "train", "--recipe", "test", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    run = torchrun(
        2, "-m", "mixtral", "train", "--recipe", "test", "--set", "parallel.ep=2", "--out", tmp_path / "ep2"
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.count("done: 8 steps") == 1  # rank 0 reports
    a, b = (json.loads((tmp_path / d / "eval.json").read_text())["eval"]["all/loss"] for d in ("one", "ep2"))
    assert abs(a - b) <= 1e-4 * a, (a, b)
    step = tmp_path / "ep2" / "checkpoints" / "step-00000008"
    conv = subprocess.run([sys.executable, "-m", "mixtral", "convert", str(step), str(tmp_path / "hf"), "--to", "hf"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-2000:]
    exported, converted = load_model(tmp_path / "ep2" / "model"), load_model(tmp_path / "hf")
    for (name, p), q in zip(exported.state_dict().items(), converted.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_parallel_settings_without_torchrun_say_how_to_start_a_job(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "mixtral", "train", "--recipe", "test", "--set", "parallel.ep=2",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode != 0
    assert "torchrun --nproc-per-node N -m mixtral train" in run.stderr, run.stderr[-1500:]


def test_torchrun_mixtral_sft_equals_one_process(tmp_path):
    import json
    import subprocess
    import sys

    from helpers import save_tiny_model, write_jsonl

    base = save_tiny_model(tmp_path / "base")
    convs = [{"messages": [{"role": "user", "content": f"Repeat {n}"}, {"role": "assistant", "content": f"{n} {n}"}]}
             for n in range(40)]  # fmt: skip
    train, valid = (
        write_jsonl(tmp_path / "t.jsonl", convs[:32]),
        write_jsonl(tmp_path / "v.jsonl", convs[32:]),
    )
    args = ["sft", str(base), "--data", str(train), "--valid", str(valid), "--max-len", "64",
            "--set", "train.steps=6", "--set", "train.batch_size=4", "--set", "train.warmup_steps=1",
            "--set", "train.eval_every=6", "--set", "train.save_every=3"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "mixtral", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    run = torchrun(2, "-m", "mixtral", *args, "--set", "parallel.ep=2", "--out", tmp_path / "ep2")
    assert run.returncode == 0, run.stdout[-3000:]
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "ep2"))
    assert a["valid_loss_before"] == b["valid_loss_before"]
    assert abs(a["valid_loss_after"] - b["valid_loss_after"]) <= 1e-4 * a["valid_loss_after"], (a, b)
    assert (tmp_path / "ep2" / "checkpoints" / "step-00000006" / ".metadata").is_file()


@pytest.mark.parametrize("reference", ["precomputed", "copy"])
def test_torchrun_mixtral_dpo_equals_one_process(tmp_path, reference):
    import json
    import subprocess
    import sys

    from helpers import save_tiny_model, write_jsonl

    base = save_tiny_model(tmp_path / "base")
    pairs = [{"prompt": f"Is {n} a number?", "chosen": f"yes {n}", "rejected": f"no {n}"} for n in range(40)]
    train, valid = (
        write_jsonl(tmp_path / "t.jsonl", pairs[:32]),
        write_jsonl(tmp_path / "v.jsonl", pairs[32:]),
    )
    args = ["dpo", str(base), "--data", str(train), "--valid", str(valid), "--max-len", "64", "--reference", reference,
            "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "train.warmup_steps=1",
            "--set", "train.eval_every=4", "--set", "train.save_every=4", "--set", "train.log_every=1"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "mixtral", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    run = torchrun(2, "-m", "mixtral", *args, "--set", "parallel.ep=2", "--out", tmp_path / "ep2")
    assert run.returncode == 0, run.stdout[-3000:]
    curves = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "ep2")]  # fmt: skip
    assert len(curves[0]) == 4 and curves[1] == pytest.approx(curves[0], rel=1e-4)
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "ep2"))
    assert a["valid_before"] == pytest.approx(b["valid_before"], rel=1e-5)
    assert a["valid_after"] == pytest.approx(b["valid_after"], rel=1e-4)
