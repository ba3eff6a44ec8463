"""The Mixtral decoder: embeddings, RMSNorm, RoPE + GQA attention, MoE blocks, untied output head.

References: Jiang et al. 2024 "Mixtral of Experts" (Section 2, Table 1); mistral-inference
transformer.py / moe.py; transformers modeling_mixtral.py (numerical oracle, tested for parity).

Conventions:
- RoPE uses the Hugging Face "rotate half" layout (q/k features split in two halves, not interleaved
  pairs), so HF q_proj/k_proj weights load unchanged; Mistral's interleaved wq/wk rows are permuted
  once by the checkpoint loader.
- `positions` [B, T] are RoPE positions; -1 marks a padding token (left padding of ragged batches):
  no token attends to it, and its own output is meaningless.
- The KV cache is passed explicitly and never hidden inside modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MixtralConfig
from .errors import GenerationError
from .moe import MoE


@dataclass(frozen=True)
class ModelOutput:
    """logits [B, T', V] in the model dtype (T' = T, or the kept tail); router_logits [L, B, T, E] fp32."""

    logits: torch.Tensor
    router_logits: torch.Tensor


@dataclass
class KVCache:
    """Preallocated keys/values for every layer, shared write pointer `length` for all rows.

    k, v: [L, B, KV, S, hd]; valid: [B, S] bool, False for slots holding padding tokens.
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(
        cls,
        config: MixtralConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        if max_len > config.max_seq_len:
            raise GenerationError(
                f"cache length {max_len} exceeds the model context of {config.max_seq_len} tokens"
            )
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            valid=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


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


def rope_cos_sin(
    positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, hd] for the rotate-half layout, computed in fp32 then cast."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions_BT.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs_BTh = positions_BT.clamp(min=0).float()[..., None] * inv_freq
    emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTd.cos().to(dtype), emb_BTd.sin().to(dtype)


def apply_rope(x_BHTd: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor) -> torch.Tensor:
    half = x_BHTd.shape[-1] // 2
    rotated = torch.cat((-x_BHTd[..., half:], x_BHTd[..., :half]), dim=-1)
    return x_BHTd * cos_BTd[:, None] + rotated * sin_BTd[:, None]


class Attention(nn.Module):
    """Grouped-query causal self-attention through scaled_dot_product_attention."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.q_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.kv_dim, bias=False)
        self.wo = nn.Linear(config.q_dim, config.dim, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor, int] | None,
    ) -> torch.Tensor:
        """mask: bool [B, 1, T, S] (True = attend), or None: causal when T > 1 (then S == T), else all
        keys; kv: (k_cache, v_cache, start) of this layer, written at [start, start + T)."""
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if kv is not None:
            k_cache, v_cache, start = kv
            k_cache[:, :, start : start + T] = k
            v_cache[:, :, start : start + T] = v
            k, v = k_cache[:, :, : start + T], v_cache[:, :, : start + T]
        gqa = self.n_heads != self.n_kv_heads
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa
        )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = MoE(config.dim, config.hidden_dim, config.n_experts, config.top_k)

    def forward(self, x, cos_sin, mask, kv) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + self.attention(self.attention_norm(x), cos_sin, mask, kv)
        moe_out, router_logits = self.feed_forward(self.ffn_norm(h))
        return h + moe_out, router_logits


def _attention_mask(positions_BT: torch.Tensor, cache: KVCache | None, padded: bool) -> torch.Tensor | None:
    """Bool [B, 1, T, S] mask, or None when plain causal attention is exact."""
    B, T = positions_BT.shape
    start = cache.length if cache is not None else 0
    if not padded and (start == 0 or T == 1):
        return None  # SDPA's is_causal (keys = queries) or attend-to-all (one new token) is exact
    valid_BS = cache.valid[:, : start + T] if cache is not None else positions_BT >= 0
    q_slot = torch.arange(start, start + T, device=positions_BT.device)
    k_slot = torch.arange(start + T, device=positions_BT.device)
    causal_TS = k_slot[None, :] <= q_slot[:, None]
    # A padding query may attend to itself only, which keeps its softmax finite (no NaN rows).
    return (causal_TS & (valid_BS[:, None, :] | (k_slot[None, :] == q_slot[:, None])))[:, None]


class Transformer(nn.Module):
    """Mixtral decoder. Build on the meta device to plan a checkpoint load without allocating."""

    def __init__(self, config: MixtralConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) for every matrix (stacked experts included), ones for norms. Seed with torch.manual_seed."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    def set_dispatch(self, name: str) -> None:
        """Select the MoE dispatch strategy of every layer ("auto", "loop", "sorted")."""
        from .moe import DISPATCH

        if name != "auto" and name not in DISPATCH:
            raise ValueError(f"unknown dispatch {name!r}; choose from auto, {', '.join(DISPATCH)}")
        for layer in self.layers:
            layer.feed_forward.dispatch = name

    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        keep_logits: int | None = None,
    ) -> ModelOutput:
        """tokens [B, T] int64 → ModelOutput. With a cache, the T tokens are written at slots
        [cache.length, cache.length + T) and cache.length advances. keep_logits=n computes logits for
        the last n positions only (prefill needs one)."""
        positions = self._check_inputs(tokens, cache, positions)
        if cache is None:
            padded = bool((positions < 0).any())
        else:
            end = cache.length + tokens.shape[1]
            cache.valid[:, cache.length : end] = positions >= 0
            padded = not bool(cache.valid[:, :end].all())
        x = self.tok_embeddings(tokens)
        cos_sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        mask = _attention_mask(positions, cache, padded)
        router_logits = []
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i], cache.length) if cache is not None else None
            x, logits_BTE = layer(x, cos_sin, mask, kv)
            router_logits.append(logits_BTE)
        if cache is not None:
            cache.length += tokens.shape[1]
        if keep_logits is not None:
            x = x[:, -keep_logits:]
        return ModelOutput(self.output(self.norm(x)), torch.stack(router_logits))

    def _check_inputs(
        self, tokens: torch.Tensor, cache: KVCache | None, positions: torch.Tensor | None
    ) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] == 0:
            raise ValueError(
                f"tokens must be an integer tensor of shape [batch, seq] with seq > 0, "
                f"got {tuple(tokens.shape)} {tokens.dtype}"
            )
        B, T = tokens.shape
        V = self.config.vocab_size
        if not torch.compiler.is_compiling() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(
                f"token ids must lie in [0, {V}); got range [{int(tokens.min())}, {int(tokens.max())}]"
            )
        start = cache.length if cache is not None else 0
        if cache is not None:
            if cache.k.shape[1] != B:
                raise ValueError(f"cache was allocated for batch {cache.k.shape[1]}, got batch {B}")
            if start + T > cache.max_len:
                raise GenerationError(
                    f"{start} cached + {T} new tokens exceed the cache length of {cache.max_len}"
                )
        elif T > self.config.max_seq_len:
            raise GenerationError(f"{T} tokens exceed the model context of {self.config.max_seq_len}")
        if positions is None:
            return torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} must equal tokens shape {(B, T)}")
        return positions
