"""Group-wise int4/int8 quantization: ggml's exact blocks, the documented error bounds, the reference
arithmetic, storage names, and quantized models (prefill path) against their dequantized weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import tiny_config

from mixtral.errors import ConfigError
from mixtral.model import Transformer
from mixtral.quant import GroupExperts, GroupLinear, parse_storage, quantize_model, storage_name
from mixtral.quant import group as G

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType


def _weights(n=48, k=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    w[0, :32] = 0  # an all-zero group
    w[1, :32] = 0.5 * torch.arange(-16, 16)  # exact ties at x/d = k + 0.5 for some groups
    w[2, 40] = -w[2, 32:64].abs().max() * 2  # the group's largest magnitude negative
    return w


@pytest.mark.parametrize("bits, qt", [(4, QT.Q4_0), (8, QT.Q8_0)])
def test_blocks_are_ggml_reference_blocks(bits, qt):
    """Our group-32 quantizer gives byte for byte what gguf-py's port of ggml's reference gives."""
    w = _weights()
    q, s = G.quantize(w, bits, 32)
    ref = gguf.quants.quantize(w.numpy(), qt).reshape(w.shape[0], w.shape[1] // 32, -1)
    assert (ref[..., :2].copy().view(np.float16).reshape(s.shape) == s.numpy()).all()
    assert (ref[..., 2:] == q.numpy().view(np.uint8).reshape(ref.shape[0], ref.shape[1], -1)).all()
    deq = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt)
    assert np.array_equal(deq, G.dequantize(q, s, bits).numpy())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_elementwise_error_bound(bits, group):
    """|w - ŵ| <= d/2 (int8) or |d| (int4), d the group's scale (plus its fp16 rounding)."""
    w = _weights(k=384)
    q, s = G.quantize(w, bits, group)
    err = (w - G.dequantize(q, s, bits)).abs().reshape(w.shape[0], -1, group)
    d = s.float().abs().unsqueeze(-1)
    amax = w.abs().reshape(w.shape[0], -1, group).amax(-1, keepdim=True)
    fp16 = amax * 2**-10  # the scale's fp16 rounding, times at most 127 (or 8) steps
    bound = (d / 2 if bits == 8 else d) + fp16
    assert (err <= bound).all()
    # and the scales are what the format says
    want = amax / 127 if bits == 8 else amax / 8
    assert torch.allclose(d, want, rtol=2**-10)


def test_pack_unpack_roundtrip():
    v = torch.randint(0, 16, (5, 96), dtype=torch.uint8)
    assert torch.equal(G.unpack4(G.pack4(v)), v.to(torch.int8) - 8)
    b = G.pack4(v)[0, :16]  # block 0: byte j = value j (low) | value 16 + j (high)
    assert torch.equal(b & 0xF, v[0, :16]) and torch.equal(b >> 4, v[0, 16:32])


def test_activation_quantization_is_q8_0_with_fp32_scale():
    x = torch.randn(3, 64) * 5
    x[1, :32] = 0
    q, d = G.quantize_activations(x)
    assert d[1, 0] == 0 and (q[1, :32] == 0).all()
    ref = gguf.quants.quantize(x.numpy(), QT.Q8_0).reshape(3, 2, 34)
    assert (ref[..., 2:].view(np.int8).reshape(3, 64) == q.numpy()).all()  # same values, same ties
    assert (
        (q.float() * d.repeat_interleave(32, -1) - x).abs() <= d.repeat_interleave(32, -1) / 2 + 1e-6
    ).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_linear_error_against_float(bits):
    """The documented bound: |y - x·ŵᵀ| <= Σ_k |ŵ| · d_x / 2 (activation rounding only)."""
    w, x = _weights(k=256), torch.randn(4, 256)
    q, s = G.quantize(w, bits)
    wh = G.dequantize(q, s, bits)
    y = G.reference_linear(x, q, s, bits)
    _, dx = G.quantize_activations(x)
    bound = (dx.repeat_interleave(32, -1) / 2) @ wh.abs().T
    assert ((y - x @ wh.T).abs() <= bound * 1.0001 + 1e-5).all()
    assert torch.allclose(y, x @ w.T, rtol=0.2, atol=0.2 * (x @ w.T).abs().max().item())


def test_storage_names():
    assert parse_storage("int4").bits == 4 and parse_storage("int4").group == 32
    assert parse_storage("int8-g64").group == 64 and parse_storage("int8").group == 0
    assert parse_storage("bf16").bits is None
    assert (
        storage_name(4, 32) == "int4" and storage_name(8, 0) == "int8" and storage_name(8, 32) == "int8-g32"
    )
    for bad in ("int3", "int4-g48", "int8-g0", "fp8", "int4-g"):
        with pytest.raises(ConfigError, match=bad):
            parse_storage(bad)
    with pytest.raises(ConfigError, match="per-row"):
        storage_name(4, 0)


def test_group_must_divide_the_matrices():
    model = Transformer(tiny_config())  # hidden_dim 48
    with pytest.raises(
        ConfigError, match=r"hidden_dim \(48\) is not a multiple of the quantization group 32"
    ):
        quantize_model(model, "int4")
    with pytest.raises(ConfigError, match="unknown quantization target"):
        quantize_model(Transformer(tiny_config(hidden_dim=64)), "int4", ("embeddings",))


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(dim=64, hidden_dim=128, head_dim=16, n_heads=4, n_kv_heads=2)).eval()


@pytest.mark.parametrize("storage", ["int4", "int8-g32", "int4-g64"])
def test_quantized_model_is_the_model_with_dequantized_weights(storage, monkeypatch):
    """Prefill (no kernel): a quantized model computes exactly the float model with weights ŵ."""
    model = _model()
    q = quantize_model(copy.deepcopy(model), storage, ("experts", "attention", "output"))
    bits = parse_storage(storage).bits
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for lq, lr in zip(q.layers, ref.layers, strict=True):
            ex = lq.feed_forward.experts
            assert isinstance(ex, GroupExperts)
            for n in ("w1", "w3", "w2"):
                getattr(lr.feed_forward.experts, n).copy_(
                    G.dequantize(getattr(ex, f"q{n}"), getattr(ex, f"s{n}"), bits)
                )
            for n in ("wq", "wk", "wv", "wo"):
                lin = getattr(lq.attention, n)
                assert isinstance(lin, GroupLinear)
                getattr(lr.attention, n).weight.copy_(G.dequantize(lin.qweight, lin.scales, bits))
        ref.output.weight.copy_(G.dequantize(q.output.qweight, q.output.scales, bits))
        tokens = torch.randint(0, 97, (2, 40))  # 80 rows: above every kernel threshold
        assert torch.allclose(q(tokens).logits, ref(tokens).logits, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("rows", [1, 64])  # the decode kernel's size and the dequantizing prefill path
def test_group_linear_names_a_wrong_input_width(rows):
    lin = GroupLinear.from_linear(torch.nn.Linear(64, 8, bias=False), 4)
    with pytest.raises(
        ValueError, match=r"GroupLinear\(64 -> 8, int4, group 32\): the input's last dimension is 32"
    ):
        lin(torch.randn(rows, 32))
    assert lin(torch.randn(rows, 64)).shape == (rows, 8)
