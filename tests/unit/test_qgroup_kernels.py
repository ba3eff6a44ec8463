"""The compiled group-quantized decode kernels (`ops.qlinear`, `ops.qmoe`) equal the reference arithmetic.

`mixtral.quant.group` defines it: x quantized per row and block of 32 to int8 (Q8_0's rule), exact
integer block products, scale products summed in fp32; so the kernels may differ from
`reference_linear` only by the fp32 accumulation order (rtol 1e-5, atol 1e-5 of the output's
scale), and the activation quantization must be bit-identical. Both the AVX-512 VNNI path and the
scalar fallback (MIXTRAL_NO_QGROUP_VNNI=1, run in a subprocess) are checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mixtral.kernels import ops
from mixtral.quant.group import pack4, quantize, quantize_activations, reference_linear, reference_moe

BITS = (4, 8)


@pytest.fixture(scope="module", autouse=True)
def _kernels():
    if not ops.available():
        pytest.skip("mixtral CPU kernels not built here")


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Equal up to fp32 summation order: rtol, and atol relative to the output's largest magnitude."""
    assert not torch.isnan(actual).any()
    scale = max(float(expected.abs().max()), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def activations(M: int, K: int, seed: int) -> torch.Tensor:
    """Rows of different magnitudes, with an outlier: every block gets its own scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-2, 2, M)[:, None]
    x[0, K // 3] = 40.0
    return x


def weights(N: int, K: int, bits: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.linspace(0.01, 1, N)[:, None]
    return quantize(w, bits, group)


# (group, K, N): K = 96 and 288 are not multiples of 64 (an odd number of blocks, the last one
# alone), group 96 puts two groups in one 64-value chunk, N odd everywhere.
SHAPES = [(32, 96, 13), (32, 256, 33), (64, 192, 7), (64, 448, 9), (96, 288, 5), (128, 384, 3)]


@pytest.mark.parametrize("M", [1, 3, 8, 17])
@pytest.mark.parametrize("group, K, N", SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_qlinear_matches_reference(bits, group, K, N, M):
    x = activations(M, K, seed=M + K)
    q, s = weights(N, K, bits, group, seed=N + K + bits)
    close(ops.qlinear(x, q, s, bits), reference_linear(x, q, s, bits))


@pytest.mark.parametrize("bits", BITS)
def test_qlinear_large_decode_shape(bits):
    """A row long enough to take the prefetching and multi-chunk paths, several threads' share of rows."""
    x = activations(2, 4096, seed=1)
    q, s = weights(300, 4096, bits, 32, seed=2)
    close(ops.qlinear(x, q, s, bits), reference_linear(x, q, s, bits))


@pytest.mark.parametrize("N", [128, 257, 1031])
@pytest.mark.parametrize("M", [1, 3])
def test_qlinear_int4_two_streams_per_thread(N, M):
    """int4 shares of at least 2 x 64 rows are read as two halves in the same passes (an odd last row
    apart); every row must land in its own place, at 1 and 2 threads."""
    x = activations(M, 1024, seed=N)
    q, s = weights(N, 1024, 4, 32, seed=N + 1)
    want = reference_linear(x, q, s, 4)
    close(ops.qlinear(x, q, s, 4), want)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        close(ops.qlinear(x, q, s, 4), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_qmoe_int4_w2_two_streams_per_thread(threads):
    """int4 w2 shares of at least 2 x 64 rows of D are read as two halves in the same passes."""
    E, D, F, T = 4, 544, 256, 5
    x, w1, w3, w2 = exact_moe_inputs(T, E, D, F, 4, 32, seed=threads + 21)
    ids = torch.tensor(ROUTES[T])
    gates = torch.softmax(torch.randn(T, 2), dim=-1)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = ops.qmoe(x, ids, gates, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], 4)
    finally:
        torch.set_num_threads(saved)
    close(y, reference_moe(x, ids, gates, w1, w3, w2, 4))


@pytest.mark.parametrize("bits", BITS)
def test_zero_rows_and_zero_weight_groups(bits):
    M, K, N, group = 5, 192, 11, 64
    x = activations(M, K, seed=3)
    x[1] = 0.0  # a zero row: scale 0, no 0/0
    x[3, 32:64] = 0.0  # one zero block
    w = torch.randn(N, K)
    w[2] = 0.0  # an all-zero row
    w[4, 64:128] = 0.0  # one all-zero group
    q, s = quantize(w, bits, group)
    assert (s[2] == 0).all() and s[4, 1] == 0
    y = ops.qlinear(x, q, s, bits)
    assert torch.isfinite(y).all()
    assert (y[1] == 0).all() and (y[:, 2] == 0).all()
    close(y, reference_linear(x, q, s, bits))
    x0 = torch.zeros(2, K)
    assert (ops.qlinear(x0, q, s, bits) == 0).all()


def identity_weights(K: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [K, K] with value 1 on the diagonal and scale 1.0: y[m, k] = q_x[m, k] · d_x[m, k // 32]."""
    eye = torch.eye(K, dtype=torch.int8)
    q = pack4((eye + 8).to(torch.uint8)) if bits == 4 else eye
    return q, torch.ones(K, K // 32, dtype=torch.float16)


def tricky_activations() -> torch.Tensor:
    """Blocks whose quantization hits ties (x · inv = k + 1/2), extremes, tiny and zero values."""
    K = 192
    x = torch.randn(4, K) * 3
    blk = torch.arange(32, dtype=torch.float32)
    x[0, 0:32] = torch.where(blk % 2 == 0, blk + 0.5, -(blk + 0.5))  # amax 31.5: inv = 127 / 31.5
    x[0, 32:64] = torch.cat([torch.tensor([127.0]), (torch.arange(31) - 15) + 0.5])  # d = 1: exact ties
    x[0, 64:96] = torch.cat([torch.tensor([-127.0]), -(torch.arange(31) + 0.5)])
    x[1, 0:32] = 1e-30 * torch.randn(32)  # tiny scales
    x[1, 32:64] = 3e37 * torch.randn(32).clamp(-1, 1)  # near fp32's largest
    x[1, 64:96] = 0.0
    x[2] *= 1e-3
    x[3, 96:128] = torch.linspace(-1, 1, 32)
    return x


@pytest.mark.parametrize("bits", BITS)
def test_activation_quantization_is_bit_identical(bits):
    """With identity weights and scale 1.0 the kernel returns fl(q_x · d_x) for each element:
    exactly the product of `quantize_activations`' values (one rounding, as the fp64 reference)."""
    x = tricky_activations()
    q, s = identity_weights(x.shape[1], bits)
    qx, dx = quantize_activations(x)
    expected = qx.float() * dx.repeat_interleave(32, dim=1)
    y = ops.qlinear(x, q, s, bits)
    assert torch.equal(y, expected)
    assert torch.equal(y, reference_linear(x, q, s, bits))
    ties = torch.tensor([127, *range(-15, 0), *range(1, 17)], dtype=torch.int8)  # -14.5 -> -15 ... 15.5 -> 16
    assert torch.equal(qx[0, 32:64], ties)


def exact_moe_inputs(T: int, E: int, D: int, F: int, bits: int, group: int, seed: int):
    """Experts and tokens for which the first layer (w1, w3) is exact in fp32: x is integers in
    [-127, 127] times 2^-3 with ±127 in every block (so d_x = 2^-3 and q_x = x · 8), every weight
    scale is 2^-6, so each block product is an integer times 2^-9 and all sums stay below 2^24 of
    those. Then a and b, hence h = silu(a) · b and its quantization, are bit-identical to the
    reference's, and only w2's fp32 summation order differs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-127, 128, (T, D), generator=g).float()
    x[:, ::32] = 127.0 * torch.where(torch.rand(T, D // 32, generator=g) < 0.5, -1.0, 1.0)
    x = x / 8

    def expert(rows: int, cols: int, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not exact:
            return quantize(torch.randn(E, rows, cols, generator=g) * 0.1, bits, group)
        lo, hi = (-8, 8) if bits == 4 else (-127, 128)
        v = torch.randint(lo, hi, (E, rows, cols), generator=g, dtype=torch.int8)
        q = pack4((v + 8).to(torch.uint8)) if bits == 4 else v
        return q, torch.full((E, rows, cols // group), 2.0**-6, dtype=torch.float16)

    return x, expert(F, D, True), expert(F, D, True), expert(D, F, False)


ROUTES = {  # top-2, experts repeated across tokens; expert 3 of 4 is chosen by no token
    1: [[1, 2]],
    2: [[2, 0], [0, 2]],
    5: [[0, 2], [2, 0], [1, 2], [2, 1], [0, 1]],
}


@pytest.mark.parametrize("T", [1, 2, 5])
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("bits", BITS)
def test_qmoe_matches_reference(bits, group, T):
    E, D, F = 4, 128 if group == 64 else 96, 192 if group == 64 else 160
    x, w1, w3, w2 = exact_moe_inputs(T, E, D, F, bits, group, seed=T + bits + group)
    ids = torch.tensor(ROUTES[T])
    gates = torch.softmax(torch.randn(T, 2), dim=-1)
    y = ops.qmoe(x, ids, gates, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], bits)
    close(y, reference_moe(x, ids, gates, w1, w3, w2, bits))
    # The unused expert's weights are never read: changing them changes nothing.
    w1[0][3] = w1[0][0]
    assert torch.equal(ops.qmoe(x, ids, gates, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], bits), y)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("bits", BITS)
def test_qmoe_threaded_matches_reference(bits, T):
    """Experts large enough for the kernel's threads (the small ones above run on one): each thread
    takes a share of F (cut at multiples of 128 values) and of D. D and F have an odd number of
    blocks (the last step of both products partial), up to 4 tokens share an expert."""
    E, D, F = 4, 288, 1056
    x, w1, w3, w2 = exact_moe_inputs(T, E, D, F, bits, 32, seed=T + bits + 11)
    ids = torch.tensor(ROUTES[T])
    gates = torch.softmax(torch.randn(T, 2), dim=-1)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        y = ops.qmoe(x, ids, gates, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], bits)
    finally:
        torch.set_num_threads(threads)
    close(y, reference_moe(x, ids, gates, w1, w3, w2, bits))


@pytest.mark.parametrize("bits", BITS)
def test_qmoe_random_experts_near_reference(bits):
    """Realistic random experts and tokens: a and b are then rounded differently from the fp64
    reference (last bits), which may move one hidden value to a neighbouring int8 step in rare
    cases, so the bound here is looser than the exact test's."""
    T, E, D, F = 3, 5, 96, 224
    experts = [quantize(torch.randn(E, r, c) * 0.1, bits, 32) for r, c in ((F, D), (F, D), (D, F))]
    x = torch.randn(T, D)
    ids = torch.tensor([[4, 1], [1, 0], [4, 0]], dtype=torch.int32)  # int32 ids are accepted too
    gates = torch.rand(T, 2)
    w1, w3, w2 = experts
    y = ops.qmoe(x, ids, gates, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], bits)
    close(y, reference_moe(x, ids, gates, w1, w3, w2, bits), rtol=1e-4, atol=2e-3)


def test_qmoe_empty_and_single_slot():
    E, D, F = 2, 64, 64
    x, w1, w3, w2 = exact_moe_inputs(3, E, D, F, 8, 32, seed=0)
    args = (w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], 8)
    ids, gates = torch.tensor([[1], [1], [0]]), torch.ones(3, 1)
    close(ops.qmoe(x, ids, gates, *args), reference_moe(x, ids, gates, w1, w3, w2, 8))
    assert ops.qmoe(x[:0], ids[:0], gates[:0], *args).shape == (0, D)


def small_case(bits: int = 4):
    x = torch.randn(2, 64)
    q, s = quantize(torch.randn(5, 64), bits, 32)
    return x, q, s


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, q, s: (x.double(), q, s, 4), "x must be a 2-D float32"),
        (lambda x, q, s: (x[0], q, s, 4), "x must be a 2-D float32"),
        (lambda x, q, s: (x, q, s, 3), "bits must be 4 or 8"),
        (lambda x, q, s: (x, q, s, 8), "q must be int8"),
        (lambda x, q, s: (x, q.view(torch.int8), s, 4), "q must be uint8"),
        (lambda x, q, s: (x, q, s.float(), 4), "scales must be float16"),
        (lambda x, q, s: (x, q, s[:4], 4), "scales has shape"),
        (lambda x, q, s: (x, q[:, :16].contiguous(), s, 4), "q must have 32 columns"),
        (lambda x, q, s: (x, q, torch.ones(5, 4, dtype=torch.float16), 4), "groups of a multiple of 32"),
        (lambda x, q, s: (x, q, torch.ones(5, 3, dtype=torch.float16), 4), "groups of a multiple of 32"),
        (lambda x, q, s: (x[:, :48], q[:, :24], s[:, :1], 4), "positive multiple of 32"),
        (lambda x, q, s: (x, torch.cat([q, q], 1)[:, ::2], s, 4), "q must be contiguous"),
        (lambda x, q, s: (x, q, s[None], 4), "must be 2-D"),
    ],
)
def test_qlinear_rejects_bad_inputs(change, message):
    with pytest.raises(RuntimeError, match=message):
        ops.qlinear(*change(*small_case()))


