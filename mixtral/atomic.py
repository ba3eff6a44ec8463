"""Atomic writes: a file or directory is built under a temporary name beside its target, renamed when complete.

A run killed mid-write leaves either the old target or the complete new one, never half a file;
the temporary (a dot-name with `.partial-`) is removed on any error. Files and directories get
the process's default permissions (no private 0600/0700 temporaries).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary(dst: Path) -> Path:
    # The suffix stays last: writers such as np.savez append one when it is missing.
    return dst.with_name(f".{dst.stem}.partial-{uuid.uuid4().hex[:8]}{dst.suffix}")


@contextmanager
def atomic_file(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path next to `dst` to write; renamed over `dst` when the block completes."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write bytes (or UTF-8 text) to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_directory(dst: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory next to `dst` to fill; it replaces `dst` when the block completes.

    Raises FileExistsError (naming `overwrite`) if `dst` exists, is not empty and overwrite is False.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
