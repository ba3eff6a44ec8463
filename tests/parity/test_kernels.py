"""The compiled CPU kernels equal torch's matmul for every weight storage, and quantization bounds hold."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_config

from mixtral import kernels
from mixtral.inference import generate_ids
from mixtral.kernels import KernelLinear, apply_kernels
from mixtral.model import KVCache, Transformer
from mixtral.quant import CompressedExperts, CompressedLinear, compress, decompress, quantize_model


@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("M", [1, 2, 5, 8, 9, 17])
@pytest.mark.parametrize("K", [8, 13, 64])
@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_linear_kernel_matches_matmul(M, K, storage, monkeypatch):
    monkeypatch.setenv("MIXTRAL_NO_W8A16", "1")  # the exact path; W8A16 is tested against its bound below
    x, w = torch.randn(M, K), torch.randn(37, K)
    q, scale = (w, None) if storage == "fp32" else compress(w, storage)
    expected = x @ decompress(q, scale).T
    torch.testing.assert_close(kernels.linear(x, q, scale), expected, atol=1e-5, rtol=1e-5)


def w8a16_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|error| bound of int16 activations (per row, per 256-block scale amax/32767, half-step
    rounding) against the exact fp32 product with the same int8 weights, plus fp32 slack."""
    M, K = x.shape
    step = torch.zeros(M, K)
    for b0 in range(0, K, 256):
        step[:, b0 : b0 + 256] = x[:, b0 : b0 + 256].abs().amax(1, keepdim=True) / 32767
    w = q.float() * scale[:, None]
    return (step / 2) @ w.abs().T + 1e-5 * (x.abs() @ w.abs().T) + 1e-6


