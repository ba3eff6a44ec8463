"""Instruct training: the DPO loss and its gradient, SFT and DPO runs on a tiny model, routing drift."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_config

from mixtral.analysis.drift import routing_drift
from mixtral.checkpoint import load_model, save_model
from mixtral.cli import main
from mixtral.model import Transformer
from mixtral.text.tokenizer import load_tokenizer
from mixtral.train.instruct import dpo_loss, sequence_logprobs
from mixtral.train.instruct_run import InstructConfig, run_dpo, run_sft
from mixtral.train.loop import TrainConfig


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logp = torch.tensor([-12.0, -3.5, -40.0])
    loss, m = dpo_loss(logp, logp - 2, logp, logp - 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["reward_margin"] == 0 and m["reward_accuracy"] == 0  # ties are not "correct"
    loss_ls, _ = dpo_loss(logp, logp - 2, logp, logp - 2, beta=0.5, label_smoothing=0.2)
    assert loss_ls.item() == pytest.approx(math.log(2))  # log 2 for any smoothing


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-5.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -4.0], requires_grad=True)
    loss, _ = dpo_loss(chosen, rejected, torch.tensor([-5.5, -7.0]), torch.tensor([-6.0, -4.5]), beta=0.1)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises chosen, lowers rejected


def test_dpo_loss_matches_the_formula():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-3.0, -5.0, -4.0, -4.0))
    beta, eps = 0.3, 0.1
    h = beta * ((pc - rc) - (pr - rr))
    expected = -(1 - eps) * torch.nn.functional.logsigmoid(h) - eps * torch.nn.functional.logsigmoid(-h)
    loss, m = dpo_loss(pc, pr, rc, rr, beta, eps)
    assert loss.item() == pytest.approx(expected.item())
    assert m["reward_chosen"] == pytest.approx(0.3) and m["reward_rejected"] == pytest.approx(-0.3)
    assert m["reward_accuracy"] == 1.0


@pytest.mark.parametrize("beta,ls", [(0.0, 0.0), (-1.0, 0.0), (0.1, 0.5), (0.1, -0.1)])
def test_dpo_rejects_bad_hyperparameters(beta, ls):
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="beta|label_smoothing"):
        dpo_loss(z, z, z, z, beta, ls)


def test_sequence_logprobs_sums_masked_targets():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = sequence_logprobs(logits, targets, mask)
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(got, (logp * mask).sum(-1))


def test_routing_drift_is_zero_for_a_copy_and_counts_changes():
    base = Transformer(tiny_config(n_layers=3)).eval()
    tokens = torch.randint(0, 97, (2, 16))
    positions = torch.arange(16).expand(2, 16).clone()
    positions[1, 12:] = -1  # padding is not counted
    same = routing_drift(base, copy.deepcopy(base), [(tokens, positions)])
    assert same["tokens"] == 28 and same["topk_changed"] == [0.0] * 3 and same["first_changed"] == [0.0] * 3
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # reverse the router of layer 1 only: its first choices all change
        tuned.layers[1].feed_forward.gate.weight.neg_()
    drift = routing_drift(base, tuned, [(tokens, positions)])
    assert drift["topk_changed"][0] == 0.0 and drift["first_changed"][1] == 1.0
    assert drift["topk_changed"][1] > 0


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("instruct") / "base"
    save_model(Transformer(tiny_config(vocab_size=32000)), path, tokenizer_src=load_tokenizer(None))
    return path


def _pairs(numbers):
    # chosen answers say "yes" + the number, rejected ones "no": learnable, and held-out numbers are new
    return [{"prompt": f"Is {n} a number?", "chosen": f"yes {n}", "rejected": f"no {n}"} for n in numbers]


def test_dpo_raises_held_out_reward_accuracy_with_the_aux_loss_on(tiny_dir, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(range(40)))
    valid = _write_jsonl(tmp_path / "valid.jsonl", _pairs(range(500, 516)))
    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, min_lr=3e-3, warmup_steps=1, eval_every=30,
                      save_every=30, log_every=1)  # fmt: skip
    report = run_dpo(
        tiny_dir, tmp_path / "dpo", train, valid, cfg, InstructConfig(max_len=64), progress=False
    )
    before, after = report["valid_before"], report["valid_after"]
    assert before["reward_accuracy"] == 0.0 and before["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert after["reward_accuracy"] >= 0.9 and after["loss"] < before["loss"]
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["balance"] > 0 and "reward_margin" in r and "reward_accuracy" in r for r in rows)


def test_dpo_with_a_frozen_copy_equals_precomputed_reference(tiny_dir, tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _pairs(range(16)))
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
    train = _write_jsonl(tmp_path / "train.jsonl", convs[:40])
    valid = _write_jsonl(tmp_path / "valid.jsonl", convs[40:])
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
    sft = _write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}] * 4)  # fmt: skip
    assert main(["sft", str(tiny_dir), "--data", str(sft), "--out", str(tmp_path / "s"), "--set", "train.steps=2",
                 "--set", "train.batch_size=2", "--set", "train.warmup_steps=1"]) == 0  # fmt: skip
    assert "4 of 4 conversations kept" in capsys.readouterr().out
    pref = _write_jsonl(tmp_path / "p.jsonl", _pairs(range(4)))
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
