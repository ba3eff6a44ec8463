"""Training checkpoints of a torchrun job, through torch.distributed.checkpoint (DCP).

Same directory discipline as `checkpoint_io` (step-00000123/, written as a dot-directory, COMMIT last
with every file's sha256, then renamed into place; older ones rotated), but the weights and optimizer
state are DCP's: every rank writes its own shards (`__R_0.distcp`) and rank 0 the `.metadata`, all
under the logical (global) names and shapes, so a checkpoint saved under one layout loads under
another (EP2×DP2 → EP4 → one process, where DCP reads it without a process group). Next to them:
state.json (the `TrainingState`, Python/NumPy RNG of rank 0, the layout that wrote it) and
rng.safetensors (every rank's torch generator: restored rank by rank when the layout is the same, so
a resume is bit-exact there). COMMIT carries `"format": "dcp"`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from mixtral.checkpoint import save_model
from mixtral.config import MixtralConfig
from mixtral.errors import TrainingError
from mixtral.model import Transformer
from mixtral.parallel import Layout, any_rank
from mixtral.train.checkpoint_io import (
    COMMIT,
    CONFIG,
    RNG,
    STATE,
    VERSION,
    CheckpointSaveError,
    TrainingState,
    capture_rng,
    commit_problem,
    fsync,
    remove_debris,
    restore_rng,
    rotate,
    sha256,
    step_dirs,
    to_json,
)

DCP_METADATA = ".metadata"
FORMAT = "dcp"


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def _first_non_finite(sd: dict, prefix: str) -> str | None:
    for k, v in sd.items():
        if isinstance(v, dict):
            if found := _first_non_finite(v, f"{prefix}{k}."):
                return found
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            local = v.to_local() if isinstance(v, DTensor) else v
            if not bool(torch.isfinite(local).all()):
                return f"{prefix}{k}"
    return None


def save_sharded_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    layout: Layout,
    keep: int = 2,
) -> Path:
    """Every rank calls this; the checkpoint of `state.step` is in place (committed) when it returns."""
    rank0 = layout.rank == 0
    rng_json, rng_tensors = capture_rng()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    bad = _first_non_finite({"model": model_sd, "optimizer": optim_sd}, "")
    if any_rank(bad is not None, layout.device):
        names = [None] * layout.world
        dist.all_gather_object(names, bad)
        where = "; ".join(f"rank {r}: {n}" for r, n in enumerate(names) if n)
        raise TrainingError(f"refusing to save step {state.step}: non-finite values in {where}")
    all_rng: list = [None] * layout.world
    dist.all_gather_object(all_rng, rng_tensors)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step:08d}"
    tmp = root / f".step-{state.step:08d}.partial"
    error = None
    if rank0:
        try:
            remove_debris(root)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if any_rank(error is not None, layout.device):
        raise _save_error(root, final, state.step, error)
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    except Exception as e:  # noqa: BLE001 - any writer failure: the same clear error on every rank
        error = e
    if any_rank(error is not None, layout.device):
        raise _save_error(root, final, state.step, error)
    if rank0:
        try:
            record = {**dataclasses.asdict(state), "version": VERSION, "rng": rng_json, "format": FORMAT,
                      "layout": {**dataclasses.asdict(layout.config), "world": layout.world}}  # fmt: skip
            (tmp / STATE).write_text(to_json(record, "training state"))
            if callable(getattr(getattr(model, "config", None), "to_dict", None)):
                (tmp / CONFIG).write_text(to_json(model.config.to_dict(), "model config"))
            tensors = {f"rank{r}.{k}": v for r, t in enumerate(all_rng) for k, v in t.items()}
            save_file(tensors, tmp / RNG, metadata={"format": "pt"})
            files = sorted(p.name for p in tmp.iterdir())
            for name in files:
                fsync(tmp / name)
            commit = {"version": VERSION, "step": state.step, "format": FORMAT,
                      "files": {n: sha256(tmp / n) for n in files}}  # fmt: skip
            (tmp / COMMIT).write_text(json.dumps(commit, indent=2) + "\n")
            fsync(tmp / COMMIT)
            if final.exists():
                old = final.with_name(f".{final.name}.deleting")
                final.rename(old)
                shutil.rmtree(old)
            tmp.rename(final)
            fsync(root)
            rotate(root, final, keep)
        except OSError as e:
            error = e
    if any_rank(error is not None, layout.device):
        raise _save_error(root, final, state.step, error)
    return final


def _save_error(root: Path, final: Path, step: int, error: BaseException | None) -> CheckpointSaveError:
    good = next((p for p in reversed(step_dirs(root)) if commit_problem(p) is None), None)
    last = f"the last good checkpoint is {good}" if good else "no earlier checkpoint exists"
    why = f" ({error})" if error is not None else " (on another rank)"
    return CheckpointSaveError(f"could not write the checkpoint of step {step} to {final}{why}; {last}")


def load_sharded_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, layout: Layout | None = None
) -> TrainingState:
    """Restore a DCP checkpoint into `model` (and `optimizer`) under any layout, or in one process
    (`layout` None, no process group); the RNGs too (each rank's own when the layout is unchanged)."""
    path = Path(path)
    if (problem := commit_problem(path)) is not None:
        raise TrainingError(f"cannot load checkpoint {path}: {problem}")
    state = json.loads((path / STATE).read_text())
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        target = {"model": model_sd, "optimizer": optim_sd}
    else:
        model_sd, _ = get_state_dict(model, [])
        target = {"model": model_sd}
    try:
        dcp.load(target, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - DCP's errors name keys and shapes; add the path
        raise TrainingError(f"cannot load checkpoint {path} into this model: {e}") from e
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=target["model"],
                   optim_state_dict=target.get("optimizer", {}))  # fmt: skip
    saved = load_file(path / RNG)
    rank, world = (layout.rank, layout.world) if layout is not None else (0, 1)
    same = state.get("layout", {}).get("world") == world
    prefix = f"rank{rank if same else 0}."
    restore_rng(state["rng"], {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)})
    return TrainingState(**{f.name: state[f.name] for f in dataclasses.fields(TrainingState)})


def export_sharded(path: str | Path, dst: str | Path, **options) -> Path:
    """A sharded training checkpoint (step directory of a torchrun run) as a checkpoint of our loaders'
    formats: the weights gathered into one process (no process group needed) and written by
    `save_model` (`options`: format "hf" or "mistral", dtype, tokenizer_src, overwrite). Without
    tokenizer_src, the run's own tokenizer (RUN/tokenizer) is taken when it has one."""
    path = Path(path)
    if not is_sharded(path):
        raise TrainingError(f"{path} is not a sharded training checkpoint (no {DCP_METADATA})")
    if not (path / CONFIG).is_file():
        raise TrainingError(f"{path} has no {CONFIG}: cannot build the model to load it into")
    model = Transformer(MixtralConfig.from_dict(json.loads((path / CONFIG).read_text())))
    load_sharded_checkpoint(path, model, None)
    run_tokenizer = path.parent.parent / "tokenizer" / "tokenizer.model"
    if "tokenizer_src" not in options and run_tokenizer.is_file():
        options["tokenizer_src"] = run_tokenizer
    save_model(model.eval(), dst, **options)
    return Path(dst)
