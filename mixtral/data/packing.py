"""Packs tokenized documents from weighted domains into fixed-length training sequences.

Layout (concatenate-and-chunk, as in GPT/Llama pretraining, with document boundaries kept):
every document is `BOS + tokens + EOS`. Documents are drawn one at a time from the domains and laid
end to end; sequence k holds stream tokens `[k*T, (k+1)*T]` (T+1 tokens, the last one shared with
sequence k+1 as its first input), so `inputs = tokens[:-1]`, `targets = tokens[1:]`.

A *segment* is the part of one document inside one sequence. Invariants, checked by the tests:
- `positions` count from 0 within each segment and are 0 exactly where a segment starts, so the
  model can rebuild segments from `positions == 0` (block-diagonal causal attention). A document
  cut by a sequence boundary continues in the next sequence as a new segment that again starts at
  position 0: positions never exceed T-1, whatever the document length, at the price of that
  continuation not seeing its own beginning (it could not attend to another sequence anyway).
- `loss_mask[t]` is False exactly where input t and target t lie in different segments (EOS of one
  document -> BOS of the next, so no token learns to predict a document from its predecessor) or
  where the target is padding. Predicting EOS from a document's last token is trained.
- Padding (only at the very end of a finite stream) has position -1, as in generation's ragged
  batches, and `pad_id` as token.

Mixture: the next document comes from the active domain with the fewest tokens emitted per unit of
weight, so each domain's share of tokens tracks its weight to within one document. Within a domain
documents follow a permutation drawn from (seed, domain, epoch); an endless stream reshuffles at
every epoch. `state_dict()` holds a few integers per domain; `load_state_dict` resumes exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtral.atomic import atomic_file
from mixtral.data.corpus import Document
from mixtral.errors import DataError
from mixtral.text.tokenizer import Tokenizer

_STATE_VERSION = 1


@dataclass(frozen=True)
class TokenizedDocs:
    """A domain's documents as one flat int32 array: document i is `tokens[offsets[i]:offsets[i+1]]`."""

    tokens: np.ndarray  # [N] int32, each document BOS ... EOS
    offsets: np.ndarray  # [n_docs + 1] int64, offsets[0] == 0, offsets[-1] == N

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @classmethod
    def from_lists(cls, docs: Iterable[Iterable[int]]) -> TokenizedDocs:
        """From already tokenized documents (each should start with BOS and end with EOS)."""
        arrays = [np.asarray(list(d), dtype=np.int32) for d in docs]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        if (lengths < 2).any():
            raise DataError(f"document {int(np.argmax(lengths < 2))} has fewer than 2 tokens (BOS and EOS)")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return cls(tokens=tokens, offsets=offsets)


def _cache_key(texts: list[str], tok: Tokenizer) -> str:
    digest = hashlib.sha256(tok.source.read_bytes())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:32]


def tokenize_documents(
    docs: Iterable[str | Document], tok: Tokenizer, cache_dir: str | os.PathLike[str] | None = None
) -> TokenizedDocs:
    """`BOS + encode(text) + EOS` for every document; cached under `cache_dir` by tokenizer and text hash."""
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"tokens-{_cache_key(texts, tok)}.npz"
        if path.is_file():
            with np.load(path) as cached:
                return TokenizedDocs(tokens=cached["tokens"], offsets=cached["offsets"])
    result = TokenizedDocs.from_lists(tok.encode(t, bos=True, eos=True) for t in texts)
    if path is not None:
        with atomic_file(path) as tmp:  # a concurrent reader never sees half a file
            np.savez(tmp, tokens=result.tokens, offsets=result.offsets)
    return result


@dataclass(frozen=True)
class PackedBatch:
    """B packed sequences of length T; see the module docstring for the invariants."""

    inputs: torch.Tensor  # [B, T] int64
    targets: torch.Tensor  # [B, T] int64
    positions: torch.Tensor  # [B, T] int64, 0 at each segment start, -1 on padding
    loss_mask: torch.Tensor  # [B, T] bool, False across a document boundary and on padding
    domain_ids: torch.Tensor  # [B, T] int64, index into PackedStream.domains of each input, -1 on padding


