// Decode kernels for group-wise quantized weights (llama.cpp's Q4_0 and Q8_0 blocks, see
// mixtral/quant/group.py, the definition these are tested against): y = x · ŵᵀ for a few rows of x,
// and the whole top-k MoE layer for a few tokens, each selected expert streamed once.
//
// As llama.cpp does, x is quantized per row and per block of 32 to int8 (Q8_0's rule, fp32 scale),
// every block's integer dot product with the weights is exact (int32), and dot · d_x · d_w is
// accumulated in fp32. With AVX-512 VNNI + BW + VL, vpdpbusd multiplies 64 unsigned bytes by 64
// signed bytes into 16 int32 lanes (4 products each) in one instruction; a zmm holds a chunk of two
// blocks of 32:
//
// - The activations are the unsigned operand, x + 128 in [1, 255] (prepared once per call), the
//   signed weights the other; Σ (x + 128)·w = Σ x·w + 128·Σ w, so each lane's accumulator starts at
//   -128·(its 4 weights' sum), which one more vpdpbusd per weight chunk computes (w ^ 0x80 = w + 128
//   times -128, plus 4·128·128), shared by all rows of x. Every partial sum is exact
//   (|lane| <= 4·255·127).
// - int4: the 32 packed bytes of a chunk are broadcast to both halves of a zmm and one GF(2) affine
//   map per byte (gf2p8affineqb) turns the lower half's low nibbles and the upper half's high nibbles
//   into n - 8 as int8; x is stored in that order (per chunk of blocks b, b+1: values 0-15 of b,
//   0-15 of b+1, 16-31 of b, 16-31 of b+1). int8: the weights as they are.
//
// Each int32 lane (a quarter or an eighth of one block's product) is converted to fp32 (exactly:
// < 2^24) and multiplied into fp32 accumulators by d_x[block] · d_w[group of block]. Weight rows are
// read once for up to 8 rows of x (more rows: tiles of up to 8; the weight row then comes from cache)
// and prefetched into L2 ahead of use. One row of x streams the weights at memory bandwidth (4096x14336
// int4, 2 cores: 1.1-1.3 ms, 26-31 GB/s, as the fp32 kernel reads its 8x larger weights).
//
// Elsewhere, or with MIXTRAL_NO_QGROUP_VNNI=1 (read once per process), a scalar loop with the same
// integer arithmetic and the same activation quantization runs instead.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define MIXTRAL_QGROUP_VNNI 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kAB = 32;      // activation block (and smallest weight group): QK8_0 = QK4_0
constexpr int64_t kMaxTile = 8;  // rows of x per pass over a weight row

bool vnni_on() {
#ifdef MIXTRAL_QGROUP_VNNI
  static const bool on = [] {
    const char* v = std::getenv("MIXTRAL_NO_QGROUP_VNNI");
    return !(v != nullptr && std::strcmp(v, "1") == 0);
  }();
  return on;
#else
  return false;
#endif
}

