// One decoder block of a decode step (one new token per row, fp32 activations) in a single call.
//
// The Python block costs ~60 small torch ops per layer at one token (two RMSNorms, RoPE, the cache
// scatter, scaled_dot_product_attention with its mask, the router's linear / topk / softmax, the
// residual adds), about 0.4 ms of dispatch on a 2-core machine: as much as the 4-bit weights of a
// bench-791m layer take to stream. Here they are plain loops around the same weight kernels the
// modules call (`linear` / `qlinear` for wq, wk, wv, wo; `moe` / `qmoe` for the experts), so a decode
// step pays one call per layer, as llama.cpp pays none:
//
//   xn = RMSNorm(x); q, k, v = xn·wqᵀ, xn·wkᵀ, xn·wvᵀ; RoPE (rotate half) on q, k with the step's
//   cos / sin; k, v written into the layer's cache at slot = position (-1: padding, the spare last
//   slot); each head attends slots 0..max(position, 0) with softmax(q·k / sqrt(hd)); h = x + o·woᵀ;
//   hn = RMSNorm(h); router logits = hn·gateᵀ; top-k (ties: the lower expert first), softmax over the
//   kept logits; out = h + Σ_k w_k · expert_k(hn).
//
// Everything the Python block does, in the same order and in fp32; only the summation order of the
// norms, the attention and the router differs (tests hold the two paths together, logits and tokens).

#include "cpu_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
// torch's vector exp for fp32 with AVX-512 (exported by libtorch_cpu); weak: absent, std::exp is used.
extern "C" __attribute__((weak)) __m512 Sleef_expf16_u10(__m512);
#endif

namespace {

// kind 0: float, bf16 or per-row int8 weight (`linear`); 4 or 8: group-quantized bits (`qlinear`).
torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& s,
                      int64_t kind, const char* name) {
  if (kind == 0) return ::linear(x, w, s);
  TORCH_CHECK(kind == 4 || kind == 8, name, ": kind must be 0 (float / per-row int8) or 4 / 8 (group bits), got ",
              kind);
  TORCH_CHECK(s.has_value(), name, ": group-quantized weights need their scales");
  return ::qlinear(x, w, *s, kind);
}

// out = w ⊙ (x · rsqrt(mean(x²) + eps)): the model's RMSNorm in fp32 (the sum of squares in double).
void rms_norm(const float* x, const float* w, float eps, int64_t D, float* out) {
  double ss = 0.0;
  for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
  const float r = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(D)) + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = w[d] * (x[d] * r);
}

// Rotate-half RoPE of one head vector in place: v·cos + rotate_half(v)·sin.
inline void rope(float* v, const float* c, const float* s, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = v[i], b = v[i + half];
    v[i] = a * c[i] - b * s[i];
    v[i + half] = b * c[i + half] + a * s[i + half];
  }
}

// Σ a·b in 16 independent fp32 lanes (vectorised), then summed.
float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One head's single-query attention over slots 0..n-1: out = softmax(q·kⱼ · scale) · V, in fp32 (p: n + 16
// floats of scratch). With AVX-512 and Sleef's exp (libtorch's, as silu in cpu_qgroup.cpp), 16 lanes at a
// time: the scores 4 keys at once, the exponentials 16 at once, out held in registers (head_dim a
// multiple of 16, at most 256); else plain loops with std::exp.
void attend(const float* q, const float* K, const float* V, int64_t n, int64_t hd, float scale, float* p,
            float* out) {
#if defined(__AVX512F__)
  if (Sleef_expf16_u10 != nullptr && hd % 16 == 0 && hd <= 256) {
    const int64_t nv = hd / 16;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const float* k0 = K + j * hd;
      for (int64_t v = 0; v < nv; ++v) {
        const __m512 qv = _mm512_loadu_ps(q + 16 * v);
        a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + 16 * v), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + hd + 16 * v), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + 2 * hd + 16 * v), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + 3 * hd + 16 * v), a3);
      }
      p[j] = _mm512_reduce_add_ps(a0) * scale;
      p[j + 1] = _mm512_reduce_add_ps(a1) * scale;
      p[j + 2] = _mm512_reduce_add_ps(a2) * scale;
      p[j + 3] = _mm512_reduce_add_ps(a3) * scale;
    }
    for (; j < n; ++j) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t v = 0; v < nv; ++v)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), _mm512_loadu_ps(K + j * hd + 16 * v), a);
      p[j] = _mm512_reduce_add_ps(a) * scale;
    }
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (j = 0; j < n; j += 16) {
      const __mmask16 mk = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_maskz_loadu_ps(mk, p + j));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j < n; j += 16) {
      const __mmask16 mk = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(mk, Sleef_expf16_u10(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, p + j), m)));
      _mm512_storeu_ps(p + j, e);  // p has 16 spare floats
      sum = _mm512_add_ps(sum, e);
    }
    __m512 acc[16];
    for (int64_t v = 0; v < nv; ++v) acc[v] = _mm512_setzero_ps();
    for (j = 0; j < n; ++j) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      const float* vj = V + j * hd;
      for (int64_t v = 0; v < nv; ++v) acc[v] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * v), acc[v]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t v = 0; v < nv; ++v) _mm512_storeu_ps(out + 16 * v, _mm512_mul_ps(acc[v], inv));
    return;
  }
