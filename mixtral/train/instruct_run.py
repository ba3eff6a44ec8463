"""Runs SFT or DPO on a checkpoint: read and tokenize chat data, train on the shared loop, export.

Each run directory gets `data.json` (records kept / truncated / dropped by the over-length rule),
`metrics.jsonl` (every logged step, with the balance and z-losses the loop always adds),
`eval.json`, `curve.png`, rotating resumable checkpoints, and `model/` in Hugging Face format with
the tokenizer. Defaults train on the bundled `data/instruct` files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mixtral.checkpoint import load_model, save_model
from mixtral.data.instruct import (
    PreferenceStream,
    SFTStream,
    read_preferences,
    read_sft,
    tokenize_preferences,
    tokenize_sft,
)
from mixtral.errors import DataError
from mixtral.eval.lm import masked_loss
from mixtral.text import load_tokenizer
from mixtral.train.instruct import DPOObjective, dpo_loss, evaluate_dpo, reference_logprobs, sft_objective
from mixtral.train.loop import Objective, TrainConfig, train
from mixtral.train.run import plot_curve

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "instruct"

SFT_TRAIN = TrainConfig(steps=400, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=20, weight_decay=0.0,
                        eval_every=100, save_every=100, log_every=10)  # fmt: skip
DPO_TRAIN = TrainConfig(steps=200, batch_size=8, lr=3e-5, min_lr=3e-6, warmup_steps=10, weight_decay=0.0,
                        eval_every=50, save_every=50, log_every=5)  # fmt: skip


@dataclass(frozen=True)
class InstructConfig:
    """Data and DPO settings (the optimisation settings are a TrainConfig)."""

    max_len: int = 512  # tokens per conversation / prompt + response (see mixtral.data.instruct)
    eval_batch_size: int = 8
    beta: float = 0.1  # DPO temperature
    label_smoothing: float = 0.0  # conservative DPO
    reference: str = "precomputed"  # "precomputed" (one pass, no second model) or "copy" (frozen model)

    def __post_init__(self) -> None:
        if self.reference not in ("precomputed", "copy"):
            raise ValueError(f"reference must be precomputed or copy, not {self.reference!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        z = torch.zeros(1)
        dpo_loss(z, z, z, z, self.beta, self.label_smoothing)  # raises on a bad beta or label_smoothing


def sft_loss(model: torch.nn.Module, stream: SFTStream, batch_size: int = 8) -> float:
    """Mean cross-entropy over the assistant tokens of every example, once."""
    total, n = masked_loss(model, stream.iter_batches(batch_size))
    return total / max(n, 1)


Evaluate = Callable[[torch.nn.Module], dict]


def _sft_setup(model, examples: list, valid: list | None, cfg: TrainConfig, icfg: InstructConfig):
    valid_stream = SFTStream(valid, shuffle=False) if valid is not None else None

    def evaluate(m: torch.nn.Module) -> dict:
        return {"sft_loss": sft_loss(m, valid_stream, icfg.eval_batch_size)} if valid_stream else {}

    return sft_objective, SFTStream(examples, seed=cfg.seed), evaluate


def _dpo_setup(model, examples: list, valid: list | None, cfg: TrainConfig, icfg: InstructConfig):
    stream = PreferenceStream(examples, seed=cfg.seed)
    # The reference is the model as loaded, before train() restores any checkpoint of this run.
    frozen = copy.deepcopy(model) if icfg.reference == "copy" else None

    def objective_for(data: PreferenceStream) -> DPOObjective:
        ref = frozen if frozen is not None else reference_logprobs(model, data, icfg.eval_batch_size)
        return DPOObjective(ref, icfg.beta, icfg.label_smoothing)

    valid_stream = PreferenceStream(valid, shuffle=False) if valid is not None else None
    objective, valid_objective = objective_for(stream), objective_for(valid_stream) if valid_stream else None

    def evaluate(m: torch.nn.Module) -> dict:
        return evaluate_dpo(m, valid_objective, valid_stream, icfg.eval_batch_size) if valid_stream else {}

    return objective, stream, evaluate


def _sft_report(before: dict, after: dict, icfg: InstructConfig) -> dict:
    return {"valid_loss_before": before.get("sft_loss"), "valid_loss_after": after.get("sft_loss")}


def _dpo_report(before: dict, after: dict, icfg: InstructConfig) -> dict:
    return {"beta": icfg.beta, "label_smoothing": icfg.label_smoothing, "reference": icfg.reference,
            "valid_before": before, "valid_after": after}  # fmt: skip


@dataclass(frozen=True)
class _Kind:
    """Everything that differs between SFT and DPO; the run itself is shared (`run_instruct`)."""

    files: str  # data/instruct/{files}_train.jsonl, {files}_valid.jsonl
    records: str  # what one record is, for messages
    read: Callable[[Path], list]
    tokenize: Callable[..., tuple[list, dict]]
    train: TrainConfig  # default optimisation settings
    # (model, train examples, valid examples or None, cfg, icfg) -> (objective, stream, evaluate)
    setup: Callable[..., tuple[Objective, Any, Evaluate]]
    report: Callable[[dict, dict, InstructConfig], dict]  # kind-specific report fields
    curve: tuple[str, str]  # held-out metric plotted and its axis label


KINDS = {
    "sft": _Kind("sft", "conversation", read_sft, tokenize_sft, SFT_TRAIN, _sft_setup, _sft_report,
                 ("sft_loss", "assistant-token cross-entropy (nats)")),
    "dpo": _Kind("pref", "preference pair", read_preferences, tokenize_preferences, DPO_TRAIN, _dpo_setup,
                 _dpo_report, ("loss", "DPO loss")),
}  # fmt: skip


def run_instruct(
    kind: str,
    model_path: str | Path,
    out_dir: str | Path,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    cfg: TrainConfig | None = None,
    icfg: InstructConfig = InstructConfig(),
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """SFT or DPO (`kind`) of `model_path` into `out_dir`; returns the report also written to eval.json.

    Without `train_file`, the bundled data/instruct files are used (and their held-out split unless
    `valid_file` is given). `cfg` None takes the kind's defaults (SFT_TRAIN, DPO_TRAIN). The report
    has the steps, tokens seen, data counts and the held-out metrics before and after training.
    """
    k = KINDS[kind]
    cfg = cfg if cfg is not None else k.train
    if train_file is None:
        train_file = DATA_DIR / f"{k.files}_train.jsonl"
        valid_file = valid_file or DATA_DIR / f"{k.files}_valid.jsonl"
    train_path, valid_path = Path(train_file), (Path(valid_file) if valid_file else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"kind": kind, "base": str(model_path), "train_file": train_path, "valid_file": valid_path,
            "train": dataclasses.asdict(cfg), "instruct": dataclasses.asdict(icfg)}  # fmt: skip
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    model, tok = load_model(model_path), load_tokenizer(model_path)
    examples, counts = k.tokenize(tok, k.read(train_path), icfg.max_len)
    if not examples:
        raise DataError(f"{train_path}: no {k.records} survives max_len={icfg.max_len}")
    data_info, valid = {"train": counts}, None
    if valid_path is not None:
        valid, data_info["valid"] = k.tokenize(tok, k.read(valid_path), icfg.max_len)
    (out / "data.json").write_text(json.dumps(data_info, indent=2))
    objective, stream, evaluate = k.setup(model, examples, valid, cfg, icfg)
    before = evaluate(model)
    torch.manual_seed(cfg.seed)
    state = train(model, objective, stream, cfg, out, evaluate, resume, progress)
    report = {"kind": kind, "steps": state.step, "tokens_seen": state.tokens_seen, "data": data_info,
              **k.report(before, evaluate(model), icfg)}  # fmt: skip
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    dtype = torch.bfloat16 if model.config.total_params > 5e6 else None
    save_model(model, out / "model", tokenizer_src=tok, dtype=dtype, overwrite=True)
    title = "SFT" if kind == "sft" else f"DPO (beta={icfg.beta})"
    plot_curve(out / "metrics.jsonl", out / "curve.png", title, *k.curve)
    return report


def run_sft(*args: Any, **options: Any) -> dict:
    """Supervised fine-tuning on assistant tokens: `run_instruct("sft", ...)` (held-out loss before and after)."""
    return run_instruct("sft", *args, **options)


def run_dpo(*args: Any, **options: Any) -> dict:
    """DPO from the model, which is also the frozen reference: `run_instruct("dpo", ...)` (held-out rewards)."""
    return run_instruct("dpo", *args, **options)