// Q8_0's rule on one block of 32 values, the same fp32 operations as group.quantize_activations:
// d = max|x| / 127, inv = 1 / d (0 if d is 0), q = roundf(x · inv) (ties away from zero) in [-127, 127].
inline float quantize_block(const float* x, int8_t* q) {
  float amax = 0.0f;
  for (int j = 0; j < kAB; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float inv = d == 0.0f ? 0.0f : 1.0f / d;
  for (int j = 0; j < kAB; ++j) {
    const float v = std::roundf(x[j] * inv);
    q[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
  }
  return d;
}

#ifdef MIXTRAL_QGROUP_VNNI
// quantize_block with AVX-512: the same fp32 operations, so the same bits (roundf's ties away from
// zero as trunc, then ±1 where |p - trunc(p)| >= 0.5).
inline float quantize_block_avx512(const float* x, int8_t* q) {
  const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
  const float d = amax / 127.0f;
  const float inv = d == 0.0f ? 0.0f : 1.0f / d;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (int h = 0; h < 2; ++h) {
    __m512 p = _mm512_mul_ps(h ? v1 : v0, vinv);
    asm("" : "+v"(p));  // p rounded to fp32 here: -ffp-contract=fast must not fuse it into p - t
    const __m512 t = _mm512_roundscale_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __mmask16 away = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(p, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    const __m512 one = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(p, _mm512_set1_ps(-0.0f)));  // ±1 as p
    __m512 r = _mm512_mask_add_ps(t, away, t, one);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
  }
  return d;
}
#endif

// M rows of x quantized once per call: q int8 [M, K] and d_x [M, K/32]. For the VNNI path also,
// chunk-major so that one chunk's rows lie together: xu [nc][M][64] (the chunk's 64 activations
// + 128 as unsigned bytes, in the weights' lane order) and dx2 [nc][M][2] (its two blocks' d_x); an
// odd last block is padded with x = 0 (byte 128) and d_x = 0.
struct Acts {
  int64_t M = 0, K = 0, nb = 0, nc = 0;
  at::Tensor q, dx, xu, dx2;
};

Acts prepare(const float* x, int64_t M, int64_t K, int bits, bool vnni) {
  Acts a;
  a.M = M;
  a.K = K;
  a.nb = K / kAB;
  a.nc = (a.nb + 1) / 2;
  a.q = at::empty({M, K}, at::kChar);
  a.dx = at::empty({M, a.nb}, at::kFloat);
  int8_t* q = a.q.data_ptr<int8_t>();
  float* dx = a.dx.data_ptr<float>();
  const int64_t nb = a.nb, nc = a.nc;
  if (!vnni) {
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t b = 0; b < nb; ++b) dx[m * nb + b] = quantize_block(x + m * K + b * kAB, q + m * K + b * kAB);
    });
    return a;
  }
#ifdef MIXTRAL_QGROUP_VNNI
  a.xu = at::empty({nc * M * 64}, at::kByte);  // 64-byte aligned (torch's CPU allocator)
  a.dx2 = at::empty({nc * M * 2}, at::kFloat);
  uint8_t* xu = a.xu.data_ptr<uint8_t>();
  float* dx2 = a.dx2.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < nb; ++b)
        dx[m * nb + b] = quantize_block_avx512(x + m * K + b * kAB, q + m * K + b * kAB);
      for (int64_t c = 0; c < nc; ++c) {
        const bool two = 2 * c + 1 < nb;
        __m512i v = _mm512_maskz_loadu_epi8(two ? ~__mmask64(0) : __mmask64(0xFFFFFFFFull), q + m * K + 2 * c * kAB);
        // int8: blocks 2c | 2c+1. int4: 16-byte quarters 0, 2, 1, 3 = values 0-15 of 2c, 0-15 of 2c+1,
        // 16-31 of 2c, 16-31 of 2c+1, the order of the nibbles.
        if (bits == 4) v = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(3, 1, 2, 0));
        _mm512_store_si512(xu + (c * M + m) * 64, _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80))));
        dx2[(c * M + m) * 2] = dx[m * nb + 2 * c];
        dx2[(c * M + m) * 2 + 1] = two ? dx[m * nb + 2 * c + 1] : 0.0f;
      }
    }
  });
#else
  (void)bits;
  (void)nc;
#endif
  return a;
}

// ---- portable scalar path ------------------------------------------------------------------------

// Exact dot of one block of 32 activations with the signed weight values of one block.
inline int32_t block_dot(int bits, const int8_t* xq, const uint8_t* w) {
  int32_t dot = 0;
  if (bits == 8) {
    const int8_t* ws = reinterpret_cast<const int8_t*>(w);
    for (int j = 0; j < kAB; ++j) dot += int32_t(xq[j]) * int32_t(ws[j]);
  } else {
    for (int j = 0; j < kAB / 2; ++j)
      dot += int32_t(xq[j]) * (int32_t(w[j] & 15) - 8) + int32_t(xq[j + 16]) * (int32_t(w[j] >> 4) - 8);
  }
  return dot;
}

