// Integer and bf16 dot-product kernels for the decode op (cpu_kernels.cpp): int8 weights with
// int16 activations (AVX-512 VNNI) and bf16 weights with bf16 activations (AVX512-BF16). Each
// entry point does nothing useful without its instruction set: prepare_* then returns nullptr and
// cpu_kernels.cpp keeps its fp32 widening path.

#include "cpu_dots.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace {

// ---- int8 weights with 16-bit integer activations (W8A16), AVX-512 VNNI ------------------------
// Widening int8 weights to fp32 costs more instructions than the bytes it saves; with VNNI,
// vpdpwssd multiplies 32 int16 pairs into 16 int32 lanes in one instruction. x is quantised per
// row and per block of kQB = 256 elements to int16 (scale = max|x_block| / 32767, error at most
// half a step: 1.5e-5 of the block's largest value, finer than bf16), weights are sign-extended to
// int16, and each block's exact int32 sums (at most 8 · 2 · 127 · 32767 < 2^31 per lane) are
// converted and scaled into fp32 accumulators. Elsewhere, the fp32 widening path above.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MIXTRAL_W8A16 1
constexpr int64_t kQB = 256;

struct QuantX {  // M rows of x as int16, zero-padded to Kp = a multiple of 32, one scale per block
  std::vector<int16_t> q;
  std::vector<float> s;
  int64_t K = 0, Kp = 0, nb = 0;
  const int16_t* row(int64_t m) const { return q.data() + m * Kp; }
  const float* scales(int64_t m) const { return s.data() + m * nb; }
};

QuantX quantize_rows(const float* x, int64_t M, int64_t K) {
  QuantX r;
  r.K = K;
  r.Kp = (K + 31) / 32 * 32;
  r.nb = (K + kQB - 1) / kQB;
  r.q.assign(M * r.Kp, 0);
  r.s.assign(M * r.nb, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < r.nb; ++b) {
      const int64_t k0 = b * kQB, k1 = std::min(K, k0 + kQB);
      float amax = 0.0f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x[m * K + k]));
      if (amax == 0.0f) continue;
      const float s = amax / 32767.0f, inv = 32767.0f / amax;
      r.s[m * r.nb + b] = s;
      for (int64_t k = k0; k < k1; ++k)
        r.q[m * r.Kp + k] = static_cast<int16_t>(std::nearbyint(x[m * K + k] * inv));
    }
  return r;
}

// y[m * ldy + n] = scale[n] · Σ_b s_x[m, b] · Σ_{k in block b} q_x[m, k] · w[n, k], for R rows of w
// at once with U int32 accumulators along k per (row of w, row of x).
template <int M, int R, int U>
inline void w8a16_block(const QuantX& qx, int64_t m0, const int8_t* w, const float* scale, float* y,
                        int64_t ldy, int64_t n0) {
  const int64_t K = qx.K;
  const int16_t* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = qx.row(m0 + m);
  __m512 facc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) facc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < qx.nb; ++b) {
    const int64_t k0 = b * kQB, k1 = std::min(K, k0 + kQB);
    __m512i iacc[R][M][U];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        for (int u = 0; u < U; ++u) iacc[r][m][u] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32 * U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const int64_t kk = k + 32 * u;
        if (kk >= k1) break;
        const __mmask32 mask = k1 - kk >= 32 ? ~__mmask32(0) : (__mmask32(1) << (k1 - kk)) - 1;
        __m512i wv[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + (n0 + r) * K + kk));
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512i xv = _mm512_loadu_si512(xr[m] + kk);  // zero beyond K
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) iacc[r][m][u] = _mm512_dpwssd_epi32(iacc[r][m][u], wv[r], xv);
        }
      }
    }
    for (int m = 0; m < M; ++m) {
      const __m512 sx = _mm512_set1_ps(qx.scales(m0 + m)[b]);
      for (int r = 0; r < R; ++r) {
        __m512i a = iacc[r][m][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_epi32(a, iacc[r][m][u]);
        facc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sx, facc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * ldy + n0 + r] = _mm512_reduce_add_ps(facc[r][m]) * scale[n0 + r];
}

template <int M>
void w8a16_rows(const QuantX& qx, int64_t m0, const int8_t* w, const float* scale, float* y, int64_t ldy,
                int64_t n0, int64_t n1) {
  // As rows_dot: one weight row at a time (one sequential stream; 1.7x faster from DRAM than 4
  // interleaved rows in a standalone test) with U accumulators along k. The int32 sums of a block
  // stay exact: per lane at most kQB / 32 · 2 · 127 · 32767 < 2^31, however they are split.
  constexpr int R = 1;
  constexpr int U = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  for (int64_t n = n0; n < n1; n += R) w8a16_block<M, R, U>(qx, m0, w, scale, y, ldy, n);
}

void w8a16_any(int M, const QuantX& qx, int64_t m0, const int8_t* w, const float* scale, float* y,
               int64_t ldy, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return w8a16_rows<1>(qx, m0, w, scale, y, ldy, n0, n1);
    case 2: return w8a16_rows<2>(qx, m0, w, scale, y, ldy, n0, n1);
    case 3: return w8a16_rows<3>(qx, m0, w, scale, y, ldy, n0, n1);
    case 4: return w8a16_rows<4>(qx, m0, w, scale, y, ldy, n0, n1);
    case 5: return w8a16_rows<5>(qx, m0, w, scale, y, ldy, n0, n1);
    case 6: return w8a16_rows<6>(qx, m0, w, scale, y, ldy, n0, n1);
    case 7: return w8a16_rows<7>(qx, m0, w, scale, y, ldy, n0, n1);
    default: return w8a16_rows<8>(qx, m0, w, scale, y, ldy, n0, n1);
  }
}
#endif

