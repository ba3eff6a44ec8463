// Decode kernels for group-wise quantized weights (llama.cpp's Q4_0 and Q8_0 blocks, see
// mixtral/quant/group.py, the definition these are tested against): y = x · ŵᵀ for a few rows of x,
// and the whole top-k MoE layer for a few tokens, each selected expert streamed once.
//
// As llama.cpp does, x is quantized per row and per block of 32 to int8 (Q8_0's rule, fp32 scale),
// every block's integer dot product is exact (int32), and dot · d_x · d_w is accumulated in fp32.
// With AVX-512 VNNI + BW + VL, vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes into 16 int32
// lanes (4 products each) in one instruction; one step of a weight row is 64 bytes:
//
// - int4: 4 blocks of 32 values. The bytes' low nibbles (b & 15: values 0-15 of each block, 16 bytes a
//   block) and high nibbles (values 16-31) are two vectors of unsigned n in [0, 15], each multiplied
//   by the matching 64 signed activations into one int32 vector that starts at -8 · (the lane's 8
//   activations' sum, prepared with them): Σ n·x - 8·Σ x = Σ (n - 8)·x. Lane i (bytes 4i..4i+3)
//   belongs to block i / 4. From 4 rows of x per tile, the correction goes to the weights' side (no
//   correction to load per row of x): n - 8 signed (gf2p8affineqb), x + 128 unsigned, the start
//   -128 · (the lane's weights' sum) computed once per weight row.
// - int8: 2 blocks; the weights signed, x + 128 unsigned (prepared so), the same weights'-side start.
//   Lane i belongs to block i / 8.
//
// Every partial sum is exact (|lane| < 2^17), and so is its conversion to fp32; each lane is
// multiplied into fp32 accumulators by d_w[block] · d_x[block] (the product rounded to fp32).
//
// The activations of a call are prepared once, step-major ([step][row of x], see Lay; in qmoe each
// expert's rows apart, so that its activations are dense: interleaved with the other experts' rows,
// int8 8x7B experts streamed ~15% slower). Weight rows are read once for up to 8 rows of x (more
// rows: tiles of up to 8; the weight row then comes from cache), in passes of 1, 2 or 4 weight rows
// that share each activation load, and prefetched into L2 ahead of use. On this kind of CPU (Zen 4:
// one 64-byte load per cycle, 512-bit operations double pumped) loads limit the loop as much as vector
// operations do: each value is loaded once into a register; the int4 loop takes ~6 cycles per 64
// weight bytes from L1/L2 (one row of x).
//
// Threads: a call is one OpenMP region (none for small matrices), each thread a contiguous share of
// the weight rows. qmoe does the whole layer in one region with two barriers: the rows of x (one per
// (token, slot) pair, sorted by expert) are quantized (blocks split among threads); each thread
// computes the w1 and w3 rows of every selected expert in the same passes (a and b) for its share of F,
// then h = silu(a)·b and h's quantization for those columns (cut at multiples of 128, its blocks are
// its own); then w2 rows of every selected expert for its share of D, and the weighted sum over the k
// slots of those outputs. Scratch memory is kept per calling thread between calls. silu(a)·b is
// computed as torch computes it for fp32 with AVX-512, with torch's own vector exp (Sleef's
// expf16_u10, exported by libtorch_cpu), so bit-identical to at::silu(a) * b (checked once per
// process against at::silu; otherwise, or for F >= 32768 where at::silu splits the row into
// chunks, at::silu runs between two regions instead).
//
// Elsewhere, or with MIXTRAL_NO_QGROUP_VNNI=1 (read once per process), a scalar loop with the same
// integer arithmetic and the same activation quantization runs instead.

#include <torch/extension.h>

#include "cpu_ops.h"
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#define MIXTRAL_QGROUP_VNNI 1
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#ifdef MIXTRAL_QGROUP_VNNI
// torch's vector exp for fp32 with AVX-512 (exported by libtorch_cpu); weak: absent, at::silu is used.
extern "C" __attribute__((weak)) __m512 Sleef_expf16_u10(__m512);
#endif

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

// ---- threads and scratch -------------------------------------------------------------------------

// Threads for a call: torch's setting, 1 inside a parallel region.
int team_size() {
  if (at::in_parallel_region()) return 1;
  return std::max(1, at::get_num_threads());
}

// f(tid, nth) on nth threads of one OpenMP region (as at::parallel_for's: no num_threads clause),
// serially with (0, 1) for nth <= 1. `barrier` in f synchronises them (a no-op with one thread).
template <class F>
void run_team(int nth, const F& f) {
#ifdef _OPENMP
  if (nth > 1) {
#pragma omp parallel
    { f(omp_get_thread_num(), omp_get_num_threads()); }
    return;
  }
#endif
  (void)nth;
  f(0, 1);
}

inline void barrier(int nth) {
#ifdef _OPENMP
  if (nth > 1) {
#pragma omp barrier
  }
#endif
  (void)nth;
}

// The largest team a region may have here (scratch is allocated per thread up to this).
int max_team(int nth) {
#ifdef _OPENMP
  return std::max(nth, omp_get_max_threads());
#else
  return nth;
#endif
}

// [begin, end) of part `tid` of `nth` of n items, the cuts at multiples of `align` (the last at n).
inline void split(int64_t n, int64_t align, int tid, int nth, int64_t& begin, int64_t& end) {
  auto cut = [&](int64_t t) { return t >= nth ? n : std::min(n, (n * t / nth + align / 2) / align * align); };
  begin = cut(tid);
  end = cut(tid + 1);
}

// Scratch memory of the calling thread, kept between calls (up to kKeep bytes), 64-byte aligned pieces.
class Arena {
 public:
  static constexpr size_t kKeep = size_t(64) << 20;
  explicit Arena(size_t bytes) {
    static thread_local std::unique_ptr<char, decltype(&std::free)> kept(nullptr, &std::free);
    static thread_local size_t kept_size = 0;
    bytes = (bytes + 63) / 64 * 64;
    if (bytes <= kept_size) {
      base_ = kept.get();
    } else if (bytes <= kKeep) {
      kept.reset(static_cast<char*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(kept, "out of memory (", bytes, " bytes of scratch)");
      kept_size = bytes;
      base_ = kept.get();
    } else {
      own_.reset(static_cast<char*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(own_, "out of memory (", bytes, " bytes of scratch)");
      base_ = own_.get();
    }
  }
  template <class T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += (count * sizeof(T) + 63) / 64 * 64;
    return p;
  }
  static size_t size_of(size_t bytes) { return (bytes + 63) / 64 * 64; }

 private:
  char* base_ = nullptr;
  size_t used_ = 0;
  std::unique_ptr<char, decltype(&std::free)> own_{nullptr, &std::free};
};

// ---- activation quantization ---------------------------------------------------------------------

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

// The VNNI layout of prepared activations, per step of SB blocks (64 weight bytes), each [step][row],
// in separate dense arrays (a kernel reads only what it needs):
// - int4: the step's 128 int8 values (64 partners of the low nibbles, then 64 of the high ones), the
//   16 int32 corrections -8 · (the lane's 8 values' sum), and d_x (4 fp32);
// - int8: the step's 64 values + 128 as unsigned bytes (x ^ 0x80), and d_x (2 fp32).
template <int BITS>
struct Lay {
  static constexpr int64_t SB = BITS == 4 ? 4 : 2;     // blocks per step
  static constexpr int64_t QB = BITS == 4 ? 128 : 64;  // activation bytes per step
};
#endif

// M rows of x quantized per block of 32. VNNI: activations X, corrections C (int4) and d_x D (see Lay),
// each laid out per segment of rows (qmoe: the rows of one expert; else all M rows), segment after
// segment, [step][row of the segment] within; else q int8 [M, K] and d_x [M, K/32].
struct Acts {
  int64_t M = 0, K = 0, nb = 0, ns = 0, qb = 0, sb = 0;  // VNNI: steps, bytes and blocks per step
  uint8_t* X = nullptr;
  int32_t* C = nullptr;
  float* D = nullptr;
  int8_t* q = nullptr;
  float* dx = nullptr;
  const int64_t* seg0 = nullptr;  // per row: its segment's first row and number of rows (null: [0, M))
  const int64_t* segn = nullptr;
  // Index of the record of row m at step s (X + index · qb, C + index · 16, D + index · sb).
  int64_t rec(int64_t s, int64_t m) const {
    const int64_t r0 = seg0 ? seg0[m] : 0, n = segn ? segn[m] : M;
    return ns * r0 + s * n + (m - r0);
  }
};

size_t acts_bytes(int64_t M, int64_t K, int bits, bool vnni) {
  const int64_t nb = K / kAB;
#ifdef MIXTRAL_QGROUP_VNNI
  if (vnni) {
    const int64_t sb = bits == 4 ? Lay<4>::SB : Lay<8>::SB, qb = bits == 4 ? Lay<4>::QB : Lay<8>::QB;
    const int64_t ns = (nb + sb - 1) / sb;
    return Arena::size_of(size_t(ns * M * qb)) + (bits == 4 ? Arena::size_of(size_t(ns * M * 64)) : 0) +
           Arena::size_of(size_t(ns * M * sb) * sizeof(float));
  }
#endif
  (void)bits;
  (void)vnni;
  return Arena::size_of(size_t(M * K)) + Arena::size_of(size_t(M * nb) * sizeof(float));
}

Acts make_acts(Arena& arena, int64_t M, int64_t K, int bits, bool vnni) {
  Acts a;
  a.M = M;
  a.K = K;
  a.nb = K / kAB;
#ifdef MIXTRAL_QGROUP_VNNI
  if (vnni) {
    a.sb = bits == 4 ? Lay<4>::SB : Lay<8>::SB;
    a.qb = bits == 4 ? Lay<4>::QB : Lay<8>::QB;
    a.ns = (a.nb + a.sb - 1) / a.sb;
    a.X = arena.take<uint8_t>(size_t(a.ns * M * a.qb));
    if (bits == 4) a.C = arena.take<int32_t>(size_t(a.ns * M * 16));
    a.D = arena.take<float>(size_t(a.ns * M * a.sb));
    return a;
  }
#endif
  (void)bits;
  (void)vnni;
  a.q = arena.take<int8_t>(size_t(M * K));
  a.dx = arena.take<float>(size_t(M * a.nb));
  return a;
}

#ifdef MIXTRAL_QGROUP_VNNI
// Blocks [b0, b1) of row m (x points at the row's first value) into the records; b1 = nb also zeroes
// the missing blocks of the last step.
template <int BITS>
void pack_blocks(const float* x, int64_t b0, int64_t b1, const Acts& A, int64_t m) {
  using L = Lay<BITS>;
  alignas(32) int8_t q[kAB];
  const __m256i ones = _mm256_set1_epi8(1);
  for (int64_t b = b0; b < b1; ++b) {
    const float d = quantize_block_avx512(x + b * kAB, q);
    const int64_t i = A.rec(b / L::SB, m);
    uint8_t* rec = A.X + i * L::QB;
    float* dx = A.D + i * L::SB;
    const int64_t j = b % L::SB;
    const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
    if constexpr (BITS == 4) {
      int32_t* corr = A.C + i * 16;
      const __m256i sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ones, qv);  // Σ of each 4 values
      _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + 16 * j), _mm256_castsi256_si128(qv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(rec + 64 + 16 * j), _mm256_extracti128_si256(qv, 1));
      // lane 4j + l: values 4l..4l+3 and 16+4l..16+4l+3 of the block, times -8
      const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(corr + 4 * j), _mm_sub_epi32(_mm_setzero_si128(), _mm_slli_epi32(s4, 3)));
      dx[j] = d;
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rec + 32 * j), _mm256_xor_si256(qv, _mm256_set1_epi8(char(0x80))));
      dx[j] = d;
    }
  }
  if (b1 == A.nb && A.nb % L::SB != 0) {
    const int64_t i = A.rec(A.nb / L::SB, m);
    uint8_t* rec = A.X + i * L::QB;
    float* dx = A.D + i * L::SB;
    for (int64_t j = A.nb % L::SB; j < L::SB; ++j) {  // x = 0
      if constexpr (BITS == 4) {
        std::memset(rec + 16 * j, 0, 16);
        std::memset(rec + 64 + 16 * j, 0, 16);
        std::memset(A.C + i * 16 + 4 * j, 0, 16);
      } else {
        std::memset(rec + 32 * j, 0x80, 32);
      }
      dx[j] = 0.0f;
    }
  }
}
#endif

