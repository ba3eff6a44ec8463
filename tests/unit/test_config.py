"""Config presets, derived parameter counts and validation."""

from __future__ import annotations

import pytest
import torch

from mixtral.config import PRESETS, MixtralConfig, get_preset
from mixtral.errors import ConfigError
from mixtral.model import Transformer


def test_8x7b_counts_match_reference():
    cfg = get_preset("mixtral-8x7b")
    assert cfg.total_params == 46_702_792_704
    assert cfg.active_params == 12_879_925_248
    assert cfg.kv_cache_bytes_per_token(torch.bfloat16) == 131_072


def test_8x22b_release_values():
    cfg = get_preset("mixtral-8x22b")
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size) == (
        6144, 56, 48, 8, 16384, 32768,
    )  # fmt: skip
    assert round(cfg.total_params / 1e9, 1) == 140.6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_counts_equal_a_built_model(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.total_params
    assert all(p.is_meta for p in model.parameters())
    expert_numel = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert cfg.total_params - cfg.active_params == expert_numel * (cfg.n_experts - cfg.top_k) // cfg.n_experts


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"top_k": 9}, "top_k"),
        ({"dim": 0}, "dim"),
        ({"hidden_dim": -4}, "hidden_dim"),
        ({"head_dim": 7}, "head_dim"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"norm_eps": -1e-5}, "norm_eps"),
        ({"n_layers": 2.5}, "n_layers"),
        ({"n_experts": True}, "n_experts"),
        ({"colour": 1}, "colour"),
    ],
)
def test_invalid_config_names_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        get_preset("tiny").replace(**changes)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="mixtral-8x7b"):
        get_preset("mixtral-9x9b")


def test_dict_round_trip_and_missing_field():
    cfg = get_preset("tiny")
    assert MixtralConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    del d["dim"]
    with pytest.raises(ConfigError, match="dim"):
        MixtralConfig.from_dict(d)
