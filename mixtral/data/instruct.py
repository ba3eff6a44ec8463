"""Reads, tokenizes and batches chat data for supervised fine-tuning (SFT) and preference tuning (DPO).

File formats (JSON lines, one record per line, blank lines skipped, `.gz`/`.xz`/`.bz2` decompressed;
fields other than those named here are ignored), the shapes trl uses:

- SFT: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`, rendered
  in the Mixtral-Instruct (Mistral v1) format with every assistant turn closed by EOS. Roles
  alternate from user (system messages only first), contents are non-empty strings, and at least
  one assistant message is needed. The loss is on the assistant tokens and their EOS only.
- Preferences: `{"prompt": ..., "chosen": ..., "rejected": ...}`, each a string or a list of
  messages. A string prompt is one user message; a string chosen/rejected is one assistant
  message. The prompt ends with a user message; chosen and rejected start and end with an
  assistant message. trl's implicit-prompt form (no "prompt", shared prefix) is not supported.

Every malformed record raises `DataError` naming the file and the 1-based line.

Pairs whose chosen and rejected responses are the same tokens teach DPO nothing (its loss is log 2
with no gradient, whatever the model): `drop_identical_pairs` removes and counts them; the runs in
`mixtral.train.instruct_run` call it and report the count.

Over-length rule (`max_len` counts every token, BOS included):
- SFT: a conversation longer than `max_len` is truncated on the right to `max_len` tokens; if no
  assistant token is left as a target, it is dropped.
- Preferences: a pair is dropped when `len(prompt) + max(len(chosen), len(rejected)) > max_len`
  (cutting a response would compare unfinished answers; cutting the prompt would change the question).

Batches: `SFTStream` and `PreferenceStream` implement the training loop's `DataStream` protocol.
Examples follow a permutation drawn from (seed, epoch), reshuffled every epoch, endlessly;
`state_dict()` is a few integers and `load_state_dict` resumes exactly; `upcoming_indices(n)` tells
which examples the next n draws will be without drawing them. `iter_batches` walks the examples
once, in order (evaluation), or only the given indices. Rows are right-padded with token 0,
position -1 and no loss; positions count 0..n-1 on real tokens (one segment per row, see
`mixtral.model`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from mixtral.data.corpus import iter_jsonl
from mixtral.errors import DataError, TokenizerError
from mixtral.text.chat import encode_chat, encode_chat_with_mask, validate_chat
from mixtral.text.tokenizer import Tokenizer

Messages = list[dict[str, str]]


# ------------------------------------------------------------------ reading


def _check_conversation(messages: Any, where: str, final: str = "complete") -> list[tuple[str, str]]:
    """The (role, content) turns of a valid conversation with non-empty contents, or DataError."""
    if not isinstance(messages, list):
        raise DataError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    try:
        _, turns = validate_chat(messages, final)
    except TokenizerError as e:
        raise DataError(f"{where}: {e}") from e
    for index, message in enumerate(messages):
        if message["role"] != "system" and not message["content"].strip():
            raise DataError(f"{where}: message {index} ({message['role']}): content is empty")
    return turns


def check_sft_record(record: Mapping[str, Any], where: str = "record") -> Messages:
    """The messages of one SFT record `{"messages": [...]}`, validated (see the module docstring)."""
    if "messages" not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{where}: no field 'messages' (fields: {keys})")
    messages = record["messages"]
    turns = _check_conversation(messages, f"{where}: messages")
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_sft(path: str | os.PathLike[str]) -> list[Messages]:
    """Every conversation of an SFT JSON-lines file (`{"messages": [...]}` per line)."""
    return [check_sft_record(record, where) for where, record in iter_jsonl(path)]


def _as_messages(value: Any, field: str, role: str, where: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return list(value)
    kind = "an empty list" if isinstance(value, list) else type(value).__name__
    raise DataError(f"{where}: field {field!r} is {kind}, expected a string or a non-empty list of messages")


def check_preference_record(record: Mapping[str, Any], where: str = "record") -> dict[str, Messages]:
    """A preference record normalised to `{"prompt", "chosen", "rejected"}` lists of messages."""
    for field in ("prompt", "chosen", "rejected"):
        if field not in record:
            hint = " (the implicit-prompt form is not supported: give the prompt explicitly)"
            raise DataError(f"{where}: no field {field!r}{hint if field == 'prompt' else ''}")
    prompt = _as_messages(record["prompt"], "prompt", "user", where)
    turns = _check_conversation(prompt, f"{where}: prompt", final="prefix")
    if turns[-1][0] != "user":
        raise DataError(f"{where}: prompt: the last message must be a user message, not an assistant one")
    out = {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt]}
    for field in ("chosen", "rejected"):
        response = _as_messages(record[field], field, "assistant", where)
        for end, message in (("first", response[0]), ("last", response[-1])):
            if not isinstance(message, Mapping) or message.get("role") != "assistant":
                raise DataError(f"{where}: {field}: the {end} message must be an assistant message")
        _check_conversation(prompt + response, f"{where}: prompt + {field} ({len(prompt)} + {len(response)})")
        out[field] = [{"role": m["role"], "content": m["content"]} for m in response]
    return out


def read_preferences(path: str | os.PathLike[str]) -> list[dict[str, Messages]]:
    """Every preference pair of a JSON-lines file, normalised (see `check_preference_record`)."""
    return [check_preference_record(record, where) for where, record in iter_jsonl(path)]


# ------------------------------------------------------------------ tokenizing


@dataclass(frozen=True)
class SFTExample:
    """A tokenized conversation and which of its tokens an assistant produced (the targets)."""

    ids: np.ndarray  # [N] int32, BOS first
    mask: np.ndarray  # [N] bool, True on assistant text and the EOS closing each assistant turn
    truncated: bool


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt and two responses; `prompt + chosen` is the whole chosen conversation's ids."""

    prompt: np.ndarray  # [P] int32, BOS ... [/INST]
    chosen: np.ndarray  # [C] int32, the chosen response's tokens ending with EOS
    rejected: np.ndarray  # [R] int32


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, int) or max_len < 2:
        raise DataError(f"max_len must be an integer >= 2, got {max_len!r}")