@pytest.mark.usefixtures("w8a16")
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("K", [7, 32, 100, 256, 600, 1024])
def test_w8a16_linear_within_its_quantisation_bound(M, K):
    torch.manual_seed(K + M)
    x, w = torch.randn(M, K) * torch.linspace(0.1, 4, K), torch.randn(41, K)
    x[0, K // 2] = 50.0  # an outlier only widens its own block's step
    q, scale = compress(w, "int8")
    exact = x @ decompress(q, scale).T
    err = (kernels.linear(x, q, scale) - exact).abs()
    bound = w8a16_bound(x, q, scale)
    assert torch.all(err <= bound), (err / bound).max()
    assert err.max() > 0  # it is the quantised path, not the exact one


@pytest.mark.usefixtures("w8a16")
def test_w8a16_moe_kernel_within_bound_of_exact_path(monkeypatch):
    torch.manual_seed(0)
    E, D, F, T = 4, 300, 520, 6
    experts = [compress(torch.randn(E, F, D) * 0.1, "int8"), compress(torch.randn(E, F, D) * 0.1, "int8"),
               compress(torch.randn(E, D, F) * 0.1, "int8")]  # fmt: skip
    (w1, s1), (w3, s3), (w2, s2) = experts
    x = torch.randn(T, D)
    ids = torch.tensor([[0, 1], [1, 2], [3, 0], [0, 2], [2, 3], [1, 0]])
    wts = torch.softmax(torch.randn(T, 2), -1)
    fast = kernels.moe(x, ids, wts, w1, w3, w2, s1, s3, s2)
    monkeypatch.setenv("MIXTRAL_NO_W8A16", "1")
    exact = kernels.moe(x, ids, wts, w1, w3, w2, s1, s3, s2)
    assert not kernels.has_w8a16()
    rel = (fast - exact).abs().max() / exact.abs().max()
    assert 0 < rel < 1e-3, rel


@pytest.mark.usefixtures("kernels_built")
def test_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        kernels.linear(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="K = x.size"):
        kernels.linear(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="expert id out of range"):
        w = torch.randn(2, 4, 8)
        kernels.moe(
            torch.randn(1, 8), torch.tensor([[2]]), torch.ones(1, 1), w, w, w.transpose(1, 2).contiguous()
        )


@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_quantized_model_decodes_like_its_own_full_recompute(storage):
    """Kernel decode of a compressed model equals the dequantised matmul path (prefill) exactly enough."""
    torch.manual_seed(0)
    model = apply_kernels(Transformer(tiny_config()).eval())
    model = quantize_model(model, storage, ("experts", "attention", "output"))
    assert all(isinstance(layer.feed_forward.experts, CompressedExperts) for layer in model.layers)
    assert isinstance(model.output, CompressedLinear)
    tokens = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(tokens).logits
        cache = KVCache.allocate(model.config, 2, 16)
        steps = [model(tokens[:, :6], cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_int8_quality_cost_is_small():
    torch.manual_seed(0)
    model = Transformer(tiny_config(dim=64, hidden_dim=128)).eval()
    q = quantize_model(copy.deepcopy(model), "int8")
    tokens = torch.randint(0, 97, (4, 32))
    with torch.no_grad():
        a, b = model(tokens).logits, q(tokens).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    greedy = list(generate_ids(q, [[1, 2, 3]], max_new_tokens=4))
    assert len(greedy) == 4


@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_quantized_bf16_model_prefills_in_bf16(storage):
    """A bf16 model keeps computing in bf16 after quantization: prefill (sorted path, > 64 slots)
    dequantises to bf16, and equals the same model's fp32 dequantised computation to bf16 precision."""
    torch.manual_seed(0)
    ref = quantize_model(Transformer(tiny_config()).eval(), storage, ("experts", "attention", "output"))
    model = quantize_model(
        Transformer(tiny_config()).eval().to(torch.bfloat16), storage, ("experts", "attention", "output")
    )
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    experts = model.layers[0].feed_forward.experts
    assert experts.compute_dtype == torch.bfloat16 and experts.weights()[0][0].dtype == torch.bfloat16
    tokens = torch.randint(0, 97, (2, 40))  # 80 slots: the sorted matmul path
    with torch.no_grad():
        out = model(tokens).logits
        expected = ref(tokens).logits
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.usefixtures("bf16_dot")
@pytest.mark.parametrize("M", [1, 2, 4, 7, 8, 9])
@pytest.mark.parametrize("K", [5, 32, 77, 1024])
def test_bf16_dot_linear_equals_fp32_product_of_the_bf16_values(M, K):
    """bf16 x with bf16 w: products of bf16 values are exact in fp32, so only accumulation order differs."""
    x, w = torch.randn(M, K).bfloat16(), torch.randn(37, K).bfloat16()
    y = kernels.linear(x, w)
    assert y.dtype == torch.float32
    exact = x.double() @ w.double().T
    assert torch.all((y.double() - exact).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-6)
    # fp32 x is multiplied exactly (widening path), not rounded to bf16
    xf = torch.randn(M, K)
    exact = xf.double() @ w.double().T
    bound = 1e-6 * (xf.double().abs() @ w.double().abs().T) + 1e-6
    assert torch.all((kernels.linear(xf, w).double() - exact).abs() <= bound)
    assert not torch.all(xf == xf.bfloat16().float())  # x really had bits bf16 would have dropped


@pytest.mark.usefixtures("bf16_dot")
def test_bf16_model_decodes_like_its_own_full_recompute():
    """A bf16 model decodes through the bf16 dot kernels (experts, attention, head) and matches its own
    bf16 full forward (torch matmuls) to bf16 precision, with the same greedy tokens."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(dim=64, hidden_dim=96)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    model = apply_kernels(model.to(torch.bfloat16))
    tokens = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(tokens).logits.float()
        cache = KVCache.allocate(model.config, 2, 16, dtype=torch.bfloat16)
        steps = [model(tokens[:, :6], cache=cache).logits]
        steps += [model(tokens[:, t : t + 1], cache=cache).logits for t in range(6, 14)]
    dec = torch.cat(steps, 1).float()
    assert (dec - full).abs().max() < 0.05 * full.abs().max()
    assert (dec.argmax(-1) == full.argmax(-1)).float().mean() > 0.9


@pytest.mark.usefixtures("kernels_built")
def test_kernel_row_limits_per_dtype(monkeypatch):
    """The kernel takes few-row products; bf16 x bf16 hands over to torch's bf16 matmul from 5 rows
    where the CPU has native bf16, int8 matrices stay in the kernel up to 128 rows (no dequantising)."""
    from mixtral.kernels import ops, policy

    calls = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    lin = KernelLinear(64, 32).eval()
    int8 = CompressedLinear(torch.nn.Linear(64, 32, bias=False), "int8")
    with torch.no_grad():
        for rows in (2, 8, 16, 17):
            lin(torch.randn(rows, 64))
        bf16_limit = policy.KERNEL_MAX_ROWS_BF16 if kernels.has_bf16_dot() else policy.KERNEL_MAX_ROWS
        lin16 = lin.to(torch.bfloat16)
        for rows in (bf16_limit, bf16_limit + 1):
            lin16(torch.randn(rows, 64, dtype=torch.bfloat16))
        for rows in (32, 128, 129):
            y = int8(torch.randn(rows, 64))
            assert y.shape == (rows, 32)
    assert calls == [2, 8, 16, bf16_limit, 32, 128]


@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_op_equals_torch_expression(dtype):
    q, scale = compress(torch.randn(3, 37, 70) * torch.linspace(0.01, 5, 70), "int8")
    expected = (q.float() * scale.unsqueeze(-1)).to(dtype)
    out = kernels.dequantize(q, scale, dtype)
    assert out.dtype == dtype and torch.equal(out, expected)
    torch.testing.assert_close(decompress(q, scale, dtype), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="one value per row"):
        kernels.dequantize(q, scale[:, :-1], dtype)
    with pytest.raises(RuntimeError, match="at least one column"):
        kernels.dequantize(torch.zeros(4, 0, dtype=torch.int8), torch.ones(4), dtype)
