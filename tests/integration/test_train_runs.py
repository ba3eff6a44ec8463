"""Training runs on a tiny model: the loss falls and a fixed batch is overfit, a killed run resumes
bit-identically, uncommitted checkpoints are skipped, a NaN stops the run before the update, bf16
autocast with accumulation and activation checkpointing trains.

The losses, schedule, evaluation and overrides on their own: tests/unit/test_train.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config, train_config, train_stream

from mixtral.errors import TrainingError
from mixtral.model import Transformer
from mixtral.train.checkpoint_io import latest_checkpoint
from mixtral.train.loop import train
from mixtral.train.pretrain import lm_objective


def _losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_a_fixed_batch_is_overfit(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    train(model, lm_objective, train_stream(), train_config(steps=40), tmp_path, progress=False)
    losses = _losses(tmp_path)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3

    class Fixed:  # the same batch forever
        def __init__(self):
            self.batch = train_stream(seed=3).next_batch(2)

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
        train_config(steps=120, lr=1e-2, min_lr=1e-2),
        tmp_path / "fixed",
        progress=False,
    )
    assert _losses(tmp_path / "fixed")[-1] < 0.3


def test_kill_and_resume_is_bit_identical(tmp_path):
    cfg = train_config(
        steps=10, save_every=3, router_jitter=0.1
    )  # jitter draws from the RNG that must be restored
    torch.manual_seed(0)
    train(Transformer(tiny_config()), lm_objective, train_stream(), cfg, tmp_path / "full", progress=False)
    torch.manual_seed(0)
    train(Transformer(tiny_config()), lm_objective, train_stream(), cfg, tmp_path / "killed", progress=False,
          stop_after=7)  # fmt: skip
    assert latest_checkpoint(tmp_path / "killed").name == "step-00000006"
    torch.manual_seed(123)  # a different process state: everything must come from the checkpoint
    model = Transformer(tiny_config())
    train(model, lm_objective, train_stream(), cfg, tmp_path / "killed", progress=False)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    final_full = Transformer(tiny_config())
    from mixtral.train.checkpoint_io import load_checkpoint

    load_checkpoint(latest_checkpoint(tmp_path / "full"), final_full, None)
    for a, b in zip(model.state_dict().values(), final_full.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_uncommitted_checkpoint_is_skipped_with_a_warning_on_resume(tmp_path):
    cfg = train_config(steps=4, save_every=2)
    torch.manual_seed(0)
    train(Transformer(tiny_config()), lm_objective, train_stream(), cfg, tmp_path, progress=False)
    (tmp_path / "checkpoints" / "step-00000004" / "COMMIT").unlink()
    with pytest.warns(UserWarning, match="step-00000004"):
        assert latest_checkpoint(tmp_path).name == "step-00000002"


def test_nan_stops_before_the_update_and_writes_no_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cfg = train_config(steps=6, save_every=2)
    train(model, lm_objective, train_stream(), cfg, tmp_path, stop_after=2, progress=False)
    with torch.no_grad():
        model.layers[1].feed_forward.experts.w2[0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"before the update.*layers\.1\.feed_forward"):
        train(model, lm_objective, train_stream(), dataclasses.replace(cfg, steps=6), tmp_path, resume=False,
              progress=False)  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) or k.endswith("w2") for k in before)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


def test_bf16_autocast_and_accumulation_train(tmp_path):
    torch.manual_seed(0)
    cfg = train_config(steps=3, bf16=True, grad_accum=2, activation_checkpointing=True, balance="per_layer")
    state = train(Transformer(tiny_config()), lm_objective, train_stream(), cfg, tmp_path, progress=False)
    assert state.step == 3 and state.tokens_seen > 0
    assert all(math.isfinite(v) for v in _losses(tmp_path))