#endif
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, p[j] = dot(q, K + j * hd, hd) * scale);
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - m));
  std::fill(out, out + hd, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* vj = V + j * hd;
    for (int64_t d = 0; d < hd; ++d) out[d] += pj * vj[d];
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] *= inv;
}

// The index of the first largest of x[0..n) (n >= 1), a NaN counting as largest (the first NaN wins),
// as torch.argmax: a greedy step's token from logits still in cache.
int64_t first_argmax(const float* x, int64_t n) {
#if defined(__AVX512F__)
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n && !nan; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, v);
  }
  if (nan) return i - 16 + __builtin_ctz(nan);
  float m = _mm512_reduce_max_ps(mx);
  for (int64_t j = i; j < n; ++j) {
    if (std::isnan(x[j])) return j;
    m = std::max(m, x[j]);
  }
  const __m512 mv = _mm512_set1_ps(m);
  for (int64_t j = 0; j + 16 <= n; j += 16)
    if (const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), mv, _CMP_EQ_OQ)) return j + __builtin_ctz(eq);
  for (int64_t j = n / 16 * 16; j < n; ++j)
    if (x[j] == m) return j;
  return 0;  // unreachable: m is one of the values
#else
  int64_t best = 0;
  if (std::isnan(x[0])) return 0;
  for (int64_t j = 1; j < n; ++j) {
    if (std::isnan(x[j])) return j;
    if (x[j] > x[best]) best = j;
  }
  return best;
#endif
}

void check_f32(const torch::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous float32 tensor with ", dim, " dimensions, got ", t.scalar_type(), " of shape ",
              t.sizes());
}

}  // namespace

std::tuple<torch::Tensor, torch::Tensor> decode_layer(
    torch::Tensor x, torch::Tensor slots, c10::optional<torch::Tensor> rows, torch::Tensor cos, torch::Tensor sin,
    torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor attention_norm, torch::Tensor ffn_norm, double eps,
    std::vector<torch::Tensor> attn_w, const c10::List<c10::optional<torch::Tensor>>& attn_s,
    std::vector<int64_t> attn_kind, int64_t n_heads, torch::Tensor gate, torch::Tensor w1, torch::Tensor w3,
    torch::Tensor w2, c10::optional<torch::Tensor> s1, c10::optional<torch::Tensor> s3,
    c10::optional<torch::Tensor> s2, int64_t moe_kind, int64_t top_k) {
  check_f32(x, "x", 2);
  check_f32(k_cache, "k_cache", 4);
  check_f32(v_cache, "v_cache", 4);
  check_f32(cos, "cos", 2);
  check_f32(sin, "sin", 2);
  check_f32(attention_norm, "attention_norm", 1);
  check_f32(ffn_norm, "ffn_norm", 1);
  check_f32(gate, "gate", 2);
  const int64_t B = x.size(0), D = x.size(1);
  const int64_t R = k_cache.size(0), KV = k_cache.size(1), S = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(n_heads > 0 && KV > 0 && n_heads % KV == 0, "n_heads (", n_heads,
              ") must be a positive multiple of the cache's kv heads (", KV, ")");
  TORCH_CHECK(hd % 2 == 0 && cos.size(0) == B && cos.size(1) == hd && sin.sizes() == cos.sizes(),
              "cos and sin must be [B, head_dim] = [", B, ", ", hd, "] (head_dim even), got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(attention_norm.size(0) == D && ffn_norm.size(0) == D, "the norms' weights must have ", D, " values");
  TORCH_CHECK(attn_w.size() == 4 && attn_s.size() == 4 && attn_kind.size() == 4,
              "attn_w, attn_s and attn_kind must hold wq, wk, wv, wo");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == B && slots.scalar_type() == at::kLong,
              "slots must be int64 [B] = [", B, "], got ", slots.scalar_type(), " of shape ", slots.sizes());
  const int64_t E = gate.size(0);
  TORCH_CHECK(gate.size(1) == D, "gate must be [E, ", D, "], got ", gate.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= E, "top_k must lie in [1, ", E, "], got ", top_k);
  // A token's position is its slot; the last slot (S - 1) holds padding, whose position is -1.
  auto slots_c = slots.contiguous();
  const int64_t* slot_p = slots_c.data_ptr<int64_t>();
  std::vector<int64_t> pos(B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(slot_p[b] >= 0 && slot_p[b] < S, "slot ", slot_p[b], " outside [0, ", S, ")");
    pos[b] = slot_p[b] == S - 1 ? -1 : slot_p[b];
  }
  torch::Tensor rows_c;
  const int64_t* row = nullptr;
  if (rows.has_value()) {
    rows_c = rows->to(at::kLong).contiguous();
    TORCH_CHECK(rows_c.dim() == 1 && rows_c.size(0) == B, "rows must be [B] = [", B, "], got ", rows_c.sizes());
    row = rows_c.data_ptr<int64_t>();
  } else {
    TORCH_CHECK(B <= R, "a batch of ", B, " rows needs a cache of at least as many rows, got ", R);
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(row == nullptr || (row[b] >= 0 && row[b] < R), "cache row ", row ? row[b] : 0, " outside [0, ", R,
                ")");
  }

  // Attention.
  const int64_t H = n_heads, per_kv = H / KV;
  auto xn = torch::empty({B, D}, x.options());
  const float* xp = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    rms_norm(xp + b * D, attention_norm.data_ptr<float>(), static_cast<float>(eps), D, xn.data_ptr<float>() + b * D);
  torch::Tensor q, k, v;
  if (attn_kind[0] != 0 && attn_kind[1] == attn_kind[0] && attn_kind[2] == attn_kind[0]) {
    // Group-quantized wq, wk, wv of the same bits: one threaded pass over the three, x quantized once.
    for (int i = 0; i < 3; ++i) TORCH_CHECK(attn_s.get(i).has_value(), "group-quantized weights need their scales");
    auto qkv = ::qlinear_many(xn, {attn_w[0], attn_w[1], attn_w[2]},
                              {*attn_s.get(0), *attn_s.get(1), *attn_s.get(2)}, attn_kind[0]);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    q = project(xn, attn_w[0], attn_s.get(0), attn_kind[0], "wq");
    k = project(xn, attn_w[1], attn_s.get(1), attn_kind[1], "wk");
    v = project(xn, attn_w[2], attn_s.get(2), attn_kind[2], "wv");
  }
  TORCH_CHECK(q.size(1) == H * hd && k.size(1) == KV * hd && v.size(1) == KV * hd, "wq, wk, wv give ", q.size(1),
              ", ", k.size(1), ", ", v.size(1), " features; the cache and n_heads need ", H * hd, ", ", KV * hd, ", ",
              KV * hd);
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) rope(qp + (b * H + h) * hd, cp + b * hd, sp + b * hd, hd);
    const int64_t r = row ? row[b] : b, slot = pos[b] < 0 ? S - 1 : pos[b];
    for (int64_t g = 0; g < KV; ++g) {
      float* kh = kp + (b * KV + g) * hd;
      rope(kh, cp + b * hd, sp + b * hd, hd);
      std::copy(kh, kh + hd, kc + ((r * KV + g) * S + slot) * hd);
      std::copy(vp + (b * KV + g) * hd, vp + (b * KV + g + 1) * hd, vc + ((r * KV + g) * S + slot) * hd);
    }
  }
  auto o = torch::empty({B, H * hd}, x.options());
  float* op = o.data_ptr<float>();
  int64_t nmax = 1;
  for (int64_t b = 0; b < B; ++b) nmax = std::max(nmax, std::max<int64_t>(pos[b], 0) + 1);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // Serial below ~2^20 multiply-adds (a short context: waking the other threads costs more), else heads
  // in parallel.
  const int64_t work = B * H * nmax * hd;
  auto heads = [&](int64_t i0, int64_t i1) {
    std::vector<float> p(nmax + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / per_kv, r = row ? row[b] : b;
      const int64_t n = std::max<int64_t>(pos[b], 0) + 1;  // padding (-1) sees slot 0, as cache_mask
      attend(qp + (b * H + h) * hd, kc + (r * KV + g) * S * hd, vc + (r * KV + g) * S * hd, n, hd, scale, p.data(),
             op + (b * H + h) * hd);
    }
  };
  if (work < (int64_t(1) << 20))
    heads(0, B * H);
  else
    at::parallel_for(0, B * H, std::max<int64_t>(1, (int64_t(1) << 18) / (nmax * hd)), heads);
  auto attn = project(o, attn_w[3], attn_s.get(3), attn_kind[3], "wo");
  TORCH_CHECK(attn.size(1) == D, "wo gives ", attn.size(1), " features, the model dimension is ", D);
  auto hbuf = torch::empty({B, D}, x.options());
  float* hp = hbuf.data_ptr<float>();
  const float* ap = attn.data_ptr<float>();
  for (int64_t i = 0; i < B * D; ++i) hp[i] = xp[i] + ap[i];

  // Router and experts.
  auto hn = torch::empty({B, D}, x.options());
  float* hnp = hn.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) rms_norm(hp + b * D, ffn_norm.data_ptr<float>(), static_cast<float>(eps), D, hnp + b * D);
  auto logits = torch::empty({B, E}, x.options());
  auto ids = torch::empty({B, top_k}, x.options().dtype(at::kLong));
  auto wts = torch::empty({B, top_k}, x.options());
  float* lp = logits.data_ptr<float>();
  int64_t* idp = ids.data_ptr<int64_t>();
  float* wp = wts.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  std::vector<int64_t> order(E);
  for (int64_t b = 0; b < B; ++b) {
    float* l = lp + b * E;
    for (int64_t e = 0; e < E; ++e) l[e] = dot(hnp + b * D, gp + e * D, D);
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return l[i] > l[j]; });
    const float top = l[order[0]];
    float sum = 0.0f;
    for (int64_t j = 0; j < top_k; ++j) {
      idp[b * top_k + j] = order[j];
      sum += (wp[b * top_k + j] = std::exp(l[order[j]] - top));
    }
    for (int64_t j = 0; j < top_k; ++j) wp[b * top_k + j] /= sum;
  }
  torch::Tensor y;
  if (moe_kind == 0) {
    y = ::moe(hn, ids, wts, w1, w3, w2, s1, s3, s2);
  } else {
    TORCH_CHECK(moe_kind == 4 || moe_kind == 8, "moe_kind must be 0 (float / per-row int8) or 4 / 8, got ", moe_kind);
    TORCH_CHECK(s1.has_value() && s3.has_value() && s2.has_value(), "group-quantized experts need s1, s3, s2");
    y = ::qmoe(hn, ids, wts, w1, w3, w2, *s1, *s3, *s2, moe_kind);
  }
  const float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < B * D; ++i) hp[i] += yp[i];
  return {hbuf, logits};
}

