"""Training checkpoints: exact round trip and resume, commit markers, non-finite refusal, rotation.

A tiny Mixtral trained a few AdamW steps on random tokens drawn from torch's RNG, so a resume is
bit-identical only if weights, optimizer, schedule and RNG all come back exactly.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixtral.config import MixtralConfig
from mixtral.errors import TrainingError
from mixtral.model import Transformer
from mixtral.train.checkpoint_io import (
    COMMIT,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

CONFIG = MixtralConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
    n_experts=4, top_k=2, vocab_size=97, max_seq_len=64,
)  # fmt: skip


def make_run(config: MixtralConfig = CONFIG):
    """Model, AdamW with a decay and a no-decay group (different lrs), and a linear warmup schedule."""
    model = Transformer(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3}],
        lr=1e-2,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=10)
    return model, optimizer, scheduler


def train_steps(model, optimizer, scheduler, n: int) -> list[float]:
    """n steps on random tokens drawn from the global torch RNG."""
    losses = []
    for _ in range(n):
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 8))
        logits = model(tokens).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, CONFIG.vocab_size), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def state_at(step: int, scheduler=None) -> TrainingState:
    sched = scheduler.state_dict() if scheduler is not None else {}
    return TrainingState(step=step, tokens_seen=16 * step, scheduler=sched, data={"doc": step}, extra={})


def assert_optimizers_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, entries in sa["state"].items():
        assert entries.keys() == sb["state"][i].keys()
        for key, t in entries.items():
            assert t.dtype == sb["state"][i][key].dtype and torch.equal(t, sb["state"][i][key]), (i, key)


def test_round_trip_is_exact_and_resume_is_bit_identical(tmp_path):
    model, optimizer, scheduler = make_run()
    model.register_buffer("counter", torch.tensor([7], dtype=torch.int64))  # buffers travel too
    train_steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(2, scheduler))
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert {p.name for p in path.iterdir()} >= {"model.safetensors", "optimizer.safetensors", COMMIT}
    assert not any(p.name.endswith((".pt", ".pth", ".bin")) for p in path.iterdir())  # no pickle
    expected = train_steps(model, optimizer, scheduler, 2)  # the uninterrupted run

    torch.manual_seed(123)  # a different RNG stream: only the restore can make the runs agree
    model2, optimizer2, scheduler2 = make_run()
    model2.register_buffer("counter", torch.zeros(1, dtype=torch.int64))
    state = load_checkpoint(path, model2, optimizer2)
    assert (state.step, state.tokens_seen, state.data) == (2, 32, {"doc": 2})
    scheduler2.load_state_dict(state.scheduler)
    assert model2.counter.item() == 7
    resumed = train_steps(model2, optimizer2, scheduler2, 2)

    assert resumed == expected
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert_optimizers_equal(optimizer, optimizer2)
    assert optimizer2.param_groups[0]["betas"] == (0.9, 0.95)


def test_load_restores_weights_optimizer_and_hyperparameters(tmp_path):
    model, optimizer, scheduler = make_run()
    train_steps(model, optimizer, scheduler, 2)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(2, scheduler))
    model2, optimizer2, _ = make_run()
    load_checkpoint(path, model2, optimizer2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert_optimizers_equal(optimizer, optimizer2)
    groups = optimizer2.param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["lr"] for g in groups] == [g["lr"] for g in optimizer.param_groups]  # scheduled lrs
    assert optimizer2.state[groups[0]["params"][0]]["step"].item() == 2.0


def test_rng_states_are_restored(tmp_path):
    model, optimizer, scheduler = make_run()
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    path = save_checkpoint(tmp_path, model, optimizer, state_at(0))

    def draws():
        return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), torch.rand(3).tolist()

    after_save = draws()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    load_checkpoint(path, model, optimizer)
    assert draws() == after_save


def test_latest_checkpoint_skips_uncommitted_and_corrupted(tmp_path):
    model, optimizer, scheduler = make_run()
    good = save_checkpoint(tmp_path, model, optimizer, state_at(1), keep=5)
    uncommitted = save_checkpoint(tmp_path, model, optimizer, state_at(2), keep=5)
    (uncommitted / COMMIT).unlink()
    corrupted = save_checkpoint(tmp_path, model, optimizer, state_at(3), keep=5)
    with open(corrupted / "optimizer.safetensors", "r+b") as f:  # flip one byte of tensor data
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    (tmp_path / "checkpoints" / ".step-00000004.partial-x").mkdir()  # a killed save: ignored

    with pytest.warns(UserWarning) as record:
        assert latest_checkpoint(tmp_path) == good
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "step-00000003" in messages[0] and "optimizer.safetensors" in messages[0]
    assert "step-00000002" in messages[1] and COMMIT in messages[1]
    with pytest.raises(TrainingError, match=COMMIT):
        load_checkpoint(uncommitted, model, optimizer)


def test_latest_checkpoint_of_empty_run_is_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("where", ["weight", "exp_avg"])
def test_non_finite_values_are_refused_and_nothing_is_written(tmp_path, where):
    model, optimizer, scheduler = make_run()
    train_steps(model, optimizer, scheduler, 1)
    save_checkpoint(tmp_path, model, optimizer, state_at(1))
    root = tmp_path / "checkpoints"
    before = sorted(p.name for p in root.iterdir())
    param = model.layers[1].feed_forward.experts.w2
    with torch.no_grad():
        if where == "weight":
            param[0, 0, 0] = float("nan")
        else:
            optimizer.state[param]["exp_avg"][1, 2, 3] = float("inf")
    name = "layers.1.feed_forward.experts.w2"
    with pytest.raises(TrainingError, match=rf"{where if where == 'exp_avg' else 'model tensor'}.*{name}"):
        save_checkpoint(tmp_path, model, optimizer, state_at(2))
    assert sorted(p.name for p in root.iterdir()) == before  # neither step-00000002 nor a temp dir


def test_non_json_state_is_refused(tmp_path):
    model, optimizer, _ = make_run()
    state = TrainingState(step=1, tokens_seen=0, scheduler={}, data={}, extra={"loss": float("nan")})
    with pytest.raises(TrainingError, match="training state"):
        save_checkpoint(tmp_path, model, optimizer, state)
    assert not (tmp_path / "checkpoints").exists()


def test_rotation_keeps_the_newest_two(tmp_path):
    model, optimizer, _ = make_run()
    for step in range(1, 5):
        save_checkpoint(tmp_path, model, optimizer, state_at(step), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000003", "step-00000004"]
    commit = json.loads((tmp_path / "checkpoints" / "step-00000004" / COMMIT).read_text())
    assert commit["step"] == 4 and "model.safetensors" in commit["files"]


@pytest.mark.parametrize(
    ("change", "tensor"),
    [({"n_experts": 8}, r"layers\.0\.feed_forward\.gate\.weight"), ({"n_layers": 3}, r"layers\.2\.")],
)
def test_load_into_a_different_model_names_the_tensor(tmp_path, change, tensor):
    model, optimizer, _ = make_run()
    path = save_checkpoint(tmp_path, model, optimizer, state_at(0))
    other, other_optimizer, _ = make_run(CONFIG.replace(**change))
    with pytest.raises(TrainingError, match=tensor):
        load_checkpoint(path, other, other_optimizer)


def test_load_into_a_different_config_of_equal_shapes_names_the_field(tmp_path):
    model, optimizer, _ = make_run()
    path = save_checkpoint(tmp_path, model, optimizer, state_at(0))
    other, other_optimizer, _ = make_run(CONFIG.replace(rope_theta=10_000.0))
    with pytest.raises(TrainingError, match="rope_theta"):
        load_checkpoint(path, other, other_optimizer)
