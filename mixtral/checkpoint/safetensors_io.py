"""Safetensors files checked by our own header parser before any tensor data is touched.

Format (github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes of
UTF-8 JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then
a data buffer that the offsets must cover exactly, without gaps or overlap. `read_header` checks all
of that and raises `CorruptFileError` naming the file and tensor, so a truncated download fails
before loading starts rather than halfway through. Tensor data is then read lazily through
safetensors' mmap'd `safe_open`, one tensor (or slice) at a time. `write_safetensors` streams
tensors to disk one at a time, so writing never needs a second copy of a model. No pickle anywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mixtral.errors import CorruptFileError, FormatError

# Byte size of every dtype safetensors knows, so offsets of any tensor can be checked.
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# The dtypes weights may have on disk and in memory; anything else (int8 quantized, fp8) is refused.
TORCH_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ST_DTYPES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
# What we write: the weight dtypes plus the integer storage of quantized checkpoints.
WRITE_DTYPES: dict[torch.dtype, str] = {**ST_DTYPES, torch.int8: "I8", torch.uint8: "U8"}
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def check_dtype(dtype: torch.dtype) -> None:
    """ValueError unless `dtype` is one weights may have (fp32, bf16, fp16)."""
    if dtype not in ST_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16"
        )


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a file's header describes it."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # where its data starts in the file (bytes from the file's start)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


def _header_entry(path: Path, name: str, info: Any, data_start: int = 0) -> tuple[TensorEntry, int, int]:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CorruptFileError(
            f"{path.name}: header entry for tensor {name!r} lacks dtype/shape/data_offsets"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _ITEMSIZE:
        raise CorruptFileError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
    ints = isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
    ints = ints and all(type(v) is int and v >= 0 for v in [*shape, *offsets])
    if not ints or offsets[0] > offsets[1]:
        raise CorruptFileError(
            f"{path.name}: tensor {name!r} has a malformed shape {shape!r} or offsets {offsets!r}"
        )
    entry = TensorEntry(name, dtype, tuple(shape), path, data_start + offsets[0])
    if offsets[1] - offsets[0] != entry.nbytes:
        raise CorruptFileError(
            f"{path.name}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but dtype {dtype} "
            f"and shape {list(shape)} need {entry.nbytes}"
        )
    return entry, offsets[0], offsets[1]


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file, after checking the header against the file size."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CorruptFileError(
            f"{path.name}: only {size} bytes, too short for a safetensors file (truncated)"
        )
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if 8 + n > size:
            raise CorruptFileError(
                f"{path.name}: header larger than the file ({n} header bytes declared, file has {size} bytes)"
            )
        if n > _MAX_HEADER_BYTES:
            raise CorruptFileError(f"{path.name}: header of {n} bytes exceeds the 100 MB safetensors limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(
            f"{path.name}: header is not valid JSON ({e}); not a safetensors file?"
        ) from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path.name}: header is JSON but not an object")
    header.pop("__metadata__", None)
    spans = sorted(
        (_header_entry(path, name, info, 8 + n) for name, info in header.items()), key=lambda s: s[1:]
    )
    data_size, pos = size - 8 - n, 0
    for entry, begin, end in spans:
        if begin != pos:
            raise CorruptFileError(f"{path.name}: data of tensor {entry.name!r} overlaps or leaves a gap")
        if end > data_size:
            raise CorruptFileError(
                f"{path.name}: truncated: tensor {entry.name!r} ends at byte {8 + n + end} "
                f"but the file has only {size} bytes"
            )
        pos = end
    if pos != data_size:
        raise CorruptFileError(
            f"{path.name}: {data_size - pos} bytes after the last tensor; not a safetensors file"
        )
    return {entry.name: entry for entry, _, _ in spans}


class ShardSet:
    """The tensors of one checkpoint over one or more files; data read lazily through mmap.

    Use as a context manager; files are opened on first read and closed on exit.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            for name, entry in read_header(file).items():
                if name in self.entries:
                    raise CorruptFileError(
                        f"tensor {name!r} appears in both {self.entries[name].file.name} and {file.name}"
                    )
                self.entries[name] = entry
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_index(cls, index_path: Path) -> ShardSet:
        """Shards listed by a `*.safetensors.index.json`, checked against the shards' headers."""
        try:
            weight_map = json.loads(index_path.read_text()).get("weight_map")
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"{index_path.name}: not a JSON object with a 'weight_map'")
        files: dict[str, str] = {}  # shard file -> first tensor it should hold
        for name, file in weight_map.items():
            files.setdefault(file, name)
        for file, name in files.items():
            if not (index_path.parent / file).is_file():
                raise CorruptFileError(
                    f"{index_path.name} puts tensor {name!r} in shard {file!r}, which does not exist"
                )
        shards = cls(index_path.parent / f for f in sorted(files))
        for name, file in weight_map.items():
            if name not in shards.entries or shards.entries[name].file.name != file:
                raise CorruptFileError(f"{index_path.name} puts tensor {name!r} in {file!r}, which lacks it")
        return shards

    def dtypes(self) -> set[str]:
        return {e.dtype for e in self.entries.values()}

    def read(self, name: str, select: tuple[Any, ...] = ()) -> torch.Tensor:
        """Tensor `name` (or `tensor[select]`, reading only that part) on the CPU, as stored."""
        file = self.entries[name].file
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
        handle = self._handles[file]
        return handle.get_slice(name)[select] if select else handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> ShardSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refuse_pickles(directory: Path) -> None:
    """FormatError if the directory holds only pickle checkpoints; they are never opened."""
    pickles = sorted(p.name for p in directory.iterdir() if re.search(r"\.(pth|pt|bin|ckpt|pkl)$", p.name))
    if pickles:
        raise FormatError(
            f"{directory}: found only pickle checkpoint(s) {', '.join(pickles)}; pickle files can run "
            "arbitrary code and are refused, safetensors only (convert them with a trusted tool first)"
        )


# ---- writing ------------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    # Little-endian raw bytes, as safetensors stores them (every torch CPU platform is little-endian).
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: Path,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterator[torch.Tensor],
    metadata: dict[str, str],
) -> None:
    """Write `tensors` (produced lazily, in `specs` order, each checked against its spec) to `path`."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * _ITEMSIZE[WRITE_DTYPES[dtype]]
        header[name] = {
            "dtype": WRITE_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"tensor {name!r} is {t.dtype} {list(t.shape)}, planned {dtype} {list(shape)}"
                )
            f.write(_tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())


def shard_plan(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Split specs, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * _ITEMSIZE[WRITE_DTYPES[spec[1]]]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards
