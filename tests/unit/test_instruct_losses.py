"""Instruct training parts: the DPO loss and its gradient, masked sequence log-probabilities, and the
routing drift between a base model and its tuned copy.

SFT and DPO runs and commands: tests/integration/test_instruct.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_config

from mixtral.analysis.drift import routing_drift
from mixtral.model import Transformer
from mixtral.train.instruct import dpo_loss, sequence_logprobs


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
