"""Loading a checkpoint into our model: built on the meta device, each parameter filled once from the mmap.

Every check headers allow runs first (`CheckpointReader`), then each parameter is allocated once
in the requested dtype and device and filled piece by piece (experts straight into their stack),
so a load holds one copy of the weights plus one file tensor in transit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mixtral.checkpoint.reader import CheckpointReader, read_config
from mixtral.checkpoint.safetensors_io import check_dtype
from mixtral.checkpoint.table import our_shapes
from mixtral.config import MixtralConfig
from mixtral.kernels import apply_kernels
from mixtral.kernels.hugepages import move_to_huge_pages
from mixtral.model.transformer import Transformer


def load_weights(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    check_finite: bool = True,
    select: Callable[[str], bool] | None = None,
) -> tuple[MixtralConfig, dict[str, torch.Tensor]]:
    """Config and our-named state dict of a checkpoint, every tensor cast to `dtype` on `device`.

    `select(name)` limits the result to some of our tensor names (e.g. one layer's).
    """
    check_dtype(dtype)
    with CheckpointReader(path) as reader:
        sd = {}
        for name, shape in reader.shapes.items():
            if select is None or select(name):
                out = torch.empty(shape, dtype=dtype, device=device)
                sd[name] = reader.read(name, out=out, check_finite=check_finite)
    return reader.config, sd


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
    kernels: bool = True,
    huge_pages: bool = True,
) -> Transformer:
    """Our Transformer with a checkpoint's weights (HF, Mistral or our quantized format, detected).

    `model.checkpoint_path` records `path` (save_model copies its tokenizer from there).
    `kernels` applies the CPU decode fast paths (`mixtral.kernels.apply_kernels`); they change
    speed, not results (each is tested equal to its torch reference), and step aside for training.
    `huge_pages` moves the large weights of a CPU model into transparent huge pages where Linux
    offers them (`mixtral.kernels.hugepages`): fewer page walks for a decode step that streams them.
    """
    check_dtype(dtype)
    from mixtral.checkpoint.quantized import load_quantized, quant_layout  # it builds on this module

    if quant_layout(path) is not None:  # int4/int8 weights as `mixtral quantize` stored them
        model = load_quantized(path, dtype, device, check_finite)
    else:
        model = build_meta(read_config(path)[0])
        _, sd = load_weights(path, dtype, device, check_finite)
        model.load_state_dict(sd, strict=True, assign=True)
        model.checkpoint_path = Path(path)  # where its tokenizer is, for save_model
    if kernels:
        apply_kernels(model)
    if huge_pages and torch.device(device).type == "cpu":
        move_to_huge_pages(model)
    return model
