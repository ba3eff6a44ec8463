"""Training parts: the router losses (against transformers' too), masked cross-entropy, the schedule and
optimizer groups, evaluation, recipes and overrides, activation checkpointing.

Training runs (learning, exact resume, the NaN guard, bf16 autocast): tests/integration/test_train_runs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_config, train_config, train_stream

from mixtral.eval.lm import evaluate_lm, masked_cross_entropy
from mixtral.model import Transformer
from mixtral.train.loop import lr_at, make_optimizer
from mixtral.train.losses import expert_load, load_balancing_loss, router_z_loss
from mixtral.train.pretrain import lm_objective
from mixtral.train.recipes import apply_overrides, get_recipe


def test_balance_loss_is_k_under_uniform_routing_and_matches_transformers():
    L, B, T, E, k = 3, 2, 5, 8, 2
    # near-uniform probabilities and every expert chosen equally often: rotate the preferred experts
    logits = torch.zeros(L, B * T * 4, E)
    for i in range(logits.shape[1]):
        logits[:, i, (2 * i) % E] = 1e-4
        logits[:, i, (2 * i + 1) % E] = 1e-4
    logits = logits.view(L, B * 4, T, E)
    assert load_balancing_loss(logits, k, form="pooled").item() == pytest.approx(k, abs=1e-3)
    assert load_balancing_loss(logits, k, form="per_layer").item() == pytest.approx(1.0, abs=1e-3)
    collapsed = torch.zeros(L, B, T, E)
    collapsed[..., 0] = 10.0
    collapsed[..., 1] = 9.0
    assert load_balancing_loss(collapsed, k, form="pooled").item() == pytest.approx(
        E, rel=1e-3
    )  # the maximum
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    rand = torch.randn(L, B, T, E)
    ours = load_balancing_loss(rand, k, form="pooled")
    theirs = load_balancing_loss_func(tuple(rand.reshape(L, B * T, E)), E, k)
    torch.testing.assert_close(ours, theirs)
    mask = torch.rand(B, T) > 0.3
    theirs_masked = load_balancing_loss_func(tuple(rand.reshape(L, B * T, E)), E, k, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(rand, k, mask, form="pooled"), theirs_masked)
    del transformers


def test_per_layer_optimum_and_z_loss_formula():
    logits = torch.randn(2, 3, 7, 4)
    expected = torch.logsumexp(logits, dim=-1).square().mean()
    torch.testing.assert_close(router_z_loss(logits), expected)
    # per-layer form: E · Σ f_e P_e >= 1 when routing follows the probabilities (Cauchy-Schwarz); check a sample
    for _ in range(5):
        value = load_balancing_loss(torch.randn(2, 4, 50, 4) * 3, 1, form="per_layer")
        assert value >= 1.0 - 1e-6
    load = expert_load(logits, 2)
    torch.testing.assert_close(load.sum(-1), torch.ones(2))


def test_masked_cross_entropy_ignores_masked_positions():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    garbage = logits.clone()
    garbage[~mask] = 1e4  # masked positions must not matter
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(masked_cross_entropy(garbage, targets, mask), expected)


def test_schedule_and_optimizer_groups():
    cfg = train_config(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(55, cfg) == pytest.approx(0.55)
    opt = make_optimizer(Transformer(tiny_config()), cfg)
    decay, no_decay = opt.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == cfg.weight_decay
    assert len(no_decay["params"]) == 2 * 2 + 1 + 2  # norms (2 per layer + final) and 2 routers


def test_evaluation_reports_per_domain_perplexity():
    torch.manual_seed(0)
    stream = train_stream()
    docs = stream._docs
    result = evaluate_lm(Transformer(tiny_config()), docs, 16, batch_size=4, max_batches=2)
    assert set(result) == {"a/loss", "a/ppl", "b/loss", "b/ppl", "all/loss", "all/ppl"}
    assert result["a/ppl"] == pytest.approx(math.exp(result["a/loss"]))
    assert 3.0 < result["all/loss"] < 6.0  # random init on 97 tokens: near log(97) = 4.57


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.lr=fast", "expected float"),
        ("train.bf16=maybe", "boolean"),
        ("train.colour=1", "no field 'colour'"),
        ("optimizer.lr=1", "section"),
        ("train.lr", "section.field=value"),
        ("model.top_k=9", "top_k"),
        ("train.warmup_steps=-1", "warmup_steps"),  # above steps is clamped (test_recipes_eval.py)
        ("train.balance=sideways", "balance"),
        ("data.inputs=nodomain", "domain=path"),
    ],
)
def test_bad_overrides_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(get_recipe("test"), [override])


def test_overrides_apply_with_types():
    r = apply_overrides(get_recipe("mini"), ["train.steps=700", "train.bf16=true", "model.n_layers=3",
                                             "data.inputs=code=a,fr=b"])  # fmt: skip
    assert (r.train.steps, r.train.bf16, r.model.n_layers, r.data.inputs) == (
        700,
        True,
        3,
        ("code=a", "fr=b"),
    )


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    batch = train_stream().next_batch(2)
    grads = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        lm_objective(model, batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
