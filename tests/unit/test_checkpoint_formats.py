"""Checkpoint configs and layouts without transformers: config.json and params.json rules, the RoPE row
permutation, the meta-device build of 8x7B, streaming memory, atomic writes, foreign state dicts.

Loading and writing against transformers' own files is in tests/parity/test_checkpoint.py.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_state_equal

from mixtral.checkpoint import build_meta, convert, load_model, load_weights, save_model, save_weights
from mixtral.checkpoint.configs import config_from_hf, config_from_params, config_to_hf, config_to_params
from mixtral.checkpoint.table import expected_tensors, from_interleaved, our_shapes, plan, to_interleaved
from mixtral.config import PRESETS, MixtralConfig, get_preset
from mixtral.errors import ConfigError, MissingTensorError, ShapeMismatchError, TokenizerError
from mixtral.model import Transformer

# ---- RoPE rows and the Mistral format -----------------------------------------------------------


def test_rope_permutation_inverse():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(to_interleaved(from_interleaved(w, 3), 3), w)
    assert not torch.equal(from_interleaved(w, 3), w)


def test_save_mistral_from_model(tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("tiny").replace(vocab_size=96, n_experts=4)
    model = Transformer(cfg)
    save_model(model, tmp_path / "m", format="mistral")
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["moe"] == {"num_experts": 4, "num_experts_per_tok": 2}
    assert_state_equal(load_model(tmp_path / "m").state_dict(), model.state_dict())


# ---- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_round_trips(preset):
    cfg = get_preset(preset)
    assert config_from_hf(config_to_hf(cfg, torch.bfloat16)) == cfg
    assert config_from_params(config_to_params(cfg)) == cfg
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg, torch.float16)))) == cfg


def test_params_json_defaults():
    d = config_to_params(get_preset("mixtral-8x7b"))
    del d["rope_theta"], d["max_seq_len"]
    cfg = config_from_params(d)
    assert (cfg.rope_theta, cfg.max_seq_len) == (1e6, 32768)
    with pytest.raises(ConfigError, match="moe"):
        config_from_params({k: v for k, v in d.items() if k != "moe"})
    with pytest.raises(ConfigError, match="sliding_window"):
        config_from_params({**d, "sliding_window": 4096})


def test_hf_config_rules():
    good = config_to_hf(get_preset("tiny"), torch.float32)
    assert config_from_hf({**good, "head_dim": None}).head_dim == 64 // 4
    assert config_from_hf({**good, "sliding_window": 4096}).max_seq_len == 2048  # window >= context: dense
    for change, word in [
        ({"sliding_window": 1024}, "sliding_window"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "RoPE scaling"),
        ({"num_local_experts": None}, "num_local_experts"),
        ({"num_experts_per_tok": 9}, "top_k"),
    ]:
        with pytest.raises(ConfigError, match=word):
            config_from_hf({**good, **change})


# ---- lazy, meta-device build --------------------------------------------------------------------


def test_8x7b_builds_on_meta_without_memory():
    cfg = get_preset("mixtral-8x7b")
    tracemalloc.start()
    model = build_meta(cfg)
    hf_plan, mistral_plan, ours = (
        expected_tensors(cfg, "hf"),
        expected_tensors(cfg, "mistral"),
        our_shapes(cfg),
    )
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20  # Python objects only; 187 GB of fp32 weights were never allocated
    assert all(p.is_meta for p in model.parameters()) and not list(model.buffers())
    assert sum(p.numel() for p in model.parameters()) == cfg.total_params == 46_702_792_704
    per_layer = 2 + 4 + 1 + 3 * 8  # norms, attention, router, experts one tensor each
    assert len(hf_plan) == len(mistral_plan) == 32 * per_layer + 3 == 995
    assert len(ours) == 32 * (2 + 4 + 1 + 3) + 3
    assert hf_plan["model.layers.31.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert ours["layers.31.feed_forward.experts.w1"] == (8, 14336, 4096)
    assert len(plan(cfg, "hf-fused")) == 995 and len(expected_tensors(cfg, "hf-fused")) == 32 * 9 + 3


def _peak_anon_growth(fn: Callable[[], object]) -> int:
    """Peak growth of this process's anonymous (non-file) resident memory while fn runs, sampled."""

    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

    base, peak, done = anon(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], anon() - base)
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], anon() - base)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_load_holds_one_copy_and_convert_streams(tmp_path):
    cfg = MixtralConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=1024, n_experts=8,
                        top_k=2, vocab_size=2048)  # fmt: skip
    save_weights(
        {k: torch.randn(v) for k, v in our_shapes(cfg).items()}, cfg, tmp_path / "m", format="mistral"
    )
    size = (tmp_path / "m" / "consolidated.safetensors").stat().st_size  # ~110 MB
    assert _peak_anon_growth(lambda: load_weights(tmp_path / "m")) < 1.3 * size  # one copy + one tensor
    assert (
        _peak_anon_growth(lambda: convert(tmp_path / "m", tmp_path / "hf", max_shard_bytes=size // 3))
        < 0.3 * size
    )


# ---- writing is atomic; tokenizer objects travel -----------------------------------------------


def test_failed_save_leaves_nothing(tmp_path):
    cfg = get_preset("tiny").replace(vocab_size=96)
    sd = Transformer(cfg).state_dict()

    def broken_tokenizer(out: Path) -> None:
        raise RuntimeError("tokenizer failed")

    with pytest.raises(RuntimeError, match="tokenizer failed"):
        save_weights(sd, cfg, tmp_path / "ckpt", tokenizer_src=broken_tokenizer)
    assert list(tmp_path.iterdir()) == []
    save_weights(
        sd, cfg, tmp_path / "ckpt", tokenizer_src=lambda out: (out / "tokenizer.json").write_text("{}")
    )
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()
    with pytest.raises(FileExistsError):
        save_weights(sd, cfg, tmp_path / "ckpt")
    save_weights(sd, cfg, tmp_path / "ckpt", format="mistral", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "consolidated.safetensors",
        "params.json",
    ]


def test_save_with_tokenizer_object(tmp_path):
    tokenizer = pytest.importorskip("mixtral.text.tokenizer")
    try:
        tok = tokenizer.load_tokenizer(None)  # the bundled Mixtral SentencePiece model
    except TokenizerError as e:
        pytest.skip(str(e))
    cfg = get_preset("tiny").replace(vocab_size=96, n_layers=1)
    save_model(Transformer(cfg), tmp_path / "ckpt", tokenizer_src=tok)
    assert tokenizer.load_tokenizer(tmp_path / "ckpt").encode("hello world") == tok.encode("hello world")


def test_save_rejects_foreign_state_dict(tmp_path):
    cfg = MixtralConfig(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, hidden_dim=8, n_experts=2, top_k=1,
                        vocab_size=16)  # fmt: skip
    sd = Transformer(cfg).state_dict()
    with pytest.raises(ShapeMismatchError, match="tok_embeddings.weight"):
        save_weights({**sd, "tok_embeddings.weight": torch.zeros(16, 9)}, cfg, tmp_path / "x")
    with pytest.raises(MissingTensorError, match="norm.weight"):
        save_weights({k: v for k, v in sd.items() if k != "norm.weight"}, cfg, tmp_path / "x")
    assert not (tmp_path / "x").exists()
