"""Checkpoint loading, saving and conversion against transformers' own files (the oracle).

Tiny random transformers MixtralForCausalLM checkpoints go through our loader and saver; bad
checkpoints are made by corrupting a good one, one way per table row. What needs no transformers
(configs, the meta-device build, streaming memory, atomic writes) is in tests/unit/test_checkpoint_formats.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_state_equal, hf_model, tiny_config
from safetensors.torch import load_file, save_file

from mixtral.checkpoint import (
    convert,
    load_model,
    load_weights,
    read_config,
    save_model,
    save_weights,
    validate_checkpoint,
)
from mixtral.checkpoint.table import expected_tensors
from mixtral.errors import (
    ConfigError,
    ConfigMismatchError,
    CorruptFileError,
    FormatError,
    MissingTensorError,
    NonFiniteWeightError,
    ShapeMismatchError,
    TokenizerError,
    UnexpectedTensorError,
)
from mixtral.model import Transformer
from mixtral.text.tokenizer import default_tokenizer_path

transformers = pytest.importorskip("transformers")

# Every case is this 2-layer, 64-token model with its attention and experts changed: GQA ratio 1 and
# 4, head_dim != dim/heads (and null in config.json: the reader derives it), 4 and 8 experts, top-1
# and top-2, a RoPE theta other than the default.
BASE = tiny_config(vocab_size=64, hidden_dim=24, max_seq_len=128)
HF_CONFIGS = {
    "mha-e4-top2": dict(n_heads=4, n_kv_heads=4, head_dim=8, n_experts=4, top_k=2, hf_overrides={"head_dim": None}),
    "gqa4-hd6-e8-top1": dict(n_heads=8, n_kv_heads=2, head_dim=6, n_experts=8, top_k=1),
    "gqa4-hd16-e8-top2": dict(n_heads=4, n_kv_heads=1, head_dim=16, n_experts=8, top_k=2, rope_theta=5e5),
}  # fmt: skip
DEFAULT = HF_CONFIGS["mha-e4-top2"]


def _expected_ours(model) -> dict[str, torch.Tensor]:
    """Our state dict, written out by hand from transformers' in-memory (fused) parameters."""
    sd, F = model.state_dict(), model.config.intermediate_size
    ours = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(model.config.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        gate_up = sd[p + "mlp.experts.gate_up_proj"]
        ours |= {
            q + "attention_norm.weight": sd[p + "input_layernorm.weight"],
            q + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            q + "feed_forward.gate.weight": sd[p + "mlp.gate.weight"],
            q + "feed_forward.experts.w1": gate_up[:, :F],
            q + "feed_forward.experts.w3": gate_up[:, F:],
            q + "feed_forward.experts.w2": sd[p + "mlp.experts.down_proj"],
        }
        for ours_name, hf_name in zip("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj"), strict=True):
            ours[q + f"attention.w{ours_name}.weight"] = sd[p + f"self_attn.{hf_name}.weight"]
    return ours


@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def hf_dir(request, tmp_path_factory) -> tuple[Path, object]:
    """A checkpoint written by transformers' save_pretrained, and the model it came from."""
    model = hf_model(BASE, **HF_CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


# ---- round trips with transformers --------------------------------------------------------------


def test_transformers_writes_per_expert_keys(hf_dir):
    path, model = hf_dir
    keys = set(load_file(path / "model.safetensors"))
    cfg, fmt = read_config(path)
    assert fmt == "hf" and keys == set(expected_tensors(cfg, "hf"))
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in keys


def test_load_transformers_checkpoint(hf_dir):
    path, model = hf_dir
    cfg, sd = load_weights(path)
    c = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    )  # fmt: skip
    assert cfg.head_dim == (c.head_dim or c.hidden_size // c.num_attention_heads)
    assert (cfg.n_experts, cfg.top_k, cfg.rope_theta) == (
        c.num_local_experts, c.num_experts_per_tok, c.rope_parameters["rope_theta"]
    )  # fmt: skip
    assert_state_equal(sd, _expected_ours(model))


def test_save_hf_loads_unchanged_in_transformers(hf_dir, tmp_path):
    path, model = hf_dir
    ours = load_model(path)
    assert isinstance(ours, Transformer)
    save_model(ours, tmp_path / "out")
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "out")
    assert_state_equal(reloaded.state_dict(), model.state_dict())
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c["sliding_window"] is None and c["tie_word_embeddings"] is False
    assert (c["bos_token_id"], c["eos_token_id"], c["dtype"]) == (1, 2, "float32")
    assert reloaded.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]