// y[m * ldy + n] for all rows m of x and weight rows n in [n0, n1).
void scalar_range(int bits, const Acts& A, const uint8_t* w, int64_t wstride, const at::Half* s, int64_t ng,
                  float* y, int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t nb = A.nb, per = nb / ng, bb = bits == 8 ? kAB : kAB / 2;
  const int8_t* q = A.q.data_ptr<int8_t>();
  const float* dx = A.dx.data_ptr<float>();
  std::vector<float> dw(nb);
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t b = 0; b < nb; ++b) dw[b] = static_cast<float>(s[n * ng + b / per]);
    const uint8_t* wr = w + n * wstride;
    for (int64_t m = 0; m < A.M; ++m) {
      const int8_t* xq = q + m * A.K;
      const float* dxm = dx + m * nb;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b)
        acc += static_cast<float>(block_dot(bits, xq + b * kAB, wr + b * bb)) * (dxm[b] * dw[b]);
      y[m * ldy + n] = acc;
    }
  }
}

// ---- AVX-512 VNNI path ---------------------------------------------------------------------------
#ifdef MIXTRAL_QGROUP_VNNI

// Weights are prefetched into L2 this far ahead of their use: without it, rows longer than ~8K values
// streamed from DRAM ~1.5x slower (4096x14336 int8 matrix, one row of x: 5.2 -> 2.9 ms on 1 core).
constexpr int64_t kPrefetch = 12288;

// One chunk (two blocks) of one weight row: ws = the signed values as int8 in the activations' lane
// order, start = -128 · (sum of each lane's 4 values), so that dpbusd(start, x + 128, ws) = Σ x · w
// exactly (|partial sums| <= 4 · 255 · 127). HALF: only the first block is read (the second's bytes
// read as 0, and its activations are 0).
struct WChunk {
  __m512i ws, start;
};

template <int BITS, bool HALF>
__attribute__((always_inline)) inline WChunk load_w(const uint8_t* p) {
  // -128 · Σ ws = Σ (ws + 128) · (-128) + 4 · 128 · 128 per lane, with ws + 128 = ws ^ 0x80 unsigned.
  const __m512i k65536 = _mm512_set1_epi32(65536), m128 = _mm512_set1_epi8(char(-128));
  __m512i ws, wu;
  if constexpr (BITS == 8) {
    ws = HALF ? _mm512_maskz_loadu_epi8(__mmask64(0xFFFFFFFFull), p) : _mm512_loadu_si512(p);
    wu = _mm512_xor_si512(ws, m128);
  } else {
    // The chunk's 32 bytes in both halves of a zmm: low nibbles in the lower half, high ones in
    // the upper (values 0-15 of each block, then 16-31), each nibble n becoming n - 8 as int8.
    const __m256i h = HALF ? _mm256_maskz_loadu_epi8(__mmask32(0xFFFF), p)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i b = _mm512_broadcast_i64x4(h);
#if defined(__GFNI__)
    // GF(2) affine map per byte (matrix per qword, the row of output bit i in its byte 7 - i):
    // output bits 0-2 = the nibble's bits 0-2, bits 3-7 = its bit 3, then ^ 0xF8 = n - 8 as int8
    // (^ 0x78 for ws ^ 0x80). The lower half's matrix takes the low nibble, the upper half's the high.
    const __m512i mat = _mm512_set_epi64(0x1020408080808080ll, 0x1020408080808080ll, 0x1020408080808080ll,
                                         0x1020408080808080ll, 0x0102040808080808ll, 0x0102040808080808ll,
                                         0x0102040808080808ll, 0x0102040808080808ll);
    ws = _mm512_gf2p8affine_epi64_epi8(b, mat, 0xF8);
    wu = _mm512_gf2p8affine_epi64_epi8(b, mat, 0x78);
#else
    const __m512i nib = _mm512_and_si512(_mm512_mask_srli_epi16(b, __mmask32(0xFFFF0000u), b, 4),
                                         _mm512_set1_epi8(0x0F));
    ws = _mm512_sub_epi8(nib, _mm512_set1_epi8(8));
    wu = _mm512_xor_si512(ws, m128);
#endif
  }
  return {ws, _mm512_dpbusd_epi32(k65536, wu, m128)};
}

