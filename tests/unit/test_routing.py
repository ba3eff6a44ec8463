"""Routing analysis: statistics with known answers, an independent recomputation of the analysis.

Layer-by-layer analysis from a checkpoint and the routing command: tests/integration/test_routing_cli.py.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import random_docs, tiny_config

from mixtral.analysis.routing import analyze_routing, parse_layers
from mixtral.analysis.routing_stats import (
    RoutingStats,
    js_divergence,
    lru_hit_histogram,
    random_baselines,
)
from mixtral.data.packing import PackedStream
from mixtral.model import Transformer


def test_random_baselines_formula():
    assert random_baselines(8, 2)["topk_overlap"] == pytest.approx(13 / 28)  # the paper's 46.4%
    assert random_baselines(8, 1) == {"share": 0.125, "same_first": 0.125, "topk_overlap": 0.125}
    assert random_baselines(16, 4)["topk_overlap"] == pytest.approx(1 - math.comb(12, 4) / math.comb(16, 4))
    with pytest.raises(ValueError, match="top_k"):
        random_baselines(4, 5)


@pytest.mark.parametrize("E,k", [(8, 2), (16, 4), (4, 1), (6, 3)])
def test_random_routing_gives_the_baselines(E, k):
    L, B, T = 2, 16, 512
    stats = RoutingStats(L, E, k, ["a", "b"])
    g = torch.Generator().manual_seed(E * 10 + k)
    positions = torch.arange(T).expand(B, T)
    stats.update("a", torch.randn(L, B, T, E, generator=g), positions)
    stats.update("b", torch.randn(L, B, T, E, generator=g), positions)
    base = random_baselines(E, k)
    n = B * (T - 1)
    rep = stats.repetition()
    for key in ("same_first", "topk_overlap"):
        p = base[key]
        tol = 4.5 * math.sqrt(p * (1 - p) / n)
        np.testing.assert_allclose(rep[key], p, atol=tol)
    for kind, share in stats.shares().items():
        np.testing.assert_allclose(share, 1 / E, atol=4.5 * math.sqrt((1 / E) / (B * T)), err_msg=kind)
    # the routed cache behaves like the random-routing simulation of the same streams
    np.testing.assert_allclose(stats.cache_hit_rates(), stats.cache_hit_rates(random=True), atol=0.02)
    assert stats.specialisation(n_resamples=50).p_value.min() > 0.01  # no specialisation detected


def test_constant_router_repeats_always():
    L, B, T, E = 3, 4, 64, 8
    logits = torch.zeros(L, B, T, E)
    logits[..., 5], logits[..., 2] = 3.0, 1.0
    stats = RoutingStats(L, E, 2, ["a", "b"])
    stats.update("a", logits, torch.arange(T).expand(B, T))
    rep = stats.repetition()
    assert (rep["same_first"][0] == 1).all() and (rep["topk_overlap"][0] == 1).all()
    hits = stats.cache_hit_rates()[0]  # [L, E]
    # the first token of each stream misses; afterwards the first choice is always the most recent
    # expert (hits in a 1-expert cache) and the second choice the next most recent
    np.testing.assert_allclose(hits[:, 0], (T - 1) / (2 * T))
    np.testing.assert_allclose(hits[:, 1:], (T - 1) / T)
    share = stats.shares()
    assert (share["first"][0][:, 5] == 1).all() and (share["second"][0][:, 2] == 1).all()


def test_router_keyed_on_token_id_gives_expected_shares():
    E, B, T = 4, 8, 128
    g = torch.Generator().manual_seed(1)
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    tokens = torch.multinomial(probs, B * T, replacement=True, generator=g).view(B, T)
    logits = 4.0 * torch.nn.functional.one_hot(tokens, E).float()
    logits += 1.0 * torch.nn.functional.one_hot((tokens + 1) % E, E).float()
    stats = RoutingStats(1, E, 2, ["a", "b"], vocab_size=E)
    stats.update("a", logits[None], torch.arange(T).expand(B, T), tokens)
    tvd = stats.token_vs_domain(min_count=1)
    assert tvd["token_modal"] == [1.0] and tvd["token_modal_frequent"] == [1.0]  # the token decides
    assert tvd["domain_modal"][0] == pytest.approx(
        float((tokens == 0).double().mean())
    )  # expert 0 is the mode
    counts = torch.bincount(tokens.flatten(), minlength=E).double() / (B * T)
    share = stats.shares()
    np.testing.assert_allclose(share["first"][0, 0], counts.numpy())
    np.testing.assert_allclose(share["second"][0, 0], counts.roll(1).numpy())
    np.testing.assert_allclose(share["either"][0, 0], ((counts + counts.roll(1)) / 2).numpy())
    same = (tokens[:, 1:] == tokens[:, :-1]).double().mean()
    assert stats.repetition()["same_first"][0, 0] == pytest.approx(float(same))
    # tokens are drawn independently, so repetition is what the unbalanced shares give: sum p^2
    assert float(same) == pytest.approx(float((counts**2).sum()), abs=0.03)


def test_pairs_never_cross_documents_or_padding():
    L, _B, _T, E = 1, 1, 12, 4
    # two documents (positions restart at 0) then padding; each document routes to its own expert
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, -1, -1, -1]])
    expert = torch.tensor([0, 0, 0, 0, 0, 3, 3, 3, 3, 1, 2, 1])
    logits = torch.nn.functional.one_hot(expert, E).float()[None, None] * 5
    stats = RoutingStats(L, E, 2, ["a", "b"])
    stats.update("a", logits, positions)
    assert stats.pairs[0] == 7 and stats.tokens[0] == 9
    assert stats.repetition()["same_first"][0, 0] == 1.0


def _lru_reference(ids_BTK: np.ndarray, valid_BT: np.ndarray, E: int) -> np.ndarray:
    """Plain LRU with an OrderedDict per stream: depth histogram [E + 1] (E = never seen)."""
    hist = np.zeros(E + 1, dtype=np.int64)
    for b in range(ids_BTK.shape[0]):
        recent: OrderedDict[int, None] = OrderedDict()  # last = most recent
        for t in range(ids_BTK.shape[1]):
            if not valid_BT[b, t]:
                continue
            order = list(reversed(recent))
            for e in ids_BTK[b, t]:
                hist[order.index(e) if e in recent else E] += 1
            for e in reversed(ids_BTK[b, t]):  # first choice ends up most recent
                recent.pop(int(e), None)
                recent[int(e)] = None
    return hist


@pytest.mark.parametrize("E,k", [(8, 2), (5, 1), (6, 3)])
def test_lru_simulation_matches_a_plain_lru(E, k):
    g = torch.Generator().manual_seed(E + k)
    L, B, T = 2, 3, 40
    skewed = torch.randn(L, B, T, E, generator=g) + torch.linspace(0, 2, E)
    ids = skewed.topk(k, dim=-1).indices
    valid = torch.rand(B, T, generator=g) > 0.15
    got = lru_hit_histogram(ids, valid, E)
    for layer in range(L):
        np.testing.assert_array_equal(got[layer], _lru_reference(ids[layer].numpy(), valid.numpy(), E))


def test_js_divergence_bounds():
    assert js_divergence(np.array([[0.5, 0.5], [0.5, 0.5]])) == pytest.approx(0.0)
    assert js_divergence(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx(1.0)
    assert js_divergence(np.eye(4)) == pytest.approx(2.0)  # log2(4) for 4 disjoint domains


def test_domain_keyed_router_is_detected_as_specialised():
    L, B, T, E = 2, 32, 64, 8
    g = torch.Generator().manual_seed(3)
    stats = RoutingStats(L, E, 2, ["a", "b"])
    pos = torch.arange(T).expand(B, T)
    bias = torch.zeros(E)
    bias[:2] = 2.0
    stats.update("a", torch.randn(L, B, T, E, generator=g) + bias, pos)
    stats.update("b", torch.randn(L, B, T, E, generator=g) + bias.flip(0), pos)
    sp = stats.specialisation(n_resamples=100)
    assert (sp.js > 3 * sp.null_p95).all() and (sp.p_value < 0.02).all()
    assert (sp.ci_low < sp.js).all() and (sp.js < sp.ci_high).all()


def test_parse_layers():
    assert parse_layers(None, 32) == [0, 15, 31]
    assert parse_layers("0,mid,last", 6) == [0, 2, 5]
    assert parse_layers("-1,1", 4) == [1, 3]
    assert parse_layers("all", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="out of range"):
        parse_layers("7", 4)
    with pytest.raises(ValueError, match="bad layer"):
        parse_layers("middle-ish", 4)


def test_analysis_agrees_with_a_plain_recomputation():
    """Repetition and shares from analyze_routing equal plain loops over the model's router logits."""
    cfg = tiny_config(n_layers=3, n_experts=6, top_k=2)
    model = Transformer(cfg).eval()
    data = {"x": random_docs(0, 12, cfg.vocab_size), "y": random_docs(1, 9, cfg.vocab_size)}
    seq_len, bs = 64, 3
    result = analyze_routing(model, data, layers="all", max_tokens=None, seq_len=seq_len, batch_size=bs,
                             n_resamples=20, progress=False, keep_traces=True)  # fmt: skip
    report = result.to_json()
    by_token = np.zeros((cfg.n_layers, cfg.vocab_size, cfg.n_experts))
    domain_mode = np.zeros(cfg.n_layers)
    for domain, docs in data.items():
        same, overlap, pairs = np.zeros(cfg.n_layers), np.zeros(cfg.n_layers), 0
        first = np.zeros((cfg.n_layers, cfg.n_experts))
        for batch in PackedStream({domain: docs}, seq_len, shuffle=False, loop=False).batches(bs):
            with torch.no_grad():
                router = model(batch.inputs, positions=batch.positions).router_logits
            for b in range(batch.inputs.shape[0]):
                pos = batch.positions[b].tolist()
                for t in range(len(pos)):
                    if pos[t] < 0:
                        continue
                    for layer in range(cfg.n_layers):
                        top = router[layer, b, t].topk(2).indices.tolist()
                        first[layer, top[0]] += 1
                        by_token[layer, int(batch.inputs[b, t]), top[0]] += 1
                        if t + 1 < len(pos) and pos[t + 1] == pos[t] + 1:
                            nxt = router[layer, b, t + 1].topk(2).indices.tolist()
                            same[layer] += top[0] == nxt[0]
                            overlap[layer] += bool(set(top) & set(nxt))
                            pairs += layer == 0
        assert report["pairs"][domain] == pairs
        assert report["tokens"][domain] == docs.n_tokens
        np.testing.assert_allclose(report["repetition"][domain]["same_first"], same / pairs)
        np.testing.assert_allclose(report["repetition"][domain]["topk_overlap"], overlap / pairs)
        np.testing.assert_allclose(
            report["expert_share"][domain]["first"], first / first.sum(1, keepdims=True)
        )
        shares = first / first.sum(1, keepdims=True)
        np.testing.assert_allclose(report["repetition"][domain]["same_first_independent"], (shares**2).sum(1))
        assert result.traces[domain].shape == (cfg.n_layers, docs.n_tokens, 2)
        domain_mode += first.max(1)
    n = sum(d.n_tokens for d in data.values())
    np.testing.assert_allclose(report["token_vs_domain"]["token_modal"], by_token.max(-1).sum(-1) / n)
    np.testing.assert_allclose(report["token_vs_domain"]["domain_modal"], domain_mode / n)
    assert len(report["samples"]) == 2 and report["timing"]["tokens"] == sum(
        d.n_tokens for d in data.values()
    )
    json.dumps(report)  # JSON-able throughout


