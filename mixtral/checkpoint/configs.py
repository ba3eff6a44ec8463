"""Checkpoint configs: Hugging Face config.json and Mistral params.json to and from MixtralConfig.

One field table (`FIELDS`) drives reading, writing and the field names quoted in error messages.
Decisions (../shared/reference/mixtral.md sections 1 and 4):
- `sliding_window` other than null (or at least the context length, which is the same thing) is a
  ConfigError: Mixtral attends densely over its whole context, and the 4096 in early copies of its
  config.json made engines that honoured it produce nonsense past 4k tokens. We refuse rather than
  ignore it because we cannot tell a stale Mixtral config from a model really trained windowed.
- RoPE theta: config.json's `rope_parameters.rope_theta` (transformers 5) or top-level `rope_theta`
  (older files); both present and different is an error; neither means 1e6, transformers' Mixtral
  default. params.json without `rope_theta` also means 1e6, as in Mistral's reference code
  (`self.args.rope_theta or 1000000.0`). Only `rope_type` "default" (no scaling) is supported.
- config.json's `head_dim` null or absent means hidden_size / num_attention_heads and a missing
  `num_key_value_heads` means num_attention_heads (transformers' rules); the other
  shape-defining fields are required rather than silently taken from transformers' 8x7B defaults.
- params.json has no context length; `max_seq_len` absent means 32768 (the Mixtral release).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mixtral.config import MixtralConfig
from mixtral.errors import ConfigError

# Our field -> (config.json key, params.json key); dots reach into nested objects.
FIELDS: dict[str, tuple[str, str]] = {
    "dim": ("hidden_size", "dim"),
    "n_layers": ("num_hidden_layers", "n_layers"),
    "n_heads": ("num_attention_heads", "n_heads"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "head_dim": ("head_dim", "head_dim"),
    "hidden_dim": ("intermediate_size", "hidden_dim"),
    "n_experts": ("num_local_experts", "moe.num_experts"),
    "top_k": ("num_experts_per_tok", "moe.num_experts_per_tok"),
    "vocab_size": ("vocab_size", "vocab_size"),
    "rope_theta": ("rope_parameters.rope_theta", "rope_theta"),
    "norm_eps": ("rms_norm_eps", "norm_eps"),
    "max_seq_len": ("max_position_embeddings", "max_seq_len"),
}
_DERIVED = {"q_dim": ("n_heads", "head_dim"), "kv_dim": ("n_kv_heads", "head_dim")}
_HF_DEFAULTS = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32}
_PARAMS_DEFAULTS = {"rope_theta": 1e6, "max_seq_len": 32768}
DEFAULT_ROPE_THETA = 1e6
# What every Mixtral config.json we write says besides the architecture: dense attention, untied
# head, SwiGLU, the tokenizer's BOS/EOS, and no training-time noise.
_HF_FIXED = {"hidden_act": "silu", "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
             "eos_token_id": 2, "attention_dropout": 0.0, "router_jitter_noise": 0.0}  # fmt: skip


def field_name(fmt: str, field: str) -> str:
    """How format `fmt` ("hf", "hf-fused" or "mistral") spells our config field (or q_dim/kv_dim)."""
    column = 1 if fmt == "mistral" else 0
    if field in _DERIVED:
        return "*".join(FIELDS[f][column] for f in _DERIVED[field])
    return FIELDS[field][column]


def read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{Path(path).name}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{Path(path).name}: expected a JSON object")
    return d


def _get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _build(values: dict[str, Any], source: str) -> MixtralConfig:
    try:
        return MixtralConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:  # a null where a number belongs
        raise ConfigError(f"{source}: {e}") from None


def _check_dense(window: Any, max_seq_len: Any, source: str) -> None:
    if window is None or (isinstance(window, int) and isinstance(max_seq_len, int) and window >= max_seq_len):
        return
    raise ConfigError(
        f"{source}: sliding_window={window!r}, but Mixtral attends densely over its whole context "
        f"(paper: 'fully dense context length of 32k'); early Mixtral configs carried 4096 by mistake. "
        f'If this is a Mixtral checkpoint, set "sliding_window": null'
    )


def _required(d: dict[str, Any], keys: list[str], source: str) -> None:
    missing = [k for k in keys if _get(d, k) is None]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> MixtralConfig:
    """MixtralConfig from a transformers config.json (4.x or 5.x spelling)."""
    if d.get("model_type") != "mixtral":
        raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, only 'mixtral' is supported")
    names = {f: hf for f, (hf, _) in FIELDS.items() if f not in ("head_dim", "n_kv_heads", "rope_theta")}
    _required(d, [k for k in names.values() if k not in _HF_DEFAULTS], source)
    values = {f: _get(d, k, _HF_DEFAULTS.get(k)) for f, k in names.items()}
    values["n_kv_heads"] = d.get("num_key_value_heads") or values["n_heads"]
    values["head_dim"] = d.get("head_dim")
    if values["head_dim"] is None:
        dim, heads = values["dim"], values["n_heads"]
        if dim % heads:
            raise ConfigError(
                f"{source}: head_dim is null and hidden_size {dim} is not divisible by {heads} heads"
            )
        values["head_dim"] = dim // heads
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
        raise ConfigError(f"{source}: RoPE scaling ({rope or d.get('rope_scaling')}) is not supported")
    thetas = {t for t in (rope.get("rope_theta"), d.get("rope_theta")) if t is not None}
    if len(thetas) > 1:
        raise ConfigError(f"{source}: rope_theta {d['rope_theta']} disagrees with rope_parameters {rope}")
    values["rope_theta"] = thetas.pop() if thetas else DEFAULT_ROPE_THETA
    _check_dense(d.get("sliding_window"), values["max_seq_len"], source)
    if d.get("tie_word_embeddings"):
        raise ConfigError(f"{source}: tie_word_embeddings is true; Mixtral's output head is untied")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r}; Mixtral's experts use 'silu' (SwiGLU)")
    return _build(values, source)


def config_to_hf(cfg: MixtralConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A config.json that transformers' MixtralForCausalLM loads unchanged (4.x and 5.x)."""
    d: dict[str, Any] = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}
    for field, (key, _) in FIELDS.items():
        if "." not in key:
            d[key] = getattr(cfg, field)
    dtype_name = str(dtype).removeprefix("torch.")
    d.update(_HF_FIXED)
    d["rope_parameters"] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    d["rope_theta"] = cfg.rope_theta  # for transformers 4.x, which does not read rope_parameters
    d["dtype"] = d["torch_dtype"] = dtype_name  # torch_dtype: transformers 4.x's spelling
    return d


def config_from_params(d: dict[str, Any], source: str = "params.json") -> MixtralConfig:
    """MixtralConfig from a Mistral params.json (with its "moe" section)."""
    if not isinstance(d.get("moe"), dict):
        raise ConfigError(f"{source}: no 'moe' section; this is a dense Mistral model, not Mixtral")
    names = {f: p for f, (_, p) in FIELDS.items()}
    _required(d, [k for k in names.values() if k not in _PARAMS_DEFAULTS], source)
    _check_dense(d.get("sliding_window"), d.get("max_seq_len", _PARAMS_DEFAULTS["max_seq_len"]), source)
    return _build({f: _get(d, k, _PARAMS_DEFAULTS.get(k)) for f, k in names.items()}, source)


def config_to_params(cfg: MixtralConfig) -> dict[str, Any]:
    """A Mistral params.json (the reference code's ModelArgs plus `max_seq_len`)."""
    d: dict[str, Any] = {}
    for field, (_, key) in FIELDS.items():
        *outer, last = key.split(".")
        target = d
        for part in outer:
            target = target.setdefault(part, {})
        target[last] = getattr(cfg, field)
    return d
