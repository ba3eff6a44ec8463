"""Running a pretraining recipe end to end: tokenizer, data, model, loop, export, curve and report.

`run_recipe` is a job entry point (like the CLI): it seeds torch from the recipe so that the same
recipe gives the same model. Output layout in `out_dir`: tokenizer/, checkpoints/, metrics.jsonl,
model/ (HF format with tokenizer: loads in mixtral.load_model and transformers), eval.json,
curve.png, recipe.json.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from mixtral.checkpoint import save_model
from mixtral.data.corpus import load_corpus, read_documents
from mixtral.data.packing import PackedStream, tokenize_documents
from mixtral.data.tokenizer_train import train_tokenizer
from mixtral.eval.lm import evaluate_lm
from mixtral.model import Transformer
from mixtral.text import Tokenizer, load_tokenizer
from mixtral.train.loop import train
from mixtral.train.pretrain import lm_objective
from mixtral.train.recipes import DataConfig, Recipe


def prepare_tokenizer(data: DataConfig, out_dir: Path) -> Tokenizer:
    """The recipe's tokenizer: trained once on the corpus into out_dir/tokenizer, or loaded."""
    if data.tokenizer == "mixtral":
        return load_tokenizer(None)
    if data.tokenizer != "train":
        return load_tokenizer(data.tokenizer)
    tok_dir = out_dir / "tokenizer"
    if (tok_dir / "tokenizer.model").exists():
        return load_tokenizer(tok_dir / "tokenizer.model")
    sources = [Path(item.partition("=")[2]) for item in data.inputs] or None  # None: the bundled corpus
    return train_tokenizer(sources, data.vocab_size, tok_dir, overwrite=True)  # the run owns tok_dir


def prepare_data(data: DataConfig, tok: Tokenizer, cache: Path) -> tuple[dict, dict]:
    """(train, valid) tokenized documents per domain, from the bundled corpus or `data.inputs`."""
    if data.inputs:
        train_docs, valid_docs = {}, {}
        for item in data.inputs:
            domain, _, path = item.partition("=")
            docs = list(read_documents(path))
            n_valid = max(1, len(docs) // 50) if len(docs) > 1 else 0  # hold out 2% of documents
            train_docs[domain] = tokenize_documents(docs[n_valid:], tok, cache)
            if n_valid:
                valid_docs[domain] = tokenize_documents(docs[:n_valid], tok, cache)
        return train_docs, valid_docs
    corpus = load_corpus()
    train_docs = {d: tokenize_documents(s.train, tok, cache) for d, s in corpus.items()}
    valid_docs = {d: tokenize_documents(s.valid, tok, cache) for d, s in corpus.items()}
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


def run_recipe(recipe: Recipe, out_dir: str | Path, resume: bool = True, progress: bool = True) -> dict:
    """Train `recipe` into out_dir (resuming a killed run), export it, and return the final evaluation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=2, default=list))
    tok = prepare_tokenizer(recipe.data, out)
    train_docs, valid_docs = prepare_data(recipe.data, tok, out / "cache")
    cfg = recipe.model.replace(vocab_size=tok.vocab_size)
    torch.manual_seed(recipe.train.seed)
    model = Transformer(cfg)
    stream = PackedStream(train_docs, recipe.data.seq_len, recipe.data.weight_map(), seed=recipe.train.seed)

    def evaluate(m: Transformer) -> dict[str, float]:
        return evaluate_lm(
            m, valid_docs, recipe.data.seq_len, recipe.data.eval_batch_size, recipe.data.eval_batches
        )

    state = train(model, lm_objective, stream, recipe.train, out, evaluate, resume=resume, progress=progress)
    final = evaluate_lm(model, valid_docs, recipe.data.seq_len, recipe.data.eval_batch_size, None)
    report = {"recipe": recipe.name, "steps": state.step, "tokens_seen": state.tokens_seen,
              "total_params": cfg.total_params, "active_params": cfg.active_params, "eval": final,
              "valid_tokens": {d: int(v.n_tokens) for d, v in valid_docs.items()}}  # fmt: skip
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    save_model(model, out / "model", tokenizer_src=tok, dtype=torch.bfloat16 if cfg.total_params > 5e6 else None,
               overwrite=True)  # fmt: skip
    plot_curve(
        out / "metrics.jsonl", out / "curve.png", f"{recipe.name}: {cfg.active_params / 1e6:.1f}M active"
    )
    return report
