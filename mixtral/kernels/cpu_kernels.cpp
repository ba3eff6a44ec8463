// Bandwidth-bound CPU kernels for decoding: y = x · Wᵀ for a few rows of x, reading each weight
// row once for all rows of x, with fp32, bf16 or int8 (per-row scale) weights; and the whole
// top-k MoE layer for a few tokens, grouped by expert so each selected expert is streamed once.
//
// Why: torch's fp32 kernels stream a 1×1024 @ 1024×3584 GEMV at ~14 GB/s on a 2-core AVX2 machine
// that reads ~32 GB/s, and 2–8 rows cost 2–4× one row. Here every weight row is loaded once and
// multiplied into up to 8 accumulators (one per row of x), so cost follows weight bytes.
// Vectors use GCC/Clang vector extensions; compiled with -O3 -march=native they become AVX2/FMA
// (or AVX-512, NEON) without intrinsics.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_dots.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int8_t v8i8 __attribute__((vector_size(8)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

constexpr int kMaxRows = 8;

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#if defined(__AVX2__)
// GCC scalarises __builtin_convertvector from 8-bit and 16-bit lanes, so widen with AVX2 directly.
inline v8f load8(const int8_t* p) {
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<v8f>(_mm256_cvtepi32_ps(w));
}
inline v8f load8(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<v8f>(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
}
#else
inline v8f load8(const int8_t* p) {
  v8i8 q;
  std::memcpy(&q, p, sizeof(q));
  return __builtin_convertvector(q, v8f);
}
inline v8f load8(const at::BFloat16* p) {  // bf16 is the top half of an fp32
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  v8u32 w = __builtin_convertvector(h, v8u32) << 16;
  v8f f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}
#endif
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// y[m * ldy + n] = scale[n] * dot(x[m, :K], w[n, :K]) for m < M, n in [n0, n0 + R): R weight rows
// at once, U accumulators along k per (row of w, row of x), so that R·M·U independent FMA chains
// hide the latency; x vectors are reused across the R rows of w.
template <typename W, int M, int R, int U>
inline void rows_dot_block(const float* x, int64_t K, const W* w, const float* scale, float* y, int64_t ldy,
                           int64_t n0) {
  const int64_t KU = K - K % (8 * U), K8 = K - K % 8;
  v8f acc[R][M][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = v8f{};
  // The unroll pragmas make the small fixed loops disappear, so acc and wv live in registers.
  for (int64_t k = 0; k < KU; k += 8 * U) {
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      v8f wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = load8(w + (n0 + r) * K + k + 8 * u);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const v8f xv = load8(x + m * K + k + 8 * u);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][m][u] += wv[r] * xv;
      }
    }
  }
  for (int64_t k = KU; k < K8; k += 8) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const v8f wv = load8(w + (n0 + r) * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[r][m][0] += wv * load8(x + m * K + k);
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wr = w + (n0 + r) * K;
    for (int m = 0; m < M; ++m) {
      v8f a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a += acc[r][m][u];
      float s = hsum(a);
      for (int64_t k = K8; k < K; ++k) s += to_float(wr[k]) * x[m * K + k];
      y[m * ldy + n0 + r] = scale ? s * scale[n0 + r] : s;
    }
  }
}

// Vector registers: 32 with AVX-512 (its VL extension gives 256-bit ops all 32), else 16.
#if defined(__AVX512VL__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

template <typename W, int M>
void rows_dot(const float* x, int64_t K, const W* w, const float* scale, float* y, int64_t ldy,
              int64_t n0, int64_t n1) {
  // Up to 4 rows of x, one weight row at a time (R = 1) with U accumulators along k: the weights
  // are then read as ONE sequential stream, which the hardware prefetchers follow; R rows at once
  // are R short interleaved streams (a 1024-wide fp32 row is one 4 KiB page) and streamed 20-40%
  // slower from DRAM here (32000x1024 fp32, 2 threads: 1 row of x 25.8 -> 32.0 GB/s, 2 rows 21.8
  // -> 31.2). From 5 rows of x the kernel is compute-bound and reusing each x vector across R
  // weight rows pays (the 32000x1024 output head at 8 rows: 14.0 -> 9.1 ms with R = 3).
  constexpr int R = M <= 4 ? 1 : std::max(1, std::min(4, (kVecRegs - 2) / (M + 1)));
  constexpr int U = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows_dot_block<W, M, R, U>(x, K, w, scale, y, ldy, n);
  for (; n < n1; ++n) rows_dot_block<W, M, 1, U>(x, K, w, scale, y, ldy, n);
}

