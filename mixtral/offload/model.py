"""A model whose experts are offloaded: resident non-expert weights, experts through an `ExpertCache`.

`load_offloaded(path, cache=N)` loads everything but the experts of quantized checkpoint `path`
(or of `experts_from`, a quantized checkpoint of the same model) and gives each MoE layer an
`OffloadDispatch`: it makes the routed experts resident (cache hits, read-ahead, or a blocking
read), starts reading the next layer's predicted experts, and runs the very code the resident
quantized model runs (the `qmoe` kernel for decode, sorted groups for prefill) on the slot pool,
so the tokens are exactly those of the resident model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mixtral.checkpoint.load import build_meta, load_weights
from mixtral.checkpoint.quantized import load_quantized, quant_layout
from mixtral.checkpoint.reader import read_config
from mixtral.errors import ConfigError
from mixtral.kernels.dispatch import AutoDispatch
from mixtral.model.dispatch import SortedDispatch
from mixtral.model.moe import route
from mixtral.offload.cache import ExpertCache
from mixtral.offload.store import ExpertStore


class OffloadedExperts(nn.Module):
    """Placeholder for a layer's experts: they live in the cache. Holds no tensors."""

    def __init__(self, cache: ExpertCache, layer: int) -> None:
        super().__init__()
        self.cache, self.layer = cache, layer

    @property
    def n_experts(self) -> int:
        return self.cache.n_experts

    def extra_repr(self) -> str:
        return f"layer {self.layer}: {self.cache.n_experts} experts offloaded, {self.cache.capacity} cached"


class OffloadDispatch:
    """The MoE dispatcher of one offloaded layer (see the module docstring)."""

    def __init__(self, cache: ExpertCache, layer: int, next_gate: nn.Linear | None) -> None:
        self.cache, self.layer, self.next_gate = cache, layer, next_gate
        self.inner = AutoDispatch(fallback=SortedDispatch())

    def __call__(
        self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor, experts: object
    ) -> torch.Tensor:
        slots_TK, extra = self.cache.acquire(self.layer, ids_TK)
        if self.cache.prefetch and self.next_gate is not None:
            logits = F.linear(x_TD.float(), self.next_gate.weight.float())
            self.cache.prefetch_layer(self.layer + 1, route(logits, ids_TK.shape[1])[1])
        try:
            return self.inner(x_TD, slots_TK, weights_TK, self.cache.view)
        finally:
            self.cache.release(self.layer, ids_TK, extra)

    def __repr__(self) -> str:
        return f"OffloadDispatch(layer={self.layer})"


def parse_cache_size(text: str | int, expert_bytes: int, n_layers: int, n_experts: int) -> int:
    """Experts per layer for `--expert-cache`: an integer, or a byte budget ("6GiB", "800MB") for all layers."""
    if isinstance(text, int) or str(text).isdigit():
        n = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB|KB|MB|GB|B)\s*", str(text))
        if not m:
            raise ConfigError(
                f"expert cache {text!r}: give experts per layer (e.g. 4) or a byte budget (e.g. 6GiB)"
            )
        unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[
            m.group(2)
        ]
        n = int(float(m.group(1)) * unit) // (expert_bytes * n_layers)
        if n < 1:
            raise ConfigError(
                f"expert cache {text}: one expert per layer needs {expert_bytes * n_layers / 2**30:.2f} GiB "
                f"({n_layers} layers x {expert_bytes / 2**20:.1f} MiB)"
            )
    if not 1 <= n <= n_experts:
        raise ConfigError(f"expert cache {text}: between 1 and {n_experts} experts per layer")
    return n


def load_offloaded(
    path: str | Path,
    cache: int | str = 2,
    prefetch: bool = True,
    dtype: torch.dtype = torch.float32,
    experts_from: str | Path | None = None,
    kernels: bool = True,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A Transformer with its experts offloaded to a quantized checkpoint (see the module docstring).

    `path`: the model (a quantized checkpoint; its experts are the offloaded ones unless
    `experts_from` names another quantized checkpoint of the same model, when `path` may be float).
    `cache`: experts per layer kept in memory, or a byte budget for all layers ("6GiB").
    `device`: "cpu", or a CUDA device: the resident weights and the slot pool in GPU memory, experts
    fed through pinned host buffers (see `ExpertCache`).
    `model.expert_cache` is the `ExpertCache` (stats, reset, close).
    """
    source = Path(experts_from or path)
    layout = quant_layout(source)
    if layout is None:
        raise ConfigError(
            f"{source} is not a quantized checkpoint: offloading reads experts written by "
            "`mixtral quantize SRC DST --format int4` (or int8)"
        )
    store = ExpertStore(source)
    if quant_layout(path) is not None:
        model = load_quantized(path, dtype, skip_experts=True)
    else:  # a float model: everything but its experts
        model = build_meta(read_config(path)[0])
        _, sd = load_weights(path, dtype, select=lambda name: ".experts." not in name)
        model.load_state_dict(sd, strict=False, assign=True)
        model.requires_grad_(False)
        model.checkpoint_path = Path(path)
    if model.config != store.config:
        raise ConfigError(f"{source} holds the experts of another model: {store.config} vs {model.config}")
    n = parse_cache_size(cache, store.expert_bytes, store.config.n_layers, store.config.n_experts)
    expert_cache = ExpertCache(store, n, prefetch, compute_dtype=dtype, device=device)
    if kernels:
        from mixtral.kernels import apply_kernels

        apply_kernels(model)
    if torch.device(device).type == "cpu":  # the resident matrices, streamed every step
        from mixtral.kernels.hugepages import move_to_huge_pages

        move_to_huge_pages(model)
    layers = list(model.layers)
    for i, layer in enumerate(layers):
        moe = layer.feed_forward
        moe.experts = OffloadedExperts(expert_cache, i)
        moe.dispatcher = OffloadDispatch(
            expert_cache, i, layers[i + 1].feed_forward.gate if i + 1 < len(layers) else None
        )
    model.expert_cache = expert_cache
    return model.to(device)
