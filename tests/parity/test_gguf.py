"""GGUF export: metadata, tensors (after the RoPE row permutation), types, vocabulary, errors.

The file is read back with gguf's own GGUFReader. The slow tests load it in llama.cpp
(llama-cpp-python) and compare its logits with ours, which is what proves the q/k permutation
and the metadata right.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from helpers import save_tiny_model

gguf = pytest.importorskip("gguf")

from mixtral.checkpoint.gguf_export import GGUF_NAMES, export_gguf, gguf_tensor_specs  # noqa: E402
from mixtral.checkpoint.table import TABLE, to_interleaved  # noqa: E402
from mixtral.config import get_preset  # noqa: E402
from mixtral.errors import ConfigError  # noqa: E402
from mixtral.model import Transformer  # noqa: E402
from mixtral.text.tokenizer import load_tokenizer  # noqa: E402

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Transformer, Path, dict[str, Path]]:
    """A tiny random model (real 32000-token vocabulary), saved as HF and exported three ways."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny")).eval()
    with torch.no_grad():  # peaky attention, so that a wrong RoPE layout changes the logits a lot
        for layer in model.layers:
            layer.attention.wq.weight.mul_(8)
            layer.attention.wk.weight.mul_(8)
    root = tmp_path_factory.mktemp("gguf")
    save_tiny_model(root / "ckpt", model)
    files = {o: export_gguf(root / "ckpt", root / f"tiny-{o}.gguf", o) for o in ("f32", "f16", "q8_0")}
    return model, root / "ckpt", files


@pytest.fixture(scope="module")
def readers(exported) -> dict[str, object]:
    """One GGUFReader per exported file (parsing 32000 token strings is the slow part; do it once)."""
    return {outtype: gguf.GGUFReader(path) for outtype, path in exported[2].items()}


def _value(field) -> object:
    """A field's value from its raw parts (ReaderField.contents() is newer than gguf 0.10)."""
    parts = [field.parts[i] for i in field.data]
    if field.types[-1] == gguf.GGUFValueType.STRING:
        values = [bytes(p).decode("utf-8") for p in parts]
    else:
        values = [p.tolist()[0] for p in parts]
    return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def _fields(reader) -> dict[str, object]:
    return {name: _value(field) for name, field in reader.fields.items()}


def _ours_in_gguf_layout(model: Transformer) -> dict[str, np.ndarray]:
    """Our weights as the GGUF file should hold them: GGUF names, q/k rows interleaved."""
    cfg, out = model.config, {}
    for spec in gguf_tensor_specs(cfg):
        w = model.state_dict()[spec.ours]
        out[spec.name] = (to_interleaved(w, spec.rope_heads) if spec.rope_heads else w).numpy()
    return out


def test_name_table_covers_every_parameter():
    assert set(GGUF_NAMES) == {row.ours for row in TABLE}


def test_metadata(exported, readers):
    model = exported[0]
    cfg = model.config
    for outtype, ftype in (("f32", 0), ("f16", 1), ("q8_0", 7)):
        f = _fields(readers[outtype])
        expected = {
            "general.architecture": "llama",
            "general.file_type": ftype,
            "general.quantization_version": 2,
            "llama.block_count": cfg.n_layers,
            "llama.context_length": cfg.max_seq_len,
            "llama.embedding_length": cfg.dim,
            "llama.feed_forward_length": cfg.hidden_dim,
            "llama.attention.head_count": cfg.n_heads,
            "llama.attention.head_count_kv": cfg.n_kv_heads,
            "llama.attention.key_length": cfg.head_dim,
            "llama.attention.value_length": cfg.head_dim,
            "llama.rope.dimension_count": cfg.head_dim,
            "llama.expert_count": cfg.n_experts,
            "llama.expert_used_count": cfg.top_k,
            "llama.vocab_size": cfg.vocab_size,
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_eos_token": False,
        }
        assert {k: f.get(k) for k in expected} == expected, outtype
        assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps, rel=1e-6)


def test_f32_tensors_bit_equal_after_rope_permutation(exported, readers):
    model = exported[0]
    want = _ours_in_gguf_layout(model)
    tensors = {t.name: t for t in readers["f32"].tensors}
    assert set(tensors) == set(want)
    for name, w in want.items():
        t = tensors[name]
        assert t.tensor_type == QT.F32, name
        assert tuple(int(d) for d in reversed(t.shape)) == w.shape, name  # GGUF lists dims innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w, err_msg=name)
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    assert list(gate.shape) == [model.config.dim, model.config.hidden_dim, model.config.n_experts]