def test_sharded_save_and_index(tmp_path):
    model = hf_model(BASE, **HF_CONFIGS["gqa4-hd6-e8-top1"])
    model.save_pretrained(tmp_path / "src")
    cfg, sd = load_weights(tmp_path / "src")
    save_weights(sd, cfg, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "sharded" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected_tensors(cfg, "hf"))
    assert index["metadata"]["total_size"] == sum(s.stat().st_size for s in shards) - sum(
        8 + int.from_bytes(s.read_bytes()[:8], "little") for s in shards
    )
    assert_state_equal(load_weights(tmp_path / "sharded")[1], sd)
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "sharded")
    assert_state_equal(reloaded.state_dict(), model.state_dict())


def test_transformers_sharded_checkpoint_loads(tmp_path):
    model = hf_model(BASE, **DEFAULT)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert_state_equal(load_weights(tmp_path)[1], _expected_ours(model))


def test_fused_in_memory_layout_loads(tmp_path):
    model = hf_model(BASE, **HF_CONFIGS["gqa4-hd16-e8-top2"])
    model.save_pretrained(tmp_path)
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    save_file(fused, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert validate_checkpoint(tmp_path) == (read_config(tmp_path)[0], "hf-fused")
    assert_state_equal(load_weights(tmp_path)[1], _expected_ours(model))


@pytest.mark.parametrize("spelling", ["top_level", "rope_parameters", "both", "neither"])
def test_rope_theta_spellings(tmp_path, spelling):
    model = hf_model(BASE, **DEFAULT)
    model.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    c.pop("rope_parameters")
    if spelling in ("top_level", "both"):
        c["rope_theta"] = 12345.0
    if spelling in ("rope_parameters", "both"):
        c["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert read_config(tmp_path)[0].rope_theta == (1e6 if spelling == "neither" else 12345.0)
    c["rope_theta"], c["rope_parameters"] = 1.0, {"rope_theta": 2.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="rope_theta"):
        read_config(tmp_path)


# ---- Mistral format -----------------------------------------------------------------------------


def test_hf_mistral_hf_is_bit_exact(hf_dir, tmp_path):
    path, model = hf_dir
    convert(path, tmp_path / "mistral", to="mistral")
    assert read_config(tmp_path / "mistral") == (read_config(path)[0], "mistral")
    convert(tmp_path / "mistral", tmp_path / "hf", to="hf")
    assert_state_equal(
        load_file(tmp_path / "hf" / "model.safetensors"), load_file(path / "model.safetensors")
    )
    assert_state_equal(load_weights(tmp_path / "mistral")[1], load_weights(path)[1])


def test_mistral_rope_rows_are_interleaved(hf_dir, tmp_path):
    path, model = hf_dir
    cfg = read_config(path)[0]
    convert(path, tmp_path / "mistral", to="mistral")
    mistral = load_file(tmp_path / "mistral" / "consolidated.safetensors")
    assert set(mistral) == set(expected_tensors(cfg, "mistral"))
    hd, D = cfg.head_dim, cfg.dim
    for name, hf_name, heads in (("wq", "q_proj", cfg.n_heads), ("wk", "k_proj", cfg.n_kv_heads)):
        w = mistral[f"layers.1.attention.{name}.weight"]
        hf_w = model.state_dict()[f"model.layers.1.self_attn.{hf_name}.weight"]
        assert not torch.equal(w, hf_w)  # head_dim > 2: the permutation moves rows
        # The reference's Mistral -> HF formula (mixtral.md section 4) recovers HF's rows.
        assert torch.equal(w.view(heads, hd // 2, 2, D).transpose(1, 2).reshape(heads * hd, D), hf_w)
    assert torch.equal(
        mistral["layers.1.attention.wv.weight"], model.state_dict()["model.layers.1.self_attn.v_proj.weight"]
    )


# ---- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_equals_cast(hf_dir, dtype):
    path, _ = hf_dir
    _, fp32 = load_weights(path)
    _, low = load_weights(path, dtype=dtype)
    assert_state_equal(low, {k: v.to(dtype) for k, v in fp32.items()})
    assert next(load_model(path, dtype=dtype).parameters()).dtype == dtype


def test_bf16_checkpoint_round_trip(tmp_path):
    model = hf_model(BASE, dtype=torch.bfloat16, **DEFAULT)
    model.save_pretrained(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "out")  # dtype kept: bf16 in, bf16 out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_state_equal(load_weights(tmp_path / "out", torch.bfloat16)[1], _expected_ours(model))
    assert_state_equal(
        load_weights(tmp_path / "out")[1], {k: v.float() for k, v in _expected_ours(model).items()}
    )


def test_unsupported_load_dtype(hf_dir):
    with pytest.raises(ValueError, match="float64"):
        load_weights(hf_dir[0], dtype=torch.float64)


# ---- tokenizer files travel ---------------------------------------------------------------------


def test_convert_copies_tokenizer(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir[0], src)
    spm = default_tokenizer_path().read_bytes()
    (src / "tokenizer.model").write_bytes(spm)
    convert(src, tmp_path / "m", to="mistral")
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == spm
    (src / "tokenizer.model").write_bytes(b"spm")  # a tokenizer file that cannot be read
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        convert(src, tmp_path / "m2", to="mistral")
    assert not (tmp_path / "m2").exists() and [p.name for p in tmp_path.iterdir()] == ["src", "m"]


# ---- bad checkpoints ----------------------------------------------------------------------------

Corruption = Callable[[Path], None]


def _edit_tensors(
    fn: Callable[[dict[str, torch.Tensor]], None], file: str = "model.safetensors"
) -> Corruption:
    def corrupt(path: Path) -> None:
        tensors = load_file(path / file)
        fn(tensors)
        save_file(tensors, path / file, metadata={"format": "pt"})

    return corrupt


def _edit_json(file: str, **changes: object) -> Corruption:
    def corrupt(path: Path) -> None:
        (path / file).write_text(json.dumps({**json.loads((path / file).read_text()), **changes}))

    return corrupt


def _edit_bytes(fn: Callable[[bytes], bytes]) -> Corruption:
    def corrupt(path: Path) -> None:
        (path / "model.safetensors").write_bytes(fn((path / "model.safetensors").read_bytes()))

    return corrupt


def _poke(name: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def fn(t: dict[str, torch.Tensor]) -> None:
        t[name].view(-1)[3] = value

    return fn


def _reshard_and_delete(path: Path) -> None:
    cfg, sd = load_weights(path)
    shutil.rmtree(path)
    save_weights(sd, cfg, path, max_shard_bytes=20_000)
    (path / "model-00002-of-00007.safetensors").unlink()


def _pickle_only(path: Path) -> None:
    for p in path.iterdir():
        p.unlink()
    (path / "params.json").write_text("{}")
    (path / "consolidated.00.pth").write_bytes(b"\x80\x04not-to-be-unpickled")


def _empty(path: Path) -> None:
    for p in path.iterdir():
        p.unlink()


_E = "model.layers.{}.block_sparse_moe.experts.{}.{}.weight"
BAD = {
    "missing tensor": (_edit_tensors(lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")),
                       MissingTensorError, "model.layers.1.self_attn.k_proj.weight"),
    "unexpected tensor": (_edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})),
                          UnexpectedTensorError, "model.layers.0.self_attn.q_proj.bias"),
    "wrong shape": (_edit_tensors(lambda t: t.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(32, 30)})),
                    ShapeMismatchError, "model.layers.1.self_attn.o_proj.weight"),
    "extra expert": (_edit_tensors(lambda t: t.update({_E.format(0, 4, w): t[_E.format(0, 0, w)].clone() for w in ("w1", "w2", "w3")})),
                     ConfigMismatchError, "num_local_experts=4, but layer 0 has experts 5"),
    "missing expert": (_edit_tensors(lambda t: [t.pop(_E.format(1, 3, w)) for w in ("w1", "w2", "w3")]),
                       ConfigMismatchError, "num_local_experts=4, but layer 1 has experts 3"),
    "router expert count": (_edit_tensors(lambda t: t.update({"model.layers.0.block_sparse_moe.gate.weight": torch.zeros(5, 32)})),
                            ConfigMismatchError, "model.layers.0.block_sparse_moe.gate.weight has 5 experts"),
    "truncated file": (_edit_bytes(lambda b: b[:-100]), CorruptFileError, "model.safetensors: truncated"),
    "header larger than file": (_edit_bytes(lambda b: (10**6).to_bytes(8, "little") + b[8:]),
                                CorruptFileError, "model.safetensors: header larger than the file"),
    "non-JSON header": (_edit_bytes(lambda b: b[:8] + b"#" * int.from_bytes(b[:8], "little") + b[8 + int.from_bytes(b[:8], "little"):]),
                        CorruptFileError, "model.safetensors: header is not valid JSON"),
    "not safetensors": (_edit_bytes(lambda b: b"PK\x03"), CorruptFileError, "model.safetensors: only 3 bytes"),
    "config hidden_size": (_edit_json("config.json", hidden_size=48, head_dim=8), ConfigMismatchError,
                           "hidden_size=48, but model.embed_tokens.weight has shape [64, 32]"),
    "config layer count": (_edit_json("config.json", num_hidden_layers=3), ConfigMismatchError,
                           "num_hidden_layers=3, but the weights have layers 2"),
    "NaN": (_edit_tensors(_poke(_E.format(0, 2, "w3"), float("nan"))), NonFiniteWeightError,
            _E.format(0, 2, "w3") + " in model.safetensors holds 1 NaN"),
    "Inf": (_edit_tensors(_poke("lm_head.weight", float("-inf"))), NonFiniteWeightError, "lm_head.weight in model.safetensors holds 0 NaN and 1 Inf"),
    "int8 weights": (_edit_tensors(lambda t: t.update({"model.norm.weight": torch.zeros(32, dtype=torch.int8)})),
                     FormatError, "model.norm.weight in model.safetensors has dtype I8"),
    "missing shard": (_reshard_and_delete, CorruptFileError, "'model-00002-of-00007.safetensors', which does not exist"),
    "pickle only": (_pickle_only, FormatError, "consolidated.00.pth; pickle"),
    "empty dir": (_empty, FormatError, "not a checkpoint"),
    "no config": (lambda p: (p / "config.json").unlink(), FormatError, "needs config.json"),
    "sliding window": (_edit_json("config.json", sliding_window=16), ConfigError, "sliding_window=16"),
}  # fmt: skip


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    hf_model(BASE, **DEFAULT).save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_raises_typed_error(good_dir, tmp_path, case):
    corrupt, error, fragment = BAD[case]
    path = tmp_path / "ckpt"
    shutil.copytree(good_dir, path)
    corrupt(path)
    with pytest.raises(error) as info:
        load_model(path)
    assert fragment in str(info.value)


def test_bad_mistral_checkpoint_names_mistral_tensor(good_dir, tmp_path):
    convert(good_dir, tmp_path / "m", to="mistral")
    _edit_tensors(lambda t: t.pop("layers.0.attention.wk.weight"), "consolidated.safetensors")(tmp_path / "m")
    with pytest.raises(MissingTensorError, match=r"layers\.0\.attention\.wk\.weight"):
        load_weights(tmp_path / "m")


def test_non_finite_check_can_be_disabled(good_dir, tmp_path):
    shutil.copytree(good_dir, tmp_path / "c")
    _edit_tensors(_poke("model.norm.weight", float("nan")))(tmp_path / "c")
    assert torch.isnan(load_weights(tmp_path / "c", check_finite=False)[1]["norm.weight"]).sum() == 1
    with pytest.raises(NonFiniteWeightError, match="model.norm.weight"):
        convert(tmp_path / "c", tmp_path / "out", to="mistral")
    assert not (tmp_path / "out").exists()