def check_weights(weights: Mapping[str, float] | None, docs: Mapping[str, TokenizedDocs]) -> dict[str, float]:
    """Validated mixture weights for every domain (None: proportional to each domain's tokens).

    Domains absent from `weights` get weight 0; unknown names, negative or non-finite weights,
    all-zero weights, and a positive weight on a domain without documents are refused.
    """
    if not docs:
        raise DataError("no domains to pack")
    if weights is None:
        weights = {d: float(td.n_tokens) for d, td in docs.items()}
    unknown = sorted(set(weights) - set(docs))
    if unknown:
        raise DataError(f"mixture weights name unknown domains {unknown}; known: {', '.join(docs)}")
    out = {}
    for d in docs:
        w = weights.get(d, 0.0)
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise DataError(f"mixture weight of {d!r} is {w!r}; weights must be finite and >= 0")
        if w > 0 and len(docs[d]) == 0:
            raise DataError(f"domain {d!r} has weight {w} but no documents")
        out[d] = float(w)
    if sum(out.values()) <= 0:
        raise DataError("mixture weights are all zero; give at least one domain a positive weight")
    return out


class PackedStream:
    """Fixed-length sequences from weighted domains; deterministic given seed, resumable exactly.

    `loop=True` is an endless training stream (domains reshuffled each epoch); `loop=False` reads
    each weighted domain once (for validation) and pads the final sequence.
    """

    def __init__(
        self,
        docs: Mapping[str, TokenizedDocs],
        seq_len: int,
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
        *,
        shuffle: bool = True,
        loop: bool = True,
        pad_id: int = 0,
    ) -> None:
        if not isinstance(seq_len, int) or seq_len < 1:
            raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.weights = check_weights(weights, docs)
        self.domains: tuple[str, ...] = tuple(docs)
        self._docs = dict(docs)
        self.seq_len, self.seed, self.shuffle, self.loop, self.pad_id = seq_len, seed, shuffle, loop, pad_id
        self._perm_cache: dict[str, tuple[int, np.ndarray]] = {}
        self._state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "epoch": dict.fromkeys(self.domains, 0),
            "cursor": dict.fromkeys(self.domains, 0),
            "emitted": dict.fromkeys(self.domains, 0),
            "current": None,  # [domain, doc index, token offset] where the next sequence starts
            "sequences": 0,
            "finished": False,
        }

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream (plus the settings that must match on resume)."""
        s = self._state
        state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in s.items()}
        state["current"] = list(s["current"]) if s["current"] is not None else None
        state.update(seed=self.seed, seq_len=self.seq_len, domains=list(self.domains), loop=self.loop)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where the stream that produced `state` stopped."""
        expected = {"version": _STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len}
        expected.update(domains=list(self.domains), loop=self.loop)
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(f"data state has {key}={state.get(key)!r} but this stream has {value!r}")
        self._state = {
            k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items() if k not in expected
        }
        self._state["version"] = _STATE_VERSION
        current = state["current"]
        self._state["current"] = list(current) if current is not None else None

    @property
    def sequences_emitted(self) -> int:
        return int(self._state["sequences"])

    # ------------------------------------------------------------ document order

    def _permutation(self, domain: str, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(domain)
        if cached is None or cached[0] != epoch:
            n = len(self._docs[domain])
            if self.shuffle:
                # crc32 of the name, not the domain's index, so adding a domain reorders no other.
                rng = np.random.default_rng([self.seed, zlib.crc32(domain.encode()), epoch])
                cached = (epoch, rng.permutation(n))
            else:
                cached = (epoch, np.arange(n))
            self._perm_cache[domain] = cached  # only each domain's current epoch is needed again
        return cached[1]

    def _next_document(self) -> list | None:
        s = self._state
        active = [d for d in self.domains if self.weights[d] > 0 and (self.loop or s["epoch"][d] == 0)]
        if not active:
            return None
        domain = min(active, key=lambda d: s["emitted"][d] / self.weights[d])  # ties: first listed
        index = int(self._permutation(domain, s["epoch"][domain])[s["cursor"][domain]])
        s["cursor"][domain] += 1
        if s["cursor"][domain] == len(self._docs[domain]):
            s["epoch"][domain] += 1
            s["cursor"][domain] = 0
        s["emitted"][domain] += len(self._docs[domain].doc(index))
        return [domain, index, 0]

    # ------------------------------------------------------------ sequences

    def next_sequence(self) -> dict[str, np.ndarray] | None:
        """The next sequence as numpy arrays (`tokens [T+1]`, `positions`, `loss_mask`, `domain_ids` [T]),
        or None when a finite stream is exhausted."""
        s = self._state
        if s["finished"]:
            return None
        need = self.seq_len + 1
        tokens = np.full(need, self.pad_id, dtype=np.int64)
        positions = np.full(need, -1, dtype=np.int64)
        segment = np.full(need, -1, dtype=np.int64)
        domain_ids = np.full(need, -1, dtype=np.int64)
        filled, n_segments, last = 0, 0, None
        while filled < need:
            current = s["current"] if s["current"] is not None else self._next_document()
            if current is None:
                break
            domain, index, offset = current
            doc = self._docs[domain].doc(index)
            n = min(len(doc) - offset, need - filled)
            tokens[filled : filled + n] = doc[offset : offset + n]
            positions[filled : filled + n] = np.arange(n)
            segment[filled : filled + n] = n_segments
            domain_ids[filled : filled + n] = self.domains.index(domain)
            filled, n_segments = filled + n, n_segments + 1
            last = [domain, index, offset + n - 1]
            s["current"] = [domain, index, offset + n] if offset + n < len(doc) else None
        if filled < need:
            s["finished"] = True
            if filled <= 1:  # only the shared token of the previous sequence was left
                return None
        s["current"] = last  # the last target is the next sequence's first input
        s["sequences"] += 1
        loss_mask = (segment[:-1] == segment[1:]) & (segment[1:] >= 0)
        return {
            "tokens": tokens,
            "positions": positions[:-1],
            "loss_mask": loss_mask,
            "domain_ids": domain_ids[:-1],
        }

    def next_batch(self, batch_size: int) -> PackedBatch | None:
        """Up to `batch_size` sequences stacked (fewer only at the end of a finite stream), or None."""
        rows = []
        for _ in range(batch_size):
            row = self.next_sequence()
            if row is None:
                break
            rows.append(row)
        if not rows:
            return None
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]))
        return PackedBatch(
            inputs=tokens[:, :-1].contiguous(),
            targets=tokens[:, 1:].contiguous(),
            positions=torch.from_numpy(np.stack([r["positions"] for r in rows])),
            loss_mask=torch.from_numpy(np.stack([r["loss_mask"] for r in rows])),
            domain_ids=torch.from_numpy(np.stack([r["domain_ids"] for r in rows])),
        )

    def batches(self, batch_size: int) -> Iterator[PackedBatch]:
        while (batch := self.next_batch(batch_size)) is not None:
            yield batch


def pack_documents(
    domains: Mapping[str, Iterable[str | Document]],
    tok: Tokenizer,
    seq_len: int,
    weights: Mapping[str, float] | None = None,
    seed: int = 0,
    *,
    loop: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PackedStream:
    """Tokenize each domain's documents with `tok` and pack them (pad with EOS; masked anyway)."""
    tokenized = {d: tokenize_documents(docs, tok, cache_dir) for d, docs in domains.items()}
    return PackedStream(tokenized, seq_len, weights, seed, loop=loop, shuffle=loop, pad_id=tok.eos_id)