def test_rope_permutation_is_llama_cpp_interleaved_order(exported):
    """Row 2k and 2k+1 of each exported head are rows k and k + hd/2 of ours (HF rotate-half)."""
    model, _, _ = exported
    hd, wq = model.config.head_dim, model.layers[0].attention.wq.weight.detach()
    got = to_interleaved(wq, model.config.n_heads).view(model.config.n_heads, hd, -1)
    ours = wq.view(model.config.n_heads, hd, -1)
    torch.testing.assert_close(got[:, 0::2], ours[:, : hd // 2], rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1::2], ours[:, hd // 2 :], rtol=0, atol=0)


def test_f16_and_q8_0_types_and_values(exported, readers):
    model = exported[0]
    want = _ours_in_gguf_layout(model)
    for outtype in ("f16", "q8_0"):
        for t in readers[outtype].tensors:
            w = want[t.name]
            # norms, the router, and with q8_0 the token embedding stay f32, exactly
            if (
                w.ndim == 1
                or "ffn_gate_inp" in t.name
                or (outtype == "q8_0" and t.name == "token_embd.weight")
            ):
                assert t.tensor_type == QT.F32, t.name
                np.testing.assert_array_equal(np.asarray(t.data).reshape(w.shape), w)
                continue
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
            if outtype == "f16":
                assert t.tensor_type == QT.F16, t.name
                np.testing.assert_array_equal(got, w.astype(np.float16).astype(np.float32))
            else:
                assert t.tensor_type == QT.Q8_0, t.name
                # Per 32-value block: scale d = amax / 127 (stored in f16), error <= d / 2 + f16 rounding.
                blocks_w, blocks_got = w.reshape(-1, 32), got.reshape(-1, 32)
                d = np.abs(blocks_w).max(axis=1, keepdims=True) / 127
                assert (np.abs(blocks_got - blocks_w) <= 0.6 * d + 1e-12).all(), t.name


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32():
    cfg = get_preset("tiny").replace(hidden_dim=48)  # w2 rows hold 48 values
    for outtype, qt in (("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0)):
        types = {s.name: s.qtype for s in gguf_tensor_specs(cfg, outtype)}
        assert types["blk.0.ffn_down_exps.weight"] == QT.F16
        assert types["blk.0.ffn_gate_exps.weight"] == qt
        assert types["token_embd.weight"] == QT.F32


def test_mistral_format_source_gives_the_same_file(exported, tmp_path):
    """A Mistral checkpoint (wq/wk rows already interleaved) exports byte-identically to the HF one."""
    model, _, files = exported
    save_tiny_model(tmp_path / "ckpt", model, format="mistral")
    out = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")  # same directory name: same general.name
    assert out.read_bytes() == files["f32"].read_bytes()


def test_vocabulary(exported, readers):
    ckpt = exported[1]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    reader = readers["f32"]
    fields = reader.fields
    tokens, types, scores = (
        _value(fields[f"tokenizer.ggml.{k}"]) for k in ("tokens", "token_type", "scores")
    )
    assert len(tokens) == len(types) == len(scores) == 32000
    assert tokens == [sp.id_to_piece(i) for i in range(32000)]
    assert scores == pytest.approx([sp.get_score(i) for i in range(32000)])
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert types.count(gguf.TokenType.BYTE) == 256 and tokens[3] == "<0x00>"


def test_errors_and_atomic_write(exported, tmp_path):
    _, ckpt, files = exported
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="unsupported GGUF outtype 'q5_k'"):
        export_gguf(ckpt, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(FileExistsError):
        export_gguf(ckpt, files["f32"])
    save_tiny_model(tmp_path / "one", Transformer(get_preset("tiny").replace(n_experts=1, top_k=1)))
    with pytest.raises(ConfigError, match="n_experts"):
        export_gguf(tmp_path / "one", tmp_path / "one.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]


def test_failed_export_leaves_no_file(exported, tmp_path, monkeypatch):
    _, ckpt, _ = exported
    import mixtral.checkpoint.gguf_export as ge

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ge, "_encode", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(ckpt, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


# ---- llama.cpp itself ---------------------------------------------------------------------------


TEXT = "The quick brown fox jumps over the lazy dog. 1 2 3"


@pytest.mark.slow
@pytest.mark.parametrize("outtype, tol", [("f32", 1e-4), ("f16", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_logits_match_ours(exported, outtype, tol):
    """llama.cpp on the GGUF gives our logits: proves the q/k permutation and the metadata.

    Tolerances are relative to max |logit|; f32 differs only by summation order (~5e-7 here),
    while leaving q/k in rotate-half order gives ~0.7.
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    model, _, files = exported
    tokens = load_tokenizer(None).encode(TEXT)
    llm = llama_cpp.Llama(
        str(files[outtype]), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    try:
        llm.eval(tokens)
        theirs = np.array(llm.scores[: len(tokens)])
        assert llm.tokenize(TEXT.encode(), add_bos=True) == tokens  # the vocabulary made it across
        assert llm.detokenize(tokens).decode() == TEXT
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([tokens])).logits[0].numpy()
    rel = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert rel <= tol, rel
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
