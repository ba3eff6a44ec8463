"""The Mixtral decoder: embeddings, RMSNorm, RoPE + GQA attention, MoE blocks, untied output head.

References: Jiang et al. 2024 "Mixtral of Experts" (Section 2, Table 1); mistral-inference
transformer.py / moe.py; transformers modeling_mixtral.py (numerical oracle, tested for parity).

Conventions:
- RoPE uses the Hugging Face "rotate half" layout (q/k features split in two halves, not interleaved
  pairs), so HF q_proj/k_proj weights load unchanged; Mistral's interleaved wq/wk rows are permuted
  once by the checkpoint loader.
- `positions` [B, T] are RoPE positions. Without a cache, a position 0 starts a new segment and
  attention never crosses segments, so left padding (position -1 before a row's 0) and packed
  documents (positions restarting at 0) are both handled; a pad token's own output is meaningless.
- The KV cache (`mixtral.model.cache`) is passed explicitly and never hidden inside modules; each
  layer's attention writes and reads through its `LayerCache` view.
- The model is plain single-device PyTorch. Fast paths are applied to a built model from outside
  (`mixtral.kernels.apply_kernels`, `mixtral.quant.quantize_model`), and the MoE dispatch strategy
  is an object (`set_dispatcher`); nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from mixtral.config import MixtralConfig
from mixtral.errors import GenerationError
from mixtral.model.cache import KVCache, LayerCache
from mixtral.model.dispatch import Dispatcher
from mixtral.model.moe import MoE


@dataclass(frozen=True)
class ModelOutput:
    """logits [B, T', V] in the model dtype (T' = T, or the kept tail); router_logits [L, B, T, E] fp32."""

    logits: torch.Tensor
    router_logits: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (bf16 variance underflows), scale in the input dtype, as the release does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE's inverse frequencies [hd/2], fp32: 1 / theta^(2i / hd)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def rope_cos_sin(
    positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, hd] for the rotate-half layout, computed in fp32 then cast."""
    inv_freq = rope_inv_freq(head_dim, theta, positions_BT.device)
    freqs_BTh = positions_BT.clamp(min=0).float()[..., None] * inv_freq
    emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTd.cos().to(dtype), emb_BTd.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos_BTd[:, None] + rotated * sin_BTd[:, None]


