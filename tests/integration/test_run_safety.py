"""A run directory under faults and second thoughts: one writer at a time (and a dead one does not block),
a refused resume changes no file, safe changes are warned about, a finished run is not evaluated again,
DPO reference log-probs only for the pairs a run visits (cached across resumes), a full disk during a
checkpoint save, identical DPO pairs, --device on a machine without that device, tokenizer --overwrite.

Tiny models (tests/helpers.py) and tiny data, so each test takes seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, tiny_config, train_config, train_stream, write_jsonl
from safetensors import safe_open

import mixtral.train.checkpoint_io as checkpoint_io
import mixtral.train.instruct_run as instruct_run
import mixtral.train.run as run_module
from mixtral.cli import main
from mixtral.model import Transformer
from mixtral.train.checkpoint_io import CheckpointSaveError, latest_checkpoint, load_checkpoint
from mixtral.train.instruct_run import InstructConfig, run_dpo, run_sft
from mixtral.train.loop import TrainConfig, train
from mixtral.train.pretrain import lm_objective
from mixtral.train.rundir import ResumeMismatchError, RunLockedError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("safety") / "base")


def tree(path: Path) -> dict[str, str]:
    """Every file below `path` and the sha256 of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}  # fmt: skip


def _convs(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
            for i in range(offset, offset + n)]  # fmt: skip


def _pairs(numbers) -> list[dict]:
    return [{"prompt": f"Is {n} a number?", "chosen": f"yes {n}", "rejected": f"no {n}"} for n in numbers]


def _cfg(**changes) -> TrainConfig:
    base = dict(steps=2, batch_size=4, lr=1e-3, eval_every=2, save_every=2, log_every=1, eval_max_tokens=0)
    return TrainConfig(**{**base, **changes})


def _docs(tmp_path: Path) -> Path:
    text = "\n<|endoftext|>\n".join(f"Document {i}: the quick brown fox jumps over {i} lazy dogs." * 3
                                    for i in range(60))  # fmt: skip
    path = tmp_path / "docs.txt"
    path.write_text(text)
    return path


