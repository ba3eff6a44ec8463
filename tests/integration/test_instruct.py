"""Instruct training runs on a tiny model: DPO raises held-out reward accuracy, a frozen reference copy
equals a precomputed one, SFT learns and exports a transformers model, the sft and dpo commands.

The DPO loss, sequence log-probabilities and routing drift on their own: tests/unit/test_instruct_losses.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import save_tiny_model, write_jsonl

from mixtral.checkpoint import load_model
from mixtral.cli import main
from mixtral.train.instruct_run import InstructConfig, run_dpo, run_sft
from mixtral.train.loop import TrainConfig


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("instruct") / "base")


def _pairs(numbers):
    # chosen answers say "yes" + the number, rejected ones "no": learnable, and held-out numbers are new
    return [{"prompt": f"Is {n} a number?", "chosen": f"yes {n}", "rejected": f"no {n}"} for n in numbers]


def test_dpo_raises_held_out_reward_accuracy_with_the_aux_loss_on(tiny_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(range(40)))
    valid = write_jsonl(tmp_path / "valid.jsonl", _pairs(range(500, 516)))
    # 15 steps: held-out accuracy 1.0 and loss 0.13-0.30 (from log 2) for model seeds 0, 1 and 2
    cfg = TrainConfig(steps=15, batch_size=8, lr=3e-3, min_lr=3e-3, warmup_steps=1, eval_every=15,
                      save_every=15, log_every=1)  # fmt: skip
    report = run_dpo(
        tiny_dir, tmp_path / "dpo", train, valid, cfg, InstructConfig(max_len=64), progress=False
    )
    before, after = report["valid_before"], report["valid_after"]
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["reward_accuracy"] >= 0.9 and after["loss"] < before["loss"]
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["balance"] > 0 and "reward_margin" in r and "reward_accuracy" in r for r in rows)


def test_dpo_with_a_frozen_copy_equals_precomputed_reference(tiny_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _pairs(range(16)))
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, eval_every=3, save_every=3, log_every=1)
    losses = {}
    for ref in ("precomputed", "copy"):
        run_dpo(
            tiny_dir,
            tmp_path / ref,
            train,
            None,
            cfg,
            InstructConfig(max_len=64, reference=ref),
            progress=False,
        )
        rows = (tmp_path / ref / "metrics.jsonl").read_text().splitlines()
        losses[ref] = [json.loads(line)["loss"] for line in rows]
    assert losses["precomputed"] == pytest.approx(losses["copy"], rel=1e-5)


def test_sft_learns_assistant_turns_and_exports_a_transformers_model(tiny_dir, tmp_path):
    convs = [{"messages": [{"role": "user", "content": f"Repeat {n}"}, {"role": "assistant", "content": f"{n} {n}"}]}
             for n in range(48)]  # fmt: skip
    train = write_jsonl(tmp_path / "train.jsonl", convs[:40])
    valid = write_jsonl(tmp_path / "valid.jsonl", convs[40:])
    cfg = TrainConfig(
        steps=25, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=25, save_every=25, log_every=5
    )
    report = run_sft(
        tiny_dir, tmp_path / "sft", train, valid, cfg, InstructConfig(max_len=64), progress=False
    )
    assert report["valid_loss_after"] < report["valid_loss_before"] - 1.0
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["balance"] > 0 for r in rows)
    transformers = pytest.importorskip("transformers")
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "sft" / "model").eval()
    ours = load_model(tmp_path / "sft" / "model").eval()
    x = torch.randint(0, 32000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, rtol=1e-4, atol=1e-4)


def test_sft_and_dpo_commands(tiny_dir, tmp_path, capsys):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}] * 4)  # fmt: skip
    assert main(["sft", str(tiny_dir), "--data", str(sft), "--out", str(tmp_path / "s"), "--set", "train.steps=2",
                 "--set", "train.batch_size=2", "--set", "train.warmup_steps=1"]) == 0  # fmt: skip
    assert "4 of 4 conversations kept" in capsys.readouterr().out
    pref = write_jsonl(tmp_path / "p.jsonl", _pairs(range(4)))
    assert main(["dpo", str(tmp_path / "s" / "model"), "--data", str(pref), "--out", str(tmp_path / "d"),
                 "--set", "train.steps=2", "--set", "train.warmup_steps=1", "--beta", "0.2"]) == 0  # fmt: skip
    assert (tmp_path / "d" / "model" / "config.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{"messages": 3}\n')
    assert main(["sft", str(tiny_dir), "--data", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "bad.jsonl:1: no assistant message" in capsys.readouterr().err
    assert (
        main(
            ["dpo", str(tiny_dir), "--data", str(pref), "--out", str(tmp_path / "e"), "--set", "model.dim=3"]
        )
        == 2
    )
    assert main(["dpo", str(tiny_dir), "--data", str(pref), "--out", str(tmp_path / "e"), "--beta", "0"]) == 2
    # hyperparameters are checked before any data is read or reference computed
    assert main(["dpo", str(tiny_dir), "--out", str(tmp_path / "f"), "--label-smoothing", "0.7"]) == 2
    assert "label_smoothing" in capsys.readouterr().err and not (tmp_path / "f").exists()