def test_qmoe_rejects_bad_inputs():
    E, D, F, bits = 3, 64, 96, 4
    x, w1, w3, w2 = exact_moe_inputs(2, E, D, F, bits, 32, seed=1)
    ids, gates = torch.tensor([[0, 1], [2, 1]]), torch.rand(2, 2)
    good = dict(
        x=x, ids=ids, weights=gates, w1=w1[0], w3=w3[0], w2=w2[0], s1=w1[1], s3=w3[1], s2=w2[1], bits=bits
    )
    ops.qmoe(**good)
    bad = [
        (dict(ids=torch.tensor([[0, 3], [2, 1]])), "expert id 3 out of range"),
        (dict(ids=torch.tensor([[0, -1], [2, 1]])), "expert id -1 out of range"),
        (dict(ids=ids.float()), "ids must be an integer tensor"),
        (dict(ids=ids[:1]), "ids must be an integer tensor"),
        (dict(weights=gates[:, :1]), "weights must be float32"),
        (dict(weights=gates.double()), "weights must be float32"),
        (dict(x=x.double()), "x must be a 2-D float32"),
        (dict(w3=w3[0][:, :-1]), "w1 and w3 must have the same shape"),
        (dict(s3=w3[1][:2]), "s1 and s3 must have the same shape"),
        (dict(w2=w2[0][:, :-1]), "w2 must be"),
        (dict(s2=w2[1].float()), "s2 must be float16"),
        (dict(w1=w1[0].view(torch.int8), w3=w3[0].view(torch.int8)), "w1 must be uint8"),
        (dict(bits=8), "w1 must be int8"),
        (dict(w1=w1[0][0]), "must be 3-D"),
        (dict(x=x[:, :32]), "x must be|w1 must have|w2 must be"),
    ]
    for change, message in bad:
        with pytest.raises(RuntimeError, match=message):
            ops.qmoe(**{**good, **change})


