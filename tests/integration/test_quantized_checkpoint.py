"""Quantized checkpoints (`mixtral quantize SRC DST`): written once, loaded as stored with the same
logits, exported to GGUF as the very same blocks, and every corruption or mismatch a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_model, tiny_config

import mixtral
from mixtral.checkpoint.quantized import QuantizedReader, quant_layout, quantize_checkpoint
from mixtral.cli import main
from mixtral.errors import (
    CheckpointError,
    ConfigError,
    CorruptFileError,
    FormatError,
    MissingTensorError,
    NonFiniteWeightError,
    ShapeMismatchError,
)
from mixtral.model import Transformer
from mixtral.quant import quantize_model

ALL = ("experts", "attention", "output")
CFG = tiny_config(dim=64, hidden_dim=128, head_dim=16, vocab_size=32000)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("qsrc") / "float", CFG)


def _logits(model, tokens=((1, 40, 50, 60, 70, 80, 90),)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


@pytest.mark.parametrize(
    "storage, targets",
    [("int4", ALL), ("int8-g32", ("experts",)), ("int4-g64", ("experts", "output")), ("int8", ALL)],
)
def test_roundtrip_same_logits_as_quantizing_in_memory(source, tmp_path, storage, targets, monkeypatch):
    quantize_checkpoint(source, tmp_path / "q", storage, targets, progress=False)
    want = _logits(quantize_model(mixtral.load_model(source), storage, targets))
    import mixtral.quant.group as group
    import mixtral.quant.rowwise as rowwise

    def refuse(*a, **k):
        raise AssertionError("loading a quantized checkpoint must not quantize again")

    monkeypatch.setattr(group, "quantize", refuse)
    monkeypatch.setattr(rowwise, "compress", refuse)
    loaded = mixtral.load_model(tmp_path / "q")
    assert torch.equal(_logits(loaded), want)
    assert loaded.quant_layout.storage == storage and loaded.quant_layout.targets == targets
    # smaller than the float checkpoint, and loads without any flag in the CLI
    size = lambda d: sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "q") < size(source)


def test_sharded_quantized_checkpoint_loads(source, tmp_path):
    quantize_checkpoint(source, tmp_path / "q", "int4", ALL, max_shard_bytes=2_000_000, progress=False)
    assert len(list((tmp_path / "q").glob("model-*-of-*.safetensors"))) > 1
    quantize_checkpoint(source, tmp_path / "one", "int4", ALL, progress=False)
    assert torch.equal(
        _logits(mixtral.load_model(tmp_path / "q")), _logits(mixtral.load_model(tmp_path / "one"))
    )


def test_experts_are_stored_one_contiguous_expert_at_a_time(source, tmp_path):
    quantize_checkpoint(source, tmp_path / "q", "int4", ("experts",), progress=False)
    names = [k for k in json.loads(_header(tmp_path / "q" / "model.safetensors")) if ".experts." in k]
    assert names[:6] == [
        f"layers.0.feed_forward.experts.0.{w}.{p}" for w in ("w1", "w3", "w2") for p in ("qweight", "scales")
    ]
    with QuantizedReader(tmp_path / "q") as r:
        t = r.read_expert(1, 3)
    assert t["qw1"].dtype == torch.uint8 and t["qw1"].shape == (128, 32) and t["sw2"].shape == (64, 4)


def _header(path: Path) -> str:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return raw[8 : 8 + n].decode()


@pytest.fixture
def q4(source, tmp_path) -> Path:
    quantize_checkpoint(source, tmp_path / "q", "int4", ALL, progress=False)
    return tmp_path / "q"


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"bits": 8}, ShapeMismatchError, r"layers\.0\.attention\.wq\.qweight.*expected I8"),
        ({"group_size": 64}, ShapeMismatchError, r"scales.*expected F16 \[64, 1\]"),
        ({"targets": ["experts"]}, Exception, r"attention\.wq"),
        ({"quant_method": "gptq"}, FormatError, "'gptq'.*not other quantization formats"),
        ({"format_version": 7}, FormatError, "format_version 7"),
        ({"bits": 5}, FormatError, "bad quantization_config"),
    ],
)
def test_mismatched_config_is_a_clear_error(q4, change, error, match):
    _edit_config(q4, **change)
    with pytest.raises(error, match=match):
        mixtral.load_model(q4)


def test_truncated_missing_and_nonfinite(q4, tmp_path):
    broken = tmp_path / "trunc"
    shutil.copytree(q4, broken)
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError, match="truncated"):
        mixtral.load_model(broken)
    # a checkpoint written for another layer count lacks tensors
    cfg = json.loads((q4 / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (q4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((MissingTensorError, CheckpointError), match="lacks"):
        mixtral.load_model(q4)


def test_nan_scale_is_named(source, tmp_path):
    quantize_checkpoint(source, tmp_path / "q", "int4", ("experts",), progress=False)
    from safetensors.torch import load_file, save_file

    f = tmp_path / "q" / "model.safetensors"
    sd = load_file(f)
    sd["layers.1.feed_forward.experts.2.w3.scales"][0, 0] = float("nan")
    save_file(sd, f)
    with pytest.raises(NonFiniteWeightError, match=r"layers\.1\.feed_forward\.experts\.2\.w3\.scales"):
        mixtral.load_model(tmp_path / "q")


def test_cli_quantize_writes_and_generate_loads(source, tmp_path, capsys):
    assert main(["quantize", str(source), str(tmp_path / "q"), "--format", "int4", "--experts-only"]) == 0
    assert "int4 (experts)" in capsys.readouterr().out
    assert quant_layout(tmp_path / "q").targets == ("experts",)
    assert main(["generate", str(tmp_path / "q"), "Hello", "--max-new-tokens", "3", "--json"]) == 0
    capsys.readouterr()
    for argv, msg in [
        (["generate", str(tmp_path / "q"), "Hi", "--quantize", "int8"], "already quantized"),
        (["quantize", str(source), str(tmp_path / "q")], "pass --overwrite"),
        (["quantize", str(source), str(tmp_path / "r"), "--group", "48"], "--group"),
        (["quantize", str(source), "--format", "int4"], "give a destination"),
        (["quantize", str(tmp_path / "q"), str(tmp_path / "r")], "already quantized"),
        (["convert", str(tmp_path / "q"), str(tmp_path / "hf")], "quantized checkpoint"),
        (["quantize", str(source), str(tmp_path / "r"), "--format", "int4", "--group", "row"], "per-row"),
    ]:
        assert main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert main(["quantize", str(source), str(tmp_path / "row"), "--format", "int8", "--group", "row"]) == 0
    assert quant_layout(tmp_path / "row").storage == "int8"


def test_group_that_does_not_divide_the_model(tmp_path):
    src = save_tiny_model(tmp_path / "f", tiny_config(vocab_size=32000))  # hidden_dim 48
    with pytest.raises(ConfigError, match=r"hidden_dim \(48\)"):
        quantize_checkpoint(src, tmp_path / "q", "int4", progress=False)
    assert not (tmp_path / "q").exists()


# ---- GGUF: the same blocks --------------------------------------------------------------------

gguf = pytest.importorskip("gguf")


@pytest.mark.parametrize("storage, qtype", [("int4", "Q4_0"), ("int8-g32", "Q8_0")])
def test_gguf_export_copies_the_stored_blocks(source, tmp_path, storage, qtype):
    """Exporting our quantized checkpoint gives the bytes ggml's own quantizer makes from the float
    weights (so llama.cpp multiplies what we multiply); float-kept tensors are exact F32."""
    from mixtral.checkpoint.gguf_export import export_gguf
    from mixtral.checkpoint.table import to_interleaved

    quantize_checkpoint(source, tmp_path / "q", storage, ALL, progress=False)
    path = export_gguf(tmp_path / "q", tmp_path / "q.gguf", progress=False)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    model = Transformer(CFG)
    model.load_state_dict(mixtral.checkpoint.load_weights(source)[1])
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    w = to_interleaved(model.layers[0].attention.wq.weight.detach(), CFG.n_heads).numpy()
    assert tensors["blk.0.attn_q.weight"].tensor_type == qt
    assert np.array_equal(
        np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(-1), gguf.quants.quantize(w, qt).reshape(-1)
    )
    e = model.layers[1].feed_forward.experts.w2.detach().numpy()
    got = np.asarray(tensors["blk.1.ffn_down_exps.weight"].data)
    assert np.array_equal(got.reshape(-1), gguf.quants.quantize(e, qt).reshape(-1))
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # a float export with the same outtype is byte-identical in every quantized tensor
    fpath = export_gguf(source, tmp_path / "f.gguf", qtype.lower(), progress=False)
    ftensors = {t.name: t for t in gguf.GGUFReader(fpath).tensors}
    for name, t in tensors.items():
        if t.tensor_type == qt:
            assert np.array_equal(np.asarray(t.data), np.asarray(ftensors[name].data)), name


def test_gguf_export_refuses_what_blocks_cannot_hold(source, tmp_path):
    from mixtral.checkpoint.gguf_export import export_gguf

    quantize_checkpoint(source, tmp_path / "g64", "int4-g64", ALL, progress=False)
    with pytest.raises(ConfigError, match="--group 32"):
        export_gguf(tmp_path / "g64", tmp_path / "x.gguf", progress=False)
    quantize_checkpoint(source, tmp_path / "q4", "int4", ALL, progress=False)
    with pytest.raises(ConfigError, match="export as q4_0, not q8_0"):
        export_gguf(tmp_path / "q4", tmp_path / "x.gguf", "q8_0", progress=False)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_llama_cpp_runs_our_int4_weights(source, tmp_path):
    """llama.cpp on the Q4_0 export of our int4-experts checkpoint gives our logits (its activations are
    8-bit, ours in prefill float: a few 1e-3 relative)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mixtral.checkpoint.gguf_export import export_gguf

    quantize_checkpoint(source, tmp_path / "q", "int4", ("experts",), progress=False)
    path = export_gguf(tmp_path / "q", tmp_path / "q.gguf", progress=False)
    tokens = mixtral.load_tokenizer(source).encode("The quick brown fox jumps over the lazy dog.", bos=True)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # fmt: skip
    try:
        llm.eval(tokens)
        theirs = np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()
    ours = _logits(mixtral.load_model(tmp_path / "q"), [tokens])[0].numpy()
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < 2e-2
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