template <typename W>
void rows_dot_any(int M, const float* x, int64_t K, const W* w, const float* scale, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  switch (M) {
    case 1: return rows_dot<W, 1>(x, K, w, scale, y, ldy, n0, n1);
    case 2: return rows_dot<W, 2>(x, K, w, scale, y, ldy, n0, n1);
    case 3: return rows_dot<W, 3>(x, K, w, scale, y, ldy, n0, n1);
    case 4: return rows_dot<W, 4>(x, K, w, scale, y, ldy, n0, n1);
    case 5: return rows_dot<W, 5>(x, K, w, scale, y, ldy, n0, n1);
    case 6: return rows_dot<W, 6>(x, K, w, scale, y, ldy, n0, n1);
    case 7: return rows_dot<W, 7>(x, K, w, scale, y, ldy, n0, n1);
    default: return rows_dot<W, 8>(x, K, w, scale, y, ldy, n0, n1);
  }
}

// Rows [m0, m0 + rows) of x times weight rows [n0, n1): W8A16 for int8 weights, bf16 dot products
// for bf16 weights with bf16 activations (both in cpu_dots.cpp) when x was prepared for them, else
// the fp32 widening path.
template <typename W>
inline void dot_rows(int rows, const float* x, const void* qx, int64_t m0, int64_t K, const W* w,
                     const float* scale, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if constexpr (std::is_same_v<W, int8_t>) {
    if (qx) return mixtral_dots::int8_dot(rows, qx, m0, w, scale, y, ldy, n0, n1);
  }
  if constexpr (std::is_same_v<W, at::BFloat16>) {
    // From 5 rows of x both paths are compute-bound and the widening one measured faster (8 rows
    // of x through 8 experts: 16.4 ms widening, 19.1 ms with dot products; at 1-4 rows the dot
    // products stream at ~25 GB/s, 1.1-1.65x the widening path).
    if (qx && !scale && rows <= 4) return mixtral_dots::bf16_dot(rows, qx, m0, w, y, ldy, n0, n1);
  }
  rows_dot_any<W>(rows, x + m0 * K, K, w, scale, y, ldy, n0, n1);
}

// x prepared for the W8A16 path (int8 weights) or the bf16 dot path (bf16 weights and bf16_x: the
// caller's activations are bf16) when this build has it; else nothing (the fp32 widening path).
template <typename W>
std::shared_ptr<void> maybe_quantize(const float* x, int64_t M, int64_t K, bool bf16_x) {
  if constexpr (std::is_same_v<W, int8_t>) return mixtral_dots::prepare_int8_x(x, M, K);
  if constexpr (std::is_same_v<W, at::BFloat16>) {
    if (bf16_x) return mixtral_dots::prepare_bf16_x(x, M, K);
  }
  return nullptr;
}

// y [M, N] = x [M, K] · w [N, K]ᵀ (· scale[n]), weight rows split across threads.
template <typename W>
void matmul_nt(const float* x, int64_t M, int64_t K, const W* w, const float* scale, int64_t N,
               float* y, bool bf16_x) {
  // ~16 KiB of weights per task keeps scheduling cheap next to the streaming work.
  const int64_t grain = std::max<int64_t>(16, 16384 / std::max<int64_t>(1, K * sizeof(W)));
  const std::shared_ptr<void> qx = maybe_quantize<W>(x, M, K, bf16_x);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
      dot_rows<W>(rows, x, qx.get(), m0, K, w, scale, y + m0 * N, N, n0, n1);
    }
  });
}

// h [M, F] = silu(x · w1ᵀ) ⊙ (x · w3ᵀ), in blocks of 64 rows of w1 and w3 per step of a task.
template <typename W>
void swiglu_nt(const float* x, int64_t M, int64_t D, const W* w1, const W* w3, const float* s1,
               const float* s3, int64_t F, float* h, bool bf16_x) {
  constexpr int64_t kBlock = 64;
  const int64_t grain = std::max<int64_t>(16, 16384 / std::max<int64_t>(1, D * sizeof(W)));
  const std::shared_ptr<void> qx = maybe_quantize<W>(x, M, D, bf16_x);
  at::parallel_for(0, F, grain, [&](int64_t n0, int64_t n1) {
    float a[kMaxRows * kBlock], b[kMaxRows * kBlock];
    for (int64_t nb = n0; nb < n1; nb += kBlock) {
      const int64_t nn = std::min(kBlock, n1 - nb);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, M - m0));
        // Shift the pointers so that rows [nb, nb + nn) land in a[0 .. nn) (ldy = kBlock).
        dot_rows<W>(rows, x, qx.get(), m0, D, w1 + nb * D, s1 ? s1 + nb : nullptr, a, kBlock, 0, nn);
        dot_rows<W>(rows, x, qx.get(), m0, D, w3 + nb * D, s3 ? s3 + nb : nullptr, b, kBlock, 0, nn);
        for (int m = 0; m < rows; ++m)
          for (int64_t j = 0; j < nn; ++j) {
            const float g = a[m * kBlock + j];
            h[(m0 + m) * F + nb + j] = g / (1.0f + std::exp(-g)) * b[m * kBlock + j];
          }
      }
    }
  });
}

