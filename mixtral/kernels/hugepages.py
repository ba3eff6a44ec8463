"""A CPU model's large weights moved into transparent huge pages (2 MiB), where Linux offers them.

A decode step reads every active weight once, ~129 MB a token for bench-791m in int4: with 4 KiB pages
that is ~32k page-table walks a step (the TLBs cover a few MB, and the walks' own data is evicted by
the stream). Weights copied into memory advised `MADV_HUGEPAGE` need 512x fewer: the int4 bench-791m
step took 0.956x the time (16 alternating pairs in one process, all 16 faster; see docs/offloading.md).
llama.cpp reads its weights from the mmap'd GGUF, in the file's 4 KiB page-cache pages.

Linux only, and only when /sys/kernel/mm/transparent_hugepage/enabled is `always` or `madvise`;
elsewhere nothing moves. Values and results are unchanged: the same bytes, in other pages.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
# Tensors below this stay where they are: a few small ones would each waste most of a huge page.
MIN_BYTES = 1 << 20
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this process can ask for transparent huge pages (Linux, THP `always` or `madvise`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def empty_huge(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in anonymous memory advised `MADV_HUGEPAGE`, starting on a 2 MiB
    boundary (its pages are allocated, huge where the kernel can, when first written). The tensor
    keeps the mapping alive; it is unmapped when the last tensor using it is freed."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    size = nbytes + HUGE_PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE  # the last, partial 2 MiB stays in small pages
    if whole:
        region.madvise(mmap.MADV_HUGEPAGE, start, whole)
    region.madvise(mmap.MADV_NOHUGEPAGE, start + whole, size - start - whole)
    return raw[start : start + nbytes].view(dtype).view(shape)


def move_to_huge_pages(model: nn.Module, min_bytes: int = MIN_BYTES) -> int:
    """Copy each CPU parameter and buffer of `model` of at least `min_bytes` (contiguous, owning its
    whole storage; not an embedding's) into `empty_huge` memory, in place of the old one (Parameters stay Parameters,
    with their requires_grad; a tensor held in two places stays one). Returns the bytes moved: 0
    where huge pages are not available. One tensor is copied at a time and the old one's memory given
    back before the next, so the peak RSS grows by about the largest tensor moved."""
    if not huge_pages_available():
        return 0
    # Keyed by the old memory's address: a tensor held in two places is still alive (and still
    # there) when its second place is reached.
    moved: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue  # read a row at a time: no walks to save (and a quantized load maps it from the file)
        for slots in (module._parameters, module._buffers):
            for name, t in list(slots.items()):
                if t is None or t.is_meta or t.device.type != "cpu" or t.nbytes < min_bytes:
                    continue
                key = (t.data_ptr(), t.dtype, tuple(t.shape))
                if key in moved:
                    slots[name] = moved[key]
                    continue
                if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
                    continue  # a view of a larger tensor: moving it would copy, not move, the memory
                with torch.no_grad():
                    data = empty_huge(tuple(t.shape), t.dtype).copy_(t)
                new = (
                    nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data
                )
                slots[name] = moved[key] = new
                total += t.nbytes
                del t, data, new
                _trim_heap()  # each time: freed heap pages stay resident otherwise, and RSS would peak
    return total


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library: its allocator returns memory itself). Looked up
    once: find_library runs ldconfig."""
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


def _trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim): the tensors just replaced may
    have come from the heap, whose freed pages glibc otherwise keeps (RSS would hold both copies)."""
    if (trim := _malloc_trim()) is not None:
        trim(0)