// ---- bf16 weights with bf16 activations (a bf16 model), AVX512-BF16 --------------------------------
// vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 lanes with no widening. Used only when the caller's
// activations are bf16 (the op's x is bf16): rounding them again is then exact, and fp32 x keeps the
// exact widening path above.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MIXTRAL_BF16DOT 1
struct Bf16X {  // M rows of x rounded to bf16, zero-padded to Kp = a multiple of 32
  std::vector<uint16_t> q;
  int64_t K = 0, Kp = 0;
  const uint16_t* row(int64_t m) const { return q.data() + m * Kp; }
};

Bf16X bf16_rows(const float* x, int64_t M, int64_t K) {
  Bf16X r;
  r.K = K;
  r.Kp = (K + 31) / 32 * 32;
  r.q.assign(M * r.Kp, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) r.q[m * r.Kp + k] = c10::BFloat16(x[m * K + k]).x;  // round to nearest even
  return r;
}

template <int M, int U>
inline void bf16_row(const Bf16X& bx, int64_t m0, const at::BFloat16* w, float* y, int64_t ldy, int64_t n) {
  const int64_t K = bx.K;
  const uint16_t* wr = reinterpret_cast<const uint16_t*>(w) + n * K;
  __m512 acc[M][U];
  for (int m = 0; m < M; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32 * U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      const int64_t kk = k + 32 * u;
      if (kk >= K) break;
      const __mmask32 mask = K - kk >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - kk)) - 1;
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, wr + kk);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_loadu_si512(bx.row(m0 + m) + kk));
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 a = acc[m][0];
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][u]);
    y[m * ldy + n] = _mm512_reduce_add_ps(a);
  }
}

template <int M>
void bf16_rows_dot(const Bf16X& bx, int64_t m0, const at::BFloat16* w, float* y, int64_t ldy, int64_t n0,
                   int64_t n1) {
  constexpr int U = M <= 2 ? 4 : 2;  // one weight row at a time, as rows_dot (1-4 rows of x)
  for (int64_t n = n0; n < n1; ++n) bf16_row<M, U>(bx, m0, w, y, ldy, n);
}

void bf16_any(int M, const Bf16X& bx, int64_t m0, const at::BFloat16* w, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return bf16_rows_dot<1>(bx, m0, w, y, ldy, n0, n1);
    case 2: return bf16_rows_dot<2>(bx, m0, w, y, ldy, n0, n1);
    case 3: return bf16_rows_dot<3>(bx, m0, w, y, ldy, n0, n1);
    default: return bf16_rows_dot<4>(bx, m0, w, y, ldy, n0, n1);
  }
}
#endif

}  // namespace

namespace mixtral_dots {

bool has_w8a16() {
#ifdef MIXTRAL_W8A16
  return std::getenv("MIXTRAL_NO_W8A16") == nullptr;
#else
  return false;
#endif
}

bool has_bf16_dot() {
#ifdef MIXTRAL_BF16DOT
  return true;
#else
  return false;
#endif
}

std::shared_ptr<void> prepare_int8_x(const float* x, int64_t M, int64_t K) {
#ifdef MIXTRAL_W8A16
  if (has_w8a16()) return std::make_shared<QuantX>(quantize_rows(x, M, K));
#endif
  return nullptr;
}

std::shared_ptr<void> prepare_bf16_x(const float* x, int64_t M, int64_t K) {
#ifdef MIXTRAL_BF16DOT
  return std::make_shared<Bf16X>(bf16_rows(x, M, K));
#else
  return nullptr;
#endif
}

void int8_dot(int rows, const void* prepared, int64_t m0, const int8_t* w, const float* scale, float* y,
              int64_t ldy, int64_t n0, int64_t n1) {
#ifdef MIXTRAL_W8A16
  w8a16_any(rows, *static_cast<const QuantX*>(prepared), m0, w, scale, y, ldy, n0, n1);
#else
  TORCH_CHECK(false, "W8A16 path not built");
#endif
}

void bf16_dot(int rows, const void* prepared, int64_t m0, const at::BFloat16* w, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
#ifdef MIXTRAL_BF16DOT
  bf16_any(rows, *static_cast<const Bf16X*>(prepared), m0, w, y, ldy, n0, n1);
#else
  TORCH_CHECK(false, "bf16 dot path not built");
#endif
}

}  // namespace mixtral_dots
