"""Group-wise int4 and int8 weights (llama.cpp's Q4_0 and Q8_0 blocks) and the reference arithmetic.

A weight matrix w [..., N, K] is cut along its input dimension K into groups of `group` values
(32 by default, llama.cpp's block; any multiple of 32 that divides K), each with one fp16 scale d:

- **int8** (Q8_0): d = max|w_g| / 127, q = round(w / d) (half away from zero) in [-127, 127],
  stored as int8 [..., N, K]; ŵ = q · d. Elementwise |w - ŵ| <= d/2 (plus d's fp16 rounding).
- **int4** (Q4_0): m = the group's value of largest magnitude (with its sign), d = m / -8,
  q = min(15, floor(w / d + 8.5)) in [0, 15]; ŵ = (q - 8) · d, so m itself is exact (-8 · d) and
  |w - ŵ| <= |d| (= max|w_g| / 8; |d|/2 except for values near -m, clipped from 8 to 7 steps).
  Two values per byte, in llama.cpp's order within each 32-block: byte j of block b holds value
  32b + j in its low nibble and 32b + 16 + j in its high nibble; stored as uint8 [..., N, K/2].

Scales are fp16 [..., N, K / group]. With group 32 the bytes are exactly ggml's Q4_0 / Q8_0 blocks
(scale, then quants), so the GGUF export of these weights is a re-interleaving, not a
re-quantization: llama.cpp multiplies the very same numbers (tested against gguf-py's port of
ggml's reference quantizer).

Decode multiplies these weights by 8-bit activations, as llama.cpp does: each row of x is cut into
blocks of 32 and quantized with Q8_0's rule (fp32 scale), every block's integer dot product is
exact, and its scale product is accumulated in fp32. `reference_linear` and `reference_moe` are the
scalar definition the compiled kernels are tested against; the activation rounding adds at most
max|x_b| / 254 per element of x.
"""

from __future__ import annotations

import torch

from mixtral.errors import ConfigError

BITS = (4, 8)
ABLOCK = 32  # activation block (and the smallest weight group): llama.cpp's QK8_0 and QK4_0


def check_group(k: int, group: int, what: str = "the weight's input dimension") -> None:
    """A clear error unless `group` is a positive multiple of 32 that divides K."""
    if group <= 0 or group % ABLOCK:
        raise ConfigError(f"quantization group {group} must be a positive multiple of {ABLOCK}")
    if k % group:
        raise ConfigError(f"{what} ({k}) is not a multiple of the quantization group {group}")


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: ties away from zero (torch.round rounds them to even)."""
    r = torch.round(v)
    t = torch.trunc(v)
    return torch.where((v - t).abs() == 0.5, t + torch.sign(v), r)


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    w = w.detach().float()
    check_group(w.shape[-1], group)
    return w.reshape(*w.shape[:-1], w.shape[-1] // group, group)


def quantize(w: torch.Tensor, bits: int, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, fp16 scales [..., N, K/group]) for w [..., N, K]: int8 [..., N, K] or packed uint8 [..., N, K/2]."""
    if bits not in BITS:
        raise ConfigError(f"group quantization has {' or '.join(map(str, BITS))} bits, not {bits}")
    g = _groups(w, group)
    if bits == 8:
        d = g.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        q = _round_half_away(g * inv).clamp(-127, 127).to(torch.int8)
        return q.reshape(w.shape).contiguous(), d.squeeze(-1).to(torch.float16).contiguous()
    imax = g.abs().argmax(dim=-1, keepdim=True)
    d = torch.gather(g, -1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.floor(g * inv + 8.5).clamp(0, 15).to(torch.uint8)
    return pack4(q.reshape(w.shape)), d.squeeze(-1).to(torch.float16).contiguous()


def pack4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [..., K] → bytes [..., K/2] in Q4_0's order within each block of 32."""
    b = q.reshape(*q.shape[:-1], q.shape[-1] // ABLOCK, 2, ABLOCK // 2)
    return (b[..., 0, :] | (b[..., 1, :] << 4)).reshape(*q.shape[:-1], q.shape[-1] // 2).contiguous()


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] → the signed values q - 8 in [-8, 7] as int8 [..., K]."""
    b = packed.reshape(*packed.shape[:-1], packed.shape[-1] * 2 // ABLOCK, 1, ABLOCK // 2)
    q = torch.cat([b & 0x0F, b >> 4], dim=-2).to(torch.int8) - 8
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def values(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The signed integer weights [..., N, K] (int8) of stored q."""
    return unpack4(q) if bits == 4 else q


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ŵ [..., N, K] in `dtype` (computed in fp32, then cast)."""
    v = values(q, bits).float()
    ng = scales.shape[-1]
    g = v.reshape(*v.shape[:-1], ng, v.shape[-1] // ng) * scales.float().unsqueeze(-1)
    return g.reshape(v.shape).to(dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] fp32 → (int8 [M, K], fp32 scales [M, K/32]) with Q8_0's rule, the scale kept in fp32."""
    g = x.float().reshape(x.shape[0], -1, ABLOCK)
    d = g.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_half_away(g * inv).clamp(-127, 127).to(torch.int8)
    return q.reshape(x.shape), d.squeeze(-1)


def reference_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] · ŵᵀ as the kernels compute it: Σ_b (exact int dot of block b) · d_x[m, b] · d_w[n, b·32/group].

    The scalar definition (fp64 sums, so only the kernels' fp32 accumulation order differs).
    """
    qx, dx = quantize_activations(x)
    w = values(q, bits)
    M, K = qx.shape
    N = w.shape[0]
    nb = K // ABLOCK
    # exact integer dot per (m, n, block): int64 products summed over the 32 values
    dots = torch.einsum("mbj,nbj->mnb", qx.reshape(M, nb, ABLOCK).double(), w.reshape(N, nb, ABLOCK).double())
    per = nb // scales.shape[-1]
    dw = scales.double().repeat_interleave(per, dim=-1)  # [N, nb]
    return (dots * dx.double().unsqueeze(1) * dw.unsqueeze(0)).sum(-1).float()


def reference_moe(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w1: tuple[torch.Tensor, torch.Tensor],
    w3: tuple[torch.Tensor, torch.Tensor],
    w2: tuple[torch.Tensor, torch.Tensor],
    bits: int,
) -> torch.Tensor:
    """Σ_k weights[t, k] · SwiGLU_{ids[t, k]}(x[t]) with each matrix product as `reference_linear`.

    w1, w3, w2: (q [E, ...], scales [E, ...]) pairs; the hidden activation silu(a)·b is computed in
    fp32 and quantized again (per block of 32) before w2.
    """
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            xt = x[t : t + 1].float()
            a = reference_linear(xt, w1[0][e], w1[1][e], bits)
            b = reference_linear(xt, w3[0][e], w3[1][e], bits)
            h = torch.nn.functional.silu(a) * b
            out[t] += float(weights[t, k]) * reference_linear(h, w2[0][e], w2[1][e], bits)[0]
    return out