def encode_sft(tok: Tokenizer, messages: Sequence[Mapping[str, Any]], max_len: int) -> SFTExample | None:
    """The conversation's ids and loss mask, truncated on the right to `max_len`; None if no target is left."""
    _check_max_len(max_len)
    ids, mask = encode_chat_with_mask(tok, messages, final_assistant="complete")
    truncated = len(ids) > max_len
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return None
    return SFTExample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), truncated)


def encode_preference(tok: Tokenizer, record: Mapping[str, Any], max_len: int) -> PreferenceExample | None:
    """Prompt and response ids of a preference record (raw or normalised); None if over `max_len`."""
    _check_max_len(max_len)
    record = check_preference_record(record)
    prompt = encode_chat(tok, record["prompt"])
    responses = []
    for field in ("chosen", "rejected"):
        full = encode_chat(tok, record["prompt"] + record[field], final_assistant="complete")
        assert full[: len(prompt)] == prompt, "each chat segment is encoded on its own"
        responses.append(full[len(prompt) :])
    if len(prompt) + max(map(len, responses)) > max_len:
        return None
    chosen, rejected = (np.asarray(r, dtype=np.int32) for r in responses)
    return PreferenceExample(np.asarray(prompt, dtype=np.int32), chosen, rejected)


def tokenize_sft(
    tok: Tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]], max_len: int
) -> tuple[list[SFTExample], dict[str, int]]:
    """The kept examples and counts {"records", "kept", "truncated", "dropped"} for the training log."""
    examples = []
    for i, messages in enumerate(conversations):
        try:
            example = encode_sft(tok, messages, max_len)
        except TokenizerError as e:
            raise DataError(f"conversation {i}: {e}") from e
        if example is not None:
            examples.append(example)
    n, kept = len(conversations), len(examples)
    truncated = sum(e.truncated for e in examples)
    return examples, {"records": n, "kept": kept, "truncated": truncated, "dropped": n - kept}


def tokenize_preferences(
    tok: Tokenizer, records: Sequence[Mapping[str, Any]], max_len: int
) -> tuple[list[PreferenceExample], dict[str, int]]:
    """The kept pairs and counts {"records", "kept", "truncated" (always 0), "dropped"}."""
    examples = []
    for i, record in enumerate(records):
        check_preference_record(record, f"preference record {i}")
        example = encode_preference(tok, record, max_len)
        if example is not None:
            examples.append(example)
    n, kept = len(records), len(examples)
    return examples, {"records": n, "kept": kept, "truncated": 0, "dropped": n - kept}


def drop_identical_pairs(examples: Sequence[PreferenceExample]) -> tuple[list[PreferenceExample], int]:
    """(the pairs whose chosen and rejected tokens differ, how many were identical and dropped)."""
    kept = [e for e in examples if not np.array_equal(e.chosen, e.rejected)]
    return kept, len(examples) - len(kept)


# ------------------------------------------------------------------ batching


@dataclass(frozen=True)
class SFTBatch:
    """B conversations, right-padded to the longest; loss only where the target is an assistant token."""

    inputs: torch.Tensor  # [B, T] int64, ids[:-1], 0 on padding
    targets: torch.Tensor  # [B, T] int64, ids[1:], 0 on padding
    positions: torch.Tensor  # [B, T] int64, 0..n-1, -1 on padding
    loss_mask: torch.Tensor  # [B, T] bool, mask[1:], False on padding


