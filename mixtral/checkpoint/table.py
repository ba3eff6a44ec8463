"""The checkpoint name table: each of our parameters, its Hugging Face and Mistral names, its layout.

Formats (../shared/reference/mixtral.md section 4):
- "hf": per-expert tensors (`model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight` [F, D]), as
  transformers 5.24's save_pretrained and the hub write them.
- "hf-fused" (load only): transformers' in-memory names, `mlp.experts.gate_up_proj` [E, 2F, D]
  (gate rows then up rows: `gate, up = linear(x, gate_up_proj[e]).chunk(2)`),
  `mlp.experts.down_proj` [E, D, F], `mlp.gate.weight`.
- "mistral": consolidated names, per-expert `layers.{i}.feed_forward.experts.{j}.w1.weight`, wq/wk
  rows in interleaved-pair RoPE order.
Our model stacks experts ([E, F, D]) and uses HF's rotate-half RoPE layout, so HF q/k copy straight
in and only Mistral's wq/wk rows are permuted. `plan` expands the table into `Slot`s, one per file
tensor (or per expert slice of a fused tensor); loading, saving and conversion all walk it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mixtral.config import MixtralConfig


@dataclass(frozen=True)
class Row:
    """One parameter of our model and its name in each format.

    Names hold `{i}` (layer) and `{j}` (expert). `shape` names MixtralConfig attributes. `experts`:
    stacked over experts in our model ([E, *shape]), one tensor per expert (`{j}`) on disk. `rope`:
    the head count whose rows Mistral stores in interleaved-pair RoPE order. `fused`: transformers'
    in-memory name where it differs; `part`: which half of dim 1 of that fused tensor this row is.
    """

    ours: str
    hf: str
    mistral: str
    shape: tuple[str, ...]
    experts: bool = False
    rope: str | None = None
    fused: str | None = None
    part: int | None = None


_L, _M = "model.layers.{i}.", "layers.{i}."
TABLE: tuple[Row, ...] = (
    Row("tok_embeddings.weight", "model.embed_tokens.weight", "tok_embeddings.weight", ("vocab_size", "dim")),
    Row(_M + "attention_norm.weight", _L + "input_layernorm.weight", _M + "attention_norm.weight", ("dim",)),
    Row(_M + "attention.wq.weight", _L + "self_attn.q_proj.weight", _M + "attention.wq.weight", ("q_dim", "dim"), rope="n_heads"),
    Row(_M + "attention.wk.weight", _L + "self_attn.k_proj.weight", _M + "attention.wk.weight", ("kv_dim", "dim"), rope="n_kv_heads"),
    Row(_M + "attention.wv.weight", _L + "self_attn.v_proj.weight", _M + "attention.wv.weight", ("kv_dim", "dim")),
    Row(_M + "attention.wo.weight", _L + "self_attn.o_proj.weight", _M + "attention.wo.weight", ("dim", "q_dim")),
    Row(_M + "ffn_norm.weight", _L + "post_attention_layernorm.weight", _M + "ffn_norm.weight", ("dim",)),
    Row(_M + "feed_forward.gate.weight", _L + "block_sparse_moe.gate.weight", _M + "feed_forward.gate.weight",
        ("n_experts", "dim"), fused=_L + "mlp.gate.weight"),
    Row(_M + "feed_forward.experts.w1", _L + "block_sparse_moe.experts.{j}.w1.weight",
        _M + "feed_forward.experts.{j}.w1.weight", ("hidden_dim", "dim"), experts=True,
        fused=_L + "mlp.experts.gate_up_proj", part=0),
    Row(_M + "feed_forward.experts.w3", _L + "block_sparse_moe.experts.{j}.w3.weight",
        _M + "feed_forward.experts.{j}.w3.weight", ("hidden_dim", "dim"), experts=True,
        fused=_L + "mlp.experts.gate_up_proj", part=1),
    Row(_M + "feed_forward.experts.w2", _L + "block_sparse_moe.experts.{j}.w2.weight",
        _M + "feed_forward.experts.{j}.w2.weight", ("dim", "hidden_dim"), experts=True,
        fused=_L + "mlp.experts.down_proj"),
    Row("norm.weight", "model.norm.weight", "norm.weight", ("dim",)),
    Row("output.weight", "lm_head.weight", "output.weight", ("vocab_size", "dim")),
)  # fmt: skip
FORMATS = ("hf", "hf-fused", "mistral")
LAYER_ROW = TABLE[1]  # any per-layer row; its names give the layer prefix of each format


@dataclass(frozen=True)
class Slot:
    """One tensor in a checkpoint file and the piece of our parameter it fills."""

    key: str
    shape: tuple[int, ...]  # of the whole file tensor
    ours: str
    expert: int | None  # index into our dim 0, or None for the whole parameter
    row: Row
    select: tuple[Any, ...] = ()  # index into the file tensor that gives the piece
    rope_heads: int | None = None  # Mistral: rows of this many heads are interleaved pairs


def file_pattern(row: Row, fmt: str) -> str:
    """The row's name pattern in format `fmt`."""
    if fmt == "mistral":
        return row.mistral
    return row.fused if fmt == "hf-fused" and row.fused else row.hf


