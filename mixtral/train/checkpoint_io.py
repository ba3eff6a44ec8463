"""Training checkpoints: atomic, verified save and exact restore of a run's complete state.

A checkpoint is `run_dir/checkpoints/step-00000123/` holding

- model.safetensors: `model.state_dict()` (parameters and persistent buffers, our names, stored dtype);
- config.json: `model.config.to_dict()` when the model has a config;
- optimizer.safetensors: every tensor of `optimizer.state_dict()["state"]` as "{param_index}.{key}"
  (e.g. "3.exp_avg", "3.step"), indices in the order of `optimizer.param_groups[*]["params"]`;
- optimizer.json: the param groups (hyperparameters, lr included) and non-tensor state entries;
- state.json: the `TrainingState` fields plus the Python and NumPy RNG states;
- rng.safetensors: the torch CPU (and, if initialised, CUDA) generator states;
- COMMIT, written last: {"version", "step", "files": {name: sha256}}.

Everything is written into a temporary dot-directory that is renamed into place only after COMMIT is
on disk, so a run killed mid-save leaves either the previous checkpoints or a complete new one; a
directory whose COMMIT is missing or disagrees with its files is skipped with a warning on resume.
Tensors holding NaN/Inf are refused before anything is written. A save that fails on the way
(a full disk, any OSError or safetensors error) removes its temporary directory, keeps every
earlier checkpoint, and raises `CheckpointSaveError` naming the last good one. Tensors are copied
to the CPU first, so a checkpoint written from any device loads on a CPU. No pickle: tensors go to
safetensors, everything else to strict JSON. One writer per run directory (rank 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mixtral.atomic import atomic_directory
from mixtral.errors import TrainingError

VERSION = 1
MODEL, CONFIG, STATE, RNG, COMMIT = (
    "model.safetensors",
    "config.json",
    "state.json",
    "rng.safetensors",
    "COMMIT",
)
OPTIMIZER, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"
_STEP_DIR = re.compile(r"step-(\d+)")
# Optimizer state tensors that are elementwise over their parameter (torch's SGD, Adam, AdamW), so
# their shape must be the parameter's; other optimizers' entries (e.g. factored moments) are unchecked.
_PER_PARAM_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


class CheckpointSaveError(TrainingError):
    """Writing a checkpoint failed (disk full, I/O error); earlier checkpoints are intact."""


@dataclass
class TrainingState:
    """Where a run stands, besides weights and optimizer. Every dict must be JSON-serialisable."""

    step: int  # optimizer steps completed
    tokens_seen: int
    scheduler: dict[str, Any]  # e.g. an LR scheduler's state_dict
    data: dict[str, Any]  # the data stream's position, e.g. PackedStream.state_dict()
    extra: dict[str, Any]  # recipe, metrics summary, ...


# ---- saving -------------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of `state.step` atomically, then keep only the newest `keep` committed ones.

    Raises TrainingError naming the tensor (and writes nothing) if any model or optimizer tensor
    holds NaN/Inf, or naming the field if the state is not strict JSON. Replaces an existing
    checkpoint of the same step. Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    # Captured first, so the RNG streams a resumed run sees are exactly those at the call.
    rng_json, rng_tensors = capture_rng()
    model_tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
    _check_finite(model_tensors, state.step, lambda k: f"model tensor {k}")
    names = _param_names(model, optimizer)
    _check_finite(opt_tensors, state.step, lambda k: f"optimizer tensor {k} (state of {_owner(k, names)})")
    texts = {
        STATE: to_json({**dataclasses.asdict(state), "version": VERSION, "rng": rng_json}, "training state"),
        OPTIMIZER_JSON: to_json(opt_json, "optimizer param_groups/state"),
    }
    if callable(getattr(getattr(model, "config", None), "to_dict", None)):
        texts[CONFIG] = to_json(model.config.to_dict(), "model config")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step:08d}"
    try:
        remove_debris(root)
        with atomic_directory(final, overwrite=True) as tmp:
            save_file({k: v.cpu() for k, v in model_tensors.items()}, tmp / MODEL, metadata={"format": "pt"})
            save_file(
                {k: v.cpu() for k, v in opt_tensors.items()}, tmp / OPTIMIZER, metadata={"format": "pt"}
            )
            save_file(rng_tensors, tmp / RNG, metadata={"format": "pt"})
            for name, text in texts.items():
                (tmp / name).write_text(text)
            files = sorted(p.name for p in tmp.iterdir())
            for name in files:
                fsync(tmp / name)
            commit = {"version": VERSION, "step": state.step, "files": {n: sha256(tmp / n) for n in files}}
            (tmp / COMMIT).write_text(json.dumps(commit, indent=2) + "\n")
            fsync(tmp / COMMIT)
        fsync(root)  # make the rename itself durable before older checkpoints go
    except (OSError, SafetensorError) as e:
        good = next((p for p in reversed(step_dirs(root)) if commit_problem(p) is None), None)
        last = f"the last good checkpoint is {good}" if good else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"could not write the checkpoint of step {state.step} to {final} ({e}); {last} "
            "(free some space, then run the same command again to resume)"
        ) from e
    rotate(root, final, keep)
    return final


def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state_dict → flat tensors "{index}.{key}" and the JSON rest."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                other.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The model's name of each optimizer parameter index (for error messages)."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id.get(id(p), "?") for group in optimizer.param_groups for p in group["params"]]


def _owner(key: str, names: list[str]) -> str:
    index = int(key.split(".", 1)[0])
    return names[index] if index < len(names) else f"parameter {index}"


def _check_finite(tensors: dict[str, torch.Tensor], step: int, describe: Callable[[str], str]) -> None:
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise TrainingError(
                f"refusing to write the checkpoint of step {step}: {describe(key)} holds "
                f"{n_nan} NaN and {n_inf} Inf value(s)"
            )


def to_json(value: Any, what: str) -> str:
    try:  # allow_nan=False: strict JSON, and no non-finite number slips into a checkpoint
        return json.dumps(value, indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise TrainingError(f"{what} cannot be stored as strict JSON: {e}") from None


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    numpy_state = {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                   "cached_gaussian": float(cached)}  # fmt: skip
    tensors = {"torch.cpu": torch.get_rng_state()}
    # Only if already initialised: querying CUDA would otherwise initialise it as a side effect.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"torch.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(internal), gauss], "numpy": numpy_state}, tensors


def rotate(root: Path, new: Path, keep: int) -> None:
    """Delete all but `new` and the newest `keep - 1` other committed checkpoints.

    `new` always survives, even when a rerun from an earlier step finds newer checkpoints on disk.
    """
    others = [p for p in step_dirs(root) if p != new and (p / COMMIT).is_file()]
    for old in others[: max(len(others) - (keep - 1), 0)]:
        # Renamed first, so a kill mid-delete leaves a dot-directory, never a half-deleted step-*.
        doomed = old.with_name(f".{old.name}.deleting")
        old.rename(doomed)
        shutil.rmtree(doomed)


def remove_debris(root: Path) -> None:
    """Temp and half-deleted directories left by a killed run (one writer per run directory)."""
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".step-"):
                shutil.rmtree(p, ignore_errors=True)


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---- finding ------------------------------------------------------------------------------------


def step_dirs(root: Path) -> list[Path]:
    """step-* directories under `root`, oldest first; temp dot-directories are not among them."""
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def commit_problem(path: Path) -> str | None:
    """Why `path` is not a complete committed checkpoint, or None if it is."""
    try:
        commit = json.loads((path / COMMIT).read_text())
    except FileNotFoundError:
        return f"no {COMMIT} marker (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {COMMIT} marker ({e})"
    files = commit.get("files") if isinstance(commit, dict) else None
    if not isinstance(files, dict) or commit.get("version") != VERSION:
        return f"{COMMIT} marker is malformed or of an unknown version"
    m = _STEP_DIR.fullmatch(path.name)
    if m and commit.get("step") != int(m.group(1)):
        return f"{COMMIT} says step {commit.get('step')}, the directory name says {int(m.group(1))}"
    needed = (
        (".metadata", STATE, RNG)
        if commit.get("format") == "dcp"
        else (MODEL, OPTIMIZER, STATE, RNG, OPTIMIZER_JSON)
    )
    for name in needed:
        if name not in files:
            return f"{COMMIT} does not list {name}"
    for name, digest in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if sha256(path / name) != digest:
            return f"{name} does not match the sha256 in {COMMIT} (corrupted or modified)"
    return None


def has_checkpoint(run_dir: str | Path) -> int | None:
    """The step of the newest checkpoint directory with a COMMIT marker (unverified, cheap), or None."""
    for path in reversed(step_dirs(Path(run_dir) / "checkpoints")):
        if (path / COMMIT).is_file():
            return int(path.name.split("-")[1])
    return None


def checkpoint_id(run_dir: str | Path, step: int) -> str | None:
    """The sha256 of the model weights of step `step`'s checkpoint, from its COMMIT marker, or None."""
    try:
        commit = json.loads((Path(run_dir) / "checkpoints" / f"step-{step:08d}" / COMMIT).read_text())
        return commit["files"][".metadata" if commit.get("format") == "dcp" else MODEL]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest committed, intact checkpoint of a run, or None.

    Newer directories without a COMMIT marker, or whose files disagree with it, are skipped with a
    warning naming them; temporary directories are ignored.
    """
    for path in reversed(step_dirs(Path(run_dir) / "checkpoints")):
        problem = commit_problem(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


# ---- loading ------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> TrainingState:
    """Restore weights, optimizer state (if given) and the RNGs exactly; return the training state.

    The model must match the checkpoint exactly (names, shapes, dtypes, config); TrainingError names
    the first mismatch. After this, training continues bit-identically to the run that saved.
    """
    path = Path(path)
    if (problem := commit_problem(path)) is not None:
        raise TrainingError(f"cannot load checkpoint {path}: {problem}")
    state = _read_json(path / STATE)
    if state.get("version") != VERSION:
        raise TrainingError(f"{path / STATE}: unknown version {state.get('version')!r}, expected {VERSION}")
    _load_model(path, model)
    if optimizer is not None:
        _load_optimizer(path, optimizer)
    restore_rng(state["rng"], load_file(path / RNG))
    return TrainingState(**{f.name: state[f.name] for f in dataclasses.fields(TrainingState)})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: not readable JSON ({e})") from None


def _load_model(path: Path, model: nn.Module) -> None:
    tensors = load_file(path / MODEL)
    expected = model.state_dict()
    if missing := [k for k in expected if k not in tensors]:
        raise TrainingError(
            f"{path / MODEL} lacks {len(missing)} tensor(s) the model has: {', '.join(missing[:5])}"
        )
    if unexpected := [k for k in tensors if k not in expected]:
        raise TrainingError(
            f"{path / MODEL} holds {len(unexpected)} tensor(s) the model has no place for: "
            f"{', '.join(unexpected[:5])}"
        )
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise TrainingError(
                f"{path / MODEL}: tensor {key} is {got.dtype} {list(got.shape)}, "
                f"the model expects {want.dtype} {list(want.shape)}"
            )
    config = getattr(model, "config", None)
    if (path / CONFIG).is_file() and callable(getattr(config, "to_dict", None)):
        saved, live = _read_json(path / CONFIG), config.to_dict()
        if diff := [f"{k}={saved.get(k)!r} (model: {v!r})" for k, v in live.items() if saved.get(k) != v]:
            raise TrainingError(f"{path / CONFIG} describes a different model: {', '.join(diff)}")
    model.load_state_dict(tensors, strict=True)


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    saved = _read_json(path / OPTIMIZER_JSON)
    groups, live_groups = saved["param_groups"], optimizer.param_groups
    sizes, live_sizes = [len(g["params"]) for g in groups], [len(g["params"]) for g in live_groups]
    if sizes != live_sizes:
        raise TrainingError(
            f"{path / OPTIMIZER_JSON} has param groups of sizes {sizes}, the optimizer has {live_sizes}"
        )
    for group, live in zip(groups, live_groups, strict=True):
        for key, value in group.items():  # JSON turned tuples (AdamW's betas) into lists
            if isinstance(live.get(key), tuple) and isinstance(value, list):
                group[key] = tuple(value)
    params = [p for g in live_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {int(i): dict(e) for i, e in saved["state"].items()}
    for name, t in load_file(path / OPTIMIZER).items():
        index, key = name.split(".", 1)
        i = int(index)
        if i >= len(params) or (key in _PER_PARAM_KEYS and t.shape != params[i].shape):
            shape = list(params[i].shape) if i < len(params) else "no parameter"
            raise TrainingError(
                f"{path / OPTIMIZER}: tensor {name} has shape {list(t.shape)}, parameter: {shape}"
            )
        state.setdefault(i, {})[key] = t
    # torch casts floating state to its parameter's dtype and device (the same dtype for its own
    # optimizers, so the restore is exact) and keeps "step" as saved.
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def restore_rng(saved: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    s = saved["numpy"]
    keys = np.array(s["keys"], dtype=np.uint32)
    np.random.set_state((s["name"], keys, s["pos"], s["has_gauss"], s["cached_gaussian"]))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [tensors[f"torch.cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    elif cuda:
        warnings.warn(
            f"the checkpoint holds the CUDA RNG state of {len(cuda)} device(s), this process has "
            f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored",
            stacklevel=3,
        )