// Blocks [b0, b1) of row m of A from x (the row's first value).
void quantize_blocks(int bits, bool vnni, const float* x, int64_t b0, int64_t b1, const Acts& A, int64_t m) {
#ifdef MIXTRAL_QGROUP_VNNI
  if (vnni) {
    if (bits == 4) return pack_blocks<4>(x, b0, b1, A, m);
    return pack_blocks<8>(x, b0, b1, A, m);
  }
#endif
  (void)bits;
  (void)vnni;
  for (int64_t b = b0; b < b1; ++b) A.dx[m * A.nb + b] = quantize_block(x + b * kAB, A.q + m * A.K + b * kAB);
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

// A weight row's fp16 group scales as one fp32 per block of 32, zeros after nb up to a multiple of 4.
inline void fill_dw(const at::Half* s, int64_t ng, int64_t per, int64_t nb, float* out) {
#ifdef MIXTRAL_QGROUP_VNNI
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
#else
  for (int64_t b = 0; b < nb; ++b) out[b] = static_cast<float>(s[b / per]);
#endif
  for (int64_t b = nb; b < (nb + 3) / 4 * 4; ++b) out[b] = 0.0f;
}

// Rows [m0, m0 + mc) of x times weight rows [n0, n1): y[(m - m0) * ldy + n]. dw: scratch for nb + 4
// floats.
void scalar_rows(int bits, const Acts& A, int64_t m0, int64_t mc, const uint8_t* w, int64_t wstride,
                 const at::Half* s, int64_t ng, float* y, int64_t ldy, int64_t n0, int64_t n1, float* dw) {
  const int64_t nb = A.nb, per = nb / ng, bb = bits == 8 ? kAB : kAB / 2;
  for (int64_t n = n0; n < n1; ++n) {
    fill_dw(s + n * ng, ng, per, nb, dw);
    const uint8_t* wr = w + n * wstride;
    for (int64_t m = m0; m < m0 + mc; ++m) {
      const int8_t* xq = A.q + m * A.K;
      const float* dxm = A.dx + m * nb;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b)
        acc += static_cast<float>(block_dot(bits, xq + b * kAB, wr + b * bb)) * (dxm[b] * dw[b]);
      y[(m - m0) * ldy + n] = acc;
    }
  }
}

// ---- AVX-512 VNNI path ---------------------------------------------------------------------------
#ifdef MIXTRAL_QGROUP_VNNI

// Weights are prefetched into L2 this far ahead of their use: without it, rows longer than ~8K values
// streamed from DRAM ~1.5x slower (4096x14336 int8 matrix, one row of x: 5.2 -> 2.9 ms on 1 core).
constexpr int64_t kPrefetch = 12288;
// int4 tiles of up to this many rows of x read 4 weight rows per pass, larger ones and int8 2: the
// activations' loads are shared by the weight rows of a pass (this CPU runs one 64-byte load a cycle,
// about as many as vector operations). Except int8 rows of 4 KB and more with up to 4 rows of x, read
// one at a time (the pair of w1 and w3 rows in qmoe): streamed from DRAM, one such stream per thread
// runs ~5-10% faster than two (4096x14336, 14336x4096). From kWsideRows rows of x, int4 puts the
// correction on the weights' side, as int8 always does (see vnni_step).
constexpr int64_t kQuadRows = 2, kWsideRows = 4;

