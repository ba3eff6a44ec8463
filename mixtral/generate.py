"""Autoregressive generation: chunked prefill, one-token decode steps and the loop over them.

Shaped after gpt-fast's generate.py: `prefill`, `decode_one_token` and `sample` are small functions;
the KV cache is allocated once per request and passed explicitly. Ragged batches are left-padded,
padding marked with position -1 (see model.py).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import GenerationError
from .model import KVCache, Transformer
from .sampling import SamplingParams, sample
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of the two phases (prefill counts all prompt tokens)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens after the first (which prefill produces) per decode second, all rows together."""
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


@torch.no_grad()
def prefill(
    model: Transformer, tokens_BT: torch.Tensor, positions_BT: torch.Tensor, cache: KVCache, chunk_size: int
) -> torch.Tensor:
    """Run the prompt through the model in chunks of at most `chunk_size` tokens (so attention never
    materialises a T×T matrix for a long prompt); returns the last position's logits [B, V]."""
    logits = None
    for start in range(0, tokens_BT.shape[1], chunk_size):
        end = start + chunk_size
        out = model(tokens_BT[:, start:end], cache=cache, positions=positions_BT[:, start:end], keep_logits=1)
        logits = out.logits[:, -1]
    assert logits is not None
    return logits


@torch.no_grad()
def decode_one_token(
    model: Transformer, token_B: torch.Tensor, position_B: torch.Tensor, cache: KVCache
) -> torch.Tensor:
    """One decode step: logits [B, V] for the next position."""
    return model(token_B[:, None], cache=cache, positions=position_B[:, None]).logits[:, -1]


DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_decode_step(model: Transformer, cache: KVCache, compile: bool = False) -> DecodeStep:
    """(token_B, position_B) -> next-token logits [B, V], advancing `cache`.

    compile=True runs `Transformer.step_cached` under torch.compile on the static cache (fixed
    shapes: one graph for every step); if compilation fails the eager step is used, with a warning.
    """
    if not compile:
        return lambda token_B, position_B: decode_one_token(model, token_B, position_B, cache)
    if not cache.static:
        raise ValueError("a compiled decode step needs a static cache (KVCache.allocate(..., static=True))")

    def step(token_B: torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
        out = model.step_cached(token_B[:, None], position_B[:, None], cache.k, cache.v, cache.max_len)
        return out.logits[:, -1]

    compiled = torch.compile(step, dynamic=False, fullgraph=False)
    eager = torch.no_grad()(step)
    state = {"fn": torch.no_grad()(compiled)}

    def run(token_B: torch.Tensor, position_B: torch.Tensor) -> torch.Tensor:
        try:
            logits = state["fn"](token_B, position_B)
        except Exception as e:  # no C++ compiler, an unsupported op...: keep generating eagerly
            if state["fn"] is eager:
                raise
            warnings.warn(f"torch.compile of the decode step failed, running eagerly: {e}", stacklevel=2)
            state["fn"] = eager
            logits = eager(token_B, position_B)
        cache.length += 1
        return logits

    return run


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    positions = torch.full((len(prompts), T), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        positions[b, T - len(p) :] = torch.arange(len(p))
    return tokens.to(device), positions.to(device)


def check_request(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Clear errors for requests the model cannot serve, before any compute."""
    if not prompts:
        raise GenerationError("no prompts given")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    context = model.config.max_seq_len
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > context:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens}, beyond the model context of {context} tokens"
            )


def generate_ids(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    max_new_tokens: int = 128,
    eos_id: int | None = None,
    chunk_size: int = 512,
    stats: GenerationStats | None = None,
    should_stop: Callable[[int, int], bool] | None = None,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows already finished).

    A row finishes on `eos_id` (yielded, then None), after `max_new_tokens`, or when
    `should_stop(row, token)` says so (the caller's stop strings). `stats` is filled in place.
    `compile` captures the decode step with torch.compile (see `make_decode_step`).
    """
    check_request(model, prompts, max_new_tokens)
    params = params if params is not None else SamplingParams()
    stats = stats if stats is not None else GenerationStats()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens, positions = _left_pad(prompts, device)
    B, T = tokens.shape
    cache = KVCache.allocate(model.config, B, T + max_new_tokens, dtype=dtype, device=device, static=compile)
    decode = make_decode_step(model, cache, compile)
    generator = params.generator(device)
    stats.prompt_tokens += sum(len(p) for p in prompts)

    t0 = time.perf_counter()
    next_B = sample(prefill(model, tokens, positions, cache, chunk_size), params, generator)
    stats.prefill_seconds += time.perf_counter() - t0
    position_B = positions[:, -1] + 1
    done = [False] * B
    for step in range(max_new_tokens):
        row_tokens = next_B.tolist()
        out: list[int | None] = [None if d else t for d, t in zip(done, row_tokens, strict=True)]
        for b, t in enumerate(out):
            if t is not None and (t == eos_id or (should_stop is not None and should_stop(b, t))):
                done[b] = True
        if step:
            stats.generated_tokens += sum(t is not None for t in out)
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        t0 = time.perf_counter()
        next_B = sample(decode(next_B, position_B), params, generator)
        position_B = position_B + 1
        stats.decode_seconds += time.perf_counter() - t0


@dataclass
class Generation:
    """One completed request: text (stop string excluded), generated ids, why it ended, timings."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)


class _TextRow:
    """Incremental text of one row: decodes tokens, finds stop strings, holds back a possible stop prefix."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.emitted = 0
        self.ids: list[int] = []
        self.finish_reason = "length"

    def push(self, token: int, eos_id: int | None) -> bool:
        """Add a token; True when the row is finished by EOS or a stop string."""
        self.ids.append(token)
        if token == eos_id:
            self.finish_reason = "eos"
            return True
        self.text += self.decoder.push(token)
        window = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, window)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            return True
        return False

    def take(self, final: bool) -> str:
        """Text that is safe to show now (everything, when final)."""
        if final and self.finish_reason == "length":
            self.text += self.decoder.flush()
        end = len(self.text)
        if not final:
            for s in self.stop:  # hold back a tail that could still grow into a stop string
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        piece, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return piece


def _encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    return [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]


def _text_events(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    rows: list[_TextRow],
    params: SamplingParams,
    max_new_tokens: int,
    chunk_size: int,
    stats: GenerationStats,
    compile: bool = False,
) -> Iterator[list[str]]:
    """Drive `generate_ids`, yielding each row's newly showable text after every step."""
    finished = [False] * len(rows)

    def should_stop(b: int, token: int) -> bool:
        finished[b] = rows[b].push(token, tokenizer.eos_id)
        return finished[b]

    ids = _encode_prompts(tokenizer, prompts)
    for row, prompt_ids in zip(rows, ids, strict=True):  # text continues the prompt: keeps a leading space
        row.decoder = StreamDecoder(tokenizer, context=prompt_ids)
    # EOS is handled by the rows, so that it ends up in `ids` but never in the text.
    steps = generate_ids(model, ids, params, max_new_tokens, None, chunk_size, stats, should_stop, compile)
    for step, _ in enumerate(steps):
        last = step == max_new_tokens - 1
        yield [r.take(final=finished[b] or last) for b, r in enumerate(rows)]


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chunk_size: int = 512,
    compile: bool = False,
) -> Generation | list[Generation]:
    """Generate for one prompt (str → Generation) or a batch (list → list[Generation]).

    A prompt is text (encoded with BOS) or a list of token ids (used as is, e.g. from encode_chat).
    `compile` runs the decode step under torch.compile (see `make_decode_step`).
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    params = SamplingParams(temperature, top_k, top_p, seed)
    stats = GenerationStats()
    rows = [_TextRow(tokenizer, stop) for _ in batch]
    for _ in _text_events(model, tokenizer, batch, rows, params, max_new_tokens, chunk_size, stats, compile):
        pass  # each row keeps its full text (stop string excluded); the pieces are for streaming
    results = [Generation(r.text, r.ids, r.finish_reason, stats) for r in rows]
    return results[0] if single else results


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    chunk_size: int = 512,
    stats: GenerationStats | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """Yield the generated text of one prompt piece by piece as it is produced (never a partial
    UTF-8 character, never text past or inside a stop string). `stats` is filled if given."""
    params = SamplingParams(temperature, top_k, top_p, seed)
    stats = stats if stats is not None else GenerationStats()
    rows = [_TextRow(tokenizer, stop)]
    for pieces in _text_events(
        model, tokenizer, [prompt], rows, params, max_new_tokens, chunk_size, stats, compile
    ):
        if pieces[0]:
            yield pieces[0]