void check_weight(const torch::Tensor& w, const char* name) {
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 ||
                  w.scalar_type() == at::kChar,
              name, " must be float32, bfloat16 or int8, got ", w.scalar_type());
}

const float* scale_ptr(const c10::optional<torch::Tensor>& s) {
  return s.has_value() && s->defined() ? s->data_ptr<float>() : nullptr;
}

template <typename Fn>
void by_dtype(at::ScalarType t, Fn&& fn) {
  if (t == at::kFloat) fn(float{});
  else if (t == at::kBFloat16) fn(at::BFloat16{});
  else fn(int8_t{});
}

}  // namespace

// y [M, N] = x [M, K] · wᵀ, w [N, K] in float32 / bfloat16 / int8 with per-row scale [N].
// bf16 x (with bf16 w) computes with bf16 dot products where the CPU has them; y is float32.
torch::Tensor linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a 2-D float32 or bfloat16 tensor");
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  x = x.to(at::kFloat);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "w must be [N, K] with K = x.size(1)");
  check_weight(w, "w");
  TORCH_CHECK(w.scalar_type() != at::kChar || scale.has_value(), "int8 weights need a scale");
  x = x.contiguous();
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  by_dtype(w.scalar_type(), [&](auto tag) {
    using W = decltype(tag);
    matmul_nt<W>(x.data_ptr<float>(), x.size(0), x.size(1), static_cast<const W*>(w.data_ptr()),
                 scale_ptr(scale), w.size(0), y.data_ptr<float>(), bf16_x);
  });
  return y;
}

// w [..., N, K] = q (int8) · scale[..., N] in float32 or bfloat16 (rounded to nearest even), rows in
// parallel: what prefill multiplies with. torch's `(q.float() * s).to(bf16)` takes three passes and
// two fresh fp32 buffers (114 ms for a 32000x1024 matrix here).
torch::Tensor dequantize(torch::Tensor q, torch::Tensor scale, at::ScalarType dtype) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() >= 2, "q must be an int8 tensor [..., N, K]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() * q.size(-1) == q.numel(),
              "scale must be float32 with one value per row of q");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16");
  TORCH_CHECK(q.size(-1) > 0, "q must have at least one column");
  q = q.contiguous();
  scale = scale.contiguous();
  auto out = torch::empty(q.sizes(), q.options().dtype(dtype));
  const int64_t K = q.size(-1), rows = q.numel() / K;
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* out_f = dtype == at::kFloat ? out.data_ptr<float>() : nullptr;
  uint16_t* out_h = dtype == at::kFloat ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int8_t* qr = qp + r * K;
      const float s = sp[r];
      if (out_f) {
        float* o = out_f + r * K;
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(qr[k]) * s;
      } else {
        uint16_t* o = out_h + r * K;
        for (int64_t k = 0; k < K; ++k) {
          uint32_t bits;
          const float v = static_cast<float>(qr[k]) * s;
          std::memcpy(&bits, &v, sizeof(bits));
          o[k] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // finite: RNE
        }
      }
    }
  });
  return out;
}