// A whole decode step's weights, taken once: the embedding, RoPE's `inv_freq`, every block's
// decode_layer arguments (layer l's at index l of each list, 4·l.. for the attention's), the final
// RMSNorm and the output head. `run` is the step: the embedding rows of `tokens`, RoPE's cos / sin at
// `positions` (fp32 position · inv_freq, as rope_cos_sin), every block through decode_layer, the final
// norm and the output head; it returns (logits [B, V], router logits [L, B, E]).
//
// Kept by `mixtral.kernels.decode` for a bound decode loop (make_decode_step), so that a step passes
// only what changes (tokens, positions, rows, the cache) and not the ~100 weight tensors of the op form
// (`decode_step`, which builds a plan for one call): on bench-791m that marshalling and the checks of
// the Python forward cost ~0.5 ms of a ~6.5 ms int4 step, their data cold after 129 MB of weights.
struct StepPlan : torch::CustomClassHolder {
  struct Layer {
    torch::Tensor attention_norm, ffn_norm, gate, w1, w3, w2;
    std::vector<torch::Tensor> attn_w;
    c10::List<c10::optional<torch::Tensor>> attn_s;
    std::vector<int64_t> attn_kind;
    c10::optional<torch::Tensor> s1, s3, s2;
    int64_t moe_kind = 0;
  };
  torch::Tensor inv_freq, embedding, norm, out_w;
  c10::optional<torch::Tensor> out_s;
  int64_t out_kind, n_heads, top_k;
  double eps;
  std::vector<Layer> layers;

