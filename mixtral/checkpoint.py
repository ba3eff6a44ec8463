"""Checkpoint loading, saving and conversion through the one name table of `checkpoint_table`.

Directories: Hugging Face (config.json + model.safetensors, or model-0000N-of-0000M.safetensors +
model.safetensors.index.json) or Mistral (params.json + consolidated.safetensors, or
consolidated-*.safetensors). Safetensors only: pickle files are refused without being opened.

Loading checks everything that headers can tell (file integrity, dtypes, layer and expert counts,
tensor names, shapes) before reading any data, then builds the model on the meta device and fills
each parameter once, one file tensor at a time from the mmap (experts straight into their stack),
so a load holds one copy of the weights. Saving and conversion write tensor by tensor into a temp
directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

from .checkpoint_config import (
    config_from_hf,
    config_from_params,
    config_to_hf,
    config_to_params,
    field_name,
    read_json,
)
from .checkpoint_table import (
    LAYER_ROW,
    TABLE,
    Slot,
    file_pattern,
    from_interleaved,
    our_shapes,
    plan,
    to_interleaved,
)
from .config import MixtralConfig
from .errors import (
    ConfigMismatchError,
    FormatError,
    MissingTensorError,
    NonFiniteWeightError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from .model import Transformer
from .safetensors_io import (
    ST_DTYPES,
    TORCH_DTYPES,
    ShardSet,
    TensorEntry,
    refuse_pickles,
    shard_plan,
    write_safetensors,
)

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the hub's usual shard size (transformers 5 defaults to 50 GB)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.model.v*", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tekken.json")  # fmt: skip

# ---- opening and validating a checkpoint --------------------------------------------------------


def read_config(path: str | Path) -> tuple[MixtralConfig, str]:
    """The config of a checkpoint directory and its format ("hf" or "mistral"); reads no weights."""
    cfg, fmt, _ = _detect(Path(path))
    return cfg, fmt


def validate_checkpoint(path: str | Path) -> tuple[MixtralConfig, str]:
    """Run every check loading runs before reading data; the config and layout found.

    The layout is "hf", "hf-fused" or "mistral". Raises the typed error `load_model` would raise.
    """
    cfg, fmt, _ = _open(Path(path))
    return cfg, fmt


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


def _open(path: Path) -> tuple[MixtralConfig, str, ShardSet]:
    """Detect, read the config and every header, and validate names and shapes; reads no data."""
    cfg, fmt, files = _detect(path)
    shards = ShardSet.from_index(files) if isinstance(files, Path) else ShardSet(files)
    if fmt == "hf" and any(k.endswith("mlp.experts.gate_up_proj") for k in shards.entries):
        fmt = "hf-fused"
    _validate(shards, cfg, fmt, "params.json" if fmt == "mistral" else "config.json")
    return cfg, fmt, shards


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


def _check_finite(t: torch.Tensor, slot: Slot, shards: ShardSet) -> None:
    if not bool(torch.isfinite(t).all()):
        entry = shards.entries[slot.key]
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        cast = TORCH_DTYPES[entry.dtype] != t.dtype
        raise NonFiniteWeightError(
            f"{slot.key} in {entry.file.name} holds {n_nan} NaN and {n_inf} Inf value(s)"
            + (
                f" after casting {entry.dtype} to {t.dtype} (values beyond its range become Inf)"
                if cast
                else ""
            )
        )


def _read_piece(shards: ShardSet, slot: Slot) -> torch.Tensor:
    """The piece of our parameter a slot holds, in our layout, on the CPU, in the file's dtype."""
    piece = shards.read(slot.key, slot.select)
    return from_interleaved(piece, slot.rope_heads) if slot.rope_heads else piece


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in ST_DTYPES:
        raise ValueError(
            f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16"
        )


# ---- loading ------------------------------------------------------------------------------------


