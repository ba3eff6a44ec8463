"""The one training loop: pretraining, SFT and DPO differ only in their data stream and objective.

AdamW (no weight decay on norms and the router), linear warmup then cosine decay, gradient
clipping and accumulation, optional bf16 autocast and activation checkpointing, the load-balancing
loss (pooled HF form or per-layer) and router z-loss added to every objective, optional router
jitter, a NaN/Inf guard that stops before the optimizer step and names where non-finite values
started, atomic checkpoints with a commit marker, exact resume, JSONL metrics and a progress bar.

Device-agnostic: the loop runs where the model's parameters are (batches are moved there, bf16
autocast uses that device type) and checkpoints are written from CPU copies, so they load anywhere.
One writer per run directory (`mixtral.train.rundir.run_lock`); a resume whose TrainConfig differs
from the checkpoint's is refused unless every change is one of `rundir.SAFE_CHANGES` (warned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from mixtral.errors import TrainingError
from mixtral.eval.lm import to_device
from mixtral.parallel import Layout, all_reduce_sum, any_rank, clip_grad_norm, mean_over_ranks, sum_over_ranks
from mixtral.train.checkpoint_io import (
    STATE,
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mixtral.train.losses import BALANCE_FORMS, expert_load, load_balancing_loss, router_z_loss
from mixtral.train.rundir import check_resume, describe, read_json, run_lock
from mixtral.train.sharded_io import is_sharded, load_sharded_checkpoint, save_sharded_checkpoint


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation knobs of a run (the architecture lives in MixtralConfig)."""

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50  # clamped to `steps`: a short run needs only train.steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    balance: str = "pooled"  # "pooled" (transformers' form), "per_layer" or "none"
    balance_coef: float = 0.02  # the released Mixtral config's router_aux_loss_coef
    z_coef: float = 1e-3
    router_jitter: float = 0.0
    bf16: bool = False
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 200
    eval_max_tokens: int = 0  # held-out tokens one evaluation reads at most (0: the whole held-out set)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < train.min_lr <= train.lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.balance not in BALANCE_FORMS:
            raise ValueError(f"train.balance must be one of {', '.join(BALANCE_FORMS)}, got {self.balance!r}")
        for name in ("weight_decay", "grad_clip", "balance_coef", "z_coef", "router_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ObjectiveOutput:
    """What an objective returns for one micro-batch."""

    loss: torch.Tensor  # scalar, the objective's own loss (the loop adds balance and z-loss)
    router_logits: torch.Tensor  # [L, B, T, E] from the model's forward(s)
    router_mask: torch.Tensor | None  # [B, T] tokens that count for the router losses
    tokens: int  # real (non-padding) tokens processed: the logged tokens/s and tokens_seen
    metrics: dict[str, float] = field(default_factory=dict)
    loss_tokens: int | None = None  # tokens the objective's loss is on (SFT: assistant tokens), if counted
    loss_over: int | None = None  # what `loss` is a mean over, if not its tokens (DPO: pairs)


Objective = Callable[[nn.Module, Any], ObjectiveOutput]


class DataStream(Protocol):
    def next_batch(self, batch_size: int) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over min(warmup_steps, steps) steps, then cosine decay to min_lr at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: never on norms or the router (`gate`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("norm.weight") or ".gate." in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def find_non_finite(model: nn.Module, run_forward: Callable[[], object]) -> str:
    """Re-run a forward with hooks and name the first module whose output is not finite."""
    first: list[str] = []

    def hook(name: str):
        def check(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "logits", output)
            if not first and isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
                first.append(name)

        return check

    handles = [m.register_forward_hook(hook(n or "model")) for n, m in model.named_modules()]
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    where = f"first non-finite output in module '{first[0]}'" if first else "the forward pass is finite"
    return where + (f"; non-finite parameters: {', '.join(bad_params[:5])}" if bad_params else "")


def _global_means(out: ObjectiveOutput, z: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's loss and the z-loss, each a mean over this rank's tokens, reweighted by this rank's
    share of the global batch's tokens (× W, which the data-parallel average of the gradients divides
    back): their gradients, and their averages over the ranks, are then those of the means over the
    global batch, as one process computes them (ranks hold different numbers of loss tokens: document
    boundaries, padding, SFT's masks)."""
    if out.loss_over is not None:
        n_loss = out.loss_over
    else:
        n_loss = out.tokens if out.loss_tokens is None else out.loss_tokens
    n_router = (
        int(out.router_mask.sum()) if out.router_mask is not None else out.router_logits[0, ..., 0].numel()
    )
    counts = torch.tensor([float(n_loss), float(n_router)], dtype=torch.float64, device=layout.device)
    dist.all_reduce(counts)
    w_loss = n_loss * layout.world / max(float(counts[0]), 1.0)
    w_z = n_router * layout.world / max(float(counts[1]), 1.0)
    return out.loss * w_loss, z * w_z


def train_step(
    model: nn.Module, objective: Objective, data: DataStream, optimizer: torch.optim.Optimizer,
    cfg: TrainConfig, step: int, layout: Layout | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One optimizer step over grad_accum micro-batches; raises TrainingError before updating on NaN/Inf.

    With a `layout` (torchrun, `mixtral.parallel`), `data` yields this rank's slice of the batch and
    the model is `parallelize`d: the router balance uses the global batch's statistics, a non-finite
    loss on any rank stops every rank (naming the rank and module), the gradient norm is the global
    one, and the returned metrics are averages (tokens: sums) over the ranks."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    t0, tokens, loss_tokens = time.perf_counter(), 0, 0
    sums, loads = {"loss": 0.0, "balance": 0.0, "z": 0.0}, []
    top_k = model.config.top_k
    device = layout.device if layout is not None else next(model.parameters()).device
    reduce = None if layout is None else all_reduce_sum
    for _ in range(cfg.grad_accum):
        batch = data.next_batch(cfg.batch_size)
        if batch is None:
            raise TrainingError(f"the data stream ran out at step {step}")
        batch = to_device(batch, device)
        bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
        with bf16:
            out = objective(model, batch)
        balance = load_balancing_loss(out.router_logits, top_k, out.router_mask, cfg.balance, reduce)
        z = router_z_loss(out.router_logits, out.router_mask)
        if layout is not None:
            out.loss, z = _global_means(out, z, layout)
        loss = out.loss + cfg.balance_coef * balance + cfg.z_coef * z
        bad = not bool(torch.isfinite(loss))
        if layout is not None:
            bad = any_rank(bad, device)
        if bad:  # every rank re-runs its forward (FSDP's all-gathers need them all), then reports
            where = find_non_finite(model, lambda b=batch: objective(model, b))
            report = [(0, float(loss), where)]
            if layout is not None:
                report = [None] * layout.world
                dist.all_gather_object(report, (layout.rank, float(loss), where))
            nan_ranks = [r for r, v, _ in report if not math.isfinite(v)]
            # A NaN crosses ranks (router statistics, all-to-all): name the ranks where a module made it.
            found = [(r, w) for r, _, w in report if w.startswith("first")] or [(r, w) for r, _, w in report]
            where = "; ".join(f"rank {r}: {w}" if layout else w for r, w in found)
            spread = (
                f" (the loss is non-finite on rank(s) {', '.join(map(str, nan_ranks))})" if layout else ""
            )
            raise TrainingError(
                f"non-finite loss ({float(loss)}) at step {step}, before the update: {where}{spread}"
            )
        (loss / cfg.grad_accum).backward()
        tokens += out.tokens
        loss_tokens += out.tokens if out.loss_tokens is None else out.loss_tokens
        for key, value in (("loss", out.loss), ("balance", balance), ("z", z)):
            sums[key] += float(value.detach()) / cfg.grad_accum
        for key, value in out.metrics.items():
            sums[key] = sums.get(key, 0.0) + value / cfg.grad_accum
        loads.append(expert_load(out.router_logits, top_k, out.router_mask))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if layout is not None:
        grad_norm = clip_grad_norm(params, cfg.grad_clip or float("inf"), layout)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf")))
    if not math.isfinite(grad_norm):
        named = {id(p): n for n, p in model.named_parameters()}
        bad = [named[id(p)] for p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
        raise TrainingError(
            f"non-finite gradients at step {step}, before the update, in: {', '.join(bad[:5])}"
        )
    optimizer.step()
    load = torch.stack(loads).mean(0)  # [L, E]
    if layout is not None:
        sums = mean_over_ranks(sums, device)
        tokens, loss_tokens = sum_over_ranks(tokens, device), sum_over_ranks(loss_tokens, device)
        load = load.to(device)
        dist.all_reduce(load)
        load = load.cpu() / layout.world
    seconds = time.perf_counter() - t0
    return {**sums, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "loss_tokens": loss_tokens, "loss_tokens_per_s": loss_tokens / seconds,
            "imbalance": float((load.max(-1).values * load.shape[-1]).mean()),
            "expert_load": [[round(v, 4) for v in row] for row in load.tolist()]}  # fmt: skip


def _configure(model: nn.Module, cfg: TrainConfig) -> None:
    model.train()
    model.activation_checkpointing = cfg.activation_checkpointing
    for layer in model.layers:
        layer.feed_forward.jitter = cfg.router_jitter


def _open_log(run_dir: Path, resumed_step: int):
    """metrics.jsonl, keeping only lines up to the resumed step (a killed run may have logged more)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        kept = [
            line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= resumed_step
        ]
        path.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def train(
    model: nn.Module,
    objective: Objective,
    data: DataStream,
    cfg: TrainConfig,
    run_dir: str | Path,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after: int | None = None,
    layout: Layout | None = None,
) -> TrainingState:
    """Train until cfg.steps (or `stop_after` steps, as if killed); resume from run_dir's latest
    committed checkpoint if there is one. Returns the final state; metrics go to run_dir/metrics.jsonl.

    Holds run_dir's writer lock throughout (RunLockedError if another process writes there). A
    checkpoint whose TrainConfig differs from `cfg` in anything but `rundir.SAFE_CHANGES` is refused
    (ResumeMismatchError naming the fields) before any file is touched; safe changes are warned about.
    """
    run_dir = Path(run_dir)
    if layout is not None and layout.rank != 0:  # rank 0 holds the lock and writes; the others follow
        return _train(model, objective, data, cfg, run_dir, evaluate, resume, False, stop_after, None, layout)
    with run_lock(run_dir) as lock:
        return _train(
            model, objective, data, cfg, run_dir, evaluate, resume, progress, stop_after, lock, layout
        )


def _resume_warning(run_dir: Path, step: int, stored: dict, cfg: TrainConfig) -> None:
    changes = check_resume(stored, {"train": asdict(cfg)}, f"{run_dir} (checkpoint state.json)", step)
    if not changes:
        return
    message = f"resuming {run_dir} at step {step} with changed settings: {describe(changes)}"
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        old = TrainConfig(**{k: v for k, v in stored["train"].items() if k in known})
    except (TypeError, ValueError):
        old = None
    if old is not None and step < cfg.steps and (a := lr_at(step, old)) != (b := lr_at(step, cfg)):
        message += (
            f"; the learning rate at step {step} moves from {a:.4g} to {b:.4g} (the schedule follows steps)"
        )
    warnings.warn(message, stacklevel=4)


def _train(
    model, objective, data, cfg, run_dir, evaluate, resume, progress, stop_after, lock, layout=None
) -> TrainingState:
    from tqdm.auto import tqdm

    optimizer = make_optimizer(model, cfg)
    state = TrainingState(step=0, tokens_seen=0, scheduler={}, data={}, extra={"train": asdict(cfg)})
    if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        saved = read_json(ckpt / STATE) or {}
        stored = (saved.get("extra") or {}).get("train")
        if isinstance(stored, dict):  # checked before the checkpoint touches the model
            _resume_warning(run_dir, int(saved.get("step", 0)), {"train": stored}, cfg)
        if is_sharded(ckpt):  # written by a torchrun job: DCP reshards it to this layout (or one process)
            state = load_sharded_checkpoint(ckpt, model, optimizer, layout)
        elif layout is not None:
            raise TrainingError(
                f"{ckpt} is a one-process checkpoint; resume it in one process (a torchrun job resumes the "
                "sharded checkpoints torchrun jobs write)"
            )
        else:
            state = load_checkpoint(ckpt, model, optimizer)
        data.load_state_dict(state.data)
        state.extra["train"] = asdict(cfg)
    writer = layout is None or layout.rank == 0
    if writer:
        lock.claim()  # the first write to the run directory
    _configure(model, cfg)
    log_cm = _open_log(run_dir, state.step) if writer else contextlib.nullcontext(None)
    with log_cm as log, tqdm(total=cfg.steps, initial=state.step, disable=not progress,
                                                     desc="train", unit="step") as bar:  # fmt: skip
        while state.step < cfg.steps and (stop_after is None or state.step < stop_after):
            metrics = train_step(model, objective, data, optimizer, cfg, state.step, layout)
            state.step += 1
            state.tokens_seen += metrics["tokens"]
            record = {"step": state.step, "tokens_seen": state.tokens_seen, **metrics}
            if evaluate is not None and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                record["eval"] = evaluate(model)
                model.train()
            if log is not None and (
                state.step % cfg.log_every == 0 or "eval" in record or state.step == cfg.steps
            ):
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}"
            )  # all real tokens
            bar.update(1)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps:
                state.data = data.state_dict()
                if layout is not None:
                    save_sharded_checkpoint(run_dir, model, optimizer, state, layout)
                else:
                    save_checkpoint(run_dir, model, optimizer, state)
    model.eval()
    return state
