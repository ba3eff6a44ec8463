"""Evaluation mode as a scope: models switched to eval() inside, each back to its own mode after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: object) -> Iterator[None]:
    """`model.eval()` for every nn.Module given inside the block; previous modes restored after,
    also on error. Other objects (e.g. a layer-by-layer runner) are passed over."""
    modules = [m for m in models if isinstance(m, nn.Module)]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
