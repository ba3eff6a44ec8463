"""Autoregressive generation: chunked prefill, one-token decode steps and the loop over them.

Shaped after gpt-fast's generate.py: `prefill`, `decode_one_token` and `sample` are small functions;
the KV cache is allocated once per request and passed explicitly. Ragged batches are left-padded,
padding marked with position -1 (see mixtral.model.transformer). What a request asks for (length,
sampling, stop strings, prefill chunk, compiled decode) is one `GenerationConfig`, which
`generate`, `stream`, `generate_ids` and the CLI all take.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mixtral.errors import GenerationError
from mixtral.inference.sampling import SamplingParams, sample
from mixtral.inference.text import TextRow
from mixtral.model.cache import KVCache
from mixtral.model.transformer import Transformer
from mixtral.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    """What one generation request asks for; validated on construction (GenerationError names the field).

    temperature 0 is greedy; top_k None/0 and top_p 1.0 disable those filters; `seed` makes
    sampling reproducible. `stop` strings end a row and are never part of its text (applied by
    `generate` and `stream`, which see text; `generate_ids` sees only token ids). `chunk_size`
    bounds the prefill chunk; `compile` runs the decode step under torch.compile.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    chunk_size: int = 512
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GenerationError(f"{name} must be a positive integer, got {value!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not all(isinstance(s, str) for s in stop):
            raise GenerationError(f"stop must be strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)  # validates those four

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed; an unknown field is a TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(changes) - known):
            raise TypeError(
                f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)


def _config(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(
            f"config must be a GenerationConfig, got {type(config).__name__}; pass options as keywords"
        )
    config = config if config is not None else GenerationConfig()
    return config.replace(**options) if options else config


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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise GenerationError(f"chunk_size must be a positive integer, got {chunk_size!r}")
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
    shapes: one graph for every step once `apply_kernels` has given the MoE layers the decode kernel,
    as `load_model` does; plain `SortedDispatch` reads its expert counts on the host, which breaks
    the graph there); if compilation fails the eager step is used, with a warning.

    Eager, on a model whose whole decode step runs in C++ (`apply_kernels`; fp32, CPU), the step is
    bound to the model's weights as they are when this is called: change the model (quantize it,
    swap a module), then make a new step.
    """
    model.check_cache(cache)  # the compiled step calls step_cached, which checks nothing
    if not compile:
        # The whole step bound once (`mixtral.kernels.decode.FusedStep.bind`) where the model has one
        # and can take it: the model's weights as they are now, for this request.
        bind = getattr(model.fused_step, "bind", None)
        bound = bind(model, cache) if bind is not None else None
        if bound is not None:
            return bound
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
    config: GenerationConfig | None = None,
    *,
    eos_id: int | None = None,
    stats: GenerationStats | None = None,
    should_stop: Callable[[int, int], bool] | None = None,
    **options: Any,
) -> Iterator[list[int | None]]:
    """Yield, per step, the new token of every row (None for rows already finished).

    `options` override fields of `config` (e.g. max_new_tokens=8). A row finishes on `eos_id`
    (yielded, then None), after `max_new_tokens`, or when `should_stop(row, token)` says so (the
    caller's stop strings: `config.stop` is text and is applied by `generate`/`stream`). `stats` is
    filled in place.
    """
    config = _config(config, options)
    max_new_tokens, compile = config.max_new_tokens, config.compile
    check_request(model, prompts, max_new_tokens)
    params = config.sampling
    stats = stats if stats is not None else GenerationStats()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokens, positions = _left_pad(prompts, device)
    B, T = tokens.shape
    cache = KVCache.allocate(model.config, B, T + max_new_tokens, dtype=dtype, device=device, static=compile)
    decode = make_decode_step(model, cache, compile)
    # A bound C++ step also gives the greedy tokens directly (its argmax while the logits are in cache).
    greedy = getattr(decode, "greedy", None) if params.greedy else None
    generator = params.generator(device)
    stats.prompt_tokens += sum(len(p) for p in prompts)

    t0 = time.perf_counter()
    next_B = sample(prefill(model, tokens, positions, cache, config.chunk_size), params, generator)
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
        if greedy is not None:
            next_B = greedy(next_B, position_B)
        else:
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


def _check_text(i: int, prompt: str) -> None:
    """A GenerationError for a prompt that is not encodable text: a lone surrogate, e.g. from bytes that
    were not UTF-8 (Python keeps them as U+DC80..U+DCFF in argv and stdin), which the tokenizer cannot take."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(
            f"prompt {i} is not valid Unicode text: {prompt[e.start]!r} at index {e.start} is a lone surrogate "
            "(undecodable input bytes?); decode the input with errors='replace' first"
        ) from None


def _encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            _check_text(i, p)
    return [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]


def _check_tokenizer(tokenizer: object) -> None:
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode")):
        raise TypeError(
            f"tokenizer must be a Tokenizer (mixtral.load_tokenizer(path)), got {type(tokenizer).__name__}; "
            "generate_ids works on token ids without one"
        )


def _text_events(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: Sequence[str | Sequence[int]],
    config: GenerationConfig,
    stats: GenerationStats,
) -> tuple[list[TextRow], Iterator[list[str]]]:
    """The text rows of a request and an iterator driving `generate_ids` that yields each row's newly
    showable text after every step."""
    _check_tokenizer(tokenizer)
    ids = _encode_prompts(tokenizer, prompts)
    rows = [TextRow(tokenizer, config.stop, context=prompt_ids) for prompt_ids in ids]
    finished = [False] * len(rows)

    def should_stop(b: int, token: int) -> bool:
        finished[b] = rows[b].push(token, tokenizer.eos_id)
        return finished[b]

    def events() -> Iterator[list[str]]:
        # EOS is handled by the rows, so that it ends up in `ids` but never in the text.
        steps = generate_ids(model, ids, config, stats=stats, should_stop=should_stop)
        for step, _ in enumerate(steps):
            last = step == config.max_new_tokens - 1
            yield [r.take(final=finished[b] or last) for b, r in enumerate(rows)]

    return rows, events()


def generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompts: str | Sequence[str | Sequence[int]],
    config: GenerationConfig | None = None,
    **options: Any,
) -> Generation | list[Generation]:
    """Generate for one prompt (str → Generation) or a batch (list → list[Generation]).

    A prompt is text (encoded with BOS) or a list of token ids (used as is, e.g. from encode_chat).
    `options` override fields of `config` (`generate(model, tok, "Hi", max_new_tokens=8, seed=0)`).
    """
    single = isinstance(prompts, str)
    batch = [prompts] if single else list(prompts)
    stats = GenerationStats()
    rows, events = _text_events(model, tokenizer, batch, _config(config, options), stats)
    for _ in events:
        pass  # each row keeps its full text (stop string excluded); the pieces are for streaming
    results = [Generation(r.text, r.ids, r.finish_reason, stats) for r in rows]
    return results[0] if single else results


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    config: GenerationConfig | None = None,
    *,
    stats: GenerationStats | None = None,
    **options: Any,
) -> Iterator[str]:
    """Yield the generated text of one prompt piece by piece as it is produced (never a partial
    UTF-8 character, never text past or inside a stop string). `stats` is filled if given."""
    stats = stats if stats is not None else GenerationStats()
    _, events = _text_events(model, tokenizer, [prompt], _config(config, options), stats)
    for pieces in events:
        if pieces[0]:
            yield pieces[0]
