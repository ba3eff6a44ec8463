"""Architecture config: a frozen dataclass with Mistral's field names, named presets and derived counts.

References: Jiang et al. 2024 "Mixtral of Experts" Table 1; Mistral's released params.json
(../shared/reference/mixtral.md sections 1 and 3). Training knobs and runtime flags do not live here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mixtral.errors import ConfigError

_INT_FIELDS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "hidden_dim",
    "n_experts",
    "top_k",
    "vocab_size",
    "max_seq_len",
)


@dataclass(frozen=True)
class MixtralConfig:
    """The architecture of a Mixtral-style sparse mixture-of-experts decoder.

    Every FFN is `n_experts` SwiGLU experts of width `hidden_dim`; each token uses `top_k` of them.
    Attention is grouped-query (`n_kv_heads` key/value heads shared by `n_heads` query heads),
    fully causal over `max_seq_len` positions (no sliding window), with RoPE base `rope_theta`.
    """

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    n_experts: int = 8
    top_k: int = 2
    vocab_size: int = 32000
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config field {name!r} must be an integer, got {value!r}")
            if value <= 0:
                raise ConfigError(f"config field {name!r} must be positive, got {value}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"config field {name!r} must be a positive number, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config field 'n_kv_heads' ({self.n_kv_heads}) must divide 'n_heads' ({self.n_heads})"
            )
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"config field 'top_k' ({self.top_k}) cannot exceed 'n_experts' ({self.n_experts})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even for RoPE, got {self.head_dim}")

    def replace(self, **changes: object) -> MixtralConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> MixtralConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(d)
        if missing:
            raise ConfigError(f"missing config field(s): {', '.join(sorted(missing))}")
        return cls(**d)  # type: ignore[arg-type]

    # ---- derived values ---------------------------------------------------------------------

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def attention_params_per_layer(self) -> int:
        return self.dim * self.q_dim * 2 + self.dim * self.kv_dim * 2

    @property
    def expert_params(self) -> int:
        """Parameters of one SwiGLU expert (w1, w2, w3)."""
        return 3 * self.dim * self.hidden_dim

    def _params(self, experts_per_layer: int) -> int:
        per_layer = (
            self.attention_params_per_layer
            + 2 * self.dim  # attention_norm, ffn_norm
            + self.dim * self.n_experts  # router
            + experts_per_layer * self.expert_params
        )
        return 2 * self.vocab_size * self.dim + self.n_layers * per_layer + self.dim

    @property
    def total_params(self) -> int:
        """All parameters (untied embedding and head, no biases)."""
        return self._params(self.n_experts)

    @property
    def active_params(self) -> int:
        """Parameters one token touches: all but the experts it is not routed to."""
        return self._params(self.top_k)

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of K and V cached per token over all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.n_layers * self.kv_dim * itemsize


PRESETS: dict[str, MixtralConfig] = {
    # Paper Table 1 with the release's rope_theta and norm_eps.
    "mixtral-8x7b": MixtralConfig(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
        n_experts=8, top_k=2, vocab_size=32000, rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768,
    ),
    # Mixtral 8x22B release (params.json / config.json).
    "mixtral-8x22b": MixtralConfig(
        dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, head_dim=128, hidden_dim=16384,
        n_experts=8, top_k=2, vocab_size=32768, rope_theta=1e6, norm_eps=1e-5, max_seq_len=65536,
    ),
    # The benchmark config of issues 2 and 3: 791M total, 263M active parameters.
    "bench-791m": MixtralConfig(
        dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=3584,
        n_experts=8, top_k=2, vocab_size=32000, rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768,
    ),
    # Tiny: real tokenizer vocabulary, a few MB of weights; for tests and the default demo.
    "tiny": MixtralConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
        n_experts=8, top_k=2, vocab_size=32000, rope_theta=1e6, norm_eps=1e-5, max_seq_len=2048,
    ),
}  # fmt: skip


def get_preset(name: str) -> MixtralConfig:
    """The preset of that exact name; a clear error lists the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
