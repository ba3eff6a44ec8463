"""EP load imbalance from routing traces (mixtral.parallel.imbalance)."""

from __future__ import annotations

import numpy as np
import pytest

from mixtral.parallel.imbalance import (
    ep_imbalance,
    first_choice_repetition,
    interleave_sequences,
    shuffle_tokens,
    synthetic_trace,
)


def test_even_and_one_sided_routing():
    N = 64
    even = np.stack([np.arange(N) % 8, (np.arange(N) + 4) % 8], axis=-1)[None]  # [1, N, 2]
    assert np.allclose(ep_imbalance(even, 8, 4, 16), 1.0)
    one_rank = np.tile(np.array([0, 1]), (1, N, 1))  # experts 0 and 1: EP rank 0 of 2, 4 or 8... of 4
    assert np.allclose(ep_imbalance(one_rank, 8, 4, 16), 4.0)  # everything on 1 of 4 ranks
    assert np.allclose(ep_imbalance(one_rank, 8, 2, 16), 2.0)
    with pytest.raises(ValueError, match="must divide"):
        ep_imbalance(even, 8, 3, 16)
    with pytest.raises(ValueError, match="fewer than one group"):
        ep_imbalance(even, 8, 4, 1000)


def test_synthetic_trace_has_the_requested_repetition_and_valid_choices():
    rates = [0.14, 0.279, 0.227]
    ids = synthetic_trace(40000, rates, seed=1)
    assert ids.shape == (3, 40000, 2) and ids.min() >= 0 and ids.max() < 8
    assert (ids[..., 0] != ids[..., 1]).all()
    assert np.allclose(first_choice_repetition(ids), rates, atol=0.01)


def test_locality_raises_imbalance_and_shuffling_removes_it():
    sticky = synthetic_trace(64000, [0.9], seed=2)
    local = ep_imbalance(sticky, 8, 8, 256).mean()
    shuffled = shuffle_tokens(sticky)
    assert local > ep_imbalance(shuffled, 8, 8, 256).mean() + 0.1
    p = np.bincount(sticky[0, :, 0], minlength=8) / sticky.shape[1]
    assert abs(first_choice_repetition(shuffled)[0] - (p**2).sum()) < 0.01  # random order: chance repetition


def test_interleave_keeps_sequences_whole():
    a = np.arange(40).reshape(1, 40, 1)
    b = 100 + np.arange(40).reshape(1, 40, 1)
    s = interleave_sequences({"a": a, "b": b}, 10, seed=0)[0, :, 0]
    assert sorted(s.tolist()) == sorted(list(range(40)) + list(range(100, 140)))
    for i in range(0, 80, 10):
        assert (np.diff(s[i : i + 10]) == 1).all()
