"""Parity with transformers' MixtralForCausalLM on tiny random models, through our real converter."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_model, tiny_config

transformers = pytest.importorskip("transformers")

from mixtral.checkpoint import convert, load_model, save_model  # noqa: E402
from mixtral.model.moe import route  # noqa: E402

# A 3-layer, 211-token model (transformers' own initialisation, std 0.1) with attention and experts
# varied: GQA 1 and 4, head_dim derived (null in config.json) or not dim/heads, top-1 and top-2.
BASE = tiny_config(vocab_size=211, dim=48, hidden_dim=80, n_layers=3, max_seq_len=512, norm_eps=1e-5)
DERIVED_HEAD_DIM = {"head_dim": None}
CONFIGS = {
    "gqa1-top2-e8": dict(n_heads=4, n_kv_heads=4, head_dim=12, n_experts=8, top_k=2, hf_overrides=DERIVED_HEAD_DIM),
    "gqa4-top2-e4": dict(n_heads=8, n_kv_heads=2, head_dim=6, n_experts=4, top_k=2, hf_overrides=DERIVED_HEAD_DIM),
    "headdim-top1-e8": dict(n_heads=4, n_kv_heads=2, head_dim=24, n_experts=8, top_k=1),
    "headdim-gqa4-top2-e4": dict(n_heads=4, n_kv_heads=1, head_dim=12, n_experts=4, top_k=2),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_model(BASE, transformers_init=0.1, **CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(path)
    return hf, load_model(path).eval(), path


def _hf_routing(hf_logits_TE: torch.Tensor, k: int):
    """transformers' router: softmax over all experts in fp32, top-k, renormalise."""
    probs = torch.softmax(hf_logits_TE.float(), dim=-1)
    top, ids = torch.topk(probs, k, dim=-1)
    return top / top.sum(-1, keepdim=True), ids


def test_logits_and_routing_match_transformers(pair):
    hf, ours, _ = pair
    tokens = torch.randint(0, 211, (2, 37))
    with torch.no_grad():
        ref = hf(tokens, output_router_logits=True)
        out = ours(tokens)
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    k = ours.config.top_k
    for layer, hf_router in enumerate(ref.router_logits):
        ours_TE = out.router_logits[layer].reshape(-1, ours.config.n_experts)
        w_ref, ids_ref = _hf_routing(hf_router, k)
        w, ids = route(ours_TE, k)
        assert torch.equal(ids, ids_ref), f"layer {layer}: selected experts differ"
        assert (w - w_ref).abs().max() <= 1e-6


def test_greedy_generation_matches_transformers(pair):
    from mixtral.inference import generate_ids

    hf, ours, _ = pair
    prompt = torch.randint(3, 211, (1, 9))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    steps = list(generate_ids(ours, [prompt[0].tolist()], max_new_tokens=32))
    assert [s[0] for s in steps] == ref[0, 9:].tolist()


def test_saved_hf_copy_loads_in_transformers(pair, tmp_path):
    _, ours, _ = pair
    save_model(ours, tmp_path / "ours")
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 211, (1, 23))
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens).logits).abs().max() <= 1e-5


def test_mistral_format_gives_same_logits(pair, tmp_path):
    _, ours, path = pair
    convert(path, tmp_path / "mistral", to="mistral")
    assert (tmp_path / "mistral" / "params.json").exists()
    mistral = load_model(tmp_path / "mistral").eval()
    tokens = torch.randint(0, 211, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(mistral(tokens).logits, ours(tokens).logits, atol=0, rtol=0)
