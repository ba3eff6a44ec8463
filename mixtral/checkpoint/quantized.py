"""Quantized checkpoints: our own safetensors layout of int4/int8 weights, written once, loaded as stored.

A quantized checkpoint is a directory like a Hugging Face one (config.json, model.safetensors or
shards with an index, the tokenizer files) whose config.json carries

    "quantization_config": {"quant_method": "mixtral-group", "format_version": 1, "bits": 4,
                            "group_size": 32, "targets": ["experts", "attention", "output"]}

(group_size 0: int8 with one scale per output row). Tensors use our parameter names
(`mixtral.checkpoint.table`); each quantized matrix `P.weight` becomes `P.qweight` + `P.scales`,
and the experts of layer i are stored one by one, each expert's three matrices together, so that
one expert is one contiguous read (what offloading maps):

    layers.{i}.feed_forward.experts.{e}.{w1,w3,w2}.qweight   U8 [N, K/2] (int4) or I8 [N, K] (int8)
    layers.{i}.feed_forward.experts.{e}.{w1,w3,w2}.scales    F16 [N, K/group] (F32 [N] per row)

Packing and scales are `mixtral.quant.group`'s (with group 32, ggml's Q4_0/Q8_0 blocks, so a GGUF
export copies them). Everything else (embedding, norms, router, unquantized matrices) is stored in
the float dtype asked for. Loading reads the stored integers as they are (no re-quantization) after
checking every name, dtype and shape against the config; a truncated, mismatched or foreign file
is a typed error naming the tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixtral.atomic import atomic_directory
from mixtral.checkpoint.configs import config_from_hf, config_to_hf, read_json
from mixtral.checkpoint.load import build_meta
from mixtral.checkpoint.reader import CheckpointReader
from mixtral.checkpoint.safetensors_io import (
    WRITE_DTYPES,
    ShardSet,
    TensorEntry,
    check_dtype,
    shard_plan,
    write_safetensors,
)
from mixtral.checkpoint.save import DEFAULT_MAX_SHARD_BYTES, check_destination, copy_tokenizer
from mixtral.checkpoint.table import our_shapes
from mixtral.config import MixtralConfig
from mixtral.errors import (
    ConfigError,
    FormatError,
    MissingTensorError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from mixtral.quant import group as qgroup
from mixtral.quant.apply import TARGETS, check_targets, parse_storage, storage_name
from mixtral.quant.groupwise import GroupExperts, GroupLinear
from mixtral.quant.rowwise import CompressedExperts, CompressedLinear, compress

QUANT_METHOD = "mixtral-group"
FORMAT_VERSION = 1
EXPERT_PARTS = ("w1", "w3", "w2")
_EXPERTS = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(w[132])$")
_ATTENTION = re.compile(r"layers\.\d+\.attention\.w[qkvo]\.weight$")


@dataclass(frozen=True)
class QuantLayout:
    """What a quantized checkpoint holds: `bits`, `group` (0: per-row int8) and the quantized `targets`."""

    bits: int
    group: int
    targets: tuple[str, ...]

    @property
    def storage(self) -> str:
        """The `quantize_model` storage name of these weights."""
        return storage_name(self.bits, self.group)

    def to_json(self) -> dict:
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": self.bits,
                "group_size": self.group, "targets": list(self.targets)}  # fmt: skip

    @classmethod
    def from_json(cls, d: object, source: str) -> QuantLayout:
        if not isinstance(d, dict):
            raise FormatError(f"{source}: quantization_config is not an object")
        if d.get("quant_method") != QUANT_METHOD:
            raise FormatError(
                f"{source}: quantization_config.quant_method is {d.get('quant_method')!r}; this loader reads "
                f"{QUANT_METHOD!r} checkpoints (from `mixtral quantize`), not other quantization formats"
            )
        if d.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"{source}: quantized checkpoint format_version {d.get('format_version')!r}; this version of "
                f"mixtral reads version {FORMAT_VERSION}"
            )
        try:
            layout = cls(int(d["bits"]), int(d["group_size"]), check_targets(d["targets"]))
            parse_storage(layout.storage)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{source}: bad quantization_config {d}: {e}") from None
        return layout

    def quantizes(self, name: str) -> bool:
        """Whether our parameter `name` is stored quantized."""
        if _EXPERTS.match(name):
            return "experts" in self.targets
        if _ATTENTION.match(name):
            return "attention" in self.targets
        return name == "output.weight" and "output" in self.targets

    def stored_shapes(self, shape: tuple[int, ...]) -> tuple[tuple[torch.dtype, tuple[int, ...]], ...]:
        """(dtype, shape) of the qweight and the scales for a float matrix of `shape` [N, K]."""
        n, k = shape
        if self.group == 0:
            return (torch.int8, (n, k)), (torch.float32, (n,))
        q = (torch.uint8, (n, k // 2)) if self.bits == 4 else (torch.int8, (n, k))
        return q, (torch.float16, (n, k // self.group))


def quant_layout(path: str | Path) -> QuantLayout | None:
    """The layout of a quantized checkpoint directory, or None for a float one (reads config.json only)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    d = read_json(config)
    if "quantization_config" not in d:
        return None
    return QuantLayout.from_json(d["quantization_config"], str(config))


