"""What a short run costs and logs: warmup clamped to the run, capped evaluation, tokens/s of all real
tokens, the settings comparison of a resume, batches moved to the model's device.

Runs that use these (resume, caches, locks, the CLI): tests/integration/test_run_safety.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import tiny_config, train_config, train_stream

from mixtral.data.instruct import PreferenceExample, PreferenceStream, drop_identical_pairs
from mixtral.eval.lm import evaluate_lm, to_device
from mixtral.model import Transformer
from mixtral.train.instruct_run import DPO_TRAIN, SFT_TRAIN, eval_subset
from mixtral.train.loop import TrainConfig, lr_at, make_optimizer, train_step
from mixtral.train.pretrain import lm_objective
from mixtral.train.recipes import RECIPES, apply_overrides, get_recipe
from mixtral.train.rundir import ResumeMismatchError, check_resume, fingerprint


def test_a_short_run_needs_only_steps_and_warms_up_over_the_whole_run():
    cfg = TrainConfig(steps=4, lr=1.0, min_lr=0.1)  # the default warmup_steps (50) > steps is accepted
    assert [lr_at(s, cfg) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    r = apply_overrides(get_recipe("mini"), ["train.steps=5"])  # no train.warmup_steps needed
    assert r.train.warmup_steps == 100 and lr_at(4, r.train) == pytest.approx(r.train.lr)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


@pytest.mark.parametrize("name", [*RECIPES, "sft", "dpo"])
def test_shipped_schedules_are_unchanged_by_the_clamp(name):
    cfg = {"sft": SFT_TRAIN, "dpo": DPO_TRAIN}.get(name) or RECIPES[name].train
    assert cfg.warmup_steps <= cfg.steps  # so min(warmup_steps, steps) is warmup_steps
    w = cfg.warmup_steps
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / w) and lr_at(w - 1, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.min_lr)
    if name.startswith("mini"):
        assert w == 100  # the shipped mini model's schedule


def test_default_evaluation_caps_keep_short_recipes_short():
    assert RECIPES["test"].train.eval_max_tokens == 4096
    assert RECIPES["demo"].train.eval_max_tokens == 65536
    assert RECIPES["mini"].train.eval_max_tokens == 0  # the shipped model's eval.json: the whole split
    assert SFT_TRAIN.eval_max_tokens == DPO_TRAIN.eval_max_tokens == 8192
    assert apply_overrides(get_recipe("test"), ["train.eval_max_tokens=0"]).train.eval_max_tokens == 0


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the real tokens it is given."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.tokens = model, model.config, 0

    def forward(self, tokens, positions=None):
        self.tokens += int((positions >= 0).sum())
        return self.inner(tokens, positions=positions)


def test_evaluation_reads_at_most_max_tokens_spread_over_domains():
    torch.manual_seed(0)
    docs = train_stream(n_docs=80)._docs  # two domains of about 700 tokens each
    model = CountingModel(Transformer(tiny_config()))
    full = evaluate_lm(model, docs, 16, batch_size=4)
    read_all, model.tokens = model.tokens, 0
    capped = evaluate_lm(model, docs, 16, batch_size=4, max_tokens=200)
    assert model.tokens <= 200 + 2 * 16 and read_all > 5 * model.tokens  # ceil to whole sequences per domain
    assert set(capped) == set(full) and capped != full
    model.tokens = 0
    assert evaluate_lm(model, docs, 16, batch_size=4, max_tokens=200) == capped  # the same tokens every time
    # max_batches (the periodic evaluation) is unchanged: the first max_batches full batches
    first = evaluate_lm(model, docs, 16, batch_size=4, max_batches=1)
    same = evaluate_lm(model, docs, 16, batch_size=2, max_batches=2)
    assert first["all/loss"] == pytest.approx(same["all/loss"], rel=1e-5)


def test_eval_subset_is_a_prefix_within_the_cap():
    sizes = [5, 7, 3, 9]
    assert eval_subset(sizes, 0, int) == sizes
    assert eval_subset(sizes, 15, int) == [5, 7, 3]
    assert eval_subset(sizes, 2, int) == [5]  # at least one


def test_tokens_per_second_counts_every_real_token_and_loss_tokens_apart():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cfg = train_config(steps=1, batch_size=3)
    stream = train_stream()
    batch = train_stream().next_batch(3)  # the batch the step will see
    metrics = train_step(model, lm_objective, stream, make_optimizer(model, cfg), cfg, 0)
    assert metrics["tokens"] == int((batch.positions >= 0).sum()) == 3 * 16
    assert metrics["loss_tokens"] == int(batch.loss_mask.sum()) < metrics["tokens"]
    ratio = metrics["tokens_per_s"] / metrics["loss_tokens_per_s"]
    assert ratio == pytest.approx(metrics["tokens"] / metrics["loss_tokens"])


def test_resume_check_refuses_unsafe_changes_naming_each_and_accepts_safe_ones():
    stored = {"train": {"lr": 1e-3, "batch_size": 8, "steps": 10, "eval_every": 5}, "data": {"seq_len": 32}}
    new = {"train": {"lr": 2e-3, "batch_size": 4, "steps": 20, "eval_every": 2}, "data": {"seq_len": 64}}
    with pytest.raises(ResumeMismatchError) as e:
        check_resume(stored, new, "runs/x", at_step=4)
    message = str(e.value)
    for field in ("train.lr", "train.batch_size", "data.seq_len"):
        assert field in message
    assert "train.steps" not in message and "train.eval_every" not in message
    safe = {"train": {**stored["train"], "steps": 20, "eval_every": 2}, "data": stored["data"]}
    assert set(check_resume(stored, safe, "runs/x", at_step=4)) == {"train.steps", "train.eval_every"}
    with pytest.raises(ResumeMismatchError, match="train.steps must be >= 6"):
        check_resume(stored, {"train": {**stored["train"], "steps": 5}}, "runs/x", at_step=6)
    # a field only one side knows (added by a newer version) is not a change
    assert check_resume(stored, {**stored, "instruct": {"beta": 0.1}}, "runs/x", at_step=4) == {}


def test_upcoming_indices_are_the_next_draws_and_leave_the_stream():
    examples = [PreferenceExample(np.array([1, i]), np.array([5]), np.array([6])) for i in range(7)]
    stream = PreferenceStream(examples, seed=3)
    stream.next_batch(2)
    ahead = stream.upcoming_indices(12)  # crosses into the next epoch
    state = stream.state_dict()
    drawn = stream.next_batch(5).index.tolist() + stream.next_batch(7).index.tolist()
    assert ahead == drawn
    stream.load_state_dict(state)
    assert stream.upcoming_indices(12) == ahead


def test_identical_pairs_are_dropped_and_counted():
    same = PreferenceExample(np.array([1, 2]), np.array([7, 2]), np.array([7, 2]))
    differ = PreferenceExample(np.array([1, 2]), np.array([7, 2]), np.array([8, 2]))
    kept, n = drop_identical_pairs([same, differ, same])
    assert n == 2 and kept == [differ]


def test_batches_follow_the_model_device():
    batch = train_stream().next_batch(2)
    assert to_device(batch, torch.device("cpu")) is batch  # nothing to move: the same object
    moved = to_device(batch, torch.device("meta"))
    assert all(getattr(moved, f.name).device.type == "meta" for f in dataclasses.fields(moved))
    assert moved.inputs.shape == batch.inputs.shape


def test_fingerprint_tells_values_apart():
    a = fingerprint("x", torch.arange(4), np.arange(3))
    assert a == fingerprint("x", torch.arange(4), np.arange(3))
    assert a != fingerprint("x", torch.arange(4).float(), np.arange(3))
    assert a != fingerprint("x", torch.tensor([0, 1, 2, 4]), np.arange(3))
