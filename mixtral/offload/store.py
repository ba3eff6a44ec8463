"""Where offloaded experts live: a quantized checkpoint on disk, read one expert at a time.

`ExpertStore(path)` validates the checkpoint (`QuantizedReader`: names, dtypes, shapes, file sizes)
and opens its files. `load(layer, expert, dst)` reads that expert's six stored tensors (w1, w3, w2
and their scales, contiguous in the file) straight into `dst`, the tensors of a cache slot, with
one `preadv`. The OS page cache keeps recently read experts (and gives the memory back under
pressure); the process's RSS holds the cache slots only. A first version mapped the files and
copied out of the mapping with torch: the copy ran torch's thread pool on the background reader
thread, which fought the compute threads for the cores (prefetch then halved the speed on this
2-core machine), and the mapped pages counted in RSS until dropped.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mixtral.checkpoint.quantized import EXPERT_PARTS, QuantizedReader, QuantLayout
from mixtral.checkpoint.safetensors_io import TensorEntry
from mixtral.config import MixtralConfig
from mixtral.errors import FormatError

_TORCH = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16, "F32": torch.float32}


class ExpertStore:
    """The experts of a quantized checkpoint, read from its files on request."""

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
        self._fds: dict[Path, int] = {}
        for e in self._entries.values():
            if e.file not in self._fds:
                self._fds[e.file] = os.open(e.file, os.O_RDONLY)
        self.expert_bytes = sum(e.nbytes for e in self.parts(0, 0).values())

    def parts(self, layer: int, expert: int) -> dict[str, TensorEntry]:
        """{"qw1", "sw1", "qw3", "sw3", "qw2", "sw2"}: the stored tensors of one expert, in file order."""
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
        """Read expert (layer, expert) into the tensors `dst`; returns the bytes read.

        One `preadv` when the six tensors are contiguous in one file (as `mixtral quantize` writes
        them): a system call that releases the GIL and starts no thread pool."""
        parts = self.parts(layer, expert)
        entries = list(parts.values())
        views = [dst[key].view(-1).view(torch.uint8).numpy() for key in parts]
        pairs = zip(entries, entries[1:], strict=False)
        if all(a.file == b.file and a.offset + a.nbytes == b.offset for a, b in pairs):
            self._pread(entries[0].file, views, entries[0].offset)
        else:  # written by other means: one read per tensor
            for e, v in zip(entries, views, strict=True):
                self._pread(e.file, [v], e.offset)
        return sum(e.nbytes for e in entries)

    def _pread(self, file: Path, views: list, offset: int) -> None:
        fd = self._fds[file]
        buffers = [memoryview(v).cast("B") for v in views]
        while buffers:
            n = os.preadv(fd, buffers, offset)
            if n <= 0:
                raise OSError(
                    f"{file}: read returned {n} bytes at offset {offset} (file truncated while open?)"
                )
            offset += n
            while buffers and n >= len(buffers[0]):
                n -= len(buffers[0])
                buffers.pop(0)
            if n:
                buffers[0] = buffers[0][n:]

    def close(self) -> None:
        fds = getattr(self, "_fds", {})
        for fd in fds.values():
            os.close(fd)
        fds.clear()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        if os is not None:
            self.close()