def _instances(cfg: MixtralConfig) -> list[tuple[Row, int | None]]:
    """(row, layer) in file order: embeddings, then layer by layer, then the final norm and head."""
    per_layer = [r for r in TABLE if "{i}" in r.ours]
    first = TABLE.index(per_layer[0])
    head = [(r, None) for r in TABLE[:first]]
    tail = [(r, None) for r in TABLE[first + len(per_layer) :]]
    return head + [(r, i) for i in range(cfg.n_layers) for r in per_layer] + tail


def _piece_shape(row: Row, cfg: MixtralConfig) -> tuple[int, ...]:
    return tuple(getattr(cfg, a) for a in row.shape)


def our_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes."""
    return {
        row.ours.format(i=i): (cfg.n_experts, *_piece_shape(row, cfg))
        if row.experts
        else _piece_shape(row, cfg)
        for row, i in _instances(cfg)
    }


def plan(cfg: MixtralConfig, fmt: str) -> list[Slot]:
    """Every file tensor of format `fmt` for this config, as slots, in file order."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; known: {', '.join(FORMATS)}")
    slots = []
    for row, i in _instances(cfg):
        piece, pattern, ours = _piece_shape(row, cfg), file_pattern(row, fmt), row.ours.format(i=i)
        if not row.experts:
            rope = getattr(cfg, row.rope) if row.rope and fmt == "mistral" else None
            slots.append(Slot(pattern.format(i=i), piece, ours, None, row, rope_heads=rope))
        elif fmt == "hf-fused":
            n = 1 if row.part is None else 2
            rows = slice(None) if row.part is None else slice(row.part * piece[0], (row.part + 1) * piece[0])
            shape = (cfg.n_experts, n * piece[0], *piece[1:])
            slots += [Slot(pattern.format(i=i), shape, ours, j, row, (j, rows)) for j in range(cfg.n_experts)]
        else:
            slots += [Slot(pattern.format(i=i, j=j), piece, ours, j, row) for j in range(cfg.n_experts)]
    return slots


def expected_tensors(cfg: MixtralConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """File tensor names and shapes of format `fmt` (995 tensors for mixtral-8x7b in "hf")."""
    return {s.key: s.shape for s in plan(cfg, fmt)}


def from_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Mistral wq/wk rows (pairs 2k, 2k+1 rotate together) to HF's halves (k, k + hd/2), per head."""
    hd = w.shape[0] // n_heads
    return w.view(n_heads, hd // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `from_interleaved`."""
    hd = w.shape[0] // n_heads
    return w.view(n_heads, 2, hd // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
