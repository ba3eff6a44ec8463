"""The Mixtral-Instruct (Mistral v1) chat prompt: validated messages to token ids.

Reference: mistral-common's `InstructTokenizerV1` (the oracle the tests compare with, token for token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from mixtral.errors import TokenizerError
from mixtral.text.tokenizer import Tokenizer

FinalAssistant = Literal["error", "prefix", "complete"]


def encode_chat(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]], *, final_assistant: FinalAssistant = "error"
) -> list[int]:
    """Token ids of a conversation in the Mixtral-Instruct (Mistral v1) format.

    `<s>[INST] user [/INST] answer</s>[INST] next [/INST]`, each text segment encoded on its own
    (so each gets SentencePiece's leading space) and `[INST]` being plain text in v1. As in
    mistral-common v1: leading system messages are joined with "\\n\\n" (empty ones dropped) and
    prepended with "\\n\\n" to the FIRST user message; content is not stripped. A final assistant
    message is an error by default (mistral-common's serving/test mode), a prefix to continue
    without EOS with "prefix", or a finished turn with EOS with "complete" (its finetuning mode).
    Stricter than mistral-common: roles must alternate (it merges repeated roles), a system
    message after the first user message and a conversation without a user message are errors.
    """
    return encode_chat_with_mask(tok, messages, final_assistant=final_assistant)[0]


def encode_chat_with_mask(
    tok: Tokenizer, messages: Sequence[Mapping[str, Any]], *, final_assistant: FinalAssistant = "complete"
) -> tuple[list[int], list[bool]]:
    """Same ids as `encode_chat(tok, messages, final_assistant=...)`, plus a mask that is True on the
    tokens an assistant turn produces: the assistant text tokens and the EOS that closes the turn
    (not the BOS, not the `[INST] ... [/INST]` user segments). The supervised fine-tuning target.
    """
    ids: list[int] = []
    mask: list[bool] = []
    previous = "bos"
    for kind, text in _chat_segments(messages, final_assistant):
        if kind == "text":
            piece = tok.encode(text, bos=False)
            # A user segment follows BOS or EOS; an assistant answer follows its user segment.
            produced = previous == "text"
        else:
            piece = [tok.bos_id if kind == "bos" else tok.eos_id]
            produced = kind == "eos"  # EOS only ever closes an assistant turn
        ids += piece
        mask += [produced] * len(piece)
        previous = kind
    return ids, mask


def format_chat_text(
    messages: Sequence[Mapping[str, Any]], *, final_assistant: FinalAssistant = "error"
) -> str:
    """The prompt `encode_chat` encodes, as display text with `<s>`/`</s>` spelled out."""
    out, previous = "", "bos"
    for kind, text in _chat_segments(messages, final_assistant):
        if kind == "text":
            # The space SentencePiece prepends to a segment shows only after other text.
            out += (" " if previous == "text" else "") + text
        else:
            out += "<s>" if kind == "bos" else "</s>"
        previous = kind
    return out


def _chat_segments(messages: Sequence[Mapping[str, Any]], final_assistant: str) -> list[tuple[str, str]]:
    """("bos" | "eos" | "text", text) pieces of the v1 prompt, each text piece encoded separately."""
    system, turns = validate_chat(messages, final_assistant)
    segments = [("bos", "")]
    for position, (role, content) in enumerate(turns):
        if role == "user":
            if position == 0 and system:
                content = f"{system}\n\n{content}"
            segments.append(("text", f"[INST] {content} [/INST]"))
        else:
            segments.append(("text", content))
            if not (position == len(turns) - 1 and final_assistant == "prefix"):
                segments.append(("eos", ""))
    return segments


def validate_chat(messages: Sequence[Mapping[str, Any]], final_assistant: str) -> tuple[str, list]:
    """(system prompt, [(role, content)] alternating from user) or TokenizerError naming the message."""
    if final_assistant not in ("error", "prefix", "complete"):
        raise TokenizerError(f"final_assistant must be error, prefix or complete, not {final_assistant!r}")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError("a conversation must be a non-empty list of messages")
    systems: list[str] = []
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        role, content = _check_message(index, message)
        if role == "system":
            if turns:
                raise TokenizerError(f"message {index}: a system message must precede all user messages")
            systems.append(content)
            continue
        expected = "assistant" if turns and turns[-1][0] == "user" else "user"
        if role != expected:
            raise TokenizerError(f"message {index}: roles alternate, expected {expected!r}, got {role!r}")
        if role == "assistant" and not content:
            raise TokenizerError(f"message {index}: assistant content is empty")
        turns.append((role, content))
    if not turns:
        raise TokenizerError("the conversation has no user message")
    if turns[-1][0] == "assistant" and final_assistant == "error":
        raise TokenizerError(
            f"message {len(messages) - 1}: the conversation ends with an assistant message; pass "
            "final_assistant='prefix' to continue it or 'complete' to end it with EOS (training)"
        )
    return "\n\n".join(s for s in systems if s), turns


def _check_message(index: int, message: Any) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise TokenizerError(f"message {index} is a {type(message).__name__}, not a dict with role, content")
    extra = sorted(set(message) - {"role", "content"})
    if extra:
        raise TokenizerError(f"message {index} has unsupported fields {extra}; v1 has role and content only")
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant"):
        raise TokenizerError(f"message {index} has unknown role {role!r}; expected system, user or assistant")
    if not isinstance(content, str):
        raise TokenizerError(f"message {index} ({role}): content must be str, got {type(content).__name__}")
    return role, content