@dataclass(frozen=True)
class PreferenceBatch:
    """Rows 0..B-1: prompt + chosen; rows B..2B-1: prompt + rejected; loss only on response targets."""

    inputs: torch.Tensor  # [2B, T] int64
    targets: torch.Tensor  # [2B, T] int64
    positions: torch.Tensor  # [2B, T] int64, -1 on padding
    loss_mask: torch.Tensor  # [2B, T] bool, True exactly where the target is a response token
    index: torch.Tensor  # [B] int64, each pair's index in the stream's example list

    def pairs(self, start: int, stop: int) -> PreferenceBatch:
        """Pairs [start, stop) of the batch: their chosen rows and their rejected rows."""
        B = self.index.numel()
        rows = torch.cat([torch.arange(start, stop), B + torch.arange(start, stop)])
        return PreferenceBatch(self.inputs[rows], self.targets[rows], self.positions[rows], self.loss_mask[rows],
                               self.index[start:stop])  # fmt: skip


def _collate(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """(ids [N], target mask [N]) rows as right-padded inputs/targets/positions/loss_mask [B, T]."""
    width = max(len(ids) for ids, _ in rows) - 1
    shape = (len(rows), width)
    inputs, targets = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    positions, loss_mask = np.full(shape, -1, dtype=np.int64), np.zeros(shape, dtype=bool)
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[b, :n], targets[b, :n] = ids[:-1], ids[1:]
        positions[b, :n] = np.arange(n)
        loss_mask[b, :n] = mask[1:]
    arrays = {"inputs": inputs, "targets": targets, "positions": positions, "loss_mask": loss_mask}
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


E = TypeVar("E")


class _ExampleStream(Generic[E]):
    """Endless shuffled batches of examples (resumable from (epoch, cursor)) and ordered evaluation batches."""

    def __init__(self, examples: Sequence[E], seed: int = 0, shuffle: bool = True) -> None:
        if not examples:
            raise DataError("no examples to batch (every record was dropped, or the data is empty)")
        self.examples, self.seed, self.shuffle = list(examples), seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm = (epoch, order)
        return self._perm[1]

    def _next_indices(self, batch_size: int) -> list[int]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        indices = []
        for _ in range(batch_size):
            indices.append(int(self._order(self.epoch)[self.cursor]))
            self.cursor += 1
            if self.cursor == len(self.examples):
                self.epoch, self.cursor = self.epoch + 1, 0
        return indices

    def upcoming_indices(self, n: int) -> list[int]:
        """The example indices of the stream's next `n` draws, in order; the stream state is untouched."""
        if n <= 0:
            return []
        epoch, cursor = self.epoch, self.cursor
        try:
            return self._next_indices(n)
        finally:
            self.epoch, self.cursor = epoch, cursor

    def _batch(self, indices: list[int]) -> Any:
        raise NotImplementedError

    def next_batch(self, batch_size: int) -> Any:
        """The next `batch_size` examples of the endless stream (crossing into the next epoch as needed)."""
        return self._batch(self._next_indices(batch_size))

    def iter_batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[Any]:
        """Every example (or those of `indices`) once, in order, the last batch possibly smaller;
        the stream state is untouched."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        order = list(range(len(self.examples))) if indices is None else [int(i) for i in indices]
        for start in range(0, len(order), batch_size):
            yield self._batch(order[start : start + batch_size])

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, plus the settings that must match on resume."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the stream that produced `state` stopped."""
        for key, value in (("seed", self.seed), ("examples", len(self.examples))):
            if state.get(key) != value:
                raise DataError(f"data state has {key}={state.get(key)!r} but this stream has {value!r}")
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not isinstance(epoch, int) or not isinstance(cursor, int) or epoch < 0:
            raise DataError(f"data state has epoch={epoch!r}, cursor={cursor!r}; expected integers")
        if not 0 <= cursor < len(self.examples):
            raise DataError(f"data state cursor {cursor} is outside 0..{len(self.examples) - 1}")
        self.epoch, self.cursor = epoch, cursor


class SFTStream(_ExampleStream[SFTExample]):
    """`SFTBatch`es of `SFTExample`s; see the module docstring for order and resumption."""

    def _batch(self, indices: list[int]) -> SFTBatch:
        return SFTBatch(**_collate([(self.examples[i].ids, self.examples[i].mask) for i in indices]))


class PreferenceStream(_ExampleStream[PreferenceExample]):
    """`PreferenceBatch`es of `PreferenceExample`s: chosen rows first, then the rejected rows."""

    def _batch(self, indices: list[int]) -> PreferenceBatch:
        rows = []
        for field in ("chosen", "rejected"):
            for i in indices:
                example = self.examples[i]
                response = getattr(example, field)
                ids = np.concatenate([example.prompt, response])
                mask = np.concatenate([np.zeros(len(example.prompt), bool), np.ones(len(response), bool)])
                rows.append((ids, mask))
        return PreferenceBatch(**_collate(rows), index=torch.tensor(indices, dtype=torch.int64))
