"""SFT and preference data: chat loss masks, file validation, the over-length rule, resumable batches.

Masks are checked against an independent rebuild: the assistant answers encoded on their own plus
EOS must be exactly the targets that carry loss, in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_jsonl

from mixtral.data.instruct import (
    PreferenceStream,
    SFTStream,
    encode_preference,
    encode_sft,
    read_preferences,
    read_sft,
    tokenize_preferences,
    tokenize_sft,
)
from mixtral.errors import DataError
from mixtral.text import encode_chat, encode_chat_with_mask
from mixtral.text.tokenizer import Tokenizer, load_tokenizer

SYS, USER, ASSISTANT = "system", "user", "assistant"


def _msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONS = {
    "single": _msgs((USER, "What is 2 + 2?"), (ASSISTANT, "4.")),
    "system": _msgs((SYS, "Be terse."), (USER, "Capital of France?"), (ASSISTANT, "Paris")),
    "two_systems": _msgs((SYS, "A"), (SYS, "B"), (USER, "hi"), (ASSISTANT, "hello there")),
    "multi_turn": _msgs(
        (SYS, "You are a helpful assistant."),
        (USER, "Name a prime."),
        (ASSISTANT, "Seven is prime."),
        (USER, "Another one?"),
        (ASSISTANT, "Eleven, also prime."),
    ),
    "ends_with_user": _msgs((USER, "q1"), (ASSISTANT, "a1"), (USER, "q2")),
    "unicode": _msgs((USER, "Où est la bibliothèque ? 😀"), (ASSISTANT, "Là-bas ! 混合专家")),
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(None)


def _assistant_targets(tok: Tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """What the loss must cover, rebuilt independently: each answer encoded alone, then EOS."""
    out: list[int] = []
    for m in messages:
        if m["role"] == ASSISTANT:
            out += tok.encode(m["content"], bos=False) + [tok.eos_id]
    return out


# ------------------------------------------------------------------ chat masks


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_chat_with_mask_matches_encode_chat(tok: Tokenizer, name: str) -> None:
    messages = CONVERSATIONS[name]
    modes = ["complete"] + (["error"] if messages[-1]["role"] == USER else ["prefix"])
    for final in modes:
        ids, mask = encode_chat_with_mask(tok, messages, final_assistant=final)  # type: ignore[arg-type]
        assert ids == encode_chat(tok, messages, final_assistant=final)  # type: ignore[arg-type]
        assert len(mask) == len(ids) and not mask[0]
    ids, mask = encode_chat_with_mask(tok, messages)
    assert [i for i, m in zip(ids, mask, strict=True) if m] == _assistant_targets(tok, messages)


def test_prefix_mode_masks_the_open_answer_without_eos(tok: Tokenizer) -> None:
    messages = CONVERSATIONS["single"]
    ids, mask = encode_chat_with_mask(tok, messages, final_assistant="prefix")
    assert [i for i, m in zip(ids, mask, strict=True) if m] == tok.encode("4.", bos=False)


# ------------------------------------------------------------------ SFT batches


def test_sft_loss_only_on_assistant_tokens(tok: Tokenizer) -> None:
    convs = [CONVERSATIONS[k] for k in ("single", "system", "multi_turn", "unicode")]
    examples, counts = tokenize_sft(tok, convs, max_len=512)
    assert counts == {"records": 4, "kept": 4, "truncated": 0, "dropped": 0}
    batch = next(SFTStream(examples).iter_batches(4))
    assert batch.inputs.shape == batch.targets.shape == batch.positions.shape == batch.loss_mask.shape
    assert batch.inputs.dtype == batch.targets.dtype == batch.positions.dtype == torch.int64
    assert batch.loss_mask.dtype == torch.bool
    assert batch.inputs.shape == (4, max(len(e.ids) for e in examples) - 1)
    for b, (conv, ex) in enumerate(zip(convs, examples, strict=True)):
        n = len(ex.ids) - 1
        assert batch.inputs[b, :n].tolist() == ex.ids[:-1].tolist()
        assert batch.targets[b, :n].tolist() == ex.ids[1:].tolist()
        assert batch.positions[b, :n].tolist() == list(range(n))
        assert (batch.positions[b, n:] == -1).all() and (batch.inputs[b, n:] == 0).all()
        assert not batch.loss_mask[b, n:].any() and (batch.targets[b, n:] == 0).all()
        learned = batch.targets[b][batch.loss_mask[b]].tolist()
        assert learned == _assistant_targets(tok, conv)
        answers = [m["content"] for m in conv if m["role"] == ASSISTANT]
        assert learned.count(tok.eos_id) == len(answers)  # both turns of a multi-turn chat
        pieces = " ".join(answers)
        assert tok.decode([i for i in learned if i != tok.eos_id]).replace("  ", " ") == pieces
        # no user or system text is ever a target with loss
        for m in conv:
            if m["role"] != ASSISTANT:
                assert m["content"] not in tok.decode(learned)


def test_sft_truncation_and_drop(tok: Tokenizer) -> None:
    long_answer = _msgs((USER, "Count."), (ASSISTANT, " ".join(str(i) for i in range(200))))
    long_prompt = _msgs((USER, "word " * 300), (ASSISTANT, "ok"))
    short = _msgs((USER, "Hi"), (ASSISTANT, "Yo"))
    prompt_len = len(encode_chat(tok, long_answer[:1]))
    max_len = prompt_len + 5
    assert len(encode_chat(tok, short, final_assistant="complete")) <= max_len
    cut = encode_sft(tok, long_answer, max_len)
    assert cut is not None and cut.truncated and len(cut.ids) == len(cut.mask) == max_len
    full_ids, full_mask = encode_chat_with_mask(tok, long_answer)
    assert cut.ids.tolist() == full_ids[:max_len] and cut.mask.tolist() == full_mask[:max_len]
    assert cut.ids.dtype == np.int32 and cut.mask.dtype == bool
    assert encode_sft(tok, long_prompt, max_len) is None  # truncation leaves no assistant token
    assert encode_sft(tok, long_answer, prompt_len) is None  # cut right after [/INST]
    exact = encode_sft(tok, short, len(encode_chat(tok, short, final_assistant="complete")))
    assert exact is not None and not exact.truncated
    examples, counts = tokenize_sft(tok, [long_answer, long_prompt, short], max_len)
    assert counts == {"records": 3, "kept": 2, "truncated": 1, "dropped": 1}
    assert len(examples) == 2
    with pytest.raises(DataError, match="max_len"):
        encode_sft(tok, short, 1)


# ------------------------------------------------------------------ readers


def test_read_sft_ignores_extra_keys_and_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "sft.jsonl",
        [{"messages": CONVERSATIONS["system"], "meta": {"id": 1}}, "", {"messages": CONVERSATIONS["single"]}],
    )
    assert read_sft(path) == [CONVERSATIONS["system"], CONVERSATIONS["single"]]


BAD_SFT = {
    "bad JSON": ('{"messages": [', "malformed JSON"),
    "not an object": ("[1, 2]", "expected a JSON object"),
    "missing messages": ({"conversation": []}, "no field 'messages'"),
    "wrong type": ({"messages": "hello"}, "expected a list of messages"),
    "content type": ({"messages": _msgs((USER, "q")) + [{"role": ASSISTANT, "content": 3}]}, "content must be str"),
    "bad role": ({"messages": _msgs((USER, "q"), ("bot", "a"))}, "unknown role 'bot'"),
    "not alternating": ({"messages": _msgs((USER, "q"), (USER, "q2"), (ASSISTANT, "a"))}, "roles alternate"),
    "no assistant": ({"messages": _msgs((SYS, "s"), (USER, "q"))}, "no assistant message"),
    "empty content": ({"messages": _msgs((USER, "  "), (ASSISTANT, "a"))}, "content is empty"),
    "late system": ({"messages": _msgs((USER, "q"), (SYS, "s"), (ASSISTANT, "a"))}, "system message"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_SFT))
def test_read_sft_errors_name_file_and_line(tmp_path: Path, name: str) -> None:
    bad, problem = BAD_SFT[name]
    good = {"messages": CONVERSATIONS["single"]}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError, match=problem) as info:
        read_sft(path)
    assert f"{path}:4:" in str(info.value)


def test_read_sft_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        read_sft(path)


def test_read_preferences_normalises_strings_and_lists(tmp_path: Path) -> None:
    conversational = {
        "prompt": _msgs((SYS, "terse"), (USER, "2+2?")),
        "chosen": _msgs((ASSISTANT, "4")),
        "rejected": [{"role": ASSISTANT, "content": "5"}],
        "score": 1.0,
    }
    plain = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    records = read_preferences(write_jsonl(tmp_path / "pref.jsonl", [plain, conversational]))
    expected = {"prompt": _msgs((USER, "2+2?")), "chosen": _msgs((ASSISTANT, "4"))}
    assert records[0] == {**expected, "rejected": _msgs((ASSISTANT, "5"))}
    assert records[1] == {k: v for k, v in conversational.items() if k != "score"}


BAD_PREFERENCES = {
    "missing prompt": ({"chosen": "a", "rejected": "b"}, "no field 'prompt'.*explicitly"),
    "missing rejected": ({"prompt": "q", "chosen": "a"}, "no field 'rejected'"),
    "wrong type": ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' is int"),
    "empty list": ({"prompt": "q", "chosen": [], "rejected": "b"}, "field 'chosen' is an empty list"),
    "prompt ends with assistant": ({"prompt": _msgs((USER, "q"), (ASSISTANT, "a")), "chosen": "a", "rejected": "b"}, "last message must be a user"),
    "chosen from user": ({"prompt": "q", "chosen": _msgs((USER, "a")), "rejected": "b"}, "chosen: the first message"),
    "rejected ends with user": ({"prompt": "q", "chosen": "a", "rejected": _msgs((ASSISTANT, "b"), (USER, "c"))}, "rejected: the last message"),
    "bad role": ({"prompt": _msgs(("human", "q")), "chosen": "a", "rejected": "b"}, "unknown role 'human'"),
    "empty response": ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_PREFERENCES))
def test_read_preferences_errors_name_file_and_line(tmp_path: Path, name: str) -> None:
    bad, problem = BAD_PREFERENCES[name]
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, bad])
    with pytest.raises(DataError, match=problem) as info:
        read_preferences(path)
    assert f"{path}:2:" in str(info.value)


# ------------------------------------------------------------------ preference pairs


def test_prompt_plus_response_is_the_complete_chat(tok: Tokenizer) -> None:
    record = {
        "prompt": _msgs((SYS, "Be kind."), (USER, "Hi"), (ASSISTANT, "Hello!"), (USER, "Tell me a joke.")),
        "chosen": _msgs((ASSISTANT, "Why did the expert route? To be on top.")),
        "rejected": "No.",
    }
    example = encode_preference(tok, record, max_len=512)
    assert example is not None
    prompt = record["prompt"]
    assert example.prompt.tolist() == encode_chat(tok, prompt)
    for field, response in (("chosen", record["chosen"]), ("rejected", _msgs((ASSISTANT, "No.")))):
        ids = getattr(example, field)
        assert ids.dtype == np.int32 and ids[-1] == tok.eos_id
        full = encode_chat(tok, prompt + response, final_assistant="complete")
        assert example.prompt.tolist() + ids.tolist() == full
        assert ids.tolist() == _assistant_targets(tok, response)


def test_preference_drop_rule(tok: Tokenizer) -> None:
    record = {"prompt": "Pick one.", "chosen": "A longer answer than the second.", "rejected": "No."}
    example = encode_preference(tok, record, max_len=512)
    assert example is not None
    limit = len(example.prompt) + max(len(example.chosen), len(example.rejected))
    assert encode_preference(tok, record, max_len=limit) is not None
    assert encode_preference(tok, record, max_len=limit - 1) is None
    tiny = {"prompt": "q", "chosen": "a", "rejected": "b"}
    examples, counts = tokenize_preferences(tok, [record, tiny], limit - 1)
    assert counts == {"records": 2, "kept": 1, "truncated": 0, "dropped": 1} and len(examples) == 1
    with pytest.raises(DataError, match="preference record 1"):
        tokenize_preferences(tok, [record, {"prompt": "q", "chosen": "a"}], limit)


def test_preference_batch_layout(tok: Tokenizer) -> None:
    records = [
        {"prompt": f"Question {i}?" + " more" * i, "chosen": "Yes, indeed" + "!" * i, "rejected": f"no {i}"}
        for i in range(5)
    ]
    examples, _ = tokenize_preferences(tok, records, max_len=512)
    stream = PreferenceStream(examples, seed=3)
    batch = stream.next_batch(3)
    B = 3
    assert batch.index.dtype == torch.int64 and batch.index.shape == (B,)
    assert len(set(batch.index.tolist())) == B
    picked = [examples[i] for i in batch.index]
    width = max(len(e.prompt) + max(len(e.chosen), len(e.rejected)) for e in picked) - 1
    for field in ("inputs", "targets", "positions", "loss_mask"):
        assert getattr(batch, field).shape == (2 * B, width)
    for row in range(2 * B):
        example = examples[int(batch.index[row % B])]
        response = example.chosen if row < B else example.rejected
        ids = np.concatenate([example.prompt, response])
        n = len(ids) - 1
        assert batch.inputs[row, :n].tolist() == ids[:-1].tolist()
        assert batch.targets[row, :n].tolist() == ids[1:].tolist()
        assert batch.positions[row, :n].tolist() == list(range(n))
        assert (batch.positions[row, n:] == -1).all() and (batch.inputs[row, n:] == 0).all()
        assert batch.targets[row][batch.loss_mask[row]].tolist() == response.tolist()  # only the response
        assert batch.loss_mask[row].nonzero().flatten().tolist() == list(range(len(example.prompt) - 1, n))


# ------------------------------------------------------------------ stream order and resumption


def _fake_sft(n: int) -> list:
    from mixtral.data.instruct import SFTExample

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 9))
        ids = np.concatenate([[1], np.full(length - 1, 100 + i)]).astype(np.int32)
        out.append(SFTExample(ids, np.arange(length) > 0, truncated=False))
    return out


def _example_ids(batch) -> list[int]:
    return [int(t[0]) - 100 for t in batch.targets]


def test_stream_epochs_are_permutations_and_resume_exactly() -> None:
    examples = _fake_sft(7)
    stream = SFTStream(examples, seed=11)
    seen = [i for _ in range(7) for i in _example_ids(stream.next_batch(3))]  # 21 = 3 epochs
    for epoch in range(3):
        assert sorted(seen[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert seen[:7] != seen[7:14]  # reshuffled each epoch
    assert stream.state_dict()["epoch"] == 3 and stream.state_dict()["cursor"] == 0

    a = SFTStream(examples, seed=11)
    for _ in range(4):
        a.next_batch(2)
    state = json.loads(json.dumps(a.state_dict()))  # a few JSON-serialisable ints
    expected = [a.next_batch(3) for _ in range(5)]
    b = SFTStream(examples, seed=11)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch(3)
        for field in ("inputs", "targets", "positions", "loss_mask"):
            assert torch.equal(getattr(got, field), getattr(want, field))
    assert b.state_dict() == a.state_dict()
    other_seed = SFTStream(examples, seed=12).next_batch(7).targets
    assert not torch.equal(other_seed, SFTStream(examples, seed=11).next_batch(7).targets)
    with pytest.raises(DataError, match="seed"):
        SFTStream(examples, seed=12).load_state_dict(state)
    with pytest.raises(DataError, match="examples"):
        SFTStream(examples[:-1], seed=11).load_state_dict(state)


def test_iter_batches_is_ordered_once_and_leaves_state() -> None:
    examples = _fake_sft(5)
    stream = SFTStream(examples, seed=0)
    stream.next_batch(2)
    state = stream.state_dict()
    batches = list(stream.iter_batches(2))
    assert [b.inputs.shape[0] for b in batches] == [2, 2, 1]
    assert [i for b in batches for i in _example_ids(b)] == list(range(5))
    assert stream.state_dict() == state
    unshuffled = SFTStream(examples, shuffle=False)
    order = [i for _ in range(3) for i in _example_ids(unshuffled.next_batch(3))]
    assert order == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_stream_rejects_empty_and_bad_batch_size() -> None:
    with pytest.raises(DataError, match="no examples"):
        SFTStream([])
    with pytest.raises(DataError, match="batch_size"):
        SFTStream(_fake_sft(2)).next_batch(0)