// One chunk (blocks 2c, 2c+1) for R weight rows and MT rows of x: xu, dx2 = the chunk's first row
// of packed activations, w = the first weight row's chunk, dw = its per-block fp32 scales from 2c.
template <int BITS, int MT, int R, bool HALF>
__attribute__((always_inline)) inline void vnni_step(const uint8_t* xu, const float* dx2, const uint8_t* w,
                                                     int64_t wstride, const float* dw, int64_t dwstride,
                                                     __m512i idx, __m512 (&acc)[R][MT]) {
  WChunk wc[R];
  __m128 dw2[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(w + r * wstride + kPrefetch), _MM_HINT_T1);
    wc[r] = load_w<BITS, HALF>(w + r * wstride);
    dw2[r] = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dw + r * dwstride)));
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const __m512i xv = _mm512_load_si512(xu + m * 64);
    const __m128 dxm = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dx2 + 2 * m)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(wc[r].start, xv, wc[r].ws));
      const __m512 scale = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_mul_ps(dw2[r], dxm)));
      acc[r][m] = _mm512_fmadd_ps(dot, scale, acc[r][m]);
    }
  }
}

// y[m * ldy + r] for MT rows of x (packed activations of all M rows from row m0: xu, dx2) and R
// weight rows (w, their block scales dw).
template <int BITS, int MT, int R, int U>
void vnni_tile(const Acts& A, int64_t m0, const uint8_t* w, int64_t wstride, const float* dw, int64_t dwstride,
               float* y, int64_t ldy) {
  constexpr int64_t CB = BITS == 8 ? 64 : 32;  // weight bytes per chunk
  const int64_t M = A.M, nb = A.nb;
  const uint8_t* xu = A.xu.data_ptr<uint8_t>() + m0 * 64;
  const float* dx2 = A.dx2.data_ptr<float>() + m0 * 2;
  // Lane l's block within the chunk: int8 lanes 0-7 | 8-15; int4 lanes 0-3, 8-11 | 4-7, 12-15.
  const __m512i idx = BITS == 8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                : _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[U][R][MT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[u][r][m] = _mm512_setzero_ps();
  const int64_t full = nb / 2;
  int64_t c = 0;
  for (; c + U <= full; c += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const int64_t cc = c + u;
      vnni_step<BITS, MT, R, false>(xu + cc * M * 64, dx2 + cc * M * 2, w + cc * CB, wstride, dw + 2 * cc, dwstride,
                                    idx, acc[u]);
    }
  }
  for (; c < full; ++c)
    vnni_step<BITS, MT, R, false>(xu + c * M * 64, dx2 + c * M * 2, w + c * CB, wstride, dw + 2 * c, dwstride, idx,
                                  acc[0]);
  if (nb & 1)
    vnni_step<BITS, MT, R, true>(xu + c * M * 64, dx2 + c * M * 2, w + c * CB, wstride, dw + 2 * c, dwstride, idx,
                                 acc[0]);
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      __m512 s = acc[0][r][m];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][r][m]);
      y[m * ldy + r] = _mm512_reduce_add_ps(s);
    }
}

template <int BITS, int R>
void vnni_tile_any(int mt, const Acts& A, int64_t m0, const uint8_t* w, int64_t wstride, const float* dw,
                   int64_t dwstride, float* y, int64_t ldy) {
  // Independent fp32 accumulator chains: U per (row of w, row of x), enough to hide the FMA latency.
  constexpr int U1 = R == 1 ? 4 : 2, U2 = R == 1 ? 2 : 1;
  switch (mt) {
    case 1: return vnni_tile<BITS, 1, R, U1>(A, m0, w, wstride, dw, dwstride, y, ldy);
    case 2: return vnni_tile<BITS, 2, R, U2>(A, m0, w, wstride, dw, dwstride, y, ldy);
    case 3: return vnni_tile<BITS, 3, R, 1>(A, m0, w, wstride, dw, dwstride, y, ldy);
    case 4: return vnni_tile<BITS, 4, R, 1>(A, m0, w, wstride, dw, dwstride, y, ldy);
    case 5: return vnni_tile<BITS, 5, R, 1>(A, m0, w, wstride, dw, dwstride, y, ldy);
    case 6: return vnni_tile<BITS, 6, R, 1>(A, m0, w, wstride, dw, dwstride, y, ldy);
    case 7: return vnni_tile<BITS, 7, R, 1>(A, m0, w, wstride, dw, dwstride, y, ldy);
    default: return vnni_tile<BITS, 8, R, 1>(A, m0, w, wstride, dw, dwstride, y, ldy);
  }
}

