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
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import load_model, save_model
from ..data.instruct import (
    PreferenceStream,
    SFTStream,
    read_preferences,
    read_sft,
    tokenize_preferences,
    tokenize_sft,
)
from ..errors import DataError
from ..tokenizer import load_tokenizer
from .instruct import DPOObjective, dpo_loss, evaluate_dpo, reference_logprobs, sft_objective
from .loop import TrainConfig, train
from .losses import masked_cross_entropy
from .run import plot_curve

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


def _files(
    kind: str, train_file: str | Path | None, valid_file: str | Path | None
) -> tuple[Path, Path | None]:
    if train_file is None:
        train_file = DATA_DIR / f"{kind}_train.jsonl"
        valid_file = valid_file or DATA_DIR / f"{kind}_valid.jsonl"
    return Path(train_file), (Path(valid_file) if valid_file else None)


def _start(model_path: str | Path, out_dir: str | Path, info: dict) -> tuple[torch.nn.Module, object, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(info, indent=2, default=str))
    return load_model(model_path), load_tokenizer(model_path), out


def _finish(model, tok, out: Path, report: dict, title: str, eval_key: str, ylabel: str) -> dict:
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    dtype = torch.bfloat16 if model.config.total_params > 5e6 else None
    save_model(model, out / "model", tokenizer_src=tok, dtype=dtype, overwrite=True)
    plot_curve(out / "metrics.jsonl", out / "curve.png", title, eval_key, ylabel)
    return report


@torch.no_grad()
def sft_loss(model: torch.nn.Module, stream: SFTStream, batch_size: int = 8) -> float:
    """Mean cross-entropy over the assistant tokens of every example, once."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in stream.iter_batches(batch_size):
        k = int(batch.loss_mask.sum())
        total += float(masked_cross_entropy(model(batch.inputs, positions=batch.positions).logits,
                                            batch.targets, batch.loss_mask)) * k  # fmt: skip
        n += k
    model.train(was_training)
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
    train_path, valid_path = _files("sft", train_file, valid_file)
    model, tok, out = _start(model_path, out_dir, {"kind": "sft", "base": str(model_path), "train_file": train_path,
                                                   "valid_file": valid_path, "train": dataclasses.asdict(cfg),
                                                   "instruct": dataclasses.asdict(icfg)})  # fmt: skip
    examples, counts = tokenize_sft(tok, read_sft(train_path), icfg.max_len)
    if not examples:
        raise DataError(f"{train_path}: no conversation survives max_len={icfg.max_len}")
    data_info = {"train": counts}
    valid = None
    if valid_path is not None:
        valid_examples, data_info["valid"] = tokenize_sft(tok, read_sft(valid_path), icfg.max_len)
        valid = SFTStream(valid_examples, shuffle=False)
    (out / "data.json").write_text(json.dumps(data_info, indent=2))
    before = sft_loss(model, valid, icfg.eval_batch_size) if valid else None

    def evaluate(m):
        return {"sft_loss": sft_loss(m, valid, icfg.eval_batch_size)} if valid else {}

    torch.manual_seed(cfg.seed)
    state = train(
        model, sft_objective, SFTStream(examples, seed=cfg.seed), cfg, out, evaluate, resume, progress
    )
    report = {"kind": "sft", "steps": state.step, "tokens_seen": state.tokens_seen, "data": data_info,
              "valid_loss_before": before, "valid_loss_after": sft_loss(model, valid, icfg.eval_batch_size) if valid else None}  # fmt: skip
    return _finish(model, tok, out, report, "SFT", "sft_loss", "assistant-token cross-entropy (nats)")


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
    train_path, valid_path = _files("pref", train_file, valid_file)
    model, tok, out = _start(model_path, out_dir, {"kind": "dpo", "base": str(model_path), "train_file": train_path,
                                                   "valid_file": valid_path, "train": dataclasses.asdict(cfg),
                                                   "instruct": dataclasses.asdict(icfg)})  # fmt: skip
    examples, counts = tokenize_preferences(tok, read_preferences(train_path), icfg.max_len)
    if not examples:
        raise DataError(f"{train_path}: no preference pair survives max_len={icfg.max_len}")
    data_info = {"train": counts}
    stream = PreferenceStream(examples, seed=cfg.seed)
    # The reference is the model as loaded, before train() restores any checkpoint of this run.
    frozen = copy.deepcopy(model) if icfg.reference == "copy" else None
    ref = frozen if frozen is not None else reference_logprobs(model, stream, icfg.eval_batch_size)
    objective = DPOObjective(ref, icfg.beta, icfg.label_smoothing)
    valid = valid_objective = None
    if valid_path is not None:
        valid_examples, data_info["valid"] = tokenize_preferences(
            tok, read_preferences(valid_path), icfg.max_len
        )
        valid = PreferenceStream(valid_examples, shuffle=False)
        valid_ref = frozen if frozen is not None else reference_logprobs(model, valid, icfg.eval_batch_size)
        valid_objective = DPOObjective(valid_ref, icfg.beta, icfg.label_smoothing)
    (out / "data.json").write_text(json.dumps(data_info, indent=2))

    def evaluate(m):
        return evaluate_dpo(m, valid_objective, valid, icfg.eval_batch_size) if valid else {}

    before = evaluate(model)
    torch.manual_seed(cfg.seed)
    state = train(model, objective, stream, cfg, out, evaluate, resume, progress)
    report = {"kind": "dpo", "steps": state.step, "tokens_seen": state.tokens_seen, "data": data_info,
              "beta": icfg.beta, "label_smoothing": icfg.label_smoothing, "reference": icfg.reference,
              "valid_before": before, "valid_after": evaluate(model)}  # fmt: skip
    return _finish(model, tok, out, report, f"DPO (beta={icfg.beta})", "loss", "DPO loss")