  StepPlan(torch::Tensor inv_freq_, torch::Tensor embedding_, torch::Tensor norm_, torch::Tensor out_w_,
           c10::optional<torch::Tensor> out_s_, int64_t out_kind_, double eps_, int64_t n_heads_, int64_t top_k_,
           std::vector<torch::Tensor> attention_norms, std::vector<torch::Tensor> ffn_norms,
           std::vector<torch::Tensor> attn_w, c10::List<c10::optional<torch::Tensor>> attn_s,
           std::vector<int64_t> attn_kind, std::vector<torch::Tensor> gates, std::vector<torch::Tensor> w1,
           std::vector<torch::Tensor> w3, std::vector<torch::Tensor> w2, c10::List<c10::optional<torch::Tensor>> s1,
           c10::List<c10::optional<torch::Tensor>> s3, c10::List<c10::optional<torch::Tensor>> s2,
           std::vector<int64_t> moe_kind)
      : inv_freq(std::move(inv_freq_)),
        embedding(std::move(embedding_)),
        norm(std::move(norm_)),
        out_w(std::move(out_w_)),
        out_s(std::move(out_s_)),
        out_kind(out_kind_),
        n_heads(n_heads_),
        top_k(top_k_),
        eps(eps_) {
    const int64_t L = static_cast<int64_t>(attention_norms.size());
    TORCH_CHECK(L > 0 && ffn_norms.size() == size_t(L) && gates.size() == size_t(L) && w1.size() == size_t(L) &&
                    w3.size() == size_t(L) && w2.size() == size_t(L) && s1.size() == size_t(L) &&
                    s3.size() == size_t(L) && s2.size() == size_t(L) && moe_kind.size() == size_t(L) &&
                    attn_w.size() == size_t(4 * L) && attn_s.size() == size_t(4 * L) &&
                    attn_kind.size() == size_t(4 * L),
                "one entry per layer in every list (four for attn_w, attn_s, attn_kind)");
    check_f32(embedding, "embedding", 2);
    check_f32(norm, "norm", 1);
    check_f32(inv_freq, "inv_freq", 1);
    TORCH_CHECK(norm.size(0) == embedding.size(1), "norm must have ", embedding.size(1), " values");
    layers.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      Layer& y = layers[l];
      y.attention_norm = attention_norms[l], y.ffn_norm = ffn_norms[l], y.gate = gates[l];
      y.w1 = w1[l], y.w3 = w3[l], y.w2 = w2[l], y.s1 = s1.get(l), y.s3 = s3.get(l), y.s2 = s2.get(l);
      y.moe_kind = moe_kind[l];
      y.attn_w.assign(attn_w.begin() + 4 * l, attn_w.begin() + 4 * l + 4);
      for (int64_t i = 0; i < 4; ++i) y.attn_s.push_back(attn_s.get(4 * l + i));
      y.attn_kind.assign(attn_kind.begin() + 4 * l, attn_kind.begin() + 4 * l + 4);
    }
  }

  std::tuple<torch::Tensor, torch::Tensor> run(torch::Tensor tokens, torch::Tensor positions,
                                               c10::optional<torch::Tensor> rows, torch::Tensor k_cache,
                                               torch::Tensor v_cache) const {
    return step(tokens, positions, rows, k_cache, v_cache, true);
  }

  // run's logits alone (a decode loop: the router logits are not stacked, nor returned).
  torch::Tensor logits(torch::Tensor tokens, torch::Tensor positions, torch::Tensor k_cache,
                       torch::Tensor v_cache) const {
    return std::get<0>(step(tokens, positions, c10::nullopt, k_cache, v_cache, false));
  }

  // logits' greedy next tokens [B] (int64): each row's first largest logit, as torch.argmax picks it.
  torch::Tensor greedy(torch::Tensor tokens, torch::Tensor positions, torch::Tensor k_cache,
                       torch::Tensor v_cache) const {
    const auto lg = logits(tokens, positions, k_cache, v_cache);
    const int64_t B = lg.size(0), V = lg.size(1);
    auto ids = torch::empty({B}, lg.options().dtype(at::kLong));
    TORCH_CHECK(V > 0, "the output head has no rows");
    for (int64_t b = 0; b < B; ++b) ids.data_ptr<int64_t>()[b] = first_argmax(lg.data_ptr<float>() + b * V, V);
    return ids;
  }

 private:
  std::tuple<torch::Tensor, torch::Tensor> step(const torch::Tensor& tokens, const torch::Tensor& positions,
                                                const c10::optional<torch::Tensor>& rows,
                                                const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                                bool with_router) const {
    const int64_t L = static_cast<int64_t>(layers.size());
    TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == L && v_cache.sizes() == k_cache.sizes(),
                "k_cache and v_cache must be [L = ", L, ", R, KV, S, hd], got ", k_cache.sizes(), " and ",
                v_cache.sizes());
    TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong && positions.dim() == 1 &&
                    positions.sizes() == tokens.sizes() && positions.scalar_type() == at::kLong,
                "tokens and positions must be int64 [B], got ", tokens.sizes(), " and ", positions.sizes());
    const int64_t B = tokens.size(0), V = embedding.size(0), D = embedding.size(1), S = k_cache.size(3),
                  hd = k_cache.size(4);
    TORCH_CHECK(inv_freq.size(0) * 2 == hd, "inv_freq must have head_dim / 2 = ", hd / 2, " values, got ",
                inv_freq.size(0));
    auto tok_c = tokens.contiguous(), pos_c = positions.contiguous();
    const int64_t *tok = tok_c.data_ptr<int64_t>(), *pos = pos_c.data_ptr<int64_t>();
    auto x = torch::empty({B, D}, embedding.options());
    auto slots = torch::empty({B}, tokens.options().dtype(at::kLong));
    auto cos = torch::empty({B, hd}, embedding.options()), sin = torch::empty({B, hd}, embedding.options());
    const float* invp = inv_freq.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < V, "token id ", tok[b], " outside [0, ", V, ")");
      TORCH_CHECK(pos[b] >= -1 && pos[b] < S - 1, "position ", pos[b], " outside [-1, ", S - 1, ")");
      std::copy(embedding.data_ptr<float>() + tok[b] * D, embedding.data_ptr<float>() + (tok[b] + 1) * D,
                x.data_ptr<float>() + b * D);
      slots.data_ptr<int64_t>()[b] = pos[b] < 0 ? S - 1 : pos[b];
      const float p = static_cast<float>(std::max<int64_t>(pos[b], 0));
      for (int64_t i = 0; i < hd / 2; ++i) {
        const float f = p * invp[i];
        const float c = std::cos(f), sn = std::sin(f);
        cos.data_ptr<float>()[b * hd + i] = cos.data_ptr<float>()[b * hd + hd / 2 + i] = c;
        sin.data_ptr<float>()[b * hd + i] = sin.data_ptr<float>()[b * hd + hd / 2 + i] = sn;
      }
    }
    std::vector<torch::Tensor> router(L);
    for (int64_t l = 0; l < L; ++l) {
      const Layer& y = layers[l];
      std::tie(x, router[l]) =
          decode_layer(x, slots, rows, cos, sin, k_cache.select(0, l), v_cache.select(0, l), y.attention_norm,
                       y.ffn_norm, eps, y.attn_w, y.attn_s, y.attn_kind, n_heads, y.gate, y.w1, y.w3, y.w2, y.s1,
                       y.s3, y.s2, y.moe_kind, top_k);
    }
    auto xn = torch::empty({B, D}, x.options());
    for (int64_t b = 0; b < B; ++b)
      rms_norm(x.data_ptr<float>() + b * D, norm.data_ptr<float>(), static_cast<float>(eps), D,
               xn.data_ptr<float>() + b * D);
    return {project(xn, out_w, out_s, out_kind, "output"), with_router ? torch::stack(router) : torch::Tensor()};
  }
};

