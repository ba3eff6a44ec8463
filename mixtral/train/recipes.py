"""Training recipes: small typed configs (model, optimisation, data) and checked `--set key=value` overrides.

Evaluation settings: `data.eval_batches` x `data.eval_batch_size` sequences per domain at each
periodic evaluation (every `train.eval_every` steps), and `train.eval_max_tokens` held-out tokens at
most per evaluation, periodic or final (0: the whole validation split; the `mini` recipes evaluate
their final model on all of it, `demo` on 64 Ki tokens, `test` on 4 Ki).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mixtral.config import MixtralConfig
from mixtral.parallel.layout import ParallelConfig
from mixtral.train.loop import TrainConfig


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is cut."""

    seq_len: int = 256
    weights: str = ""  # "code=2,math=1,...": mixture weights per domain; empty = equal weights
    tokenizer: str = "train"  # "train" (SentencePiece BPE on the corpus), "mixtral" (bundled), or a path
    vocab_size: int = 8192  # pieces of a trained tokenizer
    inputs: tuple[str, ...] = ()  # "domain=path" (text, JSONL, Parquet); empty = the bundled corpus
    eval_batches: int = 8  # validation batches per domain at each evaluation
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.vocab_size < 300:  # byte fallback alone needs 256 pieces
            raise ValueError(f"data.vocab_size must be >= 300, got {self.vocab_size}")
        for item in self.inputs:
            if "=" not in item:
                raise ValueError(f"data.inputs entries are domain=path, got {item!r}")

    def weight_map(self) -> dict[str, float] | None:
        if not self.weights:
            return None
        out = {}
        for item in self.weights.split(","):
            name, _, value = item.partition("=")
            try:
                out[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"data.weights entries are domain=number, got {item!r}") from None
        return out


@dataclass(frozen=True)
class Recipe:
    name: str
    model: MixtralConfig
    train: TrainConfig
    data: DataConfig = field(default_factory=DataConfig)
    description: str = ""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # used under torchrun


_MINI = MixtralConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=512,
                      n_experts=8, top_k=2, vocab_size=8192, max_seq_len=2048)  # fmt: skip
_MINI_TRAIN = TrainConfig(steps=3000, batch_size=8, lr=2e-3, min_lr=2e-4, warmup_steps=100,
                          eval_every=500, save_every=250, log_every=10, eval_max_tokens=0)  # fmt: skip


def _dense(cfg: MixtralConfig) -> MixtralConfig:
    """One FFN with the same ACTIVE parameters: width top_k · hidden_dim."""
    return cfg.replace(n_experts=1, top_k=1, hidden_dim=cfg.hidden_dim * cfg.top_k)


RECIPES: dict[str, Recipe] = {
    "mini": Recipe("mini", _MINI, _MINI_TRAIN, DataConfig(seq_len=256),
                   "8 experts top-2, 24M total / 10M active, 6.1M tokens; about 50 minutes on 2 CPU cores"),
    "mini-dense": Recipe("mini-dense", _dense(_MINI), _MINI_TRAIN, DataConfig(seq_len=256),
                         "mini with one dense FFN of equal ACTIVE parameters, on the same tokens"),
    "demo": Recipe("demo", _MINI.replace(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=256),
                   TrainConfig(steps=150, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=150,
                               save_every=50, log_every=10, eval_max_tokens=65536),
                   DataConfig(seq_len=128, vocab_size=4096, eval_batches=2),
                   "a small SMoE trained in a few minutes, for `mixtral demo --train`"),
    "test": Recipe("test", MixtralConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                                         n_experts=4, top_k=2, vocab_size=512, max_seq_len=128),
                   TrainConfig(steps=8, batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4,
                               save_every=4, log_every=1, eval_max_tokens=4096),
                   DataConfig(seq_len=32, vocab_size=512, eval_batches=1, eval_batch_size=2),
                   "seconds; for tests"),
}  # fmt: skip


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def _parse(value: str, kind: object, key: str) -> object:
    """A string from the command line as the field's declared type."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        return tuple(v for v in value.split(",") if v)
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}: expected a boolean (true/false), got {value!r}")
    try:
        return kind(value) if kind in (int, float, str) else value  # type: ignore[operator]
    except ValueError:
        raise ValueError(f"--set {key}: expected {kind.__name__}, got {value!r}") from None  # type: ignore[union-attr]


def set_fields(obj: Any, section: str, items: list[str]) -> Any:
    """`obj` (a dataclass) with "field=value" command-line strings applied at once, type-checked."""
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes {section}.field=value, got {section}.{item!r}")
        if name not in hints:
            fields = ", ".join(f.name for f in dataclasses.fields(obj))
            raise ValueError(f"--set {section}.{name}: {section} has no field {name!r}; fields: {fields}")
        changes[name] = _parse(value, hints[name], f"{section}.{name}")
    return dataclasses.replace(obj, **changes)  # validated once, so the order of the items does not matter


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply "section.field=value" overrides (sections: model, train, data, parallel), type-checked."""
    sections: dict[str, Any] = {"model": recipe.model, "train": recipe.train, "data": recipe.data,
                                "parallel": recipe.parallel}  # fmt: skip
    grouped: dict[str, list[str]] = {name: [] for name in sections}
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in sections or not name:
            raise ValueError(
                f"--set takes section.field=value with section in model, train, data, parallel; got {item!r}"
            )
        grouped[section].append(f"{name}={value}")
    return dataclasses.replace(recipe, **{s: set_fields(obj, s, grouped[s]) for s, obj in sections.items()})