def error_line(err: str) -> str:
    """The one `error:` line of a failed command's stderr (progress bars may precede it), no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _train_cli(out: Path, docs: Path, *sets: str) -> list[str]:
    settings = [
        "data.tokenizer=mixtral",
        f"data.inputs=a={docs}",
        "train.steps=2",
        "train.save_every=1",
        *sets,
    ]
    return ["train", "--recipe", "test", "--out", str(out), *[a for s in settings for a in ("--set", s)]]


# ---- one writer ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_dead_holder_does_not_block(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", _convs(8))
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(out / ".lock")!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, str(os.getpid()).encode())
        print("holding", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = tree(out)
        argv = ["sft", str(tiny_dir), "--data", str(data), "--out", str(out), "--set", "train.steps=2"]
        assert main(argv) == 2
        err = error_line(capsys.readouterr().err)
        assert str(out) in err and f"pid {holder.pid}" in err
        assert tree(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(argv) == 0  # the kernel released the dead process's lock
    assert json.loads((out / "eval.json").read_text())["steps"] == 2


def test_train_itself_takes_the_lock(tmp_path):
    import fcntl
    import os

    fd = os.open(tmp_path / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242")
        with pytest.raises(RunLockedError, match=rf"{tmp_path}.*pid 4242"):
            train(Transformer(tiny_config()), lm_objective, train_stream(), train_config(steps=2), tmp_path,
                  progress=False)  # fmt: skip
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        os.close(fd)


# ---- resuming with other settings ---------------------------------------------------------------


def test_a_refused_pretraining_resume_changes_no_file(tmp_path, capsys):
    docs, out = _docs(tmp_path), tmp_path / "run"
    assert main(_train_cli(out, docs)) == 0
    capsys.readouterr()
    before = tree(out)
    assert any(name.startswith("checkpoints/") for name in before) and "recipe.json" in before
    assert main(_train_cli(out, docs, "train.lr=0.01", "data.seq_len=16", "model.n_layers=1")) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: cannot resume")
    for field in ("train.lr", "data.seq_len", "model.n_layers"):
        assert field in err
    assert tree(out) == before


def test_a_refused_instruct_resume_changes_no_file(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", _convs(8))
    other = write_jsonl(tmp_path / "b.jsonl", _convs(8, offset=100))
    out = tmp_path / "run"
    run_sft(tiny_dir, out, data, None, _cfg(), InstructConfig(max_len=64), progress=False)
    before = tree(out)
    with pytest.raises(ResumeMismatchError) as e:
        run_sft(
            tiny_dir,
            out,
            other,
            None,
            _cfg(batch_size=2, steps=4),
            InstructConfig(max_len=64),
            progress=False,
        )
    for field in ("train.batch_size", "train_file", "data_sha256.train"):
        assert field in str(e.value)
    assert "train.steps" not in str(e.value)  # a safe change, not named among the refused ones
    assert tree(out) == before


def test_a_safe_change_is_accepted_with_a_warning_and_tok_s_counts_all_tokens(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "a.jsonl", _convs(8))
    out = tmp_path / "run"
    run_sft(tiny_dir, out, data, None, _cfg(), InstructConfig(max_len=64), progress=False)
    with pytest.warns(UserWarning, match=r"train\.steps 2 -> 4.*learning rate at step 2 moves"):
        report = run_sft(tiny_dir, out, data, None, _cfg(steps=4, eval_every=4), InstructConfig(max_len=64),
                         progress=False)  # fmt: skip
    assert report["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # SFT: the loss is on assistant tokens only, tokens/s counts every real token of the batch
    assert all(
        r["tokens"] > r["loss_tokens"] > 0 and r["tokens_per_s"] > r["loss_tokens_per_s"] for r in rows
    )


# ---- evaluation is paid once --------------------------------------------------------------------


def test_a_finished_pretraining_run_is_not_evaluated_again(tmp_path, monkeypatch):
    finals = []
    real = run_module.evaluate_lm

    def counting(model, valid, seq_len, batch_size=8, max_batches=None, max_tokens=None, progress=False):
        if max_batches is None:
            finals.append(max_tokens)
        return real(model, valid, seq_len, batch_size, max_batches, max_tokens, progress)

    monkeypatch.setattr(run_module, "evaluate_lm", counting)
    docs, out = _docs(tmp_path), tmp_path / "run"
    assert main(_train_cli(out, docs, "train.eval_max_tokens=64")) == 0
    first = json.loads((out / "eval.json").read_text())
    assert finals == [64] and first["eval_settings"]["eval_max_tokens"] == 64
    assert main(_train_cli(out, docs, "train.eval_max_tokens=64")) == 0  # the finished run, opened again
    assert finals == [64] and json.loads((out / "eval.json").read_text())["eval"] == first["eval"]
    with pytest.warns(UserWarning, match="eval_max_tokens"):  # a safe change, evaluated anew
        assert main(_train_cli(out, docs, "train.eval_max_tokens=32")) == 0
    assert finals == [64, 32]


def test_instruct_evaluation_is_capped_and_not_repeated(tiny_dir, tmp_path, monkeypatch):
    calls = []
    real = instruct_run.sft_loss
    monkeypatch.setattr(
        instruct_run, "sft_loss", lambda m, s, *a: calls.append(len(s.examples)) or real(m, s, *a)
    )
    data = write_jsonl(tmp_path / "a.jsonl", _convs(8))
    valid = write_jsonl(tmp_path / "v.jsonl", _convs(20, offset=50))
    out = tmp_path / "run"
    cfg = _cfg(eval_max_tokens=100)
    report = run_sft(tiny_dir, out, data, valid, cfg, InstructConfig(max_len=64), progress=False)
    evaluated = json.loads((out / "data.json").read_text())["valid"]
    assert 1 <= evaluated["evaluated"] < 20 and evaluated["evaluated_tokens"] <= 100
    assert calls == [evaluated["evaluated"]] * 2  # before, and the loop's last step (not once more after)
    again = run_sft(tiny_dir, out, data, valid, cfg, InstructConfig(max_len=64), progress=False)
    assert len(calls) == 2 and again["valid_loss_after"] == report["valid_loss_after"]
    assert again["valid_loss_before"] == report["valid_loss_before"]  # from baseline.json


# ---- DPO reference ------------------------------------------------------------------------------


def test_dpo_reference_covers_only_the_visited_pairs_and_survives_a_resume(tiny_dir, tmp_path, monkeypatch):
    computed = []
    real = instruct_run.reference_logprobs

    def counting(model, stream, batch_size=8, indices=None, progress=False):
        computed.append(sorted(indices))
        return real(model, stream, batch_size, indices, progress)

    monkeypatch.setattr(instruct_run, "reference_logprobs", counting)
    train_file = write_jsonl(tmp_path / "p.jsonl", _pairs(range(40)))
    valid_file = write_jsonl(tmp_path / "v.jsonl", _pairs(range(500, 516)))
    out = tmp_path / "run"
    run_dpo(tiny_dir, out, train_file, valid_file, _cfg(eval_max_tokens=200), InstructConfig(max_len=64),
            progress=False)  # fmt: skip
    visited = instruct_run.PreferenceStream([None] * 40, seed=0).upcoming_indices(2 * 4)
    with safe_open(out / "reference-train.safetensors", "pt") as f:
        assert sorted(f.get_tensor("index").tolist()) == sorted(set(visited))
    n_valid = json.loads((out / "data.json").read_text())["valid"]["evaluated"]
    assert computed == [sorted(set(visited)), list(range(n_valid))] and n_valid < 16
    computed.clear()
    with pytest.warns(UserWarning, match="train.steps 2 -> 4"):
        run_dpo(tiny_dir, out, train_file, valid_file, _cfg(steps=4, eval_max_tokens=200),
                InstructConfig(max_len=64), progress=False)  # fmt: skip
    more = instruct_run.PreferenceStream([None] * 40, seed=0).upcoming_indices(4 * 4)
    assert computed == [sorted(set(more) - set(visited))]  # only the pairs the new steps add
    computed.clear()
    run_dpo(tiny_dir, out, train_file, valid_file, _cfg(steps=4, eval_max_tokens=200), InstructConfig(max_len=64),
            progress=False)  # fmt: skip
    assert computed == []  # the finished run, opened again


def test_identical_pairs_are_dropped_with_a_count_and_a_warning(tiny_dir, tmp_path):
    records = _pairs(range(6)) + [{"prompt": "Same?", "chosen": "yes", "rejected": "yes"}] * 3
    train_file = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.warns(UserWarning, match="dropped 3 preference pair"):
        report = run_dpo(tiny_dir, tmp_path / "run", train_file, None, _cfg(), InstructConfig(max_len=64),
                         progress=False)  # fmt: skip
    counts = json.loads((tmp_path / "run" / "data.json").read_text())["train"]
    assert counts == report["data"]["train"] == {"records": 9, "kept": 6, "truncated": 0, "dropped": 0,
                                                 "identical": 3}  # fmt: skip


# ---- a full disk --------------------------------------------------------------------------------


def _disk_fills_after(monkeypatch, n_files: int) -> None:
    """save_file writes `n_files` files, then raises ENOSPC as a full disk does."""
    real, count = checkpoint_io.save_file, [0]

    def save_file(*args, **kwargs):
        count[0] += 1
        if count[0] > n_files:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save_file", save_file)


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    _disk_fills_after(monkeypatch, 3)  # one checkpoint writes 3 safetensors files
    torch.manual_seed(0)
    with pytest.raises(CheckpointSaveError) as e:
        train(Transformer(tiny_config()), lm_objective, train_stream(), train_config(steps=4, save_every=2),
              tmp_path, progress=False)  # fmt: skip
    message = str(e.value)
    assert "\n" not in message and "step 4" in message and "No space left" in message
    assert str(tmp_path / "checkpoints" / "step-00000002") in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]  # no debris
    good = latest_checkpoint(tmp_path)
    assert good.name == "step-00000002"
    assert load_checkpoint(good, Transformer(tiny_config()), None).step == 2


def test_a_full_disk_is_one_error_line_on_the_command_line(tiny_dir, tmp_path, monkeypatch, capsys):
    _disk_fills_after(monkeypatch, 3)
    data = write_jsonl(tmp_path / "sft.jsonl", _convs(8))
    argv = ["sft", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--set", "train.steps=2",
            "--set", "train.save_every=1"]  # fmt: skip
    assert main(argv) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: could not write the checkpoint of step 2") and "step-00000001" in err


# ---- devices and the tokenizer command ---------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "sft", "dpo"])
def test_device_cuda_without_cuda_is_one_error_line(tiny_dir, tmp_path, capsys, command):
    out = tmp_path / "run"
    argv = ["train", "--recipe", "test"] if command == "train" else [command, str(tiny_dir)]
    assert main([*argv, "--out", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --device cuda") and err.count("\n") == 0  # before any other output
    assert not out.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_writes_checkpoints_that_load_on_cpu(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", _convs(8))
    run_sft(tiny_dir, tmp_path / "run", data, None, _cfg(bf16=True), InstructConfig(max_len=64), progress=False,
            device="cuda")  # fmt: skip
    from mixtral.checkpoint import load_model

    model = load_model(tiny_dir)  # on the CPU
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"), model, None).step == 2


def test_tokenizer_train_refuses_existing_files_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.model").write_bytes(b"not a tokenizer")
    text = tmp_path / "text.txt"
    text.write_text(
        "\n".join(f"line {i}: a small text to learn a few merges from, again and again" for i in range(300))
    )
    argv = [
        "tokenizer",
        "train",
        str(out),
        "--input",
        str(text),
        "--vocab-size",
        "300",
        "--max-chars",
        "20000",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and (out / "tokenizer.model").read_bytes() == b"not a tokenizer"
    assert main([*argv, "--overwrite"]) == 0
    from mixtral.text import load_tokenizer

    assert load_tokenizer(out).vocab_size == 300
