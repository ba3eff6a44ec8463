"""Shared fixtures: deterministic fp32 CPU tests on tiny models."""

from __future__ import annotations

import pytest
import torch

from mixtral.config import MixtralConfig


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def tiny_config(**changes) -> MixtralConfig:
    base = MixtralConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
        n_experts=4, top_k=2, vocab_size=97, max_seq_len=256,
    )  # fmt: skip
    return base.replace(**changes)
