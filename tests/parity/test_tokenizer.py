"""Tokenizer tests: sentencepiece, mistral-common and transformers are the oracles."""

from __future__ import annotations

import shutil

import pytest
import sentencepiece
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral.errors import TokenizerError
from mixtral.text import encode_chat, format_chat_text
from mixtral.text.tokenizer import (
    StreamDecoder,
    Tokenizer,
    decode_stream,
    default_tokenizer_path,
    load_tokenizer,
    save_tokenizer,
    sentencepiece_to_tokenizer_json,
)

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3.14!",
    "french": "Où est la bibliothèque ? L'été dernier, j'ai mangé des crêpes à Noël.",
    "german": "Größenwahn und Straßenbahn: Über die Brücke gehen wir heute Abend.",
    "spanish": "¿Dónde está el niño? ¡Mañana será otro día, señor!",
    "italian": "Perché non andiamo al caffè? È già tardi, però.",
    "chinese": "混合专家模型使用稀疏路由。我们今天去北京吗？",
    "emoji": "Emoji: 😀🤖🦙 family 👨‍👩‍👧‍👦 flag 🇫🇷 thumb 👍🏽 heart ❤️ end",
    "code": "def moe(x):\n\tfor e in experts:\n        y = e(x)  # eight spaces\n\treturn y\n",
    "newlines": "line one\n\nline three\r\nwindows line\n",
    "spaces": "  leading, inner   runs, trailing  ",
    "one_space": " ",
    "empty": "",
    "rare": "ｆｕｌｌｗｉｄｔｈ, runes ᚠᛇᚻ, math ∮ E⋅da = Q",
    "markers_as_text": "<s>[INST] literal markers [/INST]</s> <unk>",
}
SAMPLE_IDS = list(SAMPLES)


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def json_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("json_only")
    (directory / "tokenizer.json").write_text(sentencepiece_to_tokenizer_json(default_tokenizer_path()))
    return load_tokenizer(directory)


@pytest.fixture(scope="module", params=["sentencepiece", "tokenizers"])
def tok(request: pytest.FixtureRequest, sp_tok: Tokenizer, json_tok: Tokenizer) -> Tokenizer:
    return sp_tok if request.param == "sentencepiece" else json_tok


@pytest.fixture(scope="module")
def mistral() -> MistralTokenizer:
    return MistralTokenizer.v1()


def test_default_tokenizer_is_mixtral(sp_tok: Tokenizer) -> None:
    assert sp_tok.kind == "sentencepiece"
    assert (sp_tok.vocab_size, sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (32000, 1, 2, None)
    assert [sp_tok.id_to_piece(i) for i in (0, 1, 2, 3)] == ["<unk>", "<s>", "</s>", "<0x00>"]


def test_json_backend_has_same_specials(json_tok: Tokenizer) -> None:
    assert json_tok.kind == "tokenizers"
    assert (json_tok.vocab_size, json_tok.bos_id, json_tok.eos_id, json_tok.pad_id) == (32000, 1, 2, None)


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_round_trip(tok: Tokenizer, name: str) -> None:
    text = SAMPLES[name]
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=False, eos=True)) == text


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_encode_matches_sentencepiece_and_mistral_common(
    sp_tok: Tokenizer, mistral: MistralTokenizer, name: str
) -> None:
    text = SAMPLES[name]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(default_tokenizer_path()))
    assert sp_tok.encode(text, bos=False) == sp.encode(text)
    oracle = mistral.instruct_tokenizer.tokenizer
    assert sp_tok.encode(text, bos=True, eos=True) == oracle.encode(text, bos=True, eos=True)


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_json_backend_matches_sentencepiece(sp_tok: Tokenizer, json_tok: Tokenizer, name: str) -> None:
    text = SAMPLES[name]
    ids = sp_tok.encode(text, eos=True)
    assert json_tok.encode(text, eos=True) == ids
    assert json_tok.decode(ids) == sp_tok.decode(ids)


def test_whitespace_runs_convert_exactly(sp_tok: Tokenizer, json_tok: Tokenizer) -> None:
    # Mistral's hand-added whitespace pieces (score -1e9) must merge last in the converted BPE.
    for n in range(1, 40):
        for text in (" " * n, f"a{' ' * n}b", f"\n{' ' * n}x", f"x{' ' * n}"):
            assert json_tok.encode(text) == sp_tok.encode(text), repr(text)


