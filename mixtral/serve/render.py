"""Engine outputs as OpenAI response bodies and stream chunks (completions and chat).

`ChoiceState` accumulates one choice's outputs; the functions build the JSON OpenAI clients parse:
`text_completion` objects with legacy `logprobs` ({tokens, token_logprobs, top_logprobs,
text_offset}) and `chat.completion` objects with `logprobs.content`. Finish reasons map as OpenAI
names them: EOS and stop strings are "stop", max_tokens is "length".
"""

from __future__ import annotations

from typing import Any

from mixtral.inference.engine import RequestOutput, TokenLogprob
from mixtral.serve.protocol import Job
from mixtral.text import Tokenizer

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class ChoiceState:
    """One choice: its text, tokens and logprobs so far, and how it ended."""

    def __init__(self, job: Job, tok: Tokenizer) -> None:
        self.job, self.tok = job, tok
        self.text = ""
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.echoed = False

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.completion_tokens = out.completion_tokens
        self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finish_reason:
            self.finish_reason = FINISH[out.finish_reason]

    def prompt_text(self) -> str:
        return self.tok.decode(self.job.prompt)

    def token_text(self, token: int) -> str:
        """A token as OpenAI shows it: its text, or the byte piece (<0xE2>) SentencePiece falls back to."""
        piece = self.tok.id_to_piece(token)
        return piece if piece.startswith("<0x") and piece.endswith(">") else piece.replace("▁", " ")


def _legacy_logprobs(
    state: ChoiceState, entries: list[TokenLogprob | None], tokens: list[int], offset: int
) -> dict:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries, strict=True):
        text = state.token_text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(
            None if entry is None else {state.token_text(t): lp for t, lp in entry.top}
        )
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def _completion_choice(state: ChoiceState, text: str, logprobs: list[TokenLogprob], with_prompt: bool,
                       finish_reason: str | None) -> dict:  # fmt: skip
    choice: dict[str, Any] = {"index": state.job.index, "text": text, "logprobs": None,
                              "finish_reason": finish_reason}  # fmt: skip
    if state.job.logprobs is not None:
        entries: list[TokenLogprob | None] = list(logprobs)
        tokens = [e.token for e in logprobs]
        if with_prompt:
            entries = [*(state.prompt_logprobs or [None] * len(state.job.prompt)), *entries]
            tokens = [*state.job.prompt, *tokens]
        choice["logprobs"] = _legacy_logprobs(state, entries, tokens, 0)
    return choice


def completion_response(meta: dict, states: list[ChoiceState], prompt_tokens: int) -> dict:
    choices = [
        _completion_choice(
            s, (s.prompt_text() if s.job.echo else "") + s.text, s.logprobs, s.job.echo, s.finish_reason
        )
        for s in states
    ]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(states, prompt_tokens)}


def completion_chunk(meta: dict, state: ChoiceState, out: RequestOutput | None, first: bool = False) -> dict:
    """The chunk of one output; an echoing choice's first chunk starts with the prompt."""
    echo = state.job.echo and not state.echoed
    state.echoed = True
    text = (state.prompt_text() if echo else "") + (out.text if out else "")
    logprobs = out.logprobs if out else []
    finish = FINISH[out.finish_reason] if out and out.finish_reason else None
    return {
        **meta,
        "object": "text_completion",
        "choices": [_completion_choice(state, text, logprobs, echo, finish)],
    }


def _chat_logprobs(state: ChoiceState, entries: list[TokenLogprob]) -> dict | None:
    if state.job.logprobs is None:
        return None

    def one(token: int, logprob: float) -> dict:
        text = state.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content}


def chat_response(meta: dict, states: list[ChoiceState], prompt_tokens: int) -> dict:
    choices = [
        {"index": s.job.index, "message": {"role": "assistant", "content": s.text},
         "logprobs": _chat_logprobs(s, s.logprobs), "finish_reason": s.finish_reason}
        for s in states
    ]  # fmt: skip
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(states, prompt_tokens)}


def chat_chunk(meta: dict, state: ChoiceState, out: RequestOutput | None, first: bool = False) -> dict:
    """The first chunk of a choice carries the role (and nothing else); later ones content."""
    if first:
        choice = {"index": state.job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}  # fmt: skip
    else:
        assert out is not None
        choice = {"index": state.job.index, "delta": {"content": out.text} if out.text else {},
                  "logprobs": _chat_logprobs(state, out.logprobs),
                  "finish_reason": FINISH[out.finish_reason] if out.finish_reason else None}  # fmt: skip
    return {**meta, "object": "chat.completion.chunk", "choices": [choice]}


def usage(states: list[ChoiceState], prompt_tokens: int) -> dict:
    completion = sum(s.completion_tokens for s in states)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }
