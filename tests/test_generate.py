"""Generation loop: batched ragged prompts equal single prompts, chunked prefill, stopping, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from mixtral.errors import GenerationError
from mixtral.generate import GenerationStats, generate_ids
from mixtral.model import Transformer
from mixtral.sampling import SamplingParams


def _rows(steps, B):
    rows = [[] for _ in range(B)]
    for step in steps:
        for b, t in enumerate(step):
            if t is not None:
                rows[b].append(t)
    return rows


@pytest.fixture
def model():
    return Transformer(tiny_config()).eval()


def _greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_batched_ragged_greedy_equals_full_recomputation(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    rows = _rows(generate_ids(model, prompts, max_new_tokens=12, chunk_size=3), 3)
    for p, got in zip(prompts, rows, strict=True):
        assert got == _greedy_by_recomputation(model, p, 12)


def test_chunk_size_does_not_change_output(model):
    prompt = [list(range(1, 40))]
    outs = {c: _rows(generate_ids(model, prompt, max_new_tokens=6, chunk_size=c), 1) for c in (1, 7, 512)}
    assert outs[1] == outs[7] == outs[512]


def test_sampling_with_seed_is_reproducible(model):
    params = SamplingParams(temperature=1.5, top_k=20, top_p=0.9, seed=7)
    a = _rows(generate_ids(model, [[1, 2, 3], [4]], params, max_new_tokens=10), 2)
    b = _rows(generate_ids(model, [[1, 2, 3], [4]], params, max_new_tokens=10), 2)
    assert a == b


def test_eos_stops_a_row_and_others_continue(model):
    prompts = [[5, 6, 7], [8, 9]]
    free = _rows(generate_ids(model, prompts, max_new_tokens=8), 2)
    eos = free[0][2]
    steps = list(generate_ids(model, prompts, max_new_tokens=8, eos_id=eos))
    rows = _rows(steps, 2)
    assert rows[0] == free[0][:3]
    expected_1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert rows[1] == expected_1


def test_should_stop_and_stats(model):
    stats = GenerationStats()
    steps = list(
        generate_ids(model, [[1, 2, 3]], max_new_tokens=10, stats=stats, should_stop=lambda b, t: True)
    )
    assert len(steps) == 1 and stats.prompt_tokens == 3 and stats.generated_tokens == 0
    stats = GenerationStats()
    list(generate_ids(model, [[1, 2, 3], [4, 5]], max_new_tokens=5, stats=stats))
    assert stats.generated_tokens == 8 and stats.prefill_seconds > 0 and stats.decode_tokens_per_s > 0


def test_prompt_beyond_context_names_both_numbers():
    model = Transformer(tiny_config(max_seq_len=32)).eval()
    with pytest.raises(GenerationError, match=r"30 tokens; with max_new_tokens=5 .* context of 32"):
        list(generate_ids(model, [[1] * 30], max_new_tokens=5))


@pytest.mark.parametrize(("prompts", "n", "match"), [([], 4, "no prompts"), ([[1], []], 4, "prompt 1 is empty"),
                                                   ([[1]], 0, "max_new_tokens")])  # fmt: skip
def test_bad_requests(model, prompts, n, match):
    with pytest.raises(GenerationError, match=match):
        list(generate_ids(model, prompts, max_new_tokens=n))
