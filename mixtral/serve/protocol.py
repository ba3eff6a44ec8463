"""The OpenAI completions and chat-completions requests, validated and mapped onto engine requests.

Pydantic models accept what OpenAI's API accepts (and `top_k`, an extension vLLM also takes);
`ApiError` carries OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` with the
HTTP status. `completion_jobs` / `chat_jobs` turn a request into `Job`s, one per (prompt, choice),
each a prompt of token ids with a `GenerationConfig` and the engine's scoring options. Nothing here
touches tensors; nothing here knows how the engine is driven.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mixtral.errors import MixtralError
from mixtral.inference import GenerationConfig
from mixtral.inference.engine import MAX_LOGPROBS
from mixtral.text import Tokenizer, encode_chat

MAX_N = 8  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI allows


class ApiError(Exception):
    """An OpenAI-shaped error: HTTP status, message, type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as OpenAI-compatible servers do

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


@dataclass(frozen=True)
class Job:
    """One choice of one prompt: what the engine runs."""

    index: int  # the choice's index in the response
    prompt: list[int]
    config: GenerationConfig
    max_new_tokens: int
    logprobs: int | None  # alternatives per sampled token, None for no logprobs
    echo: bool  # completions: prompt text (and its logprobs) before the answer


def _check_common(r: _Sampling) -> None:
    if r.stream_options is not None and not r.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(r, name):
            raise ApiError(400, f"{name} is not supported (only 0)", name)
    stops = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    if len(stops) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop strings must not be empty", "stop")


def _config(r: _Sampling, max_new_tokens: int, choice: int) -> GenerationConfig:
    stops = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    seed = None if r.seed is None else (r.seed + choice) % 2**63  # n choices with one seed differ
    return GenerationConfig(max_new_tokens=max(max_new_tokens, 1), temperature=r.temperature, top_k=r.top_k,
                            top_p=r.top_p, seed=seed, stop=stops)  # fmt: skip


def _prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tok: Tokenizer, vocab: int
) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]  # one prompt of token ids
    if not prompt:
        raise ApiError(400, "prompt must not be empty", "prompt")
    out = []
    for p in prompt:
        ids = _encode(tok, p, "prompt") if isinstance(p, str) else list(p)
        if not ids or (isinstance(p, str) and not p):
            raise ApiError(400, "prompt must not be empty", "prompt")
        if any(t < 0 or t >= vocab for t in ids):
            raise ApiError(400, f"token ids in prompt must lie in [0, {vocab})", "prompt")
        out.append(ids)
    return out


def _encode(tok: Tokenizer, text: str, param: str) -> list[int]:
    try:
        return tok.encode(text, bos=True)
    except MixtralError as e:
        raise ApiError(400, str(e), param) from None


def _check_fits(prompt: list[int], max_tokens: int, max_model_len: int, param: str) -> None:
    if len(prompt) + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"this model's maximum context length is {max_model_len} tokens; the prompt has {len(prompt)} "
            f"tokens and max_tokens asks for {max_tokens} more ({len(prompt) + max_tokens} in all)",
            param,
            "context_length_exceeded",
        )


def completion_jobs(
    r: CompletionRequest, tok: Tokenizer, vocab: int, max_model_len: int
) -> tuple[list[list[int]], list[Job]]:
    """(the prompts as ids, one Job per prompt and choice, in response order)."""
    _check_common(r)
    if r.suffix:
        raise ApiError(400, "suffix is not supported", "suffix")
    if r.best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported (only 1)", "best_of")
    max_tokens = 16 if r.max_tokens is None else r.max_tokens
    if max_tokens == 0 and not (r.echo and r.logprobs is not None):
        raise ApiError(
            400, "max_tokens=0 is only allowed with echo and logprobs (scoring a prompt)", "max_tokens"
        )
    prompts = _prompts(r.prompt, tok, vocab)
    for ids in prompts:
        _check_fits(ids, max_tokens, max_model_len, "max_tokens" if len(ids) < max_model_len else "prompt")
    jobs = [
        Job(p * r.n + c, ids, _config(r, max_tokens, c), max_tokens, r.logprobs, r.echo)
        for p, ids in enumerate(prompts)
        for c in range(r.n)
    ]
    return prompts, jobs


def chat_jobs(r: ChatRequest, tok: Tokenizer, max_model_len: int) -> tuple[list[int], list[Job]]:
    """(the rendered Mixtral-Instruct prompt, one Job per choice). Without max_completion_tokens or
    max_tokens, an answer may use the rest of the context."""
    _check_common(r)
    messages = []
    for i, m in enumerate(r.messages):
        content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
        if m.role != "system" and not content:
            raise ApiError(400, f"messages.[{i}].content must not be empty", f"messages.[{i}].content")
        messages.append({"role": m.role, "content": content})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user message", "messages")
    try:
        prompt = encode_chat(tok, messages)
    except MixtralError as e:
        raise ApiError(400, str(e), "messages") from None
    max_tokens = r.max_completion_tokens or r.max_tokens or max(max_model_len - len(prompt), 1)
    param = (
        "max_completion_tokens" if r.max_completion_tokens else "max_tokens" if r.max_tokens else "messages"
    )
    _check_fits(prompt, max_tokens, max_model_len, param)
    if r.top_logprobs is not None and not r.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    logprobs = (r.top_logprobs or 0) if r.logprobs else None
    return prompt, [
        Job(c, prompt, _config(r, max_tokens, c), max_tokens, logprobs, False) for c in range(r.n)
    ]
