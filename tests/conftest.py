"""Shared fixtures for tests/unit, tests/parity and tests/integration: deterministic fp32 CPU tests on
tiny models, and the compiled CPU kernels, built once per run by the first test that asks for them.

Non-fixture helpers (tiny_config, save_tiny_model, hf_model, ...) live in tests/helpers.py.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# The kernel checks run when a test first asks for them, never at import or collection: asking may
# compile the C++ extension (a minute or more on 2 cores with a cold cache), and collecting
# (`pytest --collect-only`, or a run of one unit test) must not pay for that.


@pytest.fixture(scope="session")
def kernels_built() -> None:
    """The mixtral CPU kernels are built and loaded here; else the test is skipped."""
    from mixtral import kernels

    if not kernels.available():
        pytest.skip("mixtral CPU kernels not built here")


@pytest.fixture(scope="session")
def w8a16() -> None:
    """This build multiplies int8 weights with int16 activations (AVX-512 VNNI); else skip."""
    from mixtral import kernels

    if not kernels.has_w8a16():
        pytest.skip("no AVX-512 VNNI W8A16 path in this build")


@pytest.fixture(scope="session")
def bf16_dot() -> None:
    """This build has AVX512-BF16 dot products for bf16 x bf16; else skip."""
    from mixtral import kernels

    if not kernels.has_bf16_dot():
        pytest.skip("no AVX512-BF16 dot path in this build")