def test_analysis_rejects_bad_arguments():
    model = Transformer(tiny_config()).eval()
    docs = random_docs(0, 4, 97)
    with pytest.raises(ValueError, match="at least two"):
        analyze_routing(model, {"x": docs}, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        analyze_routing(model, {"x": docs, "y": docs}, seq_len=10_000, progress=False)
    for bad in ({"batch_size": 0}, {"n_resamples": 0}, {"sample_tokens": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            analyze_routing(model, {"x": docs, "y": docs}, seq_len=64, progress=False, **bad)


def test_the_progress_bar_ends_exactly_at_its_total(monkeypatch):
    """A budget that cuts into a batch, plus the coloured samples: the bar counts what is routed."""
    import mixtral.analysis.routing as routing_mod

    bars = []

    class Recording(routing_mod.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False, "file": io.StringIO()})
            bars.append(self)

    monkeypatch.setattr(routing_mod, "tqdm", Recording)
    cfg = tiny_config()
    model = Transformer(cfg).eval()
    data = {"x": random_docs(0, 12, cfg.vocab_size), "y": random_docs(1, 9, cfg.vocab_size)}
    analyze_routing(model, data, max_tokens=100, seq_len=64, batch_size=3, n_resamples=5, progress=True)
    assert len(bars) == 1 and bars[0].n == bars[0].total > 200  # 2 x 100 budget tokens and the samples
