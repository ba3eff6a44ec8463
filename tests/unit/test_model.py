"""Model properties: KV-cache decoding equals recomputation, padding is invisible, inputs are checked."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from mixtral.errors import GenerationError
from mixtral.kernels import AutoDispatch
from mixtral.model import KVCache, LoopDispatch, SortedDispatch, Transformer


def _model(**changes) -> Transformer:
    return Transformer(tiny_config(**changes)).eval()


@pytest.mark.parametrize("changes", [{}, {"n_kv_heads": 4}, {"n_kv_heads": 1, "top_k": 1}])
def test_cache_decoding_equals_full_recomputation(changes):
    model = _model(**changes)
    tokens = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.allocate(model.config, 3, 32)
        chunks = [
            model(tokens[:, a:b], cache=cache) for a, b in [(0, 7), (7, 13), (13, 14), (14, 15), (15, 20)]
        ]
    logits = torch.cat([c.logits for c in chunks], dim=1)
    router = torch.cat([c.router_logits for c in chunks], dim=2)
    torch.testing.assert_close(logits, full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(router, full.router_logits, atol=1e-5, rtol=0)
    assert cache.length == 20


def test_ragged_batch_with_left_padding_equals_each_prompt_alone():
    """Left-padded rows (position -1) give the same logits as the prompt run alone, with and without cache."""
    model = _model()
    lengths = [9, 4, 6]
    prompts = [torch.randint(0, 97, (n,)) for n in lengths]
    T = max(lengths)
    tokens = torch.zeros(3, T, dtype=torch.long)
    positions = torch.full((3, T), -1)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = p
        positions[b, T - len(p) :] = torch.arange(len(p))
    continuation = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        batched = model(tokens, positions=positions).logits
        cache = KVCache.allocate(model.config, 3, 16)
        cached = [model(tokens[:, :5], cache=cache, positions=positions[:, :5]).logits,
                  model(tokens[:, 5:], cache=cache, positions=positions[:, 5:]).logits]  # fmt: skip
        steps = []
        for t in range(5):
            pos = (positions[:, -1] + 1 + t)[:, None]
            steps.append(model(continuation[:, t : t + 1], cache=cache, positions=pos).logits)
        for b, p in enumerate(prompts):
            alone = model(torch.cat([p, continuation[b]])[None]).logits[0]
            n = len(p)
            torch.testing.assert_close(batched[b, T - n :], alone[:n], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.cat(cached, 1)[b, T - n :], alone[:n], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.cat(steps, 1)[b], alone[n:], atol=1e-5, rtol=0)
    assert torch.isfinite(batched).all()


def test_keep_logits_returns_the_tail():
    model = _model()
    tokens = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        tail = model(tokens, keep_logits=1)
    assert tail.logits.shape == (2, 1, 97)
    torch.testing.assert_close(tail.logits, full.logits[:, -1:])
    assert tail.router_logits.shape == (2, 2, 11, 4)


def test_dispatch_paths_give_the_same_model_output_and_grads():
    model = _model()
    tokens = torch.randint(0, 97, (2, 9))
    outs = []
    for dispatcher in (LoopDispatch(), SortedDispatch(), AutoDispatch()):
        model.set_dispatcher(dispatcher)
        model.zero_grad()
        out = model(tokens)
        out.logits.square().mean().backward()
        outs.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    for logits, grads in outs[1:]:
        torch.testing.assert_close(logits, outs[0][0], atol=1e-6, rtol=1e-5)
        for a, b in zip(grads, outs[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(TypeError, match="dispatcher"):
        model.set_dispatcher("sorted")


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.zeros(5, dtype=torch.long), "shape"),
        (torch.zeros(1, 3), "integer"),
        (torch.zeros(1, 0, dtype=torch.long), "seq > 0"),
        (torch.tensor([[1, 97]]), r"\[0, 97\)"),
        (torch.tensor([[-2, 3]]), r"\[0, 97\)"),
    ],
)
def test_bad_tokens_give_clear_errors(tokens, match):
    with pytest.raises(ValueError, match=match):
        _model()(tokens)


def test_cache_overflow_and_context_errors_name_numbers():
    model = _model(max_seq_len=16)
    cache = KVCache.allocate(model.config, 1, 8)
    with pytest.raises(ValueError, match="no_grad"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    model.requires_grad_(False)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(GenerationError, match="6 cached \\+ 3 new tokens exceed the cache length of 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(GenerationError, match="17 tokens exceed the model context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(GenerationError, match="exceeds the model context"):
        KVCache.allocate(model.config, 1, 32)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="positions shape"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.zeros(1, 3, dtype=torch.long))


def test_bf16_forward_runs_with_fp32_router():
    model = _model().to(torch.bfloat16)
    out = model(torch.randint(0, 97, (1, 5)))
    assert out.logits.dtype == torch.bfloat16
    assert out.router_logits.dtype == torch.float32
    assert torch.isfinite(out.logits.float()).all()


def test_static_cache_equals_dynamic_cache():
    model = _model()
    tokens = torch.randint(0, 97, (2, 12))
    positions = torch.tensor([[-1, -1, -1] + list(range(9)), list(range(12))])
    outs = []
    with torch.no_grad():
        for static in (False, True):
            cache = KVCache.allocate(model.config, 2, 16, static=static)
            chunks = [model(tokens[:, a:b], cache=cache, positions=positions[:, a:b]).logits
                      for a, b in [(0, 5), (5, 11), (11, 12)]]  # fmt: skip
            outs.append(torch.cat(chunks, 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_packed_documents_do_not_attend_across_boundaries():
    """Positions restarting at 0 start a new segment: each packed document equals itself alone."""
    model = _model()
    docs = [torch.randint(0, 97, (n,)) for n in (5, 8, 3)]
    packed = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        together = model(packed, positions=positions).logits[0]
        start = 0
        for d in docs:
            alone = model(d[None]).logits[0]
            torch.testing.assert_close(together[start : start + len(d)], alone, atol=1e-5, rtol=0)
            start += len(d)


def test_cache_dtype_must_match_the_model():
    model = Transformer(tiny_config()).eval().to(torch.bfloat16)
    cache = KVCache.allocate(model.config, 1, 8)  # fp32 by default
    with torch.no_grad(), pytest.raises(ValueError, match="cache was allocated as torch.float32"):
        model(torch.tensor([[1, 2, 3]]), cache=cache)


def test_positions_and_a_cache_of_another_model_are_refused_by_name():
    model = _model(max_seq_len=16).requires_grad_(False)
    tokens = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(GenerationError, match=r"positions must lie in \[-1, 16\).*\[0, 16\]"):
        model(tokens, positions=torch.tensor([[0, 16]]))
    with pytest.raises(GenerationError, match=r"got \[-2, 0\]"):
        model(tokens, positions=torch.tensor([[-2, 0]]))
    model(tokens, positions=torch.tensor([[-1, 0]]))  # -1 is padding
    cache = KVCache.allocate(model.config, 1, 8)
    with pytest.raises(GenerationError, match=r"\[-1, 8\) \(-1 marks padding; 8 is the cache length\)"):
        model(tokens, cache=cache, positions=torch.tensor([[7, 8]]))
    other = KVCache.allocate(_model(n_layers=3).config, 1, 8)
    with pytest.raises(GenerationError, match="KV cache has shape.*n_layers=2"):
        model(tokens, cache=other)