_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    """Grouped-query causal self-attention through scaled_dot_product_attention."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = _linear(config.dim, config.q_dim)
        self.wk = _linear(config.dim, config.kv_dim)
        self.wv = _linear(config.dim, config.kv_dim)
        self.wo = _linear(config.q_dim, config.dim)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None,
    ) -> torch.Tensor:
        """mask: bool [B, 1, T, S] (True = attend) or None for plain causal attention (S == T)."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(k, v)
        gqa = self.n_heads != self.n_kv_heads

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa
            )

        if q.is_cuda:
            # Not cuDNN's attention: it builds an execution plan per shape, so a decode step (one more
            # cached position each time) paid ~60 ms of host time per layer (H200, torch 2.11, bf16).
            with sdpa_kernel(_CUDA_SDPA_BACKENDS):
                out = attend()
        else:
            out = attend()
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = MoE(config.dim, config.hidden_dim, config.n_experts, config.top_k)
        # A whole-block decode step set from outside (`mixtral.kernels.apply_kernels`): called first
        # with (block, x, cos_sin, cache) when there is a cache; its None means "run the modules".
        self.fused_decode: Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None = None

    def forward(self, x, cos_sin, mask, cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        if cache is not None and self.fused_decode is not None:
            out = self.fused_decode(self, x, cos_sin, cache)
            if out is not None:
                return out
        h = x + self.attention(self.attention_norm(x), cos_sin, mask, cache)
        moe_out, router_logits = self.feed_forward(self.ffn_norm(h))
        return h + moe_out, router_logits


def segment_mask(positions_BT: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, T, T]: causal, and only within a segment (a position 0 starts a new one)."""
    segment_BT = torch.cumsum(positions_BT == 0, dim=1)
    causal_TT = torch.ones(positions_BT.shape[1], positions_BT.shape[1], dtype=torch.bool,
                           device=positions_BT.device).tril()  # fmt: skip
    return (causal_TT & (segment_BT[:, :, None] == segment_BT[:, None, :]))[:, None]


def cache_mask(positions_BT: torch.Tensor, attend: int) -> torch.Tensor:
    """Bool [B, 1, T, attend]: the query at position p sees slots 0..p of its row.

    A padding query (position -1) sees slot 0 only, which keeps its softmax finite."""
    slots_S = torch.arange(attend, device=positions_BT.device)
    return (slots_S <= positions_BT.clamp(min=0)[:, :, None])[:, None]


def _int_range(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor: a decode step's few ids read as a list (two tensor
    reductions cost ~10 µs a step), larger tensors by one reduction."""
    if t.numel() <= 64 and t.device.type == "cpu":
        values = t.flatten().tolist()
        return min(values), max(values)
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


class Transformer(nn.Module):
    """Mixtral decoder. Build on the meta device to plan a checkpoint load without allocating."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = _linear(config.dim, config.vocab_size)
        self.activation_checkpointing = False  # training only: recompute each block in backward
        # A whole decode step set from outside (`mixtral.kernels.apply_kernels`), asked first by
        # step_cached for one token per row: (model, tokens, positions, k, v, rows) -> (logits,
        # router_logits) or None for "run the blocks".
        self.fused_step: Callable[..., tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) for every matrix (stacked experts included), ones for norms. Seed with torch.manual_seed."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def set_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Use `dispatcher` (see mixtral.model.dispatch) in every MoE layer."""
        if not callable(dispatcher):
            raise TypeError(
                f"a dispatcher is called as dispatcher(x, ids, weights, experts), got {dispatcher!r}"
            )
        for layer in self.layers:
            layer.feed_forward.dispatcher = dispatcher

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        keep_logits: int | None = None,
    ) -> ModelOutput:
        """tokens [B, T] int64 → ModelOutput. With a cache, the tokens are written at their
        positions (default: cache.length + 0..T-1) and cache.length advances by T. keep_logits=n
        computes logits for the last n positions only (prefill needs one)."""
        self._check_inputs(tokens, cache, positions)
        B, T = tokens.shape
        if cache is None:
            mask = None if positions is None else segment_mask(positions)
            if positions is None:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            out = self.step(tokens, positions, mask, None, keep_logits)
        else:
            if positions is None:
                positions = torch.arange(cache.length, cache.length + T, device=tokens.device).expand(B, T)
            out = self.step_cached(tokens, positions, cache.k, cache.v,
                                   cache.max_len if cache.static else cache.length + T, keep_logits)  # fmt: skip
            cache.length += T
        return out

    def step_cached(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attend: int,
        keep_logits: int | None = None,
        rows: torch.Tensor | None = None,
    ) -> ModelOutput:
        """One cached forward with no Python state: the unit torch.compile captures for decoding.
        Writes k/v at slot = position (padding, position -1, into the spare last slot); `rows` [B]
        names the cache rows of the batch's rows (None: the cache's rows are the batch)."""
        if self.fused_step is not None and tokens.shape[1] == 1:
            fused = self.fused_step(self, tokens, positions, k_cache, v_cache, rows)
            if fused is not None:
                return ModelOutput(*fused)
        caches = LayerCache.for_layers(k_cache, v_cache, positions, attend, rows)
        return self.step(tokens, positions, cache_mask(positions, attend), caches, keep_logits)

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        caches: list[LayerCache] | None,
        keep_logits: int | None,
    ) -> ModelOutput:
        x = self.tok_embeddings(tokens)
        cos_sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        router_logits = []
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x, logits_BTE = checkpoint(layer, x, cos_sin, mask, cache, use_reentrant=False)
            else:
                x, logits_BTE = layer(x, cos_sin, mask, cache)
            router_logits.append(logits_BTE)
        if keep_logits is not None:
            x = x[:, -keep_logits:]
        return ModelOutput(self.output(self.norm(x)), torch.stack(router_logits))

    def check_cache(self, cache: KVCache) -> None:
        """A GenerationError unless `cache` was allocated for this model's layout and device (a cache of
        another config would otherwise fail deep in attention, or silently use the wrong layers)."""
        c = self.config
        want = (c.n_layers, c.n_kv_heads, c.head_dim)
        got = (cache.k.shape[0], cache.k.shape[2], cache.k.shape[4]) if cache.k.dim() == 5 else None
        if got != want or cache.v.shape != cache.k.shape:
            raise GenerationError(
                f"the KV cache has shape k {tuple(cache.k.shape)}, v {tuple(cache.v.shape)}, but this model needs "
                f"[n_layers={c.n_layers}, batch, n_kv_heads={c.n_kv_heads}, max_len + 1, head_dim={c.head_dim}]; "
                "allocate it with KVCache.allocate(model.config, ...)"
            )
        device = self.tok_embeddings.weight.device
        if cache.k.device != device:
            raise GenerationError(f"the KV cache is on {cache.k.device} but the model is on {device}")

    def _check_inputs(
        self, tokens: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None
    ) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] == 0:
            raise ValueError(
                f"tokens must be an integer tensor of shape [batch, seq] with seq > 0, "
                f"got {tuple(tokens.shape)} {tokens.dtype}"
            )
        B, T = tokens.shape
        V = self.config.vocab_size
        compiling = torch.compiler.is_compiling()
        if not compiling:
            lo, hi = _int_range(tokens)
            if lo < 0 or hi >= V:
                raise ValueError(f"token ids must lie in [0, {V}); got range [{lo}, {hi}]")
        if cache is not None:
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                raise ValueError("a KV-cache forward is for inference: run it under torch.no_grad()")
            self.check_cache(cache)
            if cache.k.shape[1] != B:
                raise ValueError(f"cache was allocated for batch {cache.k.shape[1]}, got batch {B}")
            if cache.k.dtype != self.tok_embeddings.weight.dtype:
                raise ValueError(
                    f"cache was allocated as {cache.k.dtype} but the model computes in "
                    f"{self.tok_embeddings.weight.dtype}; pass dtype= to KVCache.allocate"
                )
            if cache.length + T > cache.max_len:
                raise GenerationError(
                    f"{cache.length} cached + {T} new tokens exceed the cache length of {cache.max_len}"
                )
        elif T > self.config.max_seq_len:
            raise GenerationError(f"{T} tokens exceed the model context of {self.config.max_seq_len}")
        if positions is not None:
            if positions.shape != tokens.shape or positions.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"positions shape {tuple(positions.shape)} ({positions.dtype}) must equal tokens shape "
                    f"{(B, T)}, integer"
                )
            # Position -1 marks padding; a position p is written to cache slot p.
            limit = cache.max_len if cache is not None else self.config.max_seq_len
            lo, hi = (-1, -1) if compiling else _int_range(positions)
            if lo < -1 or hi >= limit:
                raise GenerationError(
                    f"positions must lie in [-1, {limit}) (-1 marks padding; {limit} is the "
                    f"{'cache length' if cache is not None else 'model context'}); got [{lo}, {hi}]"
                )
