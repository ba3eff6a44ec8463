"""The serving engine: continuous batching of requests over fixed KV-cache rows, apart from any HTTP.

`Engine.add_request` queues a request, `Engine.step` runs one iteration and returns what each
request produced in it, `Engine.abort` drops one; nothing here knows about HTTP (mixtral.serve maps
OpenAI requests onto it). One step:
1. admission: waiting requests take free cache rows, first come first served;
2. prefill: the prompts of admitted requests advance by chunks, at most `step_tokens` prompt
   tokens per step over all of them, so a long prompt never stalls the requests already decoding;
   a request whose prompt completes samples its first token;
3. decode: every request past its prompt advances by one token, in one batched forward.
Requests join and leave the running batch between steps.

KV memory is fixed slots: one `KVCache` of `max_batch` rows × `max_model_len` positions,
allocated once; a running request owns one row, freed when it finishes or is aborted. A request
whose prompt plus `max_new_tokens` exceeds `max_model_len` can never fit and is refused when
added (`ContextLengthError`); a full queue refuses new requests (`QueueFullError`). (A paged cache
would admit more requests of mixed lengths; its view would replace `LayerCache`'s rows.)

Sampling is per request (its own seeded generator), so a request's tokens do not depend on which
others share its steps; with greedy decoding in fp32 they equal generating it alone up to the
rounding of batched matmuls (docs/serving.md: batch invariance).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from mixtral.errors import GenerationError
from mixtral.inference.generate import GenerationConfig
from mixtral.inference.sampling import sample
from mixtral.inference.text import TextRow
from mixtral.model.cache import KVCache
from mixtral.model.transformer import Transformer
from mixtral.text.tokenizer import Tokenizer

MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's completions API allows


class ContextLengthError(GenerationError):
    """A request can never fit: prompt plus max_new_tokens exceeds the engine's max_model_len."""


class QueueFullError(GenerationError):
    """The waiting queue is full; retry later."""