@dataclass(frozen=True)
class _Entry:
    """One stored tensor: its file name, dtype, shape, and where it comes from."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    ours: str  # our parameter name
    expert: int | None  # the expert of a stacked parameter
    part: str  # "float", "q" or "s"


def plan_entries(cfg: MixtralConfig, layout: QuantLayout, dtype: torch.dtype) -> list[_Entry]:
    """Every tensor of a quantized checkpoint of `cfg`, in file order (float parts in `dtype`)."""
    out: list[_Entry] = []
    for name, shape in our_shapes(cfg).items():
        m = _EXPERTS.match(name)
        if m and "experts" in layout.targets:
            if m.group(2) != "w1":
                continue  # an expert's w1, w3, w2 are written together at w1's turn
            layer = m.group(1)
            for e in range(cfg.n_experts):
                for part in EXPERT_PARTS:
                    base = f"layers.{layer}.feed_forward.experts.{e}.{part}"
                    full = f"layers.{layer}.feed_forward.experts.{part}"
                    (qd, qs), (sd, ss) = layout.stored_shapes(our_shapes(cfg)[full][1:])
                    out += [_Entry(f"{base}.qweight", qd, qs, full, e, "q"), _Entry(f"{base}.scales", sd, ss, full, e, "s")]  # fmt: skip
        elif layout.quantizes(name):
            base = name.removesuffix(".weight")
            (qd, qs), (sd, ss) = layout.stored_shapes(shape)
            out += [_Entry(f"{base}.qweight", qd, qs, name, None, "q"), _Entry(f"{base}.scales", sd, ss, name, None, "s")]  # fmt: skip
        else:
            out.append(_Entry(name, dtype, shape, name, None, "float"))
    return out


def _quantize_matrix(w: torch.Tensor, layout: QuantLayout) -> tuple[torch.Tensor, torch.Tensor]:
    if layout.group == 0:
        q, s = compress(w, "int8")
        return q, s
    return qgroup.quantize(w, layout.bits, layout.group)


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    storage: str = "int4",
    targets: tuple[str, ...] = TARGETS,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> QuantLayout:
    """Quantize float checkpoint `src` (HF or Mistral) into `dst`, one matrix at a time, atomically.

    `storage`: "int4" (groups of 32), "int4-gN", "int8-gN" or "int8" (per-row scales); `targets`:
    which matrices (default all but the embedding and the router). `dtype`: the float tensors'
    dtype (default: the source's). Memory stays at about one tensor beyond the output buffer.
    """
    from tqdm.auto import tqdm

    spec = parse_storage(storage)
    if spec.bits is None:
        raise ConfigError(
            "a quantized checkpoint stores int4 or int8 weights; for bf16 use `mixtral convert --dtype bf16`"
        )
    layout = QuantLayout(spec.bits, spec.group or 0, check_targets(targets))
    src, dst = Path(src), Path(dst)
    if (existing := quant_layout(src)) is not None:
        raise FormatError(f"{src} is already quantized ({existing.storage}); quantize a float checkpoint")
    check_destination(dst, overwrite, src)
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True to replace it")
    with CheckpointReader(src) as reader:
        cfg = reader.config
        if dtype is None:
            dtypes = reader.file_dtypes
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        check_dtype(dtype)
        if layout.group:
            for k, what in (
                (cfg.dim, "dim"),
                (cfg.hidden_dim, "hidden_dim"),
                (cfg.n_heads * cfg.head_dim, "heads x head_dim"),
            ):
                qgroup.check_group(k, layout.group, f"the model's {what}")  # fmt: skip
        entries = plan_entries(cfg, layout, dtype)
        memo: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
        bar = tqdm(total=len(entries), desc=f"quantize {layout.storage}", unit="tensor", disable=not progress)

        def tensors(shard: list[_Entry]) -> Iterator[torch.Tensor]:
            for entry in shard:
                if entry.part == "float":
                    yield reader.read(entry.ours, dtype=dtype)
                else:
                    key = (entry.ours, entry.expert)
                    if key not in memo:
                        memo.clear()
                        memo[key] = _quantize_matrix(
                            reader.read_piece(entry.ours, entry.expert).float(), layout
                        )
                    yield memo[key][0] if entry.part == "q" else memo[key][1]
                bar.update()

        specs = [(e.key, e.dtype, e.shape) for e in entries]
        by_key = {e.key: e for e in entries}
        shards = shard_plan(specs, max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)
        ]  # fmt: skip
        with atomic_directory(dst, overwrite) as out:
            for name, shard in zip(names, shards, strict=True):
                write_safetensors(
                    out / name, shard, tensors([by_key[k] for k, _, _ in shard]), {"format": "pt"}
                )
            if len(shards) > 1:
                weight_map = {
                    key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard
                }
                total = sum(math.prod(s) * d.itemsize for _, d, s in specs)
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            config = config_to_hf(cfg, dtype) | {"quantization_config": layout.to_json()}
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            copy_tokenizer(src, out)
        bar.close()
    return layout


class QuantizedReader:
    """A validated quantized checkpoint: `config`, `layout`, `entries`, and reads of its stored tensors.

    Opening checks config.json and every header (names, dtypes, shapes against the config, file
    integrity) and reads no tensor data. Use as a context manager.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        layout = quant_layout(self.path)
        if layout is None:
            raise FormatError(
                f"{self.path}: not a quantized checkpoint (config.json has no quantization_config)"
            )
        self.layout = layout
        self.config = config_from_hf(read_json(self.path / "config.json"))
        index = self.path / "model.safetensors.index.json"
        files = sorted(self.path.glob("model-*-of-*.safetensors")) or [self.path / "model.safetensors"]
        if not index.is_file() and not files[0].is_file():
            raise FormatError(f"{self.path}: quantized checkpoint without model.safetensors")
        self._shards = ShardSet.from_index(index) if index.is_file() else ShardSet(files)
        stored = self._shards.entries
        floats = {
            e.dtype
            for e in stored.values()
            if e.dtype in ("F32", "BF16", "F16") and not e.name.endswith(".scales")
        }
        self.float_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[floats.pop()] if len(floats) == 1 else torch.float32  # fmt: skip
        self.entries = plan_entries(self.config, layout, self.float_dtype)
        expected = {e.key: e for e in self.entries}
        if missing := [k for k in expected if k not in stored]:
            raise MissingTensorError(
                f"quantized checkpoint {self.path} ({layout.storage}, targets {', '.join(layout.targets)}) lacks "
                f"{len(missing)} tensor(s): {', '.join(missing[:5])}"
            )
        if extra := [k for k in stored if k not in expected]:
            raise UnexpectedTensorError(
                f"quantized checkpoint {self.path} holds {len(extra)} tensor(s) its config does not describe: "
                f"{', '.join(extra[:5])}"
            )
        for key, e in expected.items():
            got = stored[key]
            want_dtype = WRITE_DTYPES[e.dtype] if e.part != "float" else got.dtype
            if got.shape != e.shape or got.dtype != want_dtype:
                raise ShapeMismatchError(
                    f"{key} in {got.file.name}: expected {want_dtype} {list(e.shape)} for {layout.storage} "
                    f"(config.json's quantization_config and model sizes), got {got.dtype} {list(got.shape)}"
                )

    def stored_entries(self) -> dict[str, TensorEntry]:
        """Every stored tensor's header entry (file, dtype, shape, byte offset), validated."""
        return dict(self._shards.entries)

    def __enter__(self) -> QuantizedReader:
        self._shards.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._shards.__exit__(*exc)

    def read(self, key: str, check_finite: bool = True) -> torch.Tensor:
        """Stored tensor `key` as stored (a copy out of the mmap); floats and scales checked finite."""
        t = self._shards.read(key)
        if check_finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteWeightError(
                f"{key} in {self._shards.entries[key].file.name} holds "
                f"{int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} Inf value(s)"
            )
        return t

    def read_expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's stored tensors: {"qw1", "sw1", "qw3", "sw3", "qw2", "sw2"}."""
        out = {}
        for part in EXPERT_PARTS:
            base = f"layers.{layer}.feed_forward.experts.{expert}.{part}"
            out[f"q{part}"], out[f"s{part}"] = self.read(f"{base}.qweight"), self.read(f"{base}.scales")
        return out


def load_quantized(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    skip_experts: bool = False,
) -> nn.Module:
    """Our Transformer with a quantized checkpoint's weights as stored; float parts in `dtype`.

    `skip_experts`: leave the experts unread (on the meta device), for offloading to fill in."""
    check_dtype(dtype)
    with QuantizedReader(path) as reader:
        cfg, layout = reader.config, reader.layout
        model = build_meta(cfg)
        sd = {}
        for e in reader.entries:
            if e.part == "float" and not (skip_experts and ".experts." in e.key):
                sd[e.key] = reader.read(e.key, check_finite).to(device=device, dtype=dtype)

        def matrix(base: str) -> tuple[torch.Tensor, torch.Tensor]:
            return (reader.read(f"{base}.qweight", check_finite).to(device),
                    reader.read(f"{base}.scales", check_finite).to(device))  # fmt: skip

        for i, layer in enumerate(model.layers):
            if "experts" in layout.targets and not skip_experts:
                parts = [reader.read_expert(i, e) for e in range(cfg.n_experts)]
                tensors = {k: torch.stack([p[k] for p in parts]).to(device) for k in parts[0]}
                layer.feed_forward.experts = _experts(tensors, layout, dtype)
            if "attention" in layout.targets:
                for name in ("wq", "wk", "wv", "wo"):
                    setattr(
                        layer.attention, name, _linear(*matrix(f"layers.{i}.attention.{name}"), layout, dtype)
                    )
        if "output" in layout.targets:
            model.output = _linear(*matrix("output"), layout, dtype)
        unexpected = model.load_state_dict(sd, strict=False, assign=True).unexpected_keys
        unset = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                 if t.is_meta and not (skip_experts and ".experts." in n)]  # fmt: skip
        if unexpected or unset:  # the modules replaced above hold the quantized tensors as buffers
            raise RuntimeError(f"quantized load: unset {unset[:4]}, unexpected {unexpected[:4]}")
    model.requires_grad_(False)
    model.checkpoint_path = Path(path)
    model.quant_layout = layout
    return model


def _experts(tensors: dict[str, torch.Tensor], layout: QuantLayout, dtype: torch.dtype) -> nn.Module:
    if layout.group:
        return GroupExperts(tensors, layout.bits, layout.group, dtype)
    return CompressedExperts.from_stored(
        {n: tensors[f"q{n}"] for n in EXPERT_PARTS} | {f"s{n[1]}": tensors[f"s{n}"] for n in EXPERT_PARTS},
        "int8",
        dtype,
    )


def _linear(q: torch.Tensor, s: torch.Tensor, layout: QuantLayout, dtype: torch.dtype) -> nn.Module:
    if layout.group:
        return GroupLinear(q, s, layout.bits, dtype)
    return CompressedLinear.from_stored(q, s, "int8")
