"""Applies the CPU fast paths to a built model from outside, as gpt-fast applies quantization."""

from __future__ import annotations

from torch import nn

from mixtral.kernels.decode import FUSED_DECODE, FUSED_STEP
from mixtral.kernels.dispatch import AutoDispatch
from mixtral.kernels.linear import KernelLinear
from mixtral.model.transformer import Transformer


def apply_kernels(model: Transformer) -> Transformer:
    """Route a built model's few-row inference through the CPU kernels, in place; returns the model.

    The attention projections and the output head become `KernelLinear` (the same Parameters: state
    dict, dtype moves and training are unchanged), every MoE layer gets an `AutoDispatch` whose
    fallback is the dispatcher it had, every block the fused decode step and the model the fused
    whole step (`kernels.decode`: one C++ call per block, or per step, at a decode step whose parts
    they can take). Matrices already replaced (quantized) keep their own paths.
    Idempotent, and safe on any device or where the kernels cannot be built: each call decides at
    run time (`mixtral.kernels.policy`) and falls back to torch. `load_model` calls it by default.
    """
    for layer in model.layers:
        attention = layer.attention
        for name in ("wq", "wk", "wv", "wo"):
            if type(getattr(attention, name)) is nn.Linear:
                setattr(attention, name, KernelLinear.wrap(getattr(attention, name)))
        moe = layer.feed_forward
        if not isinstance(moe.dispatcher, AutoDispatch):
            moe.dispatcher = AutoDispatch(fallback=moe.dispatcher)
        layer.fused_decode = FUSED_DECODE
    if type(model.output) is nn.Linear:
        model.output = KernelLinear.wrap(model.output)
    model.fused_step = FUSED_STEP
    return model
