"""Runs SFT or DPO on a checkpoint: read and tokenize chat data, train on the shared loop, export.

Each run directory gets `run.json` (the settings, checked on resume), `data.json` (records kept /
truncated / dropped by the over-length rule, DPO pairs dropped as identical, held-out records
evaluated), `metrics.jsonl` (every logged step, with the balance and z-losses the loop always
adds), `baseline.json` (the held-out metrics of the starting model), `eval.json`, `curve.png`,
rotating resumable checkpoints, and `model/` in Hugging Face format with the tokenizer. DPO with
the precomputed reference adds `reference-train.safetensors` / `reference-valid.safetensors`: the
reference log-probabilities of exactly the pairs the run visits (steps x batch_size x grad_accum
draws of the stream) and of the held-out pairs evaluated, keyed by the base model's and the
examples' hashes, so a resume or a rerun computes only what is missing. Defaults train on the
bundled `data/instruct` files.

Cost follows the run: every evaluation (before, every eval_every steps, at the end) reads the first
held-out records up to `train.eval_max_tokens` tokens (0: all); the final evaluation is the loop's
last one, and a finished run opened again reuses eval.json when its checkpoint and evaluation
settings match. Phases longer than a moment show progress bars (with `progress`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mixtral.atomic import atomic_file
from mixtral.checkpoint import load_model, read_config, save_model
from mixtral.data.instruct import (
    PreferenceStream,
    SFTStream,
    drop_identical_pairs,
    read_preferences,
    read_sft,
    tokenize_preferences,
    tokenize_sft,
)
from mixtral.errors import DataError
from mixtral.eval.lm import masked_loss
from mixtral.parallel import ParallelConfig, parallelize
from mixtral.parallel.data import RankSlice
from mixtral.text import load_tokenizer
from mixtral.train.checkpoint_io import checkpoint_id, has_checkpoint
from mixtral.train.instruct import DPOObjective, dpo_loss, evaluate_dpo, reference_logprobs, sft_objective
from mixtral.train.loop import Objective, TrainConfig, train
from mixtral.train.run import full_model, plot_curve, start_job
from mixtral.train.rundir import (
    cached_json,
    check_resume,
    describe,
    fingerprint,
    model_fingerprint,
    note,
    read_json,
    write_json,
)

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "instruct"

# Held-out tokens one evaluation reads by default: 167 of the 300 bundled conversations, 68 of the pairs.
EVAL_MAX_TOKENS = 8192
SFT_TRAIN = TrainConfig(steps=400, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=20, weight_decay=0.0,
                        eval_every=100, save_every=100, log_every=10, eval_max_tokens=EVAL_MAX_TOKENS)  # fmt: skip
DPO_TRAIN = TrainConfig(steps=200, batch_size=8, lr=3e-5, min_lr=3e-6, warmup_steps=10, weight_decay=0.0,
                        eval_every=50, save_every=50, log_every=5, eval_max_tokens=EVAL_MAX_TOKENS)  # fmt: skip


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


def sft_loss(model: torch.nn.Module, stream: SFTStream, batch_size: int = 8, progress: bool = False) -> float:
    """Mean cross-entropy over the assistant tokens of every example, once."""
    from tqdm.auto import tqdm

    batches = tqdm(stream.iter_batches(batch_size), total=-(-len(stream.examples) // batch_size), desc="eval",
                   unit="batch", disable=not progress, leave=False)  # fmt: skip
    total, n = masked_loss(model, batches)
    return total / max(n, 1)


Evaluate = Callable[[torch.nn.Module], dict]


def examples_key(examples: Sequence) -> str:
    """A hash of tokenized examples (every array field of each, in order)."""
    parts: list = [len(examples)]
    for e in examples:
        parts += [
            getattr(e, f.name) for f in dataclasses.fields(e) if not isinstance(getattr(e, f.name), bool)
        ]
    return fingerprint(*parts)


@dataclass(frozen=True)
class _Context:
    """Where a run caches what it computes once (see the module docstring)."""

    out: Path
    model_key: str  # model_fingerprint of the base model
    progress: bool
    writer: bool = True  # False on torchrun ranks other than 0: compute, never write


def _sft_setup(
    model, examples: list, valid: list | None, cfg: TrainConfig, icfg: InstructConfig, ctx: _Context
):
    valid_stream = SFTStream(valid, shuffle=False) if valid else None

    def evaluate(m: torch.nn.Module) -> dict:
        return (
            {"sft_loss": sft_loss(m, valid_stream, icfg.eval_batch_size, ctx.progress)}
            if valid_stream
            else {}
        )

    return sft_objective, SFTStream(examples, seed=cfg.seed), evaluate, lambda: evaluate(model)


def cached_reference(
    model: torch.nn.Module, stream: PreferenceStream, indices: Iterable[int], path: Path, model_key: str,
    batch_size: int = 8, progress: bool = False, write: bool = True,
) -> torch.Tensor:  # fmt: skip
    """`[N, 2]` reference log-probs of `stream`'s examples at `indices` (other rows NaN), read from
    `path` where it holds them for the same base model and examples, computed (and added to `path`,
    atomically) where not."""
    key = fingerprint(model_key, examples_key(stream.examples))
    ref = torch.full((len(stream.examples), 2), float("nan"))
    if path.is_file():
        try:
            with safe_open(path, "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    ref[f.get_tensor("index")] = f.get_tensor("logprobs")
        except (OSError, SafetensorError, RuntimeError, IndexError):
            pass  # unreadable or stale: recomputed below
    need = sorted(i for i in set(map(int, indices)) if torch.isnan(ref[i]).any())
    if need:
        note(f"reference log-probabilities of {len(need)} pair(s) ({path.name})", progress)
        computed = reference_logprobs(model, stream, batch_size, need, progress)
        ref[need] = computed[need]
        have = (~torch.isnan(ref).any(-1)).nonzero().flatten()
        if write:
            with atomic_file(path) as tmp:
                save_file({"index": have, "logprobs": ref[have].contiguous()}, tmp, metadata={"key": key})
    return ref


def _dpo_setup(
    model, examples: list, valid: list | None, cfg: TrainConfig, icfg: InstructConfig, ctx: _Context
):
    stream = PreferenceStream(examples, seed=cfg.seed)
    valid_stream = PreferenceStream(valid, shuffle=False) if valid else None
    # The reference is the model as loaded, before train() restores any checkpoint of this run.
    if icfg.reference == "copy":
        objective = valid_objective = DPOObjective(copy.deepcopy(model), icfg.beta, icfg.label_smoothing)
        valid_ref = None
    else:  # only the pairs the run's steps draw (from step 0, so a resume finds them all in the cache)
        visits = stream.upcoming_indices(cfg.steps * cfg.batch_size * cfg.grad_accum)
        ref = cached_reference(model, stream, visits, ctx.out / "reference-train.safetensors", ctx.model_key,
                               icfg.eval_batch_size, ctx.progress, ctx.writer)  # fmt: skip
        objective = DPOObjective(ref, icfg.beta, icfg.label_smoothing)
        valid_ref = valid_objective = None
        if valid_stream is not None:
            valid_ref = cached_reference(model, valid_stream, range(len(valid)), ctx.out / "reference-valid.safetensors",
                                         ctx.model_key, icfg.eval_batch_size, ctx.progress, ctx.writer)  # fmt: skip
            valid_objective = DPOObjective(valid_ref, icfg.beta, icfg.label_smoothing)

    def evaluate(m: torch.nn.Module) -> dict:
        if valid_stream is None:
            return {}
        return evaluate_dpo(m, valid_objective, valid_stream, icfg.eval_batch_size, ctx.progress)

    def baseline() -> dict:
        if valid_ref is None:
            return evaluate(model)
        # Before training the policy is the reference: the same log-probs, so no second pass.
        chosen, rejected = valid_ref[:, 0], valid_ref[:, 1]
        loss, metrics = dpo_loss(chosen, rejected, chosen, rejected, icfg.beta, icfg.label_smoothing)
        return {"loss": float(loss), **metrics}

    return objective, stream, evaluate, baseline


def eval_subset(examples: list, max_tokens: int, size: Callable[[Any], int]) -> list:
    """The first examples of a held-out list whose sizes add up to at most `max_tokens` (at least one;
    all of them when max_tokens is 0)."""
    if not max_tokens:
        return list(examples)
    out, used = [], 0
    for example in examples:
        if out and used + size(example) > max_tokens:
            break
        out.append(example)
        used += size(example)
    return out


def _sft_size(e) -> int:
    return len(e.ids)


def _pair_size(e) -> int:
    return 2 * len(e.prompt) + len(e.chosen) + len(e.rejected)


def _file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # the reader names the problem


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
    # (model, train examples, evaluated valid examples, cfg, icfg, context)
    #   -> (objective, stream, evaluate, baseline: the starting model's held-out metrics)
    setup: Callable[..., tuple[Objective, Any, Evaluate, Callable[[], dict]]]
    report: Callable[[dict, dict, InstructConfig], dict]  # kind-specific report fields
    curve: tuple[str, str]  # held-out metric plotted and its axis label
    size: Callable[[Any], int]  # tokens of one example (the evaluation cap counts them)


KINDS = {
    "sft": _Kind("sft", "conversation", read_sft, tokenize_sft, SFT_TRAIN, _sft_setup, _sft_report,
                 ("sft_loss", "assistant-token cross-entropy (nats)"), _sft_size),
    "dpo": _Kind("pref", "preference pair", read_preferences, tokenize_preferences, DPO_TRAIN, _dpo_setup,
                 _dpo_report, ("loss", "DPO loss"), _pair_size),
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
    device: str | torch.device | None = None,
    parallel: ParallelConfig | None = None,
) -> dict:
    """SFT or DPO (`kind`) of `model_path` into `out_dir`; returns the report also written to eval.json.

    Under torchrun (WORLD_SIZE > 1) the run trains with `parallel` (as `run_recipe`: rank 0 writes, the
    others follow; `cfg.batch_size` is the global batch, of pairs for DPO). Reference log-probabilities
    and the baseline are computed on the unsharded model before sharding, on every rank (rank 0 caches
    them); a "copy" reference stays whole on every rank.

    Without `train_file`, the bundled data/instruct files are used (and their held-out split unless
    `valid_file` is given). `cfg` None takes the kind's defaults (SFT_TRAIN, DPO_TRAIN). The report
    has the steps, tokens seen, data counts and the held-out metrics before and after training.
    `device` (default CPU) is where the model trains. Resuming with settings other than run.json's
    is refused before any file is written, unless every change is safe (`rundir.SAFE_CHANGES`);
    another process writing to `out_dir` is refused (`rundir.RunLockedError`).
    """
    k = KINDS[kind]
    cfg = cfg if cfg is not None else k.train
    if train_file is None:
        train_file = DATA_DIR / f"{k.files}_train.jsonl"
        valid_file = valid_file or DATA_DIR / f"{k.files}_valid.jsonl"
    train_path, valid_path = Path(train_file), (Path(valid_file) if valid_file else None)
    out = Path(out_dir)
    job = start_job(parallel or ParallelConfig(), lambda: read_config(model_path)[0].n_experts, device)
    layout, writer, dev = job.layout, job.writer, job.device
    progress = progress and writer
    info = {"kind": kind, "base": str(Path(model_path).resolve()), "train_file": str(train_path.resolve()),
            "valid_file": str(valid_path.resolve()) if valid_path else None,
            "data_sha256": {"train": _file_sha256(train_path), "valid": _file_sha256(valid_path)},
            "train": dataclasses.asdict(cfg), "instruct": dataclasses.asdict(icfg)}  # fmt: skip
    with job.lock(out) as lock:
        step = has_checkpoint(out) if resume and writer else None
        if step is not None:
            stored = read_json(out / "run.json")
            if isinstance(stored, dict) and isinstance(stored.get("base"), str):
                stored["base"] = str(Path(stored["base"]).resolve())  # older run.json kept the path as given
            changes = check_resume(stored, info, f"{out} (run.json)", step)
            if other := {k_: v for k_, v in changes.items() if not k_.startswith("train.")}:
                warnings.warn(f"resuming {out} with changed settings: {describe(other)}", stacklevel=2)
        if writer:
            lock.claim()
            write_json(out / "run.json", info)
        note(f"loading {model_path} and tokenizing {train_path.name}", progress)
        # Plain tensors for training (FSDP2 reshards them); huge pages are for decode's weight streaming.
        model = load_model(
            model_path, device=dev, kernels=dev.type == "cpu" and layout is None, huge_pages=False
        )
        tok = load_tokenizer(model_path)
        examples, counts = k.tokenize(tok, k.read(train_path), icfg.max_len)
        if kind == "dpo":
            examples, counts["identical"] = drop_identical_pairs(examples)
            counts["kept"] -= counts["identical"]
            if counts["identical"]:
                warnings.warn(f"{train_path}: dropped {counts['identical']} preference pair(s) whose chosen and "
                              "rejected responses are identical (DPO learns nothing from them)", stacklevel=2)  # fmt: skip
        if not examples:
            raise DataError(f"{train_path}: no {k.records} survives max_len={icfg.max_len}")
        data_info, valid = {"train": counts}, []
        if valid_path is not None:
            all_valid, data_info["valid"] = k.tokenize(tok, k.read(valid_path), icfg.max_len)
            if kind == "dpo":
                all_valid, data_info["valid"]["identical"] = drop_identical_pairs(all_valid)
                data_info["valid"]["kept"] -= data_info["valid"]["identical"]
            valid = eval_subset(all_valid, cfg.eval_max_tokens, k.size)
            data_info["valid"].update(evaluated=len(valid), evaluated_tokens=sum(map(k.size, valid)))
        if writer:
            write_json(out / "data.json", data_info)
        ctx = _Context(out, model_fingerprint(model), progress, writer)
        objective, stream, evaluate, baseline = k.setup(model, examples, valid, cfg, icfg, ctx)
        valid_key = examples_key(valid)
        eval_settings = {"valid": valid_key, "eval_batch_size": icfg.eval_batch_size, "beta": icfg.beta,
                         "label_smoothing": icfg.label_smoothing, "reference": icfg.reference}  # fmt: skip
        if valid:
            note(f"held-out: {len(valid)} {k.records}s, {data_info['valid']['evaluated_tokens']} tokens "
                  f"per evaluation (train.eval_max_tokens={cfg.eval_max_tokens})", progress)  # fmt: skip
        # the starting model's metrics, before any sharding (rank 0 reports them; nothing collective)
        before = (
            cached_json(out / "baseline.json", fingerprint(ctx.model_key, eval_settings), baseline)
            if writer
            else {}
        )
        if layout is not None:
            parallelize(model, layout)
            stream = RankSlice(stream, layout.rank, layout.world)
        evaluations: list[dict] = []

        def tracked(m: torch.nn.Module) -> dict:
            evaluations.append(evaluate(m))
            return evaluations[-1]

        torch.manual_seed(cfg.seed)
        state = train(model, objective, stream, cfg, out, tracked, resume, progress, layout=layout)
        ckpt = checkpoint_id(out, state.step)
        stored = read_json(out / "eval.json") if resume else None
        if evaluations:  # the loop evaluated at its last step: that is the final evaluation
            after = evaluations[-1]
        elif (isinstance(stored, dict) and ckpt is not None and stored.get("checkpoint") == ckpt
              and stored.get("eval_settings") == eval_settings and "final_eval" in stored):  # fmt: skip
            after = stored["final_eval"]  # a finished run opened again
        else:
            after = evaluate(model)
        report = {"kind": kind, "steps": state.step, "tokens_seen": state.tokens_seen, "data": data_info,
                  **k.report(before, after, icfg), "final_eval": after, "checkpoint": ckpt,
                  "eval_settings": eval_settings}  # fmt: skip
        export = full_model(model, layout)
        if writer:
            write_json(out / "eval.json", report)
            note(f"exporting {out / 'model'}", progress)
            dtype = torch.bfloat16 if model.config.total_params > 5e6 else None
            save_model(export, out / "model", tokenizer_src=tok, dtype=dtype, overwrite=True)
            title = "SFT" if kind == "sft" else f"DPO (beta={icfg.beta})"
            plot_curve(out / "metrics.jsonl", out / "curve.png", title, *k.curve)
        if layout is not None:
            dist.barrier()  # nobody tears the group down before rank 0 has written
    return report


def run_sft(*args: Any, **options: Any) -> dict:
    """Supervised fine-tuning on assistant tokens: `run_instruct("sft", ...)` (held-out loss before and after)."""
    return run_instruct("sft", *args, **options)


def run_dpo(*args: Any, **options: Any) -> dict:
    """DPO from the model, which is also the frozen reference: `run_instruct("dpo", ...)` (held-out rewards)."""
    return run_instruct("dpo", *args, **options)