def load_weights(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    select: Callable[[str], bool] | None = None,
) -> tuple[MixtralConfig, dict[str, torch.Tensor]]:
    """Config and our-named state dict of a checkpoint, every tensor cast to `dtype` on `device`.

    Holds one copy of the weights plus one file tensor in transit: each parameter is allocated
    once and filled piece by piece (experts into their [E, F, D] stack) straight from the mmap.
    `select(name)` limits the result to some of our tensor names (e.g. one layer's).
    """
    _check_dtype(dtype)
    cfg, fmt, shards = _open(Path(path))
    shapes = {n: s for n, s in our_shapes(cfg).items() if select is None or select(n)}
    with shards:
        sd = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes.items()}
        for slot in plan(cfg, fmt):
            if slot.ours not in sd:
                continue
            dst = sd[slot.ours] if slot.expert is None else sd[slot.ours][slot.expert]
            dst.copy_(_read_piece(shards, slot))
            if check_finite:
                _check_finite(dst, slot, shards)
    return cfg, sd


def build_meta(cfg: MixtralConfig) -> Transformer:
    """Our model on the meta device (no memory), after checking its parameters match `TABLE`."""
    with torch.device("meta"):
        model = Transformer(cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if got != our_shapes(cfg):
        diff = sorted(set(got.items()) ^ set(our_shapes(cfg).items()))[:4]
        raise RuntimeError(f"mixtral.model.Transformer and checkpoint.TABLE disagree: {diff}")
    return model


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
) -> Transformer:
    """Our Transformer with a checkpoint's weights (HF or Mistral format, detected)."""
    _check_dtype(dtype)
    model = build_meta(read_config(path)[0])
    _, sd = load_weights(path, dtype, device, check_finite)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


# ---- saving and converting ----------------------------------------------------------------------

# A tokenizer file, a directory whose tokenizer files are copied, a callable that writes into the
# output directory, or a mixtral.tokenizer.Tokenizer (written with its save_tokenizer).
TokenizerSource = Union[str, Path, Callable[[Path], object], "Tokenizer", None]


@contextmanager
def _atomic_directory(dst: Path, overwrite: bool) -> Iterator[Path]:
    """A temp dir next to `dst`, renamed to `dst` only when the block completes."""
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        if dst.exists():
            dst.rename(old)
        tmp.rename(dst)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_tokenizer(tokenizer: TokenizerSource, out: Path) -> None:
    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        files = [src] if src.is_file() else [p for pat in TOKENIZER_FILES for p in sorted(src.glob(pat))]
        for f in files:
            shutil.copy2(f, out / f.name)
    elif callable(tokenizer):
        tokenizer(out)
    else:
        from .tokenizer import save_tokenizer  # only when asked: it needs sentencepiece/tokenizers

        save_tokenizer(tokenizer, out)