// A weight row's fp16 group scales as one fp32 per block of 32 (2 zeros of padding after nb).
inline void fill_dw(const at::Half* s, int64_t ng, int64_t per, int64_t nb, float* out) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(s);
  if (per == 1) {
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16)
      _mm512_storeu_ps(out + g, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + g))));
    if (g < ng) {
      const __mmask16 k = static_cast<__mmask16>((1u << (ng - g)) - 1);
      _mm512_mask_storeu_ps(out + g, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, h + g)));
    }
  } else {
    for (int64_t g = 0; g < ng; ++g) std::fill(out + g * per, out + (g + 1) * per, _cvtsh_ss(h[g]));
  }
  out[nb] = out[nb + 1] = 0.0f;
}

template <int BITS>
void vnni_range(const Acts& A, const uint8_t* w, int64_t wstride, const at::Half* s, int64_t ng, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t M = A.M, nb = A.nb, per = nb / ng, dws = nb + 2;
  // From 5 rows of x the kernel is compute-bound: two weight rows per pass share each activation load.
  const int R = M >= 5 ? 2 : 1;
  std::vector<float> dw(2 * dws);
  const int64_t tiles = (M + kMaxTile - 1) / kMaxTile;
  for (int64_t n = n0; n < n1;) {
    const int rr = R == 2 && n + 2 <= n1 ? 2 : 1;
    for (int r = 0; r < rr; ++r) fill_dw(s + (n + r) * ng, ng, per, nb, dw.data() + r * dws);
    for (int64_t t = 0; t < tiles; ++t) {  // balanced tiles of at most kMaxTile rows
      const int64_t m0 = t * M / tiles, m1 = (t + 1) * M / tiles;
      const int mt = static_cast<int>(m1 - m0);
      if (rr == 2)
        vnni_tile_any<BITS, 2>(mt, A, m0, w + n * wstride, wstride, dw.data(), dws, y + m0 * ldy + n, ldy);
      else
        vnni_tile_any<BITS, 1>(mt, A, m0, w + n * wstride, wstride, dw.data(), dws, y + m0 * ldy + n, ldy);
    }
    n += rr;
  }
}
#endif  // MIXTRAL_QGROUP_VNNI

// y[m * ldy + n] = Σ_b dot_b(q_x[m], w[n]) · d_x[m, b] · d_w[n, b / per] for n in [n0, n1).
void qgemv_range(int bits, bool vnni, const Acts& A, const uint8_t* w, const at::Half* s, int64_t ng, float* y,
                 int64_t ldy, int64_t n0, int64_t n1) {
  const int64_t wstride = bits == 8 ? A.K : A.K / 2;
#ifdef MIXTRAL_QGROUP_VNNI
  if (vnni) {
    if (bits == 8) return vnni_range<8>(A, w, wstride, s, ng, y, ldy, n0, n1);
    return vnni_range<4>(A, w, wstride, s, ng, y, ldy, n0, n1);
  }
#endif
  (void)vnni;
  scalar_range(bits, A, w, wstride, s, ng, y, ldy, n0, n1);
}

// Weight rows per parallel task: ~16 KiB of weights keeps scheduling cheap next to the streaming.
int64_t grain_for(int64_t row_bytes) { return std::max<int64_t>(16, 16384 / std::max<int64_t>(1, row_bytes)); }

void check_bits(int64_t bits) { TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits); }

