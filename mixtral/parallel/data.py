"""Each rank's share of a global batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mixtral.errors import ConfigError


class RankSlice:
    """A data stream for one data-parallel rank: every rank draws the same global batch of `batch_size`
    rows from its own copy of `stream` (same seed, same position) and keeps rows
    [rank · b, (rank + 1) · b), b = batch_size / size. So a job trains on exactly the batches one process
    with the same global batch sees, whatever the layout, and the stream's state (saved with a
    checkpoint) is the same on every rank. Drawing the whole batch costs each rank the data pipeline
    of W ranks: small next to a training step here; a sharded loader would replace it at scale."""

    def __init__(self, stream: Any, rank: int, size: int) -> None:
        self.stream, self.rank, self.size = stream, rank, size

    def next_batch(self, batch_size: int) -> Any:
        if batch_size % self.size:
            raise ConfigError(
                f"train.batch_size={batch_size} (the global batch) must be a multiple of the {self.size} "
                "data-parallel ranks"
            )
        batch = self.stream.next_batch(batch_size)
        if batch is None:
            return None
        b = batch_size // self.size
        if callable(getattr(batch, "pairs", None)):  # a preference batch: its pairs, chosen and rejected rows
            return batch.pairs(self.rank * b, (self.rank + 1) * b)
        return _rows(batch, slice(self.rank * b, (self.rank + 1) * b))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def _rows(batch: Any, rows: slice) -> Any:
    """The rows of every batch-first tensor in a batch (a tensor, dataclass, tuple, list or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch[rows]
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(
            batch, **{f.name: _rows(getattr(batch, f.name), rows) for f in dataclasses.fields(batch)}
        )
    if isinstance(batch, (tuple, list)):
        return type(batch)(_rows(x, rows) for x in batch)
    if isinstance(batch, dict):
        return {k: _rows(v, rows) for k, v in batch.items()}
    return batch
