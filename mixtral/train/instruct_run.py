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


@dataclass(frozen=True)
class _Kind:
    """What differs between SFT and DPO data: the bundled file stem, its reader and tokenizer."""

    name: str  # "sft" or "dpo"
    files: str  # data/instruct/{files}_train.jsonl, {files}_valid.jsonl
    read: Callable[[Path], list]
    tokenize: Callable[..., tuple[list, dict]]
    records: str  # what a record is, for messages


SFT = _Kind("sft", "sft", read_sft, tokenize_sft, "conversation")
DPO = _Kind("dpo", "pref", read_preferences, tokenize_preferences, "preference pair")
# (model, train examples, valid examples or None) -> (objective, train stream, evaluate)
Setup = Callable[
    [torch.nn.Module, list, list | None], tuple[Objective, Any, Callable[[torch.nn.Module], dict]]
]


def _run(
    kind: _Kind,
    model_path: str | Path,
    out_dir: str | Path,
    files: tuple[str | Path | None, str | Path | None],
    cfg: TrainConfig,
    icfg: InstructConfig,
    setup: Setup,
    run: tuple[bool, bool],
) -> tuple[torch.nn.Module, object, Path, dict]:
    """The skeleton both runs share: data, objective from `setup`, evaluation before and after, training.

    Returns (model, tokenizer, out dir, partial report with steps, tokens_seen, data, before, after).
    `run` is (resume, progress).
    """
    train_file, valid_file = files
    if train_file is None:
        train_file = DATA_DIR / f"{kind.files}_train.jsonl"
        valid_file = valid_file or DATA_DIR / f"{kind.files}_valid.jsonl"
    train_path, valid_path = Path(train_file), (Path(valid_file) if valid_file else None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"kind": kind.name, "base": str(model_path), "train_file": train_path, "valid_file": valid_path,
            "train": dataclasses.asdict(cfg), "instruct": dataclasses.asdict(icfg)}  # fmt: skip
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    model, tok = load_model(model_path), load_tokenizer(model_path)
    examples, counts = kind.tokenize(tok, kind.read(train_path), icfg.max_len)
    if not examples:
        raise DataError(f"{train_path}: no {kind.records} survives max_len={icfg.max_len}")
    data_info, valid = {"train": counts}, None
    if valid_path is not None:
        valid, data_info["valid"] = kind.tokenize(tok, kind.read(valid_path), icfg.max_len)
    (out / "data.json").write_text(json.dumps(data_info, indent=2))
    objective, stream, evaluate = setup(model, examples, valid)
    before = evaluate(model)
    torch.manual_seed(cfg.seed)
    state = train(model, objective, stream, cfg, out, evaluate, *run)
    report = {"kind": kind.name, "steps": state.step, "tokens_seen": state.tokens_seen, "data": data_info,
              "before": before, "after": evaluate(model)}  # fmt: skip
    return model, tok, out, report


def _finish(model, tok, out: Path, report: dict, title: str, eval_key: str, ylabel: str) -> dict:
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    dtype = torch.bfloat16 if model.config.total_params > 5e6 else None
    save_model(model, out / "model", tokenizer_src=tok, dtype=dtype, overwrite=True)
    plot_curve(out / "metrics.jsonl", out / "curve.png", title, eval_key, ylabel)
    return report


def sft_loss(model: torch.nn.Module, stream: SFTStream, batch_size: int = 8) -> float:
    """Mean cross-entropy over the assistant tokens of every example, once."""
    total, n = masked_loss(model, stream.iter_batches(batch_size))
    return total / max(n, 1)


def run_sft(
    model_path: str | Path,
    out_dir: str | Path,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    cfg: TrainConfig = SFT_TRAIN,
    icfg: InstructConfig = InstructConfig(),
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Supervised fine-tuning on assistant tokens; returns the held-out loss before and after."""

    def setup(model, examples, valid_examples):
        valid = SFTStream(valid_examples, shuffle=False) if valid_examples is not None else None

        def evaluate(m):
            return {"sft_loss": sft_loss(m, valid, icfg.eval_batch_size)} if valid else {}

        return sft_objective, SFTStream(examples, seed=cfg.seed), evaluate

    files = (train_file, valid_file)
    model, tok, out, r = _run(SFT, model_path, out_dir, files, cfg, icfg, setup, (resume, progress))
    before, after = r.pop("before"), r.pop("after")
    r.update(valid_loss_before=before.get("sft_loss"), valid_loss_after=after.get("sft_loss"))
    return _finish(model, tok, out, r, "SFT", "sft_loss", "assistant-token cross-entropy (nats)")


def run_dpo(
    model_path: str | Path,
    out_dir: str | Path,
    train_file: str | Path | None = None,
    valid_file: str | Path | None = None,
    cfg: TrainConfig = DPO_TRAIN,
    icfg: InstructConfig = InstructConfig(),
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """DPO from `model_path` (also the reference); returns held-out reward metrics before and after."""

    def setup(model, examples, valid_examples):
        stream = PreferenceStream(examples, seed=cfg.seed)
        # The reference is the model as loaded, before train() restores any checkpoint of this run.
        frozen = copy.deepcopy(model) if icfg.reference == "copy" else None

        def objective_for(data: PreferenceStream) -> DPOObjective:
            ref = frozen if frozen is not None else reference_logprobs(model, data, icfg.eval_batch_size)
            return DPOObjective(ref, icfg.beta, icfg.label_smoothing)

        valid = PreferenceStream(valid_examples, shuffle=False) if valid_examples is not None else None
        objective, valid_objective = objective_for(stream), objective_for(valid) if valid else None

        def evaluate(m):
            return evaluate_dpo(m, valid_objective, valid, icfg.eval_batch_size) if valid else {}

        return objective, stream, evaluate

    files = (train_file, valid_file)
    model, tok, out, r = _run(DPO, model_path, out_dir, files, cfg, icfg, setup, (resume, progress))
    r.update(beta=icfg.beta, label_smoothing=icfg.label_smoothing, reference=icfg.reference,
             valid_before=r.pop("before"), valid_after=r.pop("after"))  # fmt: skip
    return _finish(model, tok, out, r, f"DPO (beta={icfg.beta})", "loss", "DPO loss")
