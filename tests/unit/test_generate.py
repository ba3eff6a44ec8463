"""Generation loop: batched ragged prompts equal single prompts, chunked prefill, stopping, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, token_rows

from mixtral.errors import GenerationError
from mixtral.inference import GenerationConfig, GenerationStats, generate_ids
from mixtral.model import Transformer


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
    rows = token_rows(generate_ids(model, prompts, max_new_tokens=12, chunk_size=3), 3)
    for p, got in zip(prompts, rows, strict=True):
        assert got == _greedy_by_recomputation(model, p, 12)


def test_chunk_size_does_not_change_output(model):
    prompt = [list(range(1, 40))]
    outs = {
        c: token_rows(generate_ids(model, prompt, max_new_tokens=6, chunk_size=c), 1) for c in (1, 7, 512)
    }
    assert outs[1] == outs[7] == outs[512]


def test_sampling_with_seed_is_reproducible(model):
    config = GenerationConfig(temperature=1.5, top_k=20, top_p=0.9, seed=7, max_new_tokens=10)
    a = token_rows(generate_ids(model, [[1, 2, 3], [4]], config), 2)
    b = token_rows(generate_ids(model, [[1, 2, 3], [4]], config), 2)
    assert a == b


def test_eos_stops_a_row_and_others_continue(model):
    prompts = [[5, 6, 7], [8, 9]]
    free = token_rows(generate_ids(model, prompts, max_new_tokens=8), 2)
    eos = free[0][2]
    steps = list(generate_ids(model, prompts, max_new_tokens=8, eos_id=eos))
    rows = token_rows(steps, 2)
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


@pytest.fixture(scope="module")
def tok():
    from mixtral.text.tokenizer import load_tokenizer

    return load_tokenizer()


def _vocab_model():
    torch.manual_seed(3)
    return Transformer(tiny_config(vocab_size=32000, dim=48)).eval()


def test_text_generate_stream_and_batch_agree(tok):
    from mixtral.inference import generate, stream

    model = _vocab_model()
    single = generate(model, tok, "Bonjour, je suis", max_new_tokens=12)
    assert single.finish_reason == "length" and len(single.token_ids) == 12
    prompt_ids = tok.encode("Bonjour, je suis", bos=True)
    # the text continues the prompt (as vLLM and OpenAI completions): prompt + text == the whole decode
    assert tok.decode(prompt_ids) + single.text == tok.decode(prompt_ids + single.token_ids)
    pieces = list(stream(model, tok, "Bonjour, je suis", max_new_tokens=12))
    assert "".join(pieces) == single.text and all(pieces)
    batch = generate(model, tok, ["Bonjour, je suis", "def f(x):"], max_new_tokens=12)
    assert batch[0].text == single.text and batch[0].token_ids == single.token_ids


def test_continuation_keeps_the_space_before_its_first_word(tok):
    """A first generated token that starts a word must not be glued to the prompt ("de" + "la")."""
    from mixtral.inference import generate

    model = _vocab_model()
    word = tok.encode("la", bos=False)
    assert len(word) == 1 and tok.decode(tok.encode("de", bos=True) + word) == "de la"
    bonus = torch.zeros(32000)
    bonus[word[0]] = 1e4  # make "▁la" the model's favourite token
    model.output.register_forward_hook(lambda module, args, out: out + bonus)
    out = generate(model, tok, "permet de", max_new_tokens=2)
    assert out.token_ids[0] == word[0] and out.text.startswith(" la")


def test_stop_string_truncates_and_stream_never_shows_it(tok):
    from mixtral.inference import generate, stream

    model = _vocab_model()
    free = generate(model, tok, "Once upon a time", max_new_tokens=16)
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert len(stop) == 3
    cut = generate(model, tok, "Once upon a time", max_new_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    pieces = list(stream(model, tok, "Once upon a time", max_new_tokens=16, stop=[stop]))
    assert "".join(pieces) == cut.text
    assert all(stop not in p for p in pieces)


def test_eos_ends_text_generation(tok):
    from mixtral.inference import generate

    model = _vocab_model()
    with torch.no_grad():  # make EOS the model's favourite token
        model.output.weight[tok.eos_id] = model.output.weight.mean(0) + 5 * model.norm.weight
    out = generate(model, tok, "Hello", max_new_tokens=8)
    assert out.finish_reason == "eos" and out.token_ids[-1] == tok.eos_id
    prompt_ids = tok.encode("Hello", bos=True)
    assert tok.decode(prompt_ids) + out.text == tok.decode(prompt_ids + out.token_ids[:-1])