// The op form of a whole decode step: StepPlan's arguments and run's, one call (see StepPlan).
std::tuple<torch::Tensor, torch::Tensor> decode_step(
    torch::Tensor tokens, torch::Tensor positions, c10::optional<torch::Tensor> rows, torch::Tensor inv_freq,
    torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor embedding, torch::Tensor norm, torch::Tensor out_w,
    c10::optional<torch::Tensor> out_s, int64_t out_kind, double eps, int64_t n_heads, int64_t top_k,
    std::vector<torch::Tensor> attention_norms, std::vector<torch::Tensor> ffn_norms,
    std::vector<torch::Tensor> attn_w, const c10::List<c10::optional<torch::Tensor>>& attn_s,
    std::vector<int64_t> attn_kind, std::vector<torch::Tensor> gates, std::vector<torch::Tensor> w1,
    std::vector<torch::Tensor> w3, std::vector<torch::Tensor> w2, const c10::List<c10::optional<torch::Tensor>>& s1,
    const c10::List<c10::optional<torch::Tensor>>& s3, const c10::List<c10::optional<torch::Tensor>>& s2,
    std::vector<int64_t> moe_kind) {
  const StepPlan plan(std::move(inv_freq), std::move(embedding), std::move(norm), std::move(out_w), std::move(out_s),
                      out_kind, eps, n_heads, top_k, std::move(attention_norms), std::move(ffn_norms),
                      std::move(attn_w), attn_s, std::move(attn_kind), std::move(gates), std::move(w1), std::move(w3),
                      std::move(w2), s1, s3, s2, std::move(moe_kind));
  return plan.run(std::move(tokens), std::move(positions), std::move(rows), std::move(k_cache), std::move(v_cache));
}

