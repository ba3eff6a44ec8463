"""The training loop: learning, exact resume, the router losses, the NaN guard, recipes and overrides."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from mixtral.data.packing import PackedStream, TokenizedDocs
from mixtral.errors import TrainingError
from mixtral.eval.lm import evaluate_lm, masked_cross_entropy
from mixtral.model import Transformer
from mixtral.train.checkpoint_io import latest_checkpoint
from mixtral.train.loop import TrainConfig, lr_at, make_optimizer, train
from mixtral.train.losses import expert_load, load_balancing_loss, router_z_loss
from mixtral.train.pretrain import lm_objective
from mixtral.train.recipes import apply_overrides, get_recipe


def _stream(seed: int = 0, n_docs: int = 40, seq_len: int = 16) -> PackedStream:
    rng = np.random.default_rng(seed)
    docs = [[1, *rng.integers(3, 97, size=int(rng.integers(5, 30))).tolist(), 2] for _ in range(n_docs)]
    return PackedStream({"a": TokenizedDocs.from_lists(docs[::2]), "b": TokenizedDocs.from_lists(docs[1::2])},
                        seq_len, seed=seed)  # fmt: skip


def _cfg(**changes) -> TrainConfig:
    base = TrainConfig(steps=12, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=1,
                       eval_every=1000, save_every=1000)  # fmt: skip
    return dataclasses.replace(base, **changes)


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_a_fixed_batch_is_overfit(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    train(model, lm_objective, _stream(), _cfg(steps=40), tmp_path, progress=False)
    losses = _losses(tmp_path)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3

    class Fixed:  # the same batch forever
        def __init__(self):
            self.batch = _stream(seed=3).next_batch(2)

        def next_batch(self, _):
            return self.batch

        def state_dict(self):
            return {}

        def load_state_dict(self, _):
            pass

    torch.manual_seed(0)
    model = Transformer(tiny_config())
    train(
        model,
        lm_objective,
        Fixed(),
        _cfg(steps=120, lr=1e-2, min_lr=1e-2),
        tmp_path / "fixed",
        progress=False,
    )
    assert _losses(tmp_path / "fixed")[-1] < 0.3


def test_kill_and_resume_is_bit_identical(tmp_path):
    cfg = _cfg(steps=10, save_every=3, router_jitter=0.1)  # jitter draws from the RNG that must be restored
    torch.manual_seed(0)
    train(Transformer(tiny_config()), lm_objective, _stream(), cfg, tmp_path / "full", progress=False)
    torch.manual_seed(0)
    train(Transformer(tiny_config()), lm_objective, _stream(), cfg, tmp_path / "killed", progress=False,
          stop_after=7)  # fmt: skip
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000006"
    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    model = Transformer(tiny_config())
    train(model, lm_objective, _stream(), cfg, tmp_path / "killed", progress=False)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    final_full = Transformer(tiny_config())
    from mixtral.train.checkpoint_io import load_checkpoint

    load_checkpoint(latest_checkpoint(tmp_path / "full"), final_full, None)
    for a, b in zip(model.state_dict().values(), final_full.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_uncommitted_checkpoint_is_skipped_with_a_warning_on_resume(tmp_path):
    cfg = _cfg(steps=4, save_every=2)
    torch.manual_seed(0)
    train(Transformer(tiny_config()), lm_objective, _stream(), cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "step-00000004" / "COMMIT").unlink()
    with pytest.warns(UserWarning, match="step-00000004"):
        assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_nan_stops_before_the_update_and_writes_no_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cfg = _cfg(steps=6, save_every=2)
    train(model, lm_objective, _stream(), cfg, tmp_path, stop_after=2, progress=False)
    with torch.no_grad():
        model.layers[1].feed_forward.experts.w2[0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"before the update.*layers\.1\.feed_forward"):
        train(model, lm_objective, _stream(), dataclasses.replace(cfg, steps=6), tmp_path, resume=False,
              progress=False)  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k.endswith("w2") for k in before)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


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
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1) and lr_at(55, cfg) == pytest.approx(0.55)
    opt = make_optimizer(Transformer(tiny_config()), cfg)
    decay, no_decay = opt.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == cfg.weight_decay
    assert len(no_decay["params"]) == 2 * 2 + 1 + 2  # norms (2 per layer + final) and 2 routers


def test_evaluation_reports_per_domain_perplexity():
    torch.manual_seed(0)
    stream = _stream()
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
        ("train.warmup_steps=99999", "warmup_steps"),
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
    batch = _stream().next_batch(2)
    grads = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad()
        lm_objective(model, batch).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_and_accumulation_train(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(steps=3, bf16=True, grad_accum=2, activation_checkpointing=True, balance="per_layer")
    state = train(Transformer(tiny_config()), lm_objective, _stream(), cfg, tmp_path, progress=False)
    assert state.step == 3 and state.tokens_seen > 0
    assert all(math.isfinite(v) for v in _losses(tmp_path))
