"""Every MoE dispatch path equals the reference loop, forward and backward; routing follows the paper."""

from __future__ import annotations

import pytest
import torch

from mixtral.kernels import AutoDispatch, KernelDispatch
from mixtral.model import Experts, LoopDispatch, MoE, SortedDispatch, route

dispatch_loop, dispatch_sorted, dispatch_kernel = LoopDispatch(), SortedDispatch(), KernelDispatch()
DISPATCH = {"loop": dispatch_loop, "sorted": dispatch_sorted}


def _experts(E: int, D: int, F: int) -> Experts:
    experts = Experts(E, D, F)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return experts


def _run(fn, x, logits, K, experts):
    weights, ids = route(logits, K)
    y = fn(x, ids, weights, experts)
    return y, ids


CASES = [
    (1, 8, 2, False),
    (2, 8, 1, False),
    (7, 4, 2, False),
    (64, 8, 2, False),
    (33, 8, 2, True),
    (16, 8, 3, False),
]


@pytest.mark.parametrize("name", ["sorted"])
@pytest.mark.parametrize(("T", "E", "K", "skew"), CASES)
def test_dispatch_matches_reference_forward_and_backward(name, T, E, K, skew):
    D, F = 16, 24
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E)
    if skew:  # only experts 0..2 ever chosen: the others receive no token
        logits[:, 3:] -= 100.0
    logits.requires_grad_()
    experts = _experts(E, D, F)
    results = []
    for fn in (dispatch_loop, DISPATCH[name]):
        y, ids = _run(fn, x, logits, K, experts)
        inputs = [x, logits, *experts.parameters()]
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), inputs)
        results.append((y, grads, ids))
    (y_ref, g_ref, ids), (y, g, _) = results
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if skew:
        unused = sorted(set(range(E)) - set(ids.flatten().tolist()))
        assert unused, "the skewed router must leave some experts without tokens"
        for w_grad in g[2:]:
            assert torch.all(w_grad[unused] == 0)


@pytest.mark.usefixtures("kernels_built")
@pytest.mark.parametrize(("T", "E", "K", "skew"), CASES + [(5, 8, 8, False)])
@pytest.mark.parametrize("D", [16, 21])  # 21: a dimension that is not a multiple of the vector width
def test_kernel_dispatch_matches_reference(T, E, K, skew, D):
    x = torch.randn(T, D)
    logits = torch.randn(T, E)
    if skew:
        logits[:, 3:] -= 100.0
    experts = _experts(E, D, 24 + D % 3)
    with torch.no_grad():
        y_ref, _ = _run(dispatch_loop, x, logits, K, experts)
        y, _ = _run(dispatch_kernel, x, logits, K, experts)
    torch.testing.assert_close(y, y_ref, atol=2e-6, rtol=2e-5)


@pytest.mark.usefixtures("kernels_built")
def test_auto_dispatch_uses_kernel_only_without_autograd():
    experts = _experts(8, 16, 24)
    x = torch.randn(4, 16)
    auto = AutoDispatch()
    with torch.no_grad():
        assert auto.choose(x, 2, experts) is auto.kernel
        assert auto.choose(torch.randn(200, 16), 2, experts) is auto.fallback
        assert auto.choose(x, 2, _experts(8, 16, 24).half()) is auto.fallback  # storage it cannot read
    assert auto.choose(x, 2, experts) is auto.fallback  # parameters require grad
    assert isinstance(auto.fallback, SortedDispatch)


def test_route_is_softmax_over_topk_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    weights, ids = route(logits, 2)
    assert ids.tolist() == [[1, 2], [2, 3]]
    expected = torch.softmax(torch.tensor([[3.0, 2.0], [5.0, 4.0]]), dim=-1)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    # Equal to HF's form: softmax over all, take top-k, renormalise.
    probs = torch.softmax(logits, dim=-1).topk(2).values
    torch.testing.assert_close(weights, probs / probs.sum(-1, keepdim=True))


def test_top1_weight_is_one():
    weights, _ = route(torch.randn(5, 8), 1)
    assert torch.all(weights == 1.0)


def test_moe_layer_equals_explicit_formula():
    """y = Σ_i G(x)_i SwiGLU_i(x) with exactly top_k non-zero gates per token (paper eq. 1-2)."""
    torch.manual_seed(1)
    layer = MoE(dim=12, hidden_dim=20, n_experts=6, top_k=2)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 12)
    y, logits = layer(x)
    assert logits.dtype == torch.float32 and logits.shape == (2, 5, 6)
    x_flat = x.reshape(-1, 12)
    gate_logits = x_flat @ layer.gate.weight.T
    kth = gate_logits.topk(2).values[:, -1:]
    G = torch.softmax(gate_logits.masked_fill(gate_logits < kth, float("-inf")), dim=-1)
    assert torch.all((G > 0).sum(-1) == 2)
    e = layer.experts
    expected = sum(
        G[:, i, None] * (torch.nn.functional.silu(x_flat @ e.w1[i].T) * (x_flat @ e.w3[i].T)) @ e.w2[i].T
        for i in range(6)
    )
    torch.testing.assert_close(y.reshape(-1, 12), expected, atol=1e-5, rtol=1e-5)


def test_moe_router_is_fp32_under_bf16():
    layer = MoE(dim=8, hidden_dim=8, n_experts=4, top_k=2).to(torch.bfloat16)
    y, logits = layer(torch.randn(1, 3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and logits.dtype == torch.float32


@pytest.mark.parametrize("skew", [False, True])
def test_sorted_dispatch_under_bf16_autocast_matches_reference(skew):
    """Under CPU bf16 autocast the grouped path computes in bf16 like autocast's F.linear and
    returns fp32 weight gradients; it agrees with the reference loop run under the same autocast."""
    torch.manual_seed(0)
    T, E, K, D, F = 48, 8, 2, 32, 40
    x = torch.randn(T, D, requires_grad=True)
    logits = torch.randn(T, E)
    if skew:
        logits[:, 3:] -= 100.0
    experts = _experts(E, D, F)
    results = []
    for fn in (dispatch_loop, dispatch_sorted):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = _run(fn, x, logits, K, experts)
        grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    [x, *experts.parameters()])  # fmt: skip
        results.append((y.float(), grads))
    (y_ref, g_ref), (y, g) = results
    assert all(gi.dtype == torch.float32 for gi in g)
    scale = y_ref.abs().max()
    assert (y - y_ref).abs().max() < 0.02 * scale
    for a, b in zip(g, g_ref, strict=True):
        assert (a - b).abs().max() <= 0.02 * b.abs().max() + 1e-6


def test_grouped_swiglu_skips_frozen_weights_and_checks_counts():
    from mixtral.model.grouped import grouped_swiglu

    experts = _experts(4, 8, 12)
    experts.requires_grad_(False)
    x = torch.randn(6, 8, requires_grad=True)
    y = grouped_swiglu(x, [2, 0, 3, 1], experts.w1, experts.w3, experts.w2)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    ids = torch.tensor([[0], [0], [2], [2], [2], [3]])
    ref = dispatch_loop(x, ids, torch.ones(6, 1), experts)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, torch.autograd.grad(ref.sum(), [x])[0])
    with pytest.raises(ValueError, match="do not match"):
        grouped_swiglu(x, [2, 2, 3, 1], experts.w1, experts.w3, experts.w2)