def test_markers_in_text_are_not_control_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<s> </s>", bos=False)
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_decode_skips_control_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("hello there", bos=False)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.eos_id]) == "hello there"
    assert tok.decode([tok.bos_id, tok.eos_id]) == ""


def test_bad_inputs_raise(tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="position 1"):
        tok.decode([1, 32000])
    with pytest.raises(TokenizerError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_stream_decoder_concatenates_to_decode(tok: Tokenizer, name: str) -> None:
    ids = tok.encode(SAMPLES[name], eos=True)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == SAMPLES[name]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(decode_stream(tok, ids)) == SAMPLES[name]


def test_samples_exercise_byte_fallback(sp_tok: Tokenizer) -> None:
    for name in ("emoji", "chinese", "rare"):
        assert any(sp_tok.id_to_piece(i).startswith("<0x") for i in sp_tok.encode(SAMPLES[name])), name


def test_stream_decoder_holds_partial_utf8(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("a ｆ b", bos=False)  # 'ｆ' is three byte-fallback pieces <0xEF><0xBD><0x86>
    pieces = [sp_tok.id_to_piece(i) for i in ids]
    assert pieces[2:5] == ["<0xEF>", "<0xBD>", "<0x86>"]
    decoder = StreamDecoder(sp_tok)
    assert [decoder.push(i) for i in ids] == ["a", " ", "", "", "ｆ", " b"]


def test_stream_decoder_flushes_invalid_bytes(sp_tok: Tokenizer) -> None:
    ids = sp_tok.encode("x", bos=False) + [sp_tok.encode("ｆ", bos=False)[1]]  # a lone lead byte
    decoder = StreamDecoder(sp_tok)
    assert [decoder.push(i) for i in ids] == ["x", ""]
    assert decoder.flush() == "\ufffd" == sp_tok.decode(ids)[1:]


U, A, S = "user", "assistant", "system"
CONVERSATIONS = {
    "single_user": [(U, "What is a mixture of experts?")],
    "multi_turn": [
        (U, "Hi"),
        (A, "Hello! How can I help?"),
        (U, "Explain top-2 routing."),
        (A, "Sure."),
        (U, "More"),
    ],
    "system_user": [(S, "You are terse."), (U, "Why sparse MoE?")],
    "system_multi_turn": [(S, "Be kind."), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"), (U, "q3")],
    "two_systems": [(S, "First rule."), (S, "Second rule."), (U, "go")],
    "empty_system": [(S, ""), (U, "go")],
    "unicode": [(S, "Réponds en 中文 🙂"), (U, "Größe? 👨‍👩‍👧‍👦\n\tcode"), (A, "好的 ✅"), (U, "  spaced  ")],
    "empty_user": [(U, "")],
}


def _oracle(conversation: list[tuple[str, str]], final: str = "error") -> list[int]:
    kinds = {U: UserMessage, A: AssistantMessage, S: SystemMessage}
    messages = [kinds[role](content=content) for role, content in conversation]
    mode = ValidationMode.test
    if final == "prefix":
        messages[-1] = AssistantMessage(content=conversation[-1][1], prefix=True)
    elif final == "complete":
        mode = ValidationMode.finetuning
    mistral = MistralTokenizer.from_file(str(default_tokenizer_path()), mode=mode)
    return mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def _as_dicts(conversation: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in conversation]


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_matches_mistral_common(tok: Tokenizer, name: str) -> None:
    conversation = CONVERSATIONS[name]
    assert encode_chat(tok, _as_dicts(conversation)) == _oracle(conversation)


@pytest.mark.parametrize("final", ["prefix", "complete"])
def test_chat_final_assistant_matches_mistral_common(sp_tok: Tokenizer, final: str) -> None:
    conversation = [(S, "sys"), (U, "Write a haiku."), (A, "Silent experts wait")]
    ids = encode_chat(sp_tok, _as_dicts(conversation), final_assistant=final)  # type: ignore[arg-type]
    assert ids == _oracle(conversation, final)
    assert (ids[-1] == sp_tok.eos_id) == (final == "complete")


def test_chat_final_assistant_is_an_error_by_default(sp_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="message 1: .*ends with an assistant"):
        encode_chat(sp_tok, _as_dicts([(U, "q"), (A, "a")]))


def test_format_chat_text() -> None:
    conversation = _as_dicts([(S, "sys"), (U, "hi"), (A, "yo"), (U, "next")])
    assert format_chat_text(conversation) == "<s>[INST] sys\n\nhi [/INST] yo</s>[INST] next [/INST]"


MALFORMED = {
    "empty": ([], "non-empty list"),
    "not_a_list": ("hello", "non-empty list"),
    "not_a_dict": ([{"role": U, "content": "q"}, "a"], "message 1 is a str"),
    "unknown_role": ([{"role": "tool", "content": "x"}], "message 0 has unknown role 'tool'"),
    "missing_role": ([{"content": "x"}], "message 0 has unknown role None"),
    "non_str_content": ([{"role": U, "content": ["chunk"]}], r"message 0 \(user\): content must be str"),
    "missing_content": ([{"role": U}], r"message 0 \(user\): content must be str"),
    "extra_field": ([{"role": U, "content": "q", "tool_calls": []}], "message 0 has unsupported fields"),
    "starts_with_assistant": (_as_dicts([(A, "a"), (U, "q")]), "message 0: roles alternate, expected 'user'"),
    "two_users": (_as_dicts([(U, "q"), (U, "q2")]), "message 1: roles alternate, expected 'assistant'"),
    "two_assistants": (_as_dicts([(U, "q"), (A, "a"), (A, "b"), (U, "c")]), "message 2: roles alternate"),
    "system_not_first": (_as_dicts([(U, "q"), (S, "s")]), "message 1: a system message must precede"),
    "late_system": (_as_dicts([(S, "s"), (U, "q"), (A, "a"), (S, "t"), (U, "r")]), "message 3: a system"),
    "only_system": (_as_dicts([(S, "s")]), "no user message"),
    "empty_assistant": (_as_dicts([(U, "q"), (A, ""), (U, "r")]), "message 1: assistant content is empty"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_chat_raises(sp_tok: Tokenizer, name: str) -> None:
    messages, match = MALFORMED[name]
    with pytest.raises(TokenizerError, match=match):
        encode_chat(sp_tok, messages)


def test_bad_final_assistant_option(sp_tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="final_assistant"):
        encode_chat(sp_tok, _as_dicts([(U, "q")]), final_assistant="eos")  # type: ignore[arg-type]


def test_load_tokenizer_empty_dir_names_what_it_looked_for(tmp_path) -> None:
    looked_for = r"looked for tokenizer\.model, tokenizer\.json, tokenizer\.model\.v\*"
    with pytest.raises(TokenizerError, match=looked_for):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="neither a tokenizer file nor a directory"):
        load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_mistral_naming_and_file_path(tmp_path, sp_tok: Tokenizer) -> None:
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.model.v1")
    for path in (tmp_path, tmp_path / "tokenizer.model.v1", str(tmp_path)):
        tok = load_tokenizer(path)
        assert tok.kind == "sentencepiece" and tok.encode("Bonjour") == sp_tok.encode("Bonjour")
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.model.v3")
    with pytest.raises(TokenizerError, match="several tokenizers"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_rejects_corrupt_files(tmp_path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")


def test_save_then_load_round_trip(tmp_path, tok: Tokenizer) -> None:
    written = {p.name for p in save_tokenizer(tok, tmp_path / "out")}
    expected = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert written == expected | ({"tokenizer.model"} if tok.kind == "sentencepiece" else set())
    reloaded = load_tokenizer(tmp_path / "out")
    assert reloaded.kind == tok.kind
    for text in SAMPLES.values():
        assert reloaded.encode(text, eos=True) == tok.encode(text, eos=True)


def test_save_tokenizer_loads_in_transformers(tmp_path, sp_tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    save_tokenizer(sp_tok, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert (hf.bos_token_id, hf.eos_token_id) == (sp_tok.bos_id, sp_tok.eos_id)
    for text in SAMPLES.values():
        ids = sp_tok.encode(text)
        # Typed "<s>" stays text with split_special_tokens=True (transformers' default here is False,
        # as in the official Mixtral tokenizer, so that chat templates can emit BOS/EOS as text).
        assert hf.encode(text, split_special_tokens=True) == ids
        assert hf.encode(text, add_special_tokens=False, split_special_tokens=True) == ids[1:]
        assert hf.decode(ids, skip_special_tokens=True) == text
        if "<s>" not in text:
            assert hf.encode(text) == ids
    assert hf.encode("<s>", add_special_tokens=False) == [sp_tok.bos_id]