@dataclass(frozen=True)
class TokenLogprob:
    """A token, its log-probability, and the most likely alternatives at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one request produced in one step. `text` is new text that is safe to show (no partial
    UTF-8 character, nothing of a stop string); `finish_reason` is set on the request's last output:
    "eos", "stop" (a stop string) or "length" (max_new_tokens)."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt is done
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Request:
    id: str
    prompt: list[int]
    config: GenerationConfig
    max_new_tokens: int
    logprobs: int | None
    want_prompt_logprobs: bool
    text: TextRow
    generator: torch.Generator | None
    row: int | None = None
    done_prompt: int = 0  # prompt tokens written to the cache
    last_token: int | None = None  # the token the next decode step feeds
    generated: int = 0
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    carry_logits: torch.Tensor | None = None  # last prompt logits of the previous chunk (for echo)

    @property
    def position(self) -> int:
        """The next position to write: prompt tokens plus the generated tokens already fed back."""
        return self.done_prompt + max(self.generated - 1, 0)


class Engine:
    """Continuous batching over a model our loader reads (see the module docstring)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        max_batch: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 64,
        step_tokens: int = 512,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("step_tokens", step_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        context = model.config.max_seq_len
        max_model_len = context if max_model_len is None else max_model_len
        if not 1 <= max_model_len <= context:
            raise ValueError(
                f"max_model_len must lie in [1, {context}] (the model context), got {max_model_len}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_model_len, self.max_queue, self.step_tokens = (
            max_batch, max_model_len, max_queue, step_tokens,
        )  # fmt: skip
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache.allocate(
            model.config, max_batch, max_model_len, dtype=param.dtype, device=param.device
        )
        self.waiting: OrderedDict[str, _Request] = OrderedDict()
        self.running: dict[str, _Request] = {}  # insertion order = admission order
        self.free_rows = list(range(max_batch))

    # ---- requests -----------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        config: GenerationConfig | None = None,
        *,
        max_new_tokens: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
    ) -> None:
        """Queue a request. `max_new_tokens` (default config.max_new_tokens) may be 0 with
        `prompt_logprobs` (scoring only). `logprobs` 0..5: log-probabilities of the sampled tokens
        with that many alternatives. Raises GenerationError naming what is wrong (never accepts a
        request that cannot fit), QueueFullError when the queue is full."""
        config = config if config is not None else GenerationConfig()
        n = config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if request_id in self.waiting or request_id in self.running:
            raise GenerationError(f"request id {request_id!r} is already in the engine")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or (n == 0 and not prompt_logprobs):
            raise GenerationError(
                f"max_new_tokens must be a positive integer (0 only to score the prompt), got {n!r}"
            )
        if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_LOGPROBS):
            raise GenerationError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {logprobs!r}")
        vocab = self.model.config.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise GenerationError(f"the prompt must be a non-empty list of token ids in [0, {vocab})")
        if len(prompt) + n > self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {len(prompt)} tokens and max_new_tokens is {n}: {len(prompt) + n} tokens, "
                f"beyond this engine's maximum of {self.max_model_len} (max_model_len)"
            )
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the queue holds {len(self.waiting)} requests, its maximum; retry later")
        seed = config.seed
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        text = TextRow(self.tokenizer, config.stop, context=prompt)
        self.waiting[request_id] = _Request(request_id, list(prompt), config, n, logprobs, prompt_logprobs, text,
                                            generator)  # fmt: skip

    def abort(self, request_id: str) -> bool:
        """Drop a request (waiting or running) and free its cache row now; False if unknown."""
        if self.waiting.pop(request_id, None) is not None:
            return True
        request = self.running.pop(request_id, None)
        if request is None:
            return False
        self.free_rows.append(request.row)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def stats(self) -> dict[str, int]:
        """running and waiting requests; KV positions in use and the capacity."""
        used = sum(r.position for r in self.running.values())
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_used": used,
                "kv_capacity": self.max_batch * self.max_model_len}  # fmt: skip

    # ---- one iteration --------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Admit, prefill one budget of prompt tokens, decode every running request once."""
        while self.waiting and self.free_rows:
            request = self.waiting.popitem(last=False)[1]
            request.row = self.free_rows.pop(0)
            self.running[request.id] = request
        outputs: dict[str, RequestOutput] = {}
        decoding = [r for r in self.running.values() if r.done_prompt == len(r.prompt) and r.generated]
        self._prefill(outputs)
        self._decode(decoding, outputs)
        return list(outputs.values())

    def _output(self, outputs: dict[str, RequestOutput], request: _Request) -> RequestOutput:
        if request.id not in outputs:
            outputs[request.id] = RequestOutput(request.id, prompt_tokens=len(request.prompt))
        return outputs[request.id]

    def _prefill(self, outputs: dict[str, RequestOutput]) -> None:
        budget, batch = self.step_tokens, []
        for request in self.running.values():
            left = len(request.prompt) - request.done_prompt
            if left and budget:
                n = min(left, budget)
                batch.append((request, request.done_prompt, n))
                budget -= n
        if not batch:
            return
        # Left-padded (position -1), so every row's last prompt token is the batch's last column.
        T = max(n for _, _, n in batch)
        tokens = torch.zeros(len(batch), T, dtype=torch.long)
        positions = torch.full((len(batch), T), -1, dtype=torch.long)
        for b, (request, start, n) in enumerate(batch):
            tokens[b, T - n :] = torch.tensor(request.prompt[start : start + n])
            positions[b, T - n :] = torch.arange(start, start + n)
        keep_all = any(r.want_prompt_logprobs for r, _, _ in batch)
        logits = self._forward(tokens, positions, [r.row for r, _, _ in batch], keep_all)
        for b, (request, start, n) in enumerate(batch):
            request.done_prompt += n
            chunk = logits[b, -n:].float() if keep_all else logits[b].float()
            if request.want_prompt_logprobs:
                self._score_prompt(request, start, chunk)
            if request.done_prompt < len(request.prompt):
                continue
            out = self._output(outputs, request)
            if request.want_prompt_logprobs:
                out.prompt_logprobs = request.prompt_logprobs
            if request.max_new_tokens == 0:
                self._finish(request, out, "length")
            else:
                self._accept(request, chunk[-1], out)

    def _score_prompt(self, request: _Request, start: int, chunk_TV: torch.Tensor) -> None:
        """log p(prompt[t] | prompt[:t]) for the chunk's tokens prompt[start:start+n]; the first prompt
        token has none. chunk_TV[i] predicts prompt[start+i+1]; the previous chunk's last row predicts
        prompt[start]."""
        n_top = request.logprobs or 0
        if start == 0:
            request.prompt_logprobs.append(None)
        else:
            request.prompt_logprobs.append(self._logprob(request.carry_logits, request.prompt[start], n_top))
        for i in range(len(chunk_TV) - 1):
            request.prompt_logprobs.append(self._logprob(chunk_TV[i], request.prompt[start + 1 + i], n_top))
        request.carry_logits = chunk_TV[-1]

    def _decode(self, decoding: list[_Request], outputs: dict[str, RequestOutput]) -> None:
        decoding = [r for r in decoding if r.id in self.running]  # not finished by its prefill this step
        if not decoding:
            return
        tokens = torch.tensor([[r.last_token] for r in decoding])
        positions = torch.tensor([[r.position] for r in decoding])
        logits = self._forward(tokens, positions, [r.row for r in decoding], keep_all=False)
        for b, request in enumerate(decoding):
            self._accept(request, logits[b, -1].float(), self._output(outputs, request))

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, rows: list[int], keep_all: bool
    ) -> torch.Tensor:
        attend = int(positions.max()) + 1
        out = self.model.step_cached(tokens.to(self.device), positions.to(self.device), self.cache.k, self.cache.v,
                                     attend, None if keep_all else 1, torch.tensor(rows, device=self.device))  # fmt: skip
        return out.logits

    def _accept(self, request: _Request, logits_V: torch.Tensor, out: RequestOutput) -> None:
        """Sample the next token from `logits_V`, account for it, and finish the request if it ends."""
        token = int(sample(logits_V[None], request.config.sampling, request.generator)[0])
        request.generated += 1
        request.last_token = token
        out.token_ids.append(token)
        out.completion_tokens = request.generated
        if request.logprobs is not None:
            out.logprobs.append(self._logprob(logits_V, token, request.logprobs))
        ended = request.text.push(token, self.tokenizer.eos_id)
        if ended:
            self._finish(request, out, request.text.finish_reason)
        elif request.generated >= request.max_new_tokens:  # add_request made this fit max_model_len
            self._finish(request, out, "length")
        else:
            out.text += request.text.take(final=False)

    def _finish(self, request: _Request, out: RequestOutput, reason: str) -> None:
        request.text.finish_reason = reason
        out.text += request.text.take(final=True)
        out.finish_reason = reason
        out.completion_tokens = request.generated
        self.running.pop(request.id, None)
        self.free_rows.append(request.row)

    @staticmethod
    def _logprob(logits_V: torch.Tensor, token: int, n_top: int) -> TokenLogprob:
        lp = torch.log_softmax(logits_V.float(), dim=-1)
        top = ()
        if n_top:
            values, ids = torch.topk(lp, n_top)
            top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))
        value = float(lp[token])
        return TokenLogprob(token, value if math.isfinite(value) else -1e30, top)
