"""Weight compression (int8 with per-row scales, bf16) stays within its rounding bound; bad options are named.

The compressed models' outputs against the exact ones, and the kernels that read the compressed
weights, are checked in tests/parity/test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from mixtral.model import Transformer
from mixtral.quant import compress, decompress, quantize_model


@pytest.mark.parametrize("storage", ["int8", "bf16"])
def test_compression_error_bound(storage):
    w = torch.randn(64, 100) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = compress(w, storage)
    err = (decompress(q, scale) - w).abs()
    if storage == "int8":
        assert q.dtype == torch.int8 and torch.all(err <= scale[:, None] / 2 + 1e-7)
    else:
        assert torch.all(err <= w.abs() * 2**-8)


def test_quantize_rejects_unknown_options():
    model = Transformer(tiny_config())
    with pytest.raises(ValueError, match="storage"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="target"):
        quantize_model(model, "int8", ("embeddings",))