// One step (64 weight bytes, SB blocks) for R weight rows and MT rows of x: x, c, dx = the step's
// activations, corrections and d_x of the tile's first row, w[r], dw[r] = the rows' bytes and block
// scales at this step; the rows' bytes pf ahead are prefetched.
// - int4, !WS: unsigned nibbles n times the signed activations, starting from the correction -8·Σ x.
// - WS (int8 always, int4 with many rows of x: nothing to load per row of x but its values): the
//   signed weights ws (n - 8, or w) times the activations + 128 as unsigned bytes, starting from
//   -128 · (the lane's weights' sum), computed once per weight row: Σ (ws + 128)·(-128) + 4·128·128
//   per vpdpbusd.
template <int BITS, int MT, int R, bool TAIL, bool WS>
__attribute__((always_inline)) inline void vnni_step(const uint8_t* x, const int32_t* c, const float* dx,
                                                     const uint8_t* const (&w)[R], const float* const (&dw)[R],
                                                     int64_t pf, __mmask64 tail, __m512i idx, __m512 (&acc)[R][MT]) {
  static_assert(BITS == 4 || WS, "int8 takes the correction on the weights' side");
  using L = Lay<BITS>;
  const __m512i m128 = _mm512_set1_epi8(char(0x80)), low4 = _mm512_set1_epi8(0x0F);
  __m512i lo[R], hi[R], st[R];
  __m128 dws[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(w[r] + pf), _MM_HINT_T1);
    __m512i b = TAIL ? _mm512_maskz_loadu_epi8(tail, w[r]) : _mm512_loadu_si512(w[r]);
    // Loaded once into a register (GCC would otherwise read it again as a memory operand of each use:
    // loads, not vector operations, are what this loop runs short of).
    asm("" : "+v"(b));
    if constexpr (BITS == 4) {
      if constexpr (!WS) {  // unsigned nibbles (shift and mask: cheaper here than gf2p8affineqb)
        lo[r] = _mm512_and_si512(b, low4);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
      } else {  // n - 8 as int8
#if defined(__GFNI__)
        // GF(2) affine map per byte (the row of output bit i in byte 7 - i of the qword): bits 0-2 =
        // the nibble's bits 0-2, bits 3-7 = its bit 3, then ^ 0xF8 = n - 8.
        lo[r] = _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64(0x0102040808080808ll), 0xF8);
        hi[r] = _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64(0x1020408080808080ll), 0xF8);
#else
        lo[r] = _mm512_sub_epi8(_mm512_and_si512(b, low4), _mm512_set1_epi8(8));
        hi[r] = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(b, 4), low4), _mm512_set1_epi8(8));
#endif
        st[r] = _mm512_dpbusd_epi32(
            _mm512_dpbusd_epi32(_mm512_set1_epi32(2 * 65536), _mm512_xor_si512(lo[r], m128), m128),
            _mm512_xor_si512(hi[r], m128), m128);
      }
      dws[r] = _mm_loadu_ps(dw[r]);
    } else {
      lo[r] = b;
      st[r] = _mm512_dpbusd_epi32(_mm512_set1_epi32(65536), _mm512_xor_si512(b, m128), m128);
      dws[r] = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dw[r])));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const uint8_t* xm = x + m * L::QB;
    __m512i x0 = _mm512_load_si512(xm), x1 = x0, corr = x0;
    if constexpr (BITS == 4) {
      x1 = _mm512_load_si512(xm + 64);
      if constexpr (WS) {
        x0 = _mm512_xor_si512(x0, m128);
        x1 = _mm512_xor_si512(x1, m128);
      } else {
        corr = _mm512_load_si512(c + 16 * m);
        asm("" : "+v"(corr));
      }
    }
    asm("" : "+v"(x0), "+v"(x1));  // once per row of x, shared by the R weight rows
    const __m128 dxm = BITS == 4 ? _mm_loadu_ps(dx + 4 * m)
                                 : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(dx + 2 * m)));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i d;
      if constexpr (WS) {
        d = _mm512_dpbusd_epi32(st[r], x0, lo[r]);
        if constexpr (BITS == 4) d = _mm512_dpbusd_epi32(d, x1, hi[r]);
      } else {
        d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo[r], x0), hi[r], x1);
      }
      // d_w · d_x per block, the lanes' scales
      const __m512 scale = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_mul_ps(dws[r], dxm)));
      acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale, acc[r][m]);
    }
  }
}

// y[r][m * ldy] for MT rows of x (x, c, dx: their activations, corrections and d_x at step 0, M rows
// per step) and R weight rows (w[r] their bytes, dw[r] their block scales, prefetched pf ahead).
template <int BITS, int MT, int R, int U, bool WS>
void vnni_tile(const uint8_t* x, const int32_t* c, const float* dx, int64_t M, int64_t nb,
               const uint8_t* const (&w)[R], const float* const (&dw)[R], float* const (&y)[R], int64_t ldy,
               int64_t pf) {
  using L = Lay<BITS>;
  const int64_t xstep = M * L::QB, cstep = BITS == 4 ? M * 16 : 0, dstep = M * L::SB;
  // Lane l's block within the step: int4 l / 4, int8 l / 8.
  const __m512i idx = BITS == 8 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[U][R][MT];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[u][r][m] = _mm512_setzero_ps();
  const int64_t full = nb / L::SB;
  const uint8_t* wp[R];
  const float* dp[R];
  for (int r = 0; r < R; ++r) wp[r] = w[r], dp[r] = dw[r];
  auto adv = [&](int64_t steps) {
    for (int r = 0; r < R; ++r) wp[r] += 64 * steps, dp[r] += L::SB * steps;
    x += xstep * steps;
    c += cstep * steps;
    dx += dstep * steps;
  };
  int64_t s = 0;
  for (; s + U <= full; s += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const uint8_t* wu[R];
      const float* du[R];
      for (int r = 0; r < R; ++r) wu[r] = wp[r] + 64 * u, du[r] = dp[r] + L::SB * u;
      vnni_step<BITS, MT, R, false, WS>(x + xstep * u, c + cstep * u, dx + dstep * u, wu, du, pf, 0, idx, acc[u]);
    }
    adv(U);
  }
  for (; s < full; ++s) {
    vnni_step<BITS, MT, R, false, WS>(x, c, dx, wp, dp, pf, 0, idx, acc[0]);
    adv(1);
  }
  if (nb % L::SB) {  // the last step's missing blocks: weights 0 (not read), x = 0, d_x = d_w = 0
    const __mmask64 tail = (__mmask64(1) << (nb % L::SB * 64 / L::SB)) - 1;
    vnni_step<BITS, MT, R, true, WS>(x, c, dx, wp, dp, pf, tail, idx, acc[0]);
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) {
      __m512 t = acc[0][r][m];
      for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[u][r][m]);
      y[r][m * ldy] = _mm512_reduce_add_ps(t);
    }
}