// q [..., N, K or K/2] and scales fp16 [..., N, K/group] for input dimension K; returns the
// number of groups per row.
int64_t check_qweight(const torch::Tensor& q, const torch::Tensor& s, int64_t bits, int64_t K, const char* qn,
                      const char* sn) {
  const auto want = bits == 8 ? at::kChar : at::kByte;
  TORCH_CHECK(q.scalar_type() == want, qn, " must be ", bits == 8 ? "int8" : "uint8 (two 4-bit values a byte)",
              " for bits=", bits, ", got ", q.scalar_type());
  TORCH_CHECK(q.is_contiguous(), qn, " must be contiguous");
  TORCH_CHECK(s.scalar_type() == at::kHalf, sn, " must be float16, got ", s.scalar_type());
  TORCH_CHECK(s.is_contiguous(), sn, " must be contiguous");
  TORCH_CHECK(s.dim() == q.dim(), sn, " must have as many dimensions as ", qn, " (", q.dim(), "), got ", s.dim());
  for (int64_t i = 0; i + 1 < q.dim(); ++i)
    TORCH_CHECK(s.size(i) == q.size(i), sn, " has shape ", s.sizes(), " but ", qn, " has shape ", q.sizes());
  const int64_t kq = bits == 8 ? K : K / 2;
  TORCH_CHECK(q.size(-1) == kq, qn, " must have ", kq, " columns for input dimension ", K, " and bits=", bits,
              ", got ", q.size(-1));
  const int64_t ng = s.size(-1);
  TORCH_CHECK(ng > 0 && K % ng == 0 && (K / ng) % kAB == 0, sn, "'s last dimension ", ng,
              " must divide the input dimension ", K, " into groups of a multiple of ", kAB, " values");
  return ng;
}

}  // namespace

// y [M, N] fp32 = x [M, K] · ŵᵀ with ŵ = q (int8 [N, K], or packed uint8 [N, K/2]) in groups of K / ng
// values with fp16 scales [N, ng]; x quantized per 32-block to int8 as group.quantize_activations.
torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor [M, K], got ",
              x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(q.dim() == 2 && scales.dim() == 2, "q and scales must be 2-D ([N, ...]), got shapes ", q.sizes(),
              " and ", scales.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(K > 0 && K % kAB == 0, "x's input dimension ", K, " must be a positive multiple of ", kAB);
  const int64_t ng = check_qweight(q, scales, bits, K, "q", "scales");
  x = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool vnni = vnni_on();
  const Acts A = prepare(x.data_ptr<float>(), M, K, static_cast<int>(bits), vnni);
  const uint8_t* w = static_cast<const uint8_t*>(q.data_ptr());
  const at::Half* s = scales.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain_for(q.size(1)), [&](int64_t n0, int64_t n1) {
    qgemv_range(static_cast<int>(bits), vnni, A, w, s, ng, yp, N, n0, n1);
  });
  return y;
}