// Top-k MoE for a few tokens: y [T, D] = Σ_k weights[t, k] · expert_{ids[t, k]}(x[t]).
// w1, w3 [E, F, D], w2 [E, D, F]; s1, s3 [E, F] and s2 [E, D] scales for int8 weights.
torch::Tensor moe(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w1,
                  torch::Tensor w3, torch::Tensor w2, c10::optional<torch::Tensor> s1,
                  c10::optional<torch::Tensor> s3, c10::optional<torch::Tensor> s2) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a 2-D float32 or bfloat16 tensor");
  // bf16 x: a bf16 model; with bf16 weights, dot products in bf16 (the SwiGLU output is rounded to
  // bf16 before w2, as the model's own bf16 matmuls round it). The result has x's dtype.
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  const auto out_dtype = x.scalar_type();
  x = x.to(at::kFloat);
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0), "ids must be [T, K]");
  TORCH_CHECK(weights.sizes() == ids.sizes() && weights.scalar_type() == at::kFloat,
              "weights must be float32 [T, K]");
  check_weight(w1, "w1");
  check_weight(w3, "w3");
  check_weight(w2, "w2");
  TORCH_CHECK(w1.scalar_type() == w2.scalar_type() && w1.scalar_type() == w3.scalar_type(),
              "w1, w2, w3 must share a dtype");
  TORCH_CHECK(w1.scalar_type() != at::kChar || (s1.has_value() && s3.has_value() && s2.has_value()),
              "int8 expert weights need scales s1, s3, s2");
  const int64_t T = x.size(0), K = ids.size(1), E = w1.size(0), F = w1.size(1), D = w1.size(2);
  TORCH_CHECK(x.size(1) == D && w2.size(0) == E && w2.size(1) == D && w2.size(2) == F,
              "expert weight shapes disagree with x");
  x = x.contiguous();
  auto ids_c = ids.to(at::kLong).contiguous();
  auto wts = weights.contiguous();
  const int64_t* id = ids_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < E, "expert id out of range");

  // Counting sort of the T·K (token, slot) pairs by expert.
  std::vector<int64_t> start(E + 1, 0), order(T * K);
  for (int64_t i = 0; i < T * K; ++i) ++start[id[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < T * K; ++i) order[fill[id[i]]++] = i;

  auto y = torch::zeros({T, D}, x.options());
  auto xs = torch::empty({T * K, D}, x.options());
  auto hs = torch::empty({T * K, F}, x.options());
  auto os = torch::empty({T * K, D}, x.options());
  const float* xp = x.data_ptr<float>();
  float *xsp = xs.data_ptr<float>(), *hsp = hs.data_ptr<float>(), *osp = os.data_ptr<float>();
  for (int64_t i = 0; i < T * K; ++i) std::memcpy(xsp + i * D, xp + (order[i] / K) * D, D * sizeof(float));
  const float *s1p = scale_ptr(s1), *s3p = scale_ptr(s3), *s2p = scale_ptr(s2);
  by_dtype(w1.scalar_type(), [&](auto tag) {
    using W = decltype(tag);
    const W *w1p = static_cast<const W*>(w1.data_ptr()), *w3p = static_cast<const W*>(w3.data_ptr()),
            *w2p = static_cast<const W*>(w2.data_ptr());
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = start[e], m = start[e + 1] - start[e];
      if (m == 0) continue;
      swiglu_nt<W>(xsp + r0 * D, m, D, w1p + e * F * D, w3p + e * F * D, s1p ? s1p + e * F : nullptr,
                   s3p ? s3p + e * F : nullptr, F, hsp + r0 * F, bf16_x);
      matmul_nt<W>(hsp + r0 * F, m, F, w2p + e * D * F, s2p ? s2p + e * D : nullptr, D, osp + r0 * D, bf16_x);
    }
  });
  // Combine in slot order k = 0..K-1 per token, as the reference sums them.
  std::vector<int64_t> pos(T * K);
  for (int64_t i = 0; i < T * K; ++i) pos[order[i]] = i;
  float* yp = y.data_ptr<float>();
  const float* wp = wts.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) {
      const float g = wp[t * K + k];
      const float* o = osp + pos[t * K + k] * D;
      for (int64_t d = 0; d < D; ++d) yp[t * D + d] += g * o[d];
    }
  return y.to(out_dtype);
}

// Whether int8 weights take the W8A16 VNNI path in this build (else the fp32 widening path).
bool has_bf16_dot() { return mixtral_dots::has_bf16_dot(); }

// Whether int8 weights take the W8A16 VNNI path in this build (else the fp32 widening path).
bool has_w8a16() { return mixtral_dots::has_w8a16(); }

TORCH_LIBRARY(mixtral_cpu, m) {
  m.def("has_w8a16() -> bool", &has_w8a16);  // no tensor arguments: catch-all kernels
  m.def("has_bf16_dot() -> bool", &has_bf16_dot);
  m.def("linear(Tensor x, Tensor w, Tensor? scale) -> Tensor");
  m.def("dequantize(Tensor q, Tensor scale, ScalarType dtype) -> Tensor");
  m.def(
      "moe(Tensor x, Tensor ids, Tensor weights, Tensor w1, Tensor w3, Tensor w2, Tensor? s1, "
      "Tensor? s3, Tensor? s2) -> Tensor");
}

TORCH_LIBRARY_IMPL(mixtral_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("dequantize", &dequantize);
  m.impl("moe", &moe);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