template <int BITS, int R>
void vnni_tile_any(int mt, const uint8_t* x, const int32_t* c, const float* dx, int64_t M, int64_t nb,
                   const uint8_t* const (&w)[R], const float* const (&dw)[R], float* const (&y)[R], int64_t ldy,
                   int64_t pf) {
  // Independent fp32 accumulator chains: U per (row of w, row of x), enough to hide the FMA latency.
  constexpr int U1 = R == 1 ? 2 : 1;
  constexpr int W = BITS == 8 ? 1 : static_cast<int>(kWsideRows);
  if constexpr (R == 4) {  // small tiles only
    static_assert(kQuadRows <= 2);
    if (mt == 1) return vnni_tile<BITS, 1, 4, 1, (1 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
    return vnni_tile<BITS, 2, 4, 1, (2 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
  } else {
    switch (mt) {
      case 1: return vnni_tile<BITS, 1, R, U1, (1 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      case 2: return vnni_tile<BITS, 2, R, 1, (2 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      case 3: return vnni_tile<BITS, 3, R, 1, (3 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      case 4: return vnni_tile<BITS, 4, R, 1, (4 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      case 5: return vnni_tile<BITS, 5, R, 1, (5 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      case 6: return vnni_tile<BITS, 6, R, 1, (6 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      case 7: return vnni_tile<BITS, 7, R, 1, (7 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
      default: return vnni_tile<BITS, 8, R, 1, (8 >= W)>(x, c, dx, M, nb, w, dw, y, ldy, pf);
    }
  }
}

// All tiles of rows [m0, m0 + mc) of A (a whole segment) for the R weight rows wr (block scales dw, dws
// apart).
template <int BITS, int R>
void vnni_pass(const Acts& A, int64_t m0, int64_t mc, int64_t tiles, const uint8_t* const* wr, const float* dw,
               int64_t dws, float* const* yr, int64_t ldy, int64_t pf) {
  const uint8_t* w[R];
  const float* d[R];
  for (int r = 0; r < R; ++r) w[r] = wr[r], d[r] = dw + r * dws;
  for (int64_t t = 0; t < tiles; ++t) {  // balanced tiles of at most kMaxTile rows
    const int64_t t0 = t * mc / tiles, t1 = (t + 1) * mc / tiles;
    float* y[R];
    for (int r = 0; r < R; ++r) y[r] = yr[r] + t0 * ldy;
    const int64_t i = A.rec(0, m0) + t0;
    vnni_tile_any<BITS, R>(static_cast<int>(t1 - t0), A.X + i * A.qb, A.C + (BITS == 4 ? i * 16 : 0), A.D + i * A.sb,
                           mc, A.nb, w, d, y, ldy, pf);
  }
}

// Rows [m0, m0 + mc) of A (a whole segment) times weight rows [n0, n1) of nsrc matrices (1, or 2 read in
// the same passes: rows n.. of both): y[i][(m - m0) * ldy + n]. dw: scratch for 4 · (nb + 8) floats.
template <int BITS>
void vnni_rows(const Acts& A, int64_t m0, int64_t mc, int nsrc, const uint8_t* const* w, int64_t wstride,
               const at::Half* const* s, int64_t ng, float* const* y, int64_t ldy, int64_t n0, int64_t n1,
               float* dw) {
  const int64_t nb = A.nb, per = nb / ng, dws = (nb + 3) / 4 * 4 + 4;
  const int64_t tiles = (mc + kMaxTile - 1) / kMaxTile;
  const int64_t tile = (mc + tiles - 1) / tiles;
  const int64_t rows = BITS == 4 && tile <= kQuadRows              ? 4  // weight rows per pass
                       : BITS == 8 && tile <= 4 && wstride >= 4096 ? nsrc
                                                                   : 2;
  for (int64_t n = n0; n < n1;) {
    // rr weight rows: one matrix rows n.., two matrices rows n.. of each, interleaved
    const int64_t left = (n1 - n) * nsrc;
    const int rr = left >= rows ? static_cast<int>(rows) : (left >= 2 ? 2 : 1);
    const uint8_t* wr[4];
    float* yr[4];
    for (int r = 0; r < rr; ++r) {
      const int src = r % nsrc;
      const int64_t row = n + r / nsrc;
      wr[r] = w[src] + row * wstride;
      yr[r] = y[src] + row;
      fill_dw(s[src] + row * ng, ng, per, nb, dw + r * dws);
    }
    // Prefetch each row's bytes at the same place some passes ahead: the passes consume each matrix
    // in blocks of rr / nsrc rows, so a whole number of such blocks, at least kPrefetch bytes.
    const int64_t block = rr / nsrc * wstride, pf = (kPrefetch + block - 1) / block * block;
    if (rr == 4)
      vnni_pass<BITS, 4>(A, m0, mc, tiles, wr, dw, dws, yr, ldy, pf);
    else if (rr == 2)
      vnni_pass<BITS, 2>(A, m0, mc, tiles, wr, dw, dws, yr, ldy, pf);
    else
      vnni_pass<BITS, 1>(A, m0, mc, tiles, wr, dw, dws, yr, ldy, pf);
    n += rr / nsrc;
  }
}

// silu(a) · b into a, 16 values at a time, as at::silu then at::mul compute it for fp32 with AVX-512:
// x / (1 + exp(-x)) with Sleef's expf16_u10, then · b.
inline void silu_mul_avx512(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = _mm512_loadu_ps(a + i);
    const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(_mm512_set1_ps(-0.0f), x));
    const __m512 sl = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    _mm512_storeu_ps(a + i, _mm512_mul_ps(sl, _mm512_loadu_ps(b + i)));
  }
}
#endif  // MIXTRAL_QGROUP_VNNI

// Whether silu_mul_avx512 may replace at::silu · b here: Sleef's exp is there, torch runs its AVX-512
// kernels, and they agree bit for bit on values across fp32's range (checked once).
bool fast_silu() {
#ifdef MIXTRAL_QGROUP_VNNI
  static const bool ok = [] {
    if (Sleef_expf16_u10 == nullptr || at::get_cpu_capability() != "AVX512") return false;
    constexpr int64_t n = 4096;
    auto a = at::empty({n}, at::kFloat), b = at::empty({n}, at::kFloat);
    float* ap = a.data_ptr<float>();
    float* bp = b.data_ptr<float>();
    uint32_t r = 12345;
    for (int64_t i = 0; i < n; ++i) {
      r = r * 1664525u + 1013904223u;
      const float u = static_cast<float>(r >> 8) / 16777216.0f;  // [0, 1)
      ap[i] = (i % 2 ? -1.0f : 1.0f) * std::ldexp(u + 0.5f, static_cast<int>(i % 40) - 30);  // 2^-31 .. 2^9
      bp[i] = 1.0f - u;
    }
    ap[0] = 0.0f, ap[1] = -0.0f, ap[2] = 88.5f, ap[3] = -88.5f, ap[4] = 104.0f, ap[5] = -104.0f;
    auto want = at::mul(at::silu(a), b);
    silu_mul_avx512(ap, bp, n);
    return std::memcmp(ap, want.data_ptr<float>(), n * sizeof(float)) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// Rows [m0, m0 + mc) of A times weight rows [n0, n1) of nsrc matrices (see vnni_rows).
void qgemv_rows(int bits, bool vnni, const Acts& A, int64_t m0, int64_t mc, int nsrc, const uint8_t* const* w,
                int64_t wstride, const at::Half* const* s, int64_t ng, float* const* y, int64_t ldy, int64_t n0,
                int64_t n1, float* dw) {
#ifdef MIXTRAL_QGROUP_VNNI
  if (vnni) {
    if (bits == 8) return vnni_rows<8>(A, m0, mc, nsrc, w, wstride, s, ng, y, ldy, n0, n1, dw);
    return vnni_rows<4>(A, m0, mc, nsrc, w, wstride, s, ng, y, ldy, n0, n1, dw);
  }
#endif
  (void)vnni;
  for (int i = 0; i < nsrc; ++i) scalar_rows(bits, A, m0, mc, w[i], wstride, s[i], ng, y[i], ldy, n0, n1, dw);
}

// A call runs on the calling thread alone below this much work, weight bytes · (rows of x + 1) / 2: a
// region's start and end (1-3 µs with the threads awake) cost more than a second thread saves (2 cores:
// [256, 1024] int4 from one row of x, ~8 µs, gains nothing from a second thread; [512, 1024] does).
constexpr int64_t kSerialWork = 160 << 10;

int threads_for(int64_t weight_bytes, int64_t rows) {
  return weight_bytes * (rows + 1) / 2 < kSerialWork ? 1 : team_size();
}

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

// A thread's share of an int4 matrix's rows, from this many rows per half, is read as two streams.
constexpr int64_t kTwoStreamRows = 64;

// Rows [m0, m0 + mc) of A times rows [r0, r1) of one matrix (w, s as in qgemv_rows; y[m * ldy + n]): a
// thread's share. int4 shares of 2 · kTwoStreamRows rows or more are read as two halves in the same
// passes, two streams per thread, as qmoe reads w1 and w3: in the bench-791m decode step 2-5 % faster
// for qlinear and ~4 % for qmoe's w2 (alternating-process pairs). int8 stays one stream: two were
// slower, as was reading qmoe's w1 and w3 one after the other (both measured).
void qgemv_share(int bits, bool vnni, const Acts& A, int64_t m0, int64_t mc, const uint8_t* w, int64_t wstride,
                 const at::Half* s, int64_t ng, float* y, int64_t ldy, int64_t r0, int64_t r1, float* dw) {
  const int64_t half = (r1 - r0) / 2;
  if (bits == 4 && half >= kTwoStreamRows) {
    const uint8_t* const w2[2] = {w + r0 * wstride, w + (r0 + half) * wstride};
    const at::Half* const s2[2] = {s + r0 * ng, s + (r0 + half) * ng};
    float* const y2[2] = {y + r0, y + r0 + half};
    qgemv_rows(bits, vnni, A, m0, mc, 2, w2, wstride, s2, ng, y2, ldy, 0, half, dw);
    r0 += 2 * half;  // an odd last row, read alone below
    if (r0 == r1) return;
  }
  const uint8_t* const w1[1] = {w};
  const at::Half* const s1[1] = {s};
  float* const y1[1] = {y};
  qgemv_rows(bits, vnni, A, m0, mc, 1, w1, wstride, s1, ng, y1, ldy, r0, r1, dw);
}

}  // namespace

// y_i [M, N_i] fp32 = x [M, K] · ŵ_iᵀ for one or more matrices of the same bits and input dimension K
// (wq, wk, wv of a decode step): ŵ_i = q_i (int8 [N_i, K], or packed uint8 [N_i, K/2]) in groups of
// K / ng_i values with fp16 scales [N_i, ng_i]; x quantized once per 32-block to int8 as
// group.quantize_activations, then the rows of all the matrices split among the threads as one range.
std::vector<torch::Tensor> qlinear_many(torch::Tensor x, const std::vector<torch::Tensor>& qs,
                                        const std::vector<torch::Tensor>& ss, int64_t bits) {
  check_bits(bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be a 2-D float32 tensor [M, K], got ",
              x.scalar_type(), " of shape ", x.sizes());
  TORCH_CHECK(!qs.empty() && qs.size() == ss.size(), "one scales tensor per weight matrix");
  const int64_t M = x.size(0), K = x.size(1), n = static_cast<int64_t>(qs.size());
  TORCH_CHECK(K > 0 && K % kAB == 0, "x's input dimension ", K, " must be a positive multiple of ", kAB);
  std::vector<int64_t> off(n + 1, 0), ng(n);
  int64_t bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(qs[i].dim() == 2 && ss[i].dim() == 2, "q and scales must be 2-D ([N, ...]), got shapes ",
                qs[i].sizes(), " and ", ss[i].sizes());
    ng[i] = check_qweight(qs[i], ss[i], bits, K, "q", "scales");
    off[i + 1] = off[i] + qs[i].size(0);
    bytes += qs[i].numel();
  }
  x = x.contiguous();
  std::vector<torch::Tensor> ys(n);
  for (int64_t i = 0; i < n; ++i) ys[i] = torch::empty({M, qs[i].size(0)}, x.options());
  if (M == 0 || off[n] == 0) return ys;
  const int ib = static_cast<int>(bits);
  const bool vnni = vnni_on();
  const int64_t nb = K / kAB, dwn = 4 * ((nb + 3) / 4 * 4 + 4);
  const int nth = threads_for(bytes, M);
  const int nmax = max_team(nth);
  Arena arena(acts_bytes(M, K, ib, vnni) + nmax * Arena::size_of(dwn * sizeof(float)));
  const Acts A = make_acts(arena, M, K, ib, vnni);
  std::vector<float*> dw(nmax);
  for (int t = 0; t < nmax; ++t) dw[t] = arena.take<float>(dwn);
  const float* xp = x.data_ptr<float>();
  run_team(nth, [&](int tid, int team) {
    int64_t a, b;
    split(M * nb, 1, tid, team, a, b);  // blocks of x
    for (int64_t i = a; i < b;) {
      const int64_t m = i / nb, e = std::min(b, (m + 1) * nb);
      quantize_blocks(ib, vnni, xp + m * K, i - m * nb, e - m * nb, A, m);
      i = e;
    }
    barrier(team);
    split(off[n], 1, tid, team, a, b);  // rows of the matrices, end to end
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r0 = std::max(a, off[i]) - off[i], r1 = std::min(b, off[i + 1]) - off[i];
      if (r0 >= r1) continue;
      qgemv_share(ib, vnni, A, 0, M, static_cast<const uint8_t*>(qs[i].data_ptr()), qs[i].size(1),
                  ss[i].data_ptr<at::Half>(), ng[i], ys[i].data_ptr<float>(), qs[i].size(0), r0, r1, dw[tid]);
    }
  });
  return ys;
}

// y [M, N] fp32 = x [M, K] · ŵᵀ (see qlinear_many).
torch::Tensor qlinear(torch::Tensor x, torch::Tensor q, torch::Tensor scales, int64_t bits) {
  return qlinear_many(std::move(x), {q}, {scales}, bits)[0];
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
  auto y = torch::empty({T, D}, x.options());
  if (T == 0 || k == 0) return y.zero_();
  const int64_t S = T * k;  // (token, slot) pairs, one row each, sorted by expert

  // Counting sort of the pairs by expert; the selected experts in order.
  std::vector<int64_t> start(E + 1, 0), order(S), pos(S), active;
  for (int64_t i = 0; i < S; ++i) ++start[id[i] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < S; ++i) order[fill[id[i]]++] = i;
  }
  for (int64_t i = 0; i < S; ++i) pos[order[i]] = i;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) active.push_back(e);

  const int ib = static_cast<int>(bits);
  const bool vnni = vnni_on();
  const bool fused_silu = fast_silu() && F < 32768;
  const int64_t b13 = F * w1.size(2), b2 = D * w2.size(2);  // bytes per expert
  const int64_t nbmax = std::max(D, F) / kAB, dwn = 4 * ((nbmax + 3) / 4 * 4 + 4);
  const int nth = threads_for(static_cast<int64_t>(active.size()) * (2 * b13 + b2), T);
  const int nmax = max_team(nth);
  Arena arena(acts_bytes(S, D, ib, vnni) + acts_bytes(S, F, ib, vnni) + 2 * Arena::size_of(S * F * sizeof(float)) +
              Arena::size_of(S * D * sizeof(float)) + nmax * Arena::size_of(dwn * sizeof(float)));
  Acts AX = make_acts(arena, S, D, ib, vnni), AH = make_acts(arena, S, F, ib, vnni);
  std::vector<int64_t> seg0(S), segn(S);  // each expert's rows, one segment
  for (const int64_t e : active)
    for (int64_t r = start[e]; r < start[e + 1]; ++r) seg0[r] = start[e], segn[r] = start[e + 1] - start[e];
  AX.seg0 = AH.seg0 = seg0.data();
  AX.segn = AH.segn = segn.data();
  float* ap = arena.take<float>(S * F);  // w1 · x, then h = silu(a) · b
  float* bp = arena.take<float>(S * F);  // w3 · x
  float* op = arena.take<float>(S * D);  // w2 · q(h) per row
  std::vector<float*> dw(nmax);
  for (int t = 0; t < nmax; ++t) dw[t] = arena.take<float>(dwn);

  const float* xp = x.data_ptr<float>();
  const uint8_t *w1p = static_cast<const uint8_t*>(w1.data_ptr()), *w3p = static_cast<const uint8_t*>(w3.data_ptr()),
                *w2p = static_cast<const uint8_t*>(w2.data_ptr());
  const at::Half *s1p = s1.data_ptr<at::Half>(), *s3p = s3.data_ptr<at::Half>(), *s2p = s2.data_ptr<at::Half>();
  const float* wp = wts.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t nbD = D / kAB;

  // Phases 0 and 1: the rows of x (as pairs), then a and b for this thread's columns [f0, f1) of F
  // (multiples of 128 values: whole steps and blocks of h).
  auto first = [&](int tid, int team, int64_t& f0, int64_t& f1) {
    int64_t a, b;
    split(S * nbD, 1, tid, team, a, b);
    for (int64_t i = a; i < b;) {
      const int64_t r = i / nbD, e = std::min(b, (r + 1) * nbD);
      quantize_blocks(ib, vnni, xp + (order[r] / k) * D, i - r * nbD, e - r * nbD, AX, r);
      i = e;
    }
    barrier(team);
    split(F, 128, tid, team, f0, f1);
    if (f0 >= f1) return;
    for (const int64_t e : active) {
      const int64_t r0 = start[e], m = start[e + 1] - r0;
      const uint8_t* const w[2] = {w1p + e * b13, w3p + e * b13};
      const at::Half* const s[2] = {s1p + e * F * ng1, s3p + e * F * ng1};
      float* const yo[2] = {ap + r0 * F, bp + r0 * F};
      qgemv_rows(ib, vnni, AX, r0, m, 2, w, w1.size(2), s, ng1, yo, F, f0, f1, dw[tid]);
    }
  };
  // h's quantization for columns [f0, f1) (h already in a).
  auto quantize_h = [&](int64_t f0, int64_t f1) {
    for (int64_t r = 0; r < S; ++r) quantize_blocks(ib, vnni, ap + r * F, f0 / kAB, f1 / kAB, AH, r);
  };
  // Phase 2: w2 rows [d0, d1) of each selected expert, then the weighted sum over the slots in slot
  // order k = 0..k-1 per token, as the reference sums them.
  auto second = [&](int tid, int team) {
    int64_t d0, d1;
    split(D, 16, tid, team, d0, d1);
    if (d0 >= d1) return;
    for (const int64_t e : active) {
      const int64_t r0 = start[e], m = start[e + 1] - r0;
      qgemv_share(ib, vnni, AH, r0, m, w2p + e * b2, w2.size(2), s2p + e * D * ng2, ng2, op + r0 * D, D, d0, d1,
                  dw[tid]);
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t d = d0; d < d1; ++d) {
        float acc = 0.0f;
        for (int64_t j = 0; j < k; ++j) acc += wp[t * k + j] * op[pos[t * k + j] * D + d];
        yp[t * D + d] = acc;
      }
  };

  if (fused_silu) {
#ifdef MIXTRAL_QGROUP_VNNI
    run_team(nth, [&](int tid, int team) {
      int64_t f0, f1;
      first(tid, team, f0, f1);
      if (f0 < f1) {
        for (int64_t r = 0; r < S; ++r) silu_mul_avx512(ap + r * F + f0, bp + r * F + f0, f1 - f0);
        quantize_h(f0, f1);
      }
      barrier(team);
      second(tid, team);
    });
#endif
  } else {
    run_team(nth, [&](int tid, int team) {
      int64_t f0, f1;
      first(tid, team, f0, f1);
    });
    // silu(a) · b in fp32 with torch's own silu, row by row as group.reference_moe computes it.
    for (int64_t r = 0; r < S; ++r) {
      auto a = at::from_blob(ap + r * F, {F}, at::kFloat), b = at::from_blob(bp + r * F, {F}, at::kFloat);
      at::mul_out(a, at::silu(a), b);
    }
    run_team(nth, [&](int tid, int team) {
      int64_t f0, f1;
      split(F, 128, tid, team, f0, f1);
      if (f0 < f1) quantize_h(f0, f1);
      barrier(team);
      second(tid, team);
    });
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