def _write(
    dst: Path,
    cfg: MixtralConfig,
    fmt: str,
    dtype: torch.dtype,
    piece: Callable[[Slot], torch.Tensor],
    max_shard_bytes: int,
    tokenizer: TokenizerSource,
    overwrite: bool,
) -> None:
    """Write format `fmt` ("hf" or "mistral"), producing each file tensor from `piece(slot)`."""
    if fmt not in ("hf", "mistral"):
        raise ValueError(f"can save format 'hf' or 'mistral', not {fmt!r}")
    _check_dtype(dtype)
    if isinstance(tokenizer, (str, Path)) and not Path(tokenizer).exists():
        raise FileNotFoundError(f"tokenizer source {tokenizer} does not exist")
    slots = {s.key: s for s in plan(cfg, fmt)}

    def tensors(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> Iterator[torch.Tensor]:
        for key, _, _ in specs:
            t, heads = piece(slots[key]), slots[key].rope_heads
            yield (to_interleaved(t, heads) if heads else t).to(dtype)

    specs = [(key, dtype, s.shape) for key, s in slots.items()]
    stem = "consolidated" if fmt == "mistral" else "model"
    shards = [specs] if fmt == "mistral" else shard_plan(specs, max_shard_bytes)
    names = [f"{stem}.safetensors"] if len(shards) == 1 else [
        f"{stem}-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)
    ]  # fmt: skip
    with _atomic_directory(Path(dst), overwrite) as out:
        for name, shard in zip(names, shards, strict=True):
            write_safetensors(out / name, shard, tensors(shard), {"format": "pt"})
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard}
            total = sum(math.prod(shape) * dtype.itemsize for _, _, shape in specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = config_to_params(cfg) if fmt == "mistral" else config_to_hf(cfg, dtype)
        (out / ("params.json" if fmt == "mistral" else "config.json")).write_text(
            json.dumps(config, indent=2) + "\n"
        )
        _copy_tokenizer(tokenizer, out)


def _uniform_dtype(dtypes: set[torch.dtype], what: str) -> torch.dtype:
    if len(dtypes) != 1:
        raise ValueError(f"{what} mixes dtypes {sorted(map(str, dtypes))}; pass dtype= explicitly")
    return dtypes.pop()


def save_weights(
    state_dict: dict[str, torch.Tensor],
    cfg: MixtralConfig,
    path: str | Path,
    format: str = "hf",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_src: TokenizerSource = None,
    overwrite: bool = False,
) -> None:
    """Write our-named `state_dict` as an HF or Mistral checkpoint directory, atomically.

    `dtype` None keeps the state dict's (single) dtype. HF output is sharded (with an index) above
    `max_shard_bytes`; Mistral output is always one consolidated.safetensors. Tensors are written
    one at a time, so memory beyond the model is one tensor. `tokenizer_src`: a tokenizer file, a
    directory whose tokenizer files are copied, or a callable given the output directory.
    """
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    want = our_shapes(cfg)
    if missing := [k for k in want if k not in got]:
        raise MissingTensorError(f"state dict lacks {len(missing)} parameter(s): {', '.join(missing[:5])}")
    if extra := [k for k in got if k not in want]:
        raise UnexpectedTensorError(
            f"state dict has {len(extra)} unknown parameter(s): {', '.join(extra[:5])}"
        )
    if bad := [k for k in want if got[k] != want[k]]:
        raise ShapeMismatchError(
            f"state dict {bad[0]}: expected shape {list(want[bad[0]])}, got {list(got[bad[0]])}"
        )
    dtype = dtype or _uniform_dtype({t.dtype for t in state_dict.values()}, "the state dict")

    def piece(slot: Slot) -> torch.Tensor:
        t = state_dict[slot.ours]
        return t if slot.expert is None else t[slot.expert]

    _write(Path(path), cfg, format, dtype, piece, max_shard_bytes, tokenizer_src, overwrite)


def save_model(
    model: torch.nn.Module,
    path: str | Path,
    format: str = "hf",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_src: TokenizerSource = None,
    overwrite: bool = False,
    config: MixtralConfig | None = None,
) -> None:
    """Save our Transformer (its `config` attribute, unless `config` is given); see `save_weights`."""
    cfg = config or getattr(model, "config", None)
    if not isinstance(cfg, MixtralConfig):
        raise ValueError("model has no MixtralConfig `config` attribute; pass config=")
    sd = model.state_dict()
    save_weights(sd, cfg, path, format, dtype, max_shard_bytes, tokenizer_src, overwrite)


def convert(
    src: str | Path,
    dst: str | Path,
    to: str = "hf",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    check_finite: bool = True,
    overwrite: bool = False,
) -> None:
    """Rewrite checkpoint `src` as format `to` ("hf" or "mistral") in `dst`, tensor by tensor.

    Never builds the model: each destination tensor is read from its source slot through the
    shared table, so memory stays at about one tensor. Tokenizer files in `src` are copied along.
    `dtype` None keeps the source's (single) dtype; same-dtype conversion is bit-exact.
    """
    src = Path(src)
    cfg, fmt, shards = _open(src)
    sources = {(s.ours, s.expert): s for s in plan(cfg, fmt)}
    with shards:
        dtype = dtype or _uniform_dtype({TORCH_DTYPES[d] for d in shards.dtypes()}, f"checkpoint {src}")

        def piece(slot: Slot) -> torch.Tensor:
            source = sources[(slot.ours, slot.expert)]
            t = _read_piece(shards, source)
            if check_finite:
                _check_finite(t, source, shards)
            return t

        _write(Path(dst), cfg, to, dtype, piece, max_shard_bytes, src, overwrite)
