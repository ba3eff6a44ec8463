"""Running a pretraining recipe end to end: tokenizer, data, model, loop, export, curve and report.

`run_recipe` is a job entry point (like the CLI): it seeds torch from the recipe so that the same
recipe gives the same model. Output layout in `out_dir`: tokenizer/, checkpoints/, metrics.jsonl,
model/ (HF format with tokenizer: loads in mixtral.load_model and transformers), eval.json,
curve.png, recipe.json.

The run holds the directory's writer lock; a resume is checked against recipe.json before anything
is written (`rundir.check_resume`). The final evaluation reads at most `train.eval_max_tokens`
held-out tokens (0: the whole validation split), spread evenly over the domains; it is stored in
eval.json with the final checkpoint's hash and reused when the finished run is opened again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mixtral.checkpoint import save_model
from mixtral.data.corpus import load_corpus, read_documents
from mixtral.data.packing import PackedStream, tokenize_documents
from mixtral.data.tokenizer_train import train_tokenizer
from mixtral.errors import ConfigError
from mixtral.eval.lm import evaluate_lm
from mixtral.model import Transformer
from mixtral.parallel import Layout, ParallelConfig, init_process_group, make_layout, parallelize
from mixtral.parallel.data import RankSlice
from mixtral.text import Tokenizer, load_tokenizer
from mixtral.train.checkpoint_io import checkpoint_id, has_checkpoint
from mixtral.train.loop import train
from mixtral.train.pretrain import lm_objective
from mixtral.train.recipes import DataConfig, Recipe
from mixtral.train.rundir import check_resume, describe, note, read_json, run_lock, write_json


def prepare_tokenizer(data: DataConfig, out_dir: Path, progress: bool = False) -> Tokenizer:
    """The recipe's tokenizer: trained once on the corpus into out_dir/tokenizer (again if the
    vocabulary size changed), or loaded."""
    if data.tokenizer == "mixtral":
        return load_tokenizer(None)
    if data.tokenizer != "train":
        return load_tokenizer(data.tokenizer)
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.model").exists():
        tok = load_tokenizer(tok_dir / "tokenizer.model")
        if tok.vocab_size == data.vocab_size:
            return tok
    sources = [Path(item.partition("=")[2]) for item in data.inputs] or None  # None: the bundled corpus
    note(f"training a {data.vocab_size}-piece tokenizer into {tok_dir}", progress)
    return train_tokenizer(sources, data.vocab_size, tok_dir, overwrite=True)  # the run owns tok_dir


def prepare_data(data: DataConfig, tok: Tokenizer, cache: Path, progress: bool = False) -> tuple[dict, dict]:
    """(train, valid) tokenized documents per domain, from the bundled corpus or `data.inputs`
    (tokenized once, then read from `cache`)."""
    from tqdm.auto import tqdm

    if data.inputs:
        train_docs, valid_docs = {}, {}
        for item in tqdm(data.inputs, desc="tokenize", unit="input", disable=not progress, leave=False):
            domain, _, path = item.partition("=")
            docs = list(read_documents(path))
            n_valid = max(1, len(docs) // 50) if len(docs) > 1 else 0  # hold out 2% of documents
            train_docs[domain] = tokenize_documents(docs[n_valid:], tok, cache)
            if n_valid:
                valid_docs[domain] = tokenize_documents(docs[:n_valid], tok, cache)
        return train_docs, valid_docs
    corpus = load_corpus()
    train_docs, valid_docs = {}, {}
    for d, s in tqdm(corpus.items(), desc="tokenize", unit="domain", disable=not progress, leave=False):
        train_docs[d] = tokenize_documents(s.train, tok, cache)
        valid_docs[d] = tokenize_documents(s.valid, tok, cache)
    return train_docs, valid_docs


def plot_curve(metrics_path: Path, png: Path, title: str, eval_key: str = "all/loss",
               ylabel: str = "cross-entropy (nats)") -> None:  # fmt: skip
    """Training loss and the held-out `eval_key` against tokens seen, from a run's metrics.jsonl."""
    from matplotlib.figure import Figure

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ax.plot([r["tokens_seen"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    evals = [r for r in rows if eval_key in r.get("eval", {})]
    ax.plot(
        [r["tokens_seen"] for r in evals],
        [r["eval"][eval_key] for r in evals],
        "o-",
        label=f"held-out {eval_key}",
    )
    ax.set(xlabel="training tokens", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


@dataclass
class Job:
    """Where a run executes: one process (`layout` None) or its rank of a torchrun job."""

    layout: Layout | None
    device: torch.device

    @property
    def writer(self) -> bool:
        """Whether this process writes the run directory (one process, or rank 0)."""
        return self.layout is None or self.layout.rank == 0

    def lock(self, out: Path):
        """The run directory's writer lock on the writing process; nothing on the other ranks."""
        return run_lock(out) if self.writer else contextlib.nullcontext()


def start_job(
    parallel: ParallelConfig, n_experts: Callable[[], int], device: str | torch.device | None
) -> Job:
    """Join the job torchrun started with several processes (`parallel`'s layout, for a model of
    `n_experts()` experts, on the rank's device), else one process on `device` (default CPU). A parallel
    setting without such a job is a ConfigError that says how to start one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_process_group()
        layout = make_layout(parallel, n_experts())
        return Job(layout, layout.device)
    if parallel.ep > 1 or parallel.dp_shard > 1 or parallel.dp_replicate > 1:
        raise ConfigError(
            f"parallel settings {dataclasses.asdict(parallel)} need a multi-process job: "
            "torchrun --nproc-per-node N -m mixtral train ... (N = dp_replicate x dp_shard)"
        )
    return Job(None, torch.device(device) if device is not None else torch.device("cpu"))


def full_model(model: Transformer, layout: Layout | None) -> Transformer | None:
    """The whole model in one process's memory: `model` itself in one process; under torchrun, a plain
    copy gathered from the shards on rank 0 (None on the other ranks; every rank must call this)."""
    if layout is None:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if layout.rank != 0:
        return None
    plain = Transformer(model.config)
    plain.load_state_dict(state)
    return plain.eval()


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> dict:
    """Train `recipe` into out_dir (resuming a killed run), export it, and return the final evaluation.

    `device` (default CPU) is where the model trains; the model is built on the CPU first, so a
    seed gives the same initial weights everywhere. Resuming with settings other than recipe.json's
    is refused before any file is written, unless every change is safe (`rundir.SAFE_CHANGES`).

    Under torchrun (WORLD_SIZE > 1) the job trains with `recipe.parallel` (`mixtral.parallel`): rank 0
    holds the run directory's lock and writes everything (tokenizer, caches, logs, reports, export);
    the other ranks wait for it, read what it prepared, and take part in every step, checkpoint and
    evaluation. `train.batch_size` is the global batch: each rank reads batch_size / W rows of it.
    """
    out = Path(out_dir)
    job = start_job(recipe.parallel, lambda: recipe.model.n_experts, device)
    layout, writer, dev = job.layout, job.writer, job.device
    settings = json.loads(json.dumps(dataclasses.asdict(recipe), default=list))
    with job.lock(out) as lock:
        if writer:
            step = has_checkpoint(out) if resume else None
            if step is not None:
                changes = check_resume(read_json(out / "recipe.json"), settings, f"{out} (recipe.json)", step)
                if other := {k: v for k, v in changes.items() if not k.startswith("train.")}:
                    warnings.warn(f"resuming {out} with changed settings: {describe(other)}", stacklevel=2)
            lock.claim()
            write_json(out / "recipe.json", settings)
            tok = prepare_tokenizer(recipe.data, out, progress)
            train_docs, valid_docs = prepare_data(recipe.data, tok, out / "cache", progress)
        if layout is not None:  # the others read the tokenizer and token caches rank 0 wrote
            dist.barrier()
            if not writer:
                tok = prepare_tokenizer(recipe.data, out, False)
                train_docs, valid_docs = prepare_data(recipe.data, tok, out / "cache", False)
        cfg = recipe.model.replace(vocab_size=tok.vocab_size)
        torch.manual_seed(recipe.train.seed)
        model = Transformer(cfg).to(dev)
        stream = PackedStream(
            train_docs, recipe.data.seq_len, recipe.data.weight_map(), seed=recipe.train.seed
        )
        if layout is not None:
            parallelize(model, layout)
            stream = RankSlice(stream, layout.rank, layout.world)
        seq_len, batch_size, max_tokens = (
            recipe.data.seq_len,
            recipe.data.eval_batch_size,
            recipe.train.eval_max_tokens,
        )
        show = progress and writer

        def evaluate(m: Transformer) -> dict[str, float]:
            return evaluate_lm(m, valid_docs, seq_len, batch_size, recipe.data.eval_batches, max_tokens, show)

        state = train(
            model,
            lm_objective,
            stream,
            recipe.train,
            out,
            evaluate,
            resume=resume,
            progress=show,
            layout=layout,
        )
        ckpt = checkpoint_id(out, state.step)
        eval_settings = {"seq_len": seq_len, "eval_batch_size": batch_size, "eval_max_tokens": max_tokens,
                         "valid_tokens": {d: int(v.n_tokens) for d, v in valid_docs.items()}}  # fmt: skip
        stored = read_json(out / "eval.json") if resume else None
        if (isinstance(stored, dict) and ckpt is not None and stored.get("checkpoint") == ckpt
                and stored.get("eval_settings") == eval_settings and "eval" in stored):  # fmt: skip
            final = stored["eval"]  # the finished run opened again: its weights were evaluated already
        else:
            what = f"at most {max_tokens} tokens" if max_tokens else "the whole validation split"
            note(f"final evaluation: {what} (train.eval_max_tokens)", show)
            final = evaluate_lm(model, valid_docs, seq_len, batch_size, None, max_tokens, show)
        report = {"recipe": recipe.name, "steps": state.step, "tokens_seen": state.tokens_seen,
                  "total_params": cfg.total_params, "active_params": cfg.active_params, "eval": final,
                  "valid_tokens": eval_settings["valid_tokens"], "checkpoint": ckpt,
                  "eval_settings": eval_settings}  # fmt: skip
        export = full_model(model, layout)
        if writer:
            write_json(out / "eval.json", report)
            note(f"exporting {out / 'model'}", progress)
            save_model(export, out / "model", tokenizer_src=tok,
                       dtype=torch.bfloat16 if cfg.total_params > 5e6 else None, overwrite=True)  # fmt: skip
            plot_curve(
                out / "metrics.jsonl",
                out / "curve.png",
                f"{recipe.name}: {cfg.active_params / 1e6:.1f}M active",
            )
        if layout is not None:
            dist.barrier()  # nobody leaves (and tears the group down) before rank 0 has written
    return report