def test_fakes_are_registered():
    """The ops can be traced with fake tensors (torch.compile of a decode step)."""
    x, q, s = small_case()
    torch.library.opcheck(
        torch.ops.mixtral_cpu.qlinear.default, (x, q, s, 4), test_utils=("test_schema", "test_faketensor")
    )
    E, D, F = 2, 64, 64
    x, w1, w3, w2 = exact_moe_inputs(2, E, D, F, 8, 32, seed=2)
    args = (x, torch.tensor([[0, 1], [1, 1]]), torch.rand(2, 2), w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], 8)
    torch.library.opcheck(
        torch.ops.mixtral_cpu.qmoe.default, args, test_utils=("test_schema", "test_faketensor")
    )


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_vnni_path_is_built_where_the_cpu_has_it():
    want = {"avx512_vnni", "avx512bw", "avx512vl", "f16c"}
    if os.environ.get("MIXTRAL_NO_QGROUP_VNNI") == "1" or not want <= _cpu_flags():
        pytest.skip("no AVX-512 VNNI here (or turned off)")
    assert ops.has_qgroup_vnni() is True


FALLBACK_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from mixtral.kernels import ops
    assert ops.available() and not ops.has_qgroup_vnni()
    cases = torch.load(sys.argv[1])
    out = []
    for kind, args in cases:
        out.append(ops.qmoe(*args) if kind == "moe" else ops.qlinear(*args))
    torch.save(out, sys.argv[2])
    """
)


def test_scalar_fallback_equals_vnni_path(tmp_path):
    """MIXTRAL_NO_QGROUP_VNNI=1 (read once per process, hence the subprocess) selects the scalar
    loop; it gives the same results (the same integers, fp32 sums in another order)."""
    cases = []
    for bits in BITS:
        for group, K, N in SHAPES[:3] + SHAPES[4:5]:
            for M in (1, 5, 17):
                cases.append(
                    ("linear", (activations(M, K, seed=M), *weights(N, K, bits, group, seed=K), bits))
                )
        x = tricky_activations()
        cases.append(("identity", (x, *identity_weights(x.shape[1], bits), bits)))
        x, w1, w3, w2 = exact_moe_inputs(5, 4, 96, 160, bits, 32, seed=bits)
        ids, gates = torch.tensor(ROUTES[5]), torch.rand(5, 2)
        cases.append(("moe", (x, ids, gates, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], bits)))
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "MIXTRAL_NO_QGROUP_VNNI": "1"}
    subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
        env=env,
        check=True,
        timeout=600,
    )
    scalar = torch.load(tmp_path / "out.pt")
    for (kind, args), ys in zip(cases, scalar, strict=True):
        if kind == "moe":
            yv, ref = (
                ops.qmoe(*args),
                reference_moe(*args[:3], *zip(args[3:6], args[6:9], strict=True), args[9]),
            )
        else:
            yv, ref = ops.qlinear(*args), reference_linear(*args)
        if kind == "identity":  # both exactly fl(q_x · d_x): the scalar quantizer is bit-identical too
            assert torch.equal(ys, ref) and torch.equal(yv, ref)
        close(ys, yv)
        close(ys, ref)
