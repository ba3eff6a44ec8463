"""`mixtral info`: parameter counts and memory of a preset or a checkpoint, allocating nothing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mixtral.cli.common import DTYPES
from mixtral.config import PRESETS, MixtralConfig, get_preset
from mixtral.errors import MixtralError


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def _human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _resolve_config(target: str) -> tuple[MixtralConfig, str]:
    if target in PRESETS:
        return get_preset(target), f"preset {target}"
    path = Path(target)
    if not path.exists():
        raise MixtralError(f"{target!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    from mixtral.checkpoint import read_config

    cfg, fmt = read_config(path)
    return cfg, f"{fmt} checkpoint {path}"


def info_report(cfg: MixtralConfig) -> dict[str, object]:
    """Parameter counts and memory figures for a config (nothing is allocated)."""
    return {
        "config": cfg.to_dict(),
        "total_params": cfg.total_params,
        "active_params": cfg.active_params,
        "active_fraction": cfg.active_params / cfg.total_params,
        "weights_bytes": {
            name: cfg.total_params * torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()
        },  # fmt: skip
        "kv_cache_bytes_per_token": {name: cfg.kv_cache_bytes_per_token(dt) for name, dt in DTYPES.items()},
        "kv_cache_bytes_full_context_bf16": cfg.kv_cache_bytes_per_token(torch.bfloat16) * cfg.max_seq_len,
    }


def cmd_info(target: str, as_json: bool = False) -> None:
    cfg, source = _resolve_config(target)
    report = info_report(cfg)
    if as_json:
        print(json.dumps({"source": source, **report}))
        return
    print(f"{source}")
    print("  " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    print(f"  total parameters:  {cfg.total_params:,} ({_human_count(cfg.total_params)})")
    print(f"  active parameters: {cfg.active_params:,} ({_human_count(cfg.active_params)}, "
          f"{report['active_fraction']:.1%} of total: top-{cfg.top_k} of {cfg.n_experts} experts)")  # fmt: skip
    weights = report["weights_bytes"]
    print("  weights: " + ", ".join(f"{_human_bytes(weights[n])} in {n}" for n in DTYPES))  # type: ignore[index]
    kv = report["kv_cache_bytes_per_token"]
    print("  KV cache per token: " + ", ".join(f"{_human_bytes(kv[n])} in {n}" for n in DTYPES))  # type: ignore[index]
    print(f"  KV cache for one {cfg.max_seq_len}-token sequence (bf16): "
          f"{_human_bytes(report['kv_cache_bytes_full_context_bf16'])}")  # type: ignore[arg-type]  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="parameter counts and memory of a preset or checkpoint (allocates nothing)"
    )
    p.add_argument("target", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=lambda a: cmd_info(a.target, a.json))
