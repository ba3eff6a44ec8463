"""A run directory's safety: one writer at a time, resumes checked against the stored settings, caches.

- **Lock.** `run_lock(run_dir)` takes an exclusive `fcntl.flock` on `run_dir/.lock` (Linux, macOS)
  for as long as a run writes there; a second writer gets `RunLockedError` naming the directory and
  the holder's pid. The kernel drops the lock when its process dies, so a killed run never blocks
  the next one. The holder's pid is written only by `RunLock.claim()`, after the settings check
  passed, so a refused attempt leaves every file as it was. Re-entrant within one process
  (`run_recipe` holds it, then `train` asks again). Where `fcntl` is missing, no lock is taken.
- **Resume check.** `check_resume` compares the settings stored by the previous attempt (the
  run's recipe.json or run.json, or the training state in the checkpoint) with the new ones,
  field by field ("train.lr"). A change in `SAFE_CHANGES` (how often to log, evaluate and save,
  how much to evaluate, more steps, activation checkpointing, the description) is accepted and
  reported; any other (learning rate, batch size, schedule, data, model shape, seq_len, ...) is
  refused with one `ResumeMismatchError` naming every changed field. Fields that only one side
  has (a setting added by a newer version) are not compared.
- **Fingerprints and caches.** `fingerprint` hashes JSON-able values, tensors and arrays;
  `model_fingerprint` a model's weights. `cached_json` reuses a stored result while its key
  matches (the DPO reference cache of `instruct_run` is keyed the same way).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixtral.atomic import write_atomic
from mixtral.errors import TrainingError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

# Settings that may change when a run resumes (a warning names them); every other change is refused.
SAFE_CHANGES = frozenset({
    "description",
    "parallel.ep", "parallel.dp_shard", "parallel.dp_replicate",  # the checkpoints reshard (DCP)
    "train.steps",  # more (or fewer, not below the checkpoint's step) steps: the cosine schedule stretches
    "train.log_every", "train.eval_every", "train.save_every", "train.eval_max_tokens",
    "train.activation_checkpointing",  # recomputes activations; the same gradients
    "data.eval_batches", "data.eval_batch_size",
    "instruct.eval_batch_size",
})  # fmt: skip


class RunLockedError(TrainingError):
    """Another process is writing to the run directory."""


class ResumeMismatchError(TrainingError):
    """A resume asks for settings the run was not started with (and that cannot change mid-run)."""


class RunLock:
    """The held lock of one run directory (see `run_lock`)."""

    def __init__(self, run_dir: Path, fd: int | None) -> None:
        self.run_dir, self.fd, self.depth, self.claimed = run_dir, fd, 1, False

    def claim(self) -> None:
        """Write this process's pid into the lock file (once); call after the resume check passed."""
        if self.fd is not None and not self.claimed:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        self.claimed = True


_HELD: dict[Path, RunLock] = {}


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "a process that has not written its pid yet"


@contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[RunLock]:
    """Hold `run_dir`'s writer lock for the block (creating the directory); RunLockedError if taken."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _HELD:  # this process already holds it (an entry point calling train)
        held = _HELD[key]
        held.depth += 1
        try:
            yield held
        finally:
            held.depth -= 1
        return
    fd = None
    if fcntl is not None:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunLockedError(
                f"run directory {run_dir} is in use by another writer ({_holder(run_dir / LOCK_FILE)} holds "
                f"{run_dir / LOCK_FILE}); wait for it to finish or choose another --out"
            ) from None
    lock = _HELD[key] = RunLock(run_dir, fd)
    try:
        yield lock
    finally:
        del _HELD[key]
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ---- settings -------------------------------------------------------------------------------------


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and tuples compare as lists."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def changed_settings(stored: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (stored, new)} for every field both sides have and that differs."""
    a, b = (
        flatten(json.loads(json.dumps(stored, default=str))),
        flatten(json.loads(json.dumps(new, default=str))),
    )
    return {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k]}


def describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changes.items()))


def check_resume(
    stored: Mapping[str, Any] | None,
    new: Mapping[str, Any],
    where: str,
    at_step: int,
    safe: Iterable[str] = SAFE_CHANGES,
) -> dict[str, tuple[Any, Any]]:
    """The accepted changes between `stored` and `new` settings of a run resuming at `at_step`.

    Raises ResumeMismatchError naming every refused change (and a steps value below `at_step`);
    `where` names what the stored settings come from. Nothing is written either way.
    """
    if stored is None:
        return {}
    changes = changed_settings(stored, new)
    safe = set(safe)
    refused = {k: v for k, v in changes.items() if k not in safe}
    steps = changes.get("train.steps")
    if steps is not None and isinstance(steps[1], int) and steps[1] < at_step:
        refused["train.steps"] = steps
    if refused:
        hint = (
            f"; train.steps must be >= {at_step}, the checkpoint's step" if "train.steps" in refused else ""
        )
        raise ResumeMismatchError(
            f"cannot resume {where} at step {at_step} with different settings: {describe(refused)}{hint}. "
            "Use the run's settings, or start afresh (--no-resume, or another --out)"
        )
    return changes


def note(message: str, progress: bool = True) -> None:
    """A run's progress line on stderr (with `progress`), for phases without a bar."""
    if progress:
        print(message, file=sys.stderr, flush=True)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, indent=2, default=str) + "\n")


# ---- fingerprints and caches ----------------------------------------------------------------------


def fingerprint(*parts: Any) -> str:
    """sha256 (hex, 32 chars) of JSON-able values, tensors and numpy arrays, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous()
            h.update(f"tensor {part.dtype} {list(part.shape)}".encode())
            h.update(part.reshape(-1).view(torch.uint8).numpy().tobytes() if part.numel() else b"")
        elif isinstance(part, np.ndarray):
            h.update(f"array {part.dtype} {list(part.shape)}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the model's config and every tensor of its state dict (names, dtypes, shapes, values)."""
    config = getattr(model, "config", None)
    h = hashlib.sha256(json.dumps(config.to_dict() if hasattr(config, "to_dict") else None).encode())
    for name, t in model.state_dict().items():
        h.update(fingerprint(name, t).encode())
    return h.hexdigest()[:32]


def cached_json(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, stored in `path` with `key`; a later call with the same key reads it back instead."""
    stored = read_json(path)
    if isinstance(stored, dict) and stored.get("key") == key and "value" in stored:
        return stored["value"]
    value = compute()
    write_json(path, {"key": key, "value": value})
    return value
