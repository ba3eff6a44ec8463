"""Where offloaded experts live: a quantized checkpoint, memory-mapped, read one expert at a time.

`ExpertStore(path)` validates the checkpoint (`QuantizedReader`: names, dtypes, shapes, file sizes)
and maps its files. `load(layer, expert, dst)` copies that expert's six stored tensors (w1, w3, w2
and their scales, contiguous in the file) into `dst`, a dict of destination tensors (a cache slot),
then tells the kernel it no longer needs those pages in this process (madvise MADV_DONTNEED): the
bytes stay in the OS page cache, which the kernel reclaims under pressure, and the process's RSS
holds the cache slots only, not every expert ever read.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import torch

from mixtral.checkpoint.quantized import EXPERT_PARTS, QuantizedReader, QuantLayout
from mixtral.checkpoint.safetensors_io import TensorEntry
from mixtral.config import MixtralConfig
from mixtral.errors import FormatError

_TORCH = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "F32": torch.float32}
PAGE = mmap.PAGESIZE


class ExpertStore:
    """The experts of a quantized checkpoint, read from its memory-mapped files on request."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        reader = QuantizedReader(self.path)
        self.config: MixtralConfig = reader.config
        self.layout: QuantLayout = reader.layout
        if "experts" not in self.layout.targets or not self.layout.group:
            raise FormatError(
                f"{self.path}: offloading reads group-quantized experts (`mixtral quantize SRC DST --format int4`); "
                f"this checkpoint is {self.layout.storage} with targets {', '.join(self.layout.targets)}"
            )
        self._entries: dict[str, TensorEntry] = reader.stored_entries()
        self._maps: dict[Path, mmap.mmap] = {}
        for e in self._entries.values():
            if e.file not in self._maps:
                with open(e.file, "rb") as f:
                    self._maps[e.file] = mmap.mmap(
                        f.fileno(), 0, access=mmap.ACCESS_COPY
                    )  # private: writable to torch, never to the file
        first = self.parts(0, 0)
        self.expert_bytes = sum(e.nbytes for e in first.values())

    def parts(self, layer: int, expert: int) -> dict[str, TensorEntry]:
        """{"qw1", "sw1", ...}: the stored tensors of one expert."""
        out = {}
        for part in EXPERT_PARTS:
            base = f"layers.{layer}.feed_forward.experts.{expert}.{part}"
            out[f"q{part}"], out[f"s{part}"] = (
                self._entries[f"{base}.qweight"],
                self._entries[f"{base}.scales"],
            )
        return out

    def slot_shapes(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of each of an expert's tensors (the same for every expert)."""
        return {k: (_TORCH[e.dtype], e.shape) for k, e in self.parts(0, 0).items()}

    def load(self, layer: int, expert: int, dst: dict[str, torch.Tensor]) -> int:
        """Copy expert (layer, expert) into the tensors `dst`; returns the bytes read."""
        total = 0
        for key, e in self.parts(layer, expert).items():
            mm = self._maps[e.file]
            src = torch.frombuffer(mm, dtype=torch.uint8, count=e.nbytes, offset=e.offset)
            dst[key].view(-1).view(torch.uint8).copy_(src)
            total += e.nbytes
            start = e.offset // PAGE * PAGE
            end = -(-(e.offset + e.nbytes) // PAGE) * PAGE
            mm.madvise(mmap.MADV_DONTNEED, start, min(end, len(mm)) - start)
        return total

    def close(self) -> None:
        for mm in getattr(self, "_maps", {}).values():
            with contextlib.suppress(BufferError):  # a tensor still views it; it goes with the last reference
                mm.close()
        getattr(self, "_maps", {}).clear()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        if os is not None:
            self.close()
