"""`quantize_model`: weight-only compression of a built model, named by one storage string.

Storages: "bf16"; "int8" (one scale per output row, the original scheme); "int4" and "int8-g32"
(group-wise, llama.cpp's Q4_0 / Q8_0 blocks: one fp16 scale per 32 inputs; "int4-g64",
"int8-g128"... for other groups, any multiple of 32 dividing the matrices' input sizes). Targets:
"experts", "attention" (wq, wk, wv, wo), "output" (the head); the embedding and the router stay float.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from mixtral.errors import ConfigError
from mixtral.model.moe import Experts
from mixtral.quant.group import check_group
from mixtral.quant.groupwise import GroupExperts, GroupLinear
from mixtral.quant.rowwise import ROWWISE, quantize_rowwise

STORAGE = ("int8", "bf16", "int4", "int8-g32")  # the usual names; -gN selects another group
TARGETS = ("experts", "attention", "output")


@dataclass(frozen=True)
class Storage:
    """A parsed storage name: `bits` and `group` (0 for per-row int8, None for bf16)."""

    name: str
    bits: int | None
    group: int | None

    @property
    def groupwise(self) -> bool:
        return bool(self.group)


def parse_storage(name: str) -> Storage:
    """ "int8" | "bf16" | "int4[-gN]" | "int8-gN" → Storage; a ConfigError naming the choices otherwise."""
    if name == "bf16":
        return Storage(name, None, None)
    if name == "int8":
        return Storage(name, 8, 0)
    m = re.fullmatch(r"int(4|8)(?:-g(\d+))?", name)
    if m and (m.group(1) == "4" or m.group(2)):
        g = int(m.group(2) or 32)
        if g <= 0 or g % 32:
            raise ConfigError(f"storage {name!r}: the group must be a positive multiple of 32")
        return Storage(name, int(m.group(1)), g)
    raise ConfigError(
        f"unknown storage {name!r}; choose int8 (per-row scales), bf16, int4 (groups of 32), int8-g32, "
        "or int4-gN / int8-gN for groups of N (a multiple of 32)"
    )


def storage_name(bits: int, group: int) -> str:
    """The storage name of `bits` with `group` (0: per row)."""
    if group == 0:
        if bits != 8:
            raise ConfigError("per-row scales exist for int8 only; int4 needs a group (e.g. 32)")
        return "int8"
    return f"int{bits}" if (bits, group) == (4, 32) else f"int{bits}-g{group}"


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    targets = tuple(targets)
    if unknown := set(targets) - set(TARGETS):
        raise ConfigError(
            f"unknown quantization target(s) {sorted(unknown)}; choose from {', '.join(TARGETS)}"
        )
    return targets


def quantize_model(
    model: nn.Module, storage: str = "int8", targets: Iterable[str] = ("experts",)
) -> nn.Module:
    """Compress `targets` of a built Transformer in place (and return it); experts by default."""
    spec, targets = parse_storage(storage), check_targets(targets)
    if not spec.groupwise:
        return quantize_rowwise(model, storage, targets)
    cfg = model.config
    for k, what in ((cfg.dim, "dim"), (cfg.hidden_dim, "hidden_dim")):
        if "experts" in targets or what == "dim":
            check_group(k, spec.group, f"the model's {what}")
    if "attention" in targets:
        check_group(cfg.n_heads * cfg.head_dim, spec.group, "the attention output projection")
    model.requires_grad_(False)
    for layer in model.layers:
        moe = layer.feed_forward
        if "experts" in targets and isinstance(moe.experts, Experts):
            moe.experts = GroupExperts.from_experts(moe.experts, spec.bits, spec.group)
        if "attention" in targets:
            for name in ("wq", "wk", "wv", "wo"):
                if isinstance(getattr(layer.attention, name), nn.Linear):
                    lin = getattr(layer.attention, name)
                    setattr(layer.attention, name, GroupLinear.from_linear(lin, spec.bits, spec.group))
    if "output" in targets and isinstance(model.output, nn.Linear):
        model.output = GroupLinear.from_linear(model.output, spec.bits, spec.group)
    return model


__all__ = ["ROWWISE", "STORAGE", "TARGETS", "Storage", "parse_storage", "quantize_model", "storage_name"]