TORCH_LIBRARY_FRAGMENT(mixtral_cpu, m) {
  m.def(
      "decode_layer(Tensor x, Tensor slots, Tensor? rows, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor attention_norm, Tensor ffn_norm, float eps, Tensor[] attn_w, Tensor?[] attn_s, "
      "int[] attn_kind, int n_heads, Tensor gate, Tensor w1, Tensor w3, Tensor w2, Tensor? s1, Tensor? s3, "
      "Tensor? s2, int moe_kind, int top_k) -> (Tensor, Tensor)");
  m.def(
      "decode_step(Tensor tokens, Tensor positions, Tensor? rows, Tensor inv_freq, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor embedding, Tensor norm, Tensor out_w, Tensor? out_s, int out_kind, float eps, "
      "int n_heads, int top_k, Tensor[] attention_norms, Tensor[] ffn_norms, Tensor[] attn_w, Tensor?[] attn_s, "
      "int[] attn_kind, Tensor[] gates, Tensor[] w1, Tensor[] w3, Tensor[] w2, Tensor?[] s1, Tensor?[] s3, "
      "Tensor?[] s2, int[] moe_kind) -> (Tensor, Tensor)");
  m.class_<StepPlan>("StepPlan")
      .def(torch::init<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>,
                       int64_t, double, int64_t, int64_t, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                       std::vector<torch::Tensor>, c10::List<c10::optional<torch::Tensor>>, std::vector<int64_t>,
                       std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                       std::vector<torch::Tensor>, c10::List<c10::optional<torch::Tensor>>,
                       c10::List<c10::optional<torch::Tensor>>, c10::List<c10::optional<torch::Tensor>>,
                       std::vector<int64_t>>())
      .def("run", &StepPlan::run)
      .def("logits", &StepPlan::logits)
      .def("greedy", &StepPlan::greedy);
}

TORCH_LIBRARY_IMPL(mixtral_cpu, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_step", &decode_step);
}
