"""Sampling: greedy, temperature, top-k, top-p with a seed; invalid parameters are named."""

from __future__ import annotations

import pytest
import torch

from mixtral.errors import GenerationError
from mixtral.inference import SamplingParams, sample


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(3, 100)
    params = SamplingParams(temperature=1.0, seed=123)
    a = [sample(logits, params, g).tolist() for g in [params.generator()] for _ in range(5)]
    b = [sample(logits, params, g).tolist() for g in [params.generator()] for _ in range(5)]
    assert a == b
    assert len({tuple(x) for x in a}) > 1


def test_top_k_only_draws_from_k_best():
    logits = torch.randn(2, 30)
    params = SamplingParams(temperature=5.0, top_k=3, seed=0)
    g = params.generator()
    allowed = logits.topk(3).indices
    for _ in range(200):
        drawn = sample(logits, params, g)
        assert all(drawn[b] in allowed[b] for b in range(2))


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    g = params.generator()
    drawn = {int(sample(probs.log(), params, g)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 < 0.75 so token 1 is needed; 0.8 >= 0.75 so token 2 is not
    tiny_p = SamplingParams(temperature=1.0, top_p=0.01, seed=0)
    assert {int(sample(probs.log(), tiny_p, g)) for _ in range(50)} == {0}


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold = SamplingParams(temperature=0.05, seed=1)
    g = cold.generator()
    assert {int(sample(logits, cold, g)) for _ in range(100)} == {0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kwargs)
