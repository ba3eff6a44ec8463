"""Saved checkpoints carry the tokenizer and the Mixtral-Instruct chat template, and transformers'
apply_chat_template on them gives mistral-common's ids."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_config
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mixtral.checkpoint import convert, load_model, save_model
from mixtral.model import Transformer
from mixtral.text import format_chat_text, load_tokenizer
from mixtral.text.chat_template import CHAT_TEMPLATE
from mixtral.text.tokenizer import default_tokenizer_path

transformers = pytest.importorskip("transformers")

U, A, S = "user", "assistant", "system"
CONVERSATIONS = {
    "multi_turn": [(U, "Hi"), (A, "Hello! How can I help?"), (U, "Explain top-2 routing."), (A, "Sure."), (U, "More")],
    "system_multi_turn": [(S, "Be kind."), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"), (U, "q3")],
    "two_systems": [(S, "First rule."), (S, ""), (S, "Second rule."), (U, "go")],
    "unicode": [(S, "Réponds en 中文 🙂"), (U, "Größe? 👨‍👩‍👧‍👦\n\tcode"), (A, "好的 ✅"), (U, "  spaced  ")],
}  # fmt: skip


def mistral_ids(conversation) -> list[int]:
    kinds = {U: UserMessage, A: AssistantMessage, S: SystemMessage}
    mistral = MistralTokenizer.from_file(str(default_tokenizer_path()), mode=ValidationMode.test)
    request = ChatCompletionRequest(messages=[kinds[r](content=c) for r, c in conversation])
    return mistral.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A model saved with the bundled tokenizer, then loaded and saved again with no tokenizer given."""
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    save_model(Transformer(tiny_config(vocab_size=32000)), root / "first", tokenizer_src=load_tokenizer(None))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tokenizer is known: no "without a tokenizer" warning
        save_model(load_model(root / "first"), root / "second")
    return root


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("which", ["first", "second"])
def test_apply_chat_template_gives_mistral_common_ids(saved, which, name):
    conversation = CONVERSATIONS[name]
    messages = [{"role": r, "content": c} for r, c in conversation]
    hf = transformers.AutoTokenizer.from_pretrained(str(saved / which), local_files_only=True)
    assert hf.apply_chat_template(messages, tokenize=False) == format_chat_text(messages)
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids == mistral_ids(conversation)
    assert load_tokenizer(saved / which).vocab_size == 32000  # and our loader opens it


def test_the_template_refuses_what_the_format_cannot_express(saved):
    hf = transformers.AutoTokenizer.from_pretrained(str(saved / "first"), local_files_only=True)
    with pytest.raises(Exception, match="alternate"):
        hf.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )
    with pytest.raises(Exception, match="precede"):
        hf.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], tokenize=False
        )


def test_a_mistral_directory_converts_to_a_complete_hf_tokenizer(tmp_path):
    """Mistral's consolidated layout ships only tokenizer.model.v1; the HF output gets the rest."""
    src = tmp_path / "mistral"
    save_model(
        Transformer(tiny_config(vocab_size=32000)),
        src,
        format="mistral",
        tokenizer_src=default_tokenizer_path(),
    )
    (src / "tokenizer.model.v1").write_bytes(default_tokenizer_path().read_bytes())
    for extra in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / extra).unlink(missing_ok=True)
    convert(src, tmp_path / "hf", to="hf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    messages = [{"role": r, "content": c} for r, c in CONVERSATIONS["system_multi_turn"]]
    assert hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"] == mistral_ids(
        CONVERSATIONS["system_multi_turn"]
    )


def test_a_model_with_no_known_tokenizer_warns(tmp_path):
    with pytest.warns(UserWarning, match="without a tokenizer"):
        save_model(Transformer(tiny_config()), tmp_path / "m")


def test_gguf_carries_the_template(tmp_path, saved):
    gguf = pytest.importorskip("gguf")
    from mixtral.checkpoint.gguf_export import export_gguf

    export_gguf(saved / "first", tmp_path / "m.gguf")
    field = gguf.GGUFReader(tmp_path / "m.gguf").get_field("tokenizer.chat_template")
    assert field is not None and bytes(field.parts[field.data[0]]).decode() == CHAT_TEMPLATE
