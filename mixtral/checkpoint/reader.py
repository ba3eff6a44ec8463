"""Opening a checkpoint directory: format detection, header validation, and lazy reads of our parameters.

Directories: Hugging Face (config.json + model.safetensors, or model-0000N-of-0000M.safetensors +
model.safetensors.index.json) or Mistral (params.json + consolidated.safetensors, or
consolidated-*.safetensors). Safetensors only: pickle files are refused without being opened.

`CheckpointReader(path)` reads the config and every header and runs every check headers allow
(file integrity, dtypes, layer and expert counts, tensor names, shapes) before any tensor data is
touched, then reads tensors lazily from the mmap, one at a time, through the name table
(`mixtral.checkpoint.table`). Loading, conversion, GGUF export and the layer-by-layer runner all
read through it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mixtral.checkpoint.configs import config_from_hf, config_from_params, field_name, read_json
from mixtral.checkpoint.safetensors_io import TORCH_DTYPES, ShardSet, TensorEntry, refuse_pickles
from mixtral.checkpoint.table import LAYER_ROW, TABLE, Slot, file_pattern, from_interleaved, our_shapes, plan
from mixtral.config import MixtralConfig
from mixtral.errors import (
    ConfigMismatchError,
    FormatError,
    MissingTensorError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnexpectedTensorError,
)


def read_config(path: str | Path) -> tuple[MixtralConfig, str]:
    """The config of a checkpoint directory and its format ("hf" or "mistral"); reads no weights."""
    cfg, fmt, _ = _detect(Path(path))
    return cfg, fmt


def validate_checkpoint(path: str | Path) -> tuple[MixtralConfig, str]:
    """Run every check loading runs before reading data; the config and layout found.

    The layout is "hf", "hf-fused" or "mistral". Raises the typed error `load_model` would raise.
    """
    with CheckpointReader(path) as reader:
        return reader.config, reader.format


class CheckpointReader:
    """A validated checkpoint: `config`, `format` ("hf", "hf-fused" or "mistral"), lazy tensor reads.

    Opening reads no tensor data. `read(name)` returns one of our parameters (experts gathered into
    their [E, ...] stack, Mistral's interleaved q/k rows permuted to our layout); `read_piece(name,
    expert)` one file tensor's part of it. Values are checked finite by default, and a
    `NonFiniteWeightError` names the file tensor. Use as a context manager: files are mmap'd on
    first read and closed on exit.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg, fmt, files = _detect(self.path)
        if fmt == "hf" and "quantization_config" in read_json(self.path / "config.json"):
            raise FormatError(
                f"{self.path} is a quantized checkpoint (config.json has a quantization_config): load_model "
                "and every mixtral command load it, and it exports to GGUF; it cannot be converted to a float "
                "HF or Mistral checkpoint"
            )
        self._shards = ShardSet.from_index(files) if isinstance(files, Path) else ShardSet(files)
        if fmt == "hf" and any(k.endswith("mlp.experts.gate_up_proj") for k in self._shards.entries):
            fmt = "hf-fused"
        _validate(self._shards, cfg, fmt, "params.json" if fmt == "mistral" else "config.json")
        self.config, self.format = cfg, fmt
        self._slots: dict[tuple[str, int | None], Slot] = {(s.ours, s.expert): s for s in plan(cfg, fmt)}

    def __enter__(self) -> CheckpointReader:
        self._shards.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._shards.__exit__(*exc)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our parameter names and shapes, in file order."""
        return our_shapes(self.config)

    @property
    def file_dtypes(self) -> set[torch.dtype]:
        """The dtypes the weights are stored in."""
        return {TORCH_DTYPES[d] for d in self._shards.dtypes()}

    def read_piece(self, name: str, expert: int | None = None, check_finite: bool = True) -> torch.Tensor:
        """One expert's slice of stacked parameter `name` (or a whole unstacked one), in our layout
        and the file's dtype, on the CPU."""
        slot = self._slots[(name, expert)]
        piece = self._shards.read(slot.key, slot.select)
        piece = from_interleaved(piece, slot.rope_heads) if slot.rope_heads else piece
        if check_finite:
            self._check_finite(piece, slot)
        return piece

    def read(
        self,
        name: str,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        check_finite: bool = True,
    ) -> torch.Tensor:
        """Our parameter `name`, filled piece by piece into `out` (or a new CPU tensor of `dtype`,
        default the file's). Finiteness is checked after the cast, so an overflowing cast is caught."""
        if out is None:
            stored = TORCH_DTYPES[self._shards.entries[self._slot_of(name).key].dtype]
            out = torch.empty(self.shapes[name], dtype=dtype or stored)
        for expert in self._experts(name):
            dst = out if expert is None else out[expert]
            dst.copy_(self.read_piece(name, expert, check_finite=False))
            if check_finite:
                self._check_finite(dst, self._slots[(name, expert)])
        return out

    def verify(self) -> None:
        """Read every tensor once and check it is finite (headers were checked on opening)."""
        for name in self.shapes:
            for expert in self._experts(name):
                self.read_piece(name, expert)

    def _experts(self, name: str) -> list[int | None]:
        if (name, None) in self._slots:
            return [None]
        if (name, 0) not in self._slots:
            raise KeyError(f"{name!r} is not a parameter of this checkpoint's model")
        return list(range(self.config.n_experts))

    def _slot_of(self, name: str) -> Slot:
        return self._slots[(name, self._experts(name)[0])]

    def _check_finite(self, t: torch.Tensor, slot: Slot) -> None:
        if bool(torch.isfinite(t).all()):
            return
        entry = self._shards.entries[slot.key]
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        cast = torch.finfo(t.dtype).max < torch.finfo(TORCH_DTYPES[entry.dtype]).max  # a narrowing cast
        raise NonFiniteWeightError(
            f"{slot.key} in {entry.file.name} holds {n_nan} NaN and {n_inf} Inf value(s)"
            + (
                f" after casting {entry.dtype} to {t.dtype} (values beyond its range become Inf)"
                if cast
                else ""
            )
        )


def _detect(path: Path) -> tuple[MixtralConfig, str, list[Path] | Path]:
    """Config, format and weight files (or the index file) of a checkpoint directory."""
    if not path.is_dir():
        raise FormatError(f"{path}: not a directory; pass the checkpoint directory")
    hf = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    hf = hf or sorted(path.glob("model-*-of-*.safetensors"))
    index = path / "model.safetensors.index.json"
    mistral = sorted(path.glob("consolidated*.safetensors"))
    if (path / "config.json").is_file() and (hf or index.is_file()):
        return config_from_hf(read_json(path / "config.json")), "hf", index if index.is_file() else hf
    if (path / "params.json").is_file() and mistral:
        return config_from_params(read_json(path / "params.json")), "mistral", mistral
    if not (hf or mistral):
        refuse_pickles(path)
    has = [n for n in ("config.json", "params.json") if (path / n).is_file()]
    raise FormatError(
        f"{path}: not a checkpoint: needs config.json with model.safetensors (or model-*-of-*.safetensors "
        f"and model.safetensors.index.json), or params.json with consolidated.safetensors; "
        f"found {', '.join(has + [p.name for p in hf + mistral]) or 'neither'}"
    )


def _indices(keys: set[str], pattern: str, whole: bool = True) -> dict[int, set[int]]:
    """Keys shaped like `pattern` ({i}, maybe {j}; a prefix unless `whole`): layer -> expert indices."""
    regex = re.compile(
        re.escape(pattern).replace(r"\{i\}", r"(\d+)").replace(r"\{j\}", r"(\d+)") + "$" * whole
    )
    found: dict[int, set[int]] = {}
    for key in keys:
        if m := regex.match(key):
            found.setdefault(int(m.group(1)), set()).update(int(g) for g in m.groups()[1:])
    return found


def _span(indices: set[int]) -> str:
    return f"{len(indices)} ({min(indices)}..{max(indices)})" if indices else "none"


def _check_counts(entries: dict[str, TensorEntry], cfg: MixtralConfig, fmt: str, source: str) -> None:
    """Layer count, per-layer expert count and the embedding against the config."""
    keys, layer_prefix = set(entries), file_pattern(LAYER_ROW, fmt).split("{i}")[0] + "{i}."
    layers = set(_indices(keys, layer_prefix, whole=False))
    if layers and layers != set(range(cfg.n_layers)):
        raise ConfigMismatchError(
            f"{source} says {field_name(fmt, 'n_layers')}={cfg.n_layers}, but the weights have layers "
            f"{_span(layers)}, e.g. {layer_prefix.format(i=max(layers))}*"
        )
    n_experts = field_name(fmt, "n_experts")
    for row in (r for r in TABLE if r.experts and fmt != "hf-fused"):
        for i, js in sorted(_indices(keys, file_pattern(row, fmt)).items()):
            if js != set(range(cfg.n_experts)):
                raise ConfigMismatchError(
                    f"{source} says {n_experts}={cfg.n_experts}, but layer {i} has experts {_span(js)} "
                    f"of {file_pattern(row, fmt).format(i=i, j='{j}')}"
                )
    slots = plan(cfg, fmt)
    for slot in slots:
        got = entries[slot.key].shape if slot.key in entries else slot.shape
        if slot is slots[0] and got != slot.shape:  # the embedding fixes V and D
            raise ConfigMismatchError(
                f"{source} says {field_name(fmt, 'vocab_size')}={cfg.vocab_size}, "
                f"{field_name(fmt, 'dim')}={cfg.dim}, but {slot.key} has shape {list(got)}"
            )
        # The router's and fused experts' dim 0 counts experts.
        if (slot.row.shape[0] == "n_experts" or slot.select) and got[:1] != slot.shape[:1]:
            raise ConfigMismatchError(
                f"{source} says {n_experts}={cfg.n_experts}, but {slot.key} has {got[0]} experts"
            )


def _validate(shards: ShardSet, cfg: MixtralConfig, fmt: str, source: str) -> None:
    """Every check that headers allow, in order of diagnosis; typed errors name the tensor."""
    entries, slots = shards.entries, plan(cfg, fmt)
    for e in entries.values():
        if e.dtype not in TORCH_DTYPES:
            raise FormatError(
                f"tensor {e.name} in {e.file.name} has dtype {e.dtype}; weights must be F32, F16 or BF16"
            )
    _check_counts(entries, cfg, fmt, source)
    expected = {s.key: s for s in slots}
    if missing := [k for k in expected if k not in entries]:
        raise MissingTensorError(f"checkpoint lacks {len(missing)} tensor(s): {', '.join(missing[:5])}")
    if unexpected := [e for k, e in entries.items() if k not in expected]:
        listed = ", ".join(f"{e.name} ({e.file.name})" for e in unexpected[:5])
        raise UnexpectedTensorError(f"checkpoint holds {len(unexpected)} unexpected tensor(s): {listed}")
    for key, slot in expected.items():
        if entries[key].shape != slot.shape:
            fields = ", ".join(field_name(fmt, a) for a in slot.row.shape)
            raise ShapeMismatchError(
                f"{key} in {entries[key].file.name}: expected shape {list(slot.shape)} (from {source}: "
                f"{fields}), got {list(entries[key].shape)}"
            )