// Top-k MoE for a few tokens: y [T, D] = Σ_k weights[t, k] · w2_e · q(silu(w1_e · x_t) ⊙ (w3_e · x_t)),
// e = ids[t, k], each product as qlinear; tokens grouped by expert so each expert is streamed once.
torch::Tensor qmoe(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w1, torch::Tensor w3,
                   torch::Tensor w2, torch::Tensor s1, torch::Tensor s3, torch::Tensor s2, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor [T, D], got ",
              x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) &&
                  at::isIntegralType(ids.scalar_type(), /*includeBool=*/false),
              "ids must be an integer tensor [T, k] with T = x.size(0), got ", ids.scalar_type(), " of shape ",
              ids.sizes());
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat,
              "weights must be float32 with ids' shape ", ids.sizes(), ", got ", weights.scalar_type(), " of shape ",
              weights.sizes());
  TORCH_CHECK(w1.dim() == 3 && w3.dim() == 3 && w2.dim() == 3, "w1, w3, w2 must be 3-D [E, rows, cols]");
  TORCH_CHECK(w1.sizes() == w3.sizes(), "w1 and w3 must have the same shape, got ", w1.sizes(), " and ", w3.sizes());
  TORCH_CHECK(s1.sizes() == s3.sizes(), "s1 and s3 must have the same shape, got ", s1.sizes(), " and ", s3.sizes());
  const int64_t T = x.size(0), k = ids.size(1), D = x.size(1), E = w1.size(0), F = w1.size(1);
  TORCH_CHECK(D > 0 && D % kAB == 0 && F > 0 && F % kAB == 0, "model dimension ", D, " and expert hidden dimension ",
              F, " must be positive multiples of ", kAB);
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == D, "w2 must be [E, D, ...] = [", E, ", ", D, ", ...], got ",
              w2.sizes());
  const int64_t ng1 = check_qweight(w1, s1, bits, D, "w1", "s1");
  check_qweight(w3, s3, bits, D, "w3", "s3");
  const int64_t ng2 = check_qweight(w2, s2, bits, F, "w2", "s2");
  x = x.contiguous();
  auto ids_c = ids.to(at::kLong).contiguous();
  auto wts = weights.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * k; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < E, "expert id ", id[i], " out of range [0, ", E, ")");
  auto y = torch::zeros({T, D}, x.options());
  if (T == 0 || k == 0) return y;

  // Counting sort of the T·k (token, slot) pairs by expert.
  std::vector<int64_t> start(E + 1, 0), order(T * k);
  for (int64_t i = 0; i < T * k; ++i) ++start[id[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < T * k; ++i) order[fill[id[i]]++] = i;

  const int ib = static_cast<int>(bits);
  const bool vnni = vnni_on();
  auto xs = torch::empty({T * k, D}, x.options());
  auto a = torch::empty({T * k, F}, x.options()), b = torch::empty({T * k, F}, x.options());
  auto h = torch::empty({T * k, F}, x.options());
  auto os = torch::empty({T * k, D}, x.options());
  const float* xp = x.data_ptr<float>();
  float *xsp = xs.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float *hp = h.data_ptr<float>(), *osp = os.data_ptr<float>();
  for (int64_t i = 0; i < T * k; ++i) std::memcpy(xsp + i * D, xp + (order[i] / k) * D, D * sizeof(float));
  const uint8_t *w1p = static_cast<const uint8_t*>(w1.data_ptr()), *w3p = static_cast<const uint8_t*>(w3.data_ptr()),
                *w2p = static_cast<const uint8_t*>(w2.data_ptr());
  const at::Half *s1p = s1.data_ptr<at::Half>(), *s3p = s3.data_ptr<at::Half>(), *s2p = s2.data_ptr<at::Half>();
  const int64_t b13 = F * w1.size(2), b2 = D * w2.size(2);  // bytes per expert
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = start[e], m = start[e + 1] - start[e];
    if (m == 0) continue;
    const Acts ax = prepare(xsp + r0 * D, m, D, ib, vnni);
    at::parallel_for(0, F, grain_for(2 * w1.size(2)), [&](int64_t n0, int64_t n1) {
      qgemv_range(ib, vnni, ax, w1p + e * b13, s1p + e * F * ng1, ng1, ap + r0 * F, F, n0, n1);
      qgemv_range(ib, vnni, ax, w3p + e * b13, s3p + e * F * ng1, ng1, bp + r0 * F, F, n0, n1);
    });
    // silu(a) · b in fp32 with torch's own silu, row by row as group.reference_moe computes it.
    for (int64_t i = r0; i < r0 + m; ++i) {
      at::Tensor hi = h[i];
      at::mul_out(hi, at::silu(a[i]), b[i]);
    }
    const Acts ah = prepare(hp + r0 * F, m, F, ib, vnni);
    at::parallel_for(0, D, grain_for(w2.size(2)), [&](int64_t n0, int64_t n1) {
      qgemv_range(ib, vnni, ah, w2p + e * b2, s2p + e * D * ng2, ng2, osp + r0 * D, D, n0, n1);
    });
  }
  // Combine in slot order k = 0..k-1 per token, as the reference sums them.
  std::vector<int64_t> pos(T * k);
  for (int64_t i = 0; i < T * k; ++i) pos[order[i]] = i;
  float* yp = y.data_ptr<float>();
  const float* wp = wts.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const float g = wp[t * k + j];
      const float* o = osp + pos[t * k + j] * D;
      for (int64_t d = 0; d < D; ++d) yp[t * D + d] += g * o[d];
    }
  return y;
}

// Whether group-quantized weights multiply with AVX-512 VNNI here: compiled in and not turned off by
// MIXTRAL_NO_QGROUP_VNNI=1 (else the scalar path, same integers).
bool has_qgroup_vnni() { return vnni_on(); }

TORCH_LIBRARY_FRAGMENT(mixtral_cpu, m) {
  m.def("has_qgroup_vnni() -> bool", &has_qgroup_vnni);
  m.def("qlinear(Tensor x, Tensor q, Tensor scales, int bits) -> Tensor");
  m.def(
      "qmoe(Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2, Tensor s1, Tensor s3, "
      "Tensor s2, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_cpu, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("qmoe", &qmoe);
}
