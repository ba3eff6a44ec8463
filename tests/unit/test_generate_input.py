"""The generation API refuses bad input with errors that name it: a missing tokenizer, a KV cache of
another model, text that is not valid Unicode, an out-of-range seed, a zero prefill chunk."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from mixtral.errors import GenerationError
from mixtral.inference import (
    GenerationConfig,
    SamplingParams,
    decode_one_token,
    generate,
    generate_ids,
    make_decode_step,
    prefill,
    stream,
)
from mixtral.model import Transformer
from mixtral.model.cache import KVCache
from mixtral.text import load_tokenizer


@pytest.fixture
def model():
    return Transformer(tiny_config()).eval()


@pytest.mark.parametrize("tokenizer", [None, "Hello", GenerationConfig()])
def test_generate_and_stream_without_a_tokenizer_name_the_argument(model, tokenizer):
    """generate(model, None, ...) was an AttributeError from deep inside; a prompt or config passed in
    the tokenizer's place is the same mistake."""
    with pytest.raises(TypeError, match=r"tokenizer must be a Tokenizer.*generate_ids"):
        generate(model, tokenizer, "Hello", max_new_tokens=2)
    with pytest.raises(TypeError, match="tokenizer must be a Tokenizer"):
        next(stream(model, tokenizer, "Hello", max_new_tokens=2))


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (tiny_config(n_layers=1), "n_layers=2"),
        (tiny_config(n_layers=3), "n_layers=2"),  # more layers used to run silently on the first two
        (tiny_config(n_heads=2, n_kv_heads=1), "n_kv_heads=2"),
        (tiny_config(head_dim=4), "head_dim=8"),
    ],
)
def test_a_kv_cache_of_another_config_is_refused_by_name(model, other, what):
    """A cache from another config was an IndexError (fewer layers), a scatter RuntimeError (other
    heads or head size) or no error at all (more layers)."""
    cache = KVCache.allocate(other, 1, 16)
    tokens, positions = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]])
    with pytest.raises(GenerationError, match=rf"KV cache has shape .*{what}.*KVCache.allocate"):
        prefill(model, tokens, positions, cache, 8)
    with pytest.raises(GenerationError, match=what):
        decode_one_token(model, tokens[:, 0], positions[:, 0], cache)
    with pytest.raises(GenerationError, match=what):
        make_decode_step(model, cache)


def test_a_kv_cache_on_another_device_is_refused(model):
    cache = KVCache.allocate(model.config, 1, 16, device="meta")
    with pytest.raises(GenerationError, match="KV cache is on meta but the model is on cpu"):
        prefill(model, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache, 8)


def test_a_matching_cache_still_works(model):
    cache = KVCache.allocate(model.config, 1, 16)
    logits = prefill(model, torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), cache, 2)
    assert logits.shape == (1, model.config.vocab_size) and cache.length == 3


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_prefill_refuses_a_chunk_size_below_one(model, chunk_size):
    """0 was "range() arg 3 must not be zero", -1 a bare AssertionError."""
    cache = KVCache.allocate(model.config, 1, 16)
    with pytest.raises(GenerationError, match="chunk_size must be a positive integer"):
        prefill(model, torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache, chunk_size)


@pytest.mark.parametrize("seed", [-1, 2**63, True, 1.5])
def test_seed_outside_int64_is_a_generation_error(seed):
    """An overflowing seed was torch's "Overflow when unpacking long long" at the first sample."""
    with pytest.raises(GenerationError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        GenerationConfig(seed=seed)
    with pytest.raises(GenerationError, match="seed"):
        SamplingParams(temperature=1.0, seed=seed)


def test_largest_seed_samples(model):
    steps = list(generate_ids(model, [[1, 2, 3]], temperature=1.0, seed=2**63 - 1, max_new_tokens=2))
    assert len(steps) == 2


def test_a_prompt_with_lone_surrogates_is_a_generation_error_not_a_pybind_cast():
    """Undecodable bytes that Python kept as surrogates reached the tokenizer's C++ and failed there."""
    model = Transformer(tiny_config(vocab_size=32000)).eval()
    tok = load_tokenizer(None)
    with pytest.raises(GenerationError, match=r"prompt 1 is not valid Unicode text: '\\udcff' at index 2"):
        generate(model, tok, ["fine", "ab\udcff"], max_new_tokens=2)
    with pytest.raises(GenerationError, match="prompt 0 is not valid Unicode"):
        next(stream(model, tok, "\ud800", max_new_tokens=2))
