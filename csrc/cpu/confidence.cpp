// CPU confidence: per masked row, one pass over V in L1-sized chunks -> argmax token of the (noisy) logits and its
// softmax probability; never materializes probabilities.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "confidence.h"
#include "philox.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

#define LLADA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace llada {
namespace {

constexpr int kChunk = 2048;  // 8 KiB of fp32 per buffer: a chunk is converted once and re-read from L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

LLADA_ALWAYS_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
LLADA_ALWAYS_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// Vectors of W fp32 lanes in GCC/clang vector extensions, W = the native width of the target the row loop is compiled
// for (16 for AVX-512, 8 for AVX2, 4 otherwise): explicit lanes let the reductions vectorize without -ffast-math
// (which would also drop the inf/NaN semantics relied on here), and a width above the native one would be scalarized.
template <int W> struct VecTypes;
template <> struct VecTypes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef uint32_t U __attribute__((vector_size(16)));
  typedef uint64_t U2 __attribute__((vector_size(16)));  // the same bytes as pairs of 32-bit lanes
  typedef uint16_t H __attribute__((vector_size(8)));
};
template <> struct VecTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef uint64_t U2 __attribute__((vector_size(32)));  // the same bytes as pairs of 32-bit lanes
  typedef uint16_t H __attribute__((vector_size(16)));
};
template <> struct VecTypes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint32_t U __attribute__((vector_size(64)));
  typedef uint64_t U2 __attribute__((vector_size(64)));  // the same bytes as pairs of 32-bit lanes
  typedef uint16_t H __attribute__((vector_size(32)));
};

template <int W>
struct Vec {
  using F = typename VecTypes<W>::F;
  using I = typename VecTypes<W>::I;
  using H = typename VecTypes<W>::H;
  using U = typename VecTypes<W>::U;
  using U2 = typename VecTypes<W>::U2;
  static LLADA_ALWAYS_INLINE F splat(float v) { return F{} + v; }
  static LLADA_ALWAYS_INLINE F load(const float* p) { F v; std::memcpy(&v, p, sizeof v); return v; }
  static LLADA_ALWAYS_INLINE void store(float* p, const F& v) { std::memcpy(p, &v, sizeof v); }
  static LLADA_ALWAYS_INLINE I load_u16(const uint16_t* p) {
    H h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, I);
  }
  template <class To, class From>
  static LLADA_ALWAYS_INLINE To cast(const From& v) { To t; std::memcpy(&t, &v, sizeof t); return t; }

  // exp(x) for x <= 0 (every softmax term is exp(logit - max)) as 2^t, t = x log2(e) = n + f with n = round(t) and
  // |f| <= 1/2: 2^f by a degree-5 polynomial fitted for relative error (< 2.4e-7 evaluated in fp32), 2^n through the
  // exponent bits. t is clamped at -126, so -inf and anything below give 2^-126 ~ 1.2e-38 instead of 0: at most
  // V * 1.2e-38 on a sum that is >= 1, and never NaN.
  static LLADA_ALWAYS_INLINE F exp(const F& x) {
    const F shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
    F t = x * 1.44269504088896341f;
    t = t > -126.0f ? t : splat(-126.0f);
    const F u = t + shifter;
    const F f = t - (u - shifter);
    F p = splat(1.3276439858600497e-3f);
    p = p * f + 9.675540961325169e-3f;
    p = p * f + 5.550713464617729e-2f;
    p = p * f + 2.4022120237350464e-1f;
    p = p * f + 6.931469440460205e-1f;
    p = p * f + 1.0000001192092896f;
    // the low bits of u hold n; shifted into the exponent field with the bias (shifter's own bits shift out)
    const I pow2n = (cast<I>(u) << 23) + (127 << 23);
    return p * cast<F>(pow2n);
  }

  // log(x) for positive normal x: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s), s = (m-1)/(m+1),
  // |s| <= 0.172, by its odd series to s^9 (error < 1e-9). Accurate near 1 as well, where m - 1 is exact: the Gumbel
  // noise takes log(u) for u up to 1 - 2^-24.
  static LLADA_ALWAYS_INLINE F log(const F& x) {
    const I bits = cast<I>(x);
    I e = ((bits >> 23) & 0xff) - 127;
    F m = cast<F>((bits & 0x7fffff) | 0x3f800000);
    const I big = m > 1.41421356f;  // -1 where true
    m = big ? m * 0.5f : m;
    e = e - big;
    const F s = (m - 1.0f) / (m + 1.0f);
    const F s2 = s * s;
    F p = splat(2.0f / 9.0f);
    p = p * s2 + 2.0f / 7.0f;
    p = p * s2 + 2.0f / 5.0f;
    p = p * s2 + 2.0f / 3.0f;
    p = p * s2 + 2.0f;
    return s * p + __builtin_convertvector(e, F) * 0.693147180559945309f;
  }

  // (lo, hi) words of a * m per 32-bit lane: the even and the odd lanes each as 64-bit lanes with zero upper halves,
  // so that the multiply is one 32x32->64 instruction (pmuludq) per half.
  static LLADA_ALWAYS_INLINE void mulhilo(const U& a, uint32_t m, U* lo, U* hi) {
    const U2 a2 = cast<U2>(a);
    const U2 even = (a2 & 0xffffffffull) * m, odd = (a2 >> 32) * m;
    *lo = cast<U>((even & 0xffffffffull) | (odd << 32));
    *hi = cast<U>((even >> 32) | (odd & 0xffffffff00000000ull));
  }

  // Philox4x32-10 of philox.h for W consecutive columns of one row, as the uniforms philox_uniform returns (bit-exact).
  static LLADA_ALWAYS_INLINE F philox_uniform(uint64_t seed, uint64_t offset, uint32_t row, uint32_t col0) {
    U c0, c1 = U{} + row, c2 = U{} + static_cast<uint32_t>(offset), c3 = U{} + static_cast<uint32_t>(offset >> 32);
    for (int l = 0; l < W; ++l) c0[l] = col0 + static_cast<uint32_t>(l);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      U lo0, hi0, lo1, hi1;
      mulhilo(c0, 0xD2511F53u, &lo0, &hi0);
      mulhilo(c2, 0xCD9E8D57u, &lo1, &hi1);
      c0 = hi1 ^ c1 ^ k0;
      c1 = lo1;
      c2 = hi0 ^ c3 ^ k1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    return (__builtin_convertvector(cast<I>(c0 >> 9), F) + 0.5f) * (1.0f / 8388608.0f);
  }

  // fp16 bits -> fp32: rebias the exponent with one multiply by 2^112 (exact, also for subnormals); inf/nan keep an
  // all-ones exponent.
  static LLADA_ALWAYS_INLINE F half_to_float(const I& h) {
    I em = (h & 0x7fff) << 13;
    I sign = (h & 0x8000) << 16;
    I bits = cast<I>(cast<F>(em) * 0x1p112f);
    bits = em >= (0x7c00 << 13) ? (em | 0x7f800000) : bits;
    return cast<F>(bits | sign);
  }
};

LLADA_ALWAYS_INLINE float scalar_half_to_float(uint16_t h) {
  return Vec<4>::half_to_float(Vec<4>::I{} + static_cast<int32_t>(h))[0];
}
LLADA_ALWAYS_INLINE float scalar_exp(float x) { return Vec<4>::exp(Vec<4>::splat(x))[0]; }

template <int W>
LLADA_ALWAYS_INLINE void load_chunk(const void* row, int64_t c0, int n, DType dtype, float* __restrict__ dst) {
  using V = Vec<W>;
  int i = 0;
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(row) + c0, sizeof(float) * n);
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(row) + c0;
  if (dtype == DType::kBFloat16) {
    for (; i + W <= n; i += W) V::store(dst + i, V::template cast<typename V::F>(V::load_u16(src + i) << 16));
    for (; i < n; ++i) { uint32_t u = static_cast<uint32_t>(src[i]) << 16; std::memcpy(dst + i, &u, 4); }
  } else {
    for (; i + W <= n; i += W) V::store(dst + i, V::half_to_float(V::load_u16(src + i)));
    for (; i < n; ++i) dst[i] = scalar_half_to_float(src[i]);
  }
}

// NaN compares false, so a NaN logit is never the maximum.
template <int W>
LLADA_ALWAYS_INLINE float chunk_max(const float* __restrict__ x, int n) {
  using V = Vec<W>;
  typename V::F m = V::splat(kNegInf);
  int i = 0;
  for (; i + W <= n; i += W) {
    typename V::F v = V::load(x + i);
    m = v > m ? v : m;
  }
  float r = kNegInf;
  for (int l = 0; l < W; ++l) r = m[l] > r ? m[l] : r;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  return r;
}

// Sum of exp(x - mx) over a chunk. While this compute-bound loop runs, the next chunk of the row (pf, pf_bytes) is
// prefetched, so that its DRAM reads overlap the exps instead of stalling the next chunk_max.
template <int W>
LLADA_ALWAYS_INLINE float chunk_sum_exp(const float* __restrict__ x, int n, float mx, const char* pf, int pf_bytes) {
  using V = Vec<W>;
  typename V::F s0 = V::splat(0.0f), s1 = s0, s2 = s0, s3 = s0;  // independent chains for the out-of-order core
  const int pf_step = std::max(1, pf_bytes / std::max(1, n / (4 * W)));
  int i = 0, pf_off = 0;
  for (; i + 4 * W <= n; i += 4 * W, pf_off += pf_step) {
    if (pf_off < pf_bytes) __builtin_prefetch(pf + pf_off);
    if (pf_off + 64 < pf_bytes) __builtin_prefetch(pf + pf_off + 64);
    s0 += V::exp(V::load(x + i) - mx);
    s1 += V::exp(V::load(x + i + W) - mx);
    s2 += V::exp(V::load(x + i + 2 * W) - mx);
    s3 += V::exp(V::load(x + i + 3 * W) - mx);
  }
  for (; i + W <= n; i += W) s0 += V::exp(V::load(x + i) - mx);
  s0 += s1 + (s2 + s3);
  float r = 0.0f;
  for (int l = 0; l < W; ++l) r += s0[l];
  for (; i < n; ++i) r += scalar_exp(x[i] - mx);
  return r;
}

// key = logit + temperature * gumbel, gumbel = -log(-log(u)) with u the Philox draw of (row, column): W columns at a
// time (bit-exact Philox, polynomial logs), the last few through philox.h and std::log.
template <int W>
LLADA_ALWAYS_INLINE void add_gumbel(float* __restrict__ key, const float* __restrict__ logit, int n, int64_t col0,
                                    float temperature, uint64_t seed, uint64_t offset, uint32_t row) {
  using V = Vec<W>;
  int i = 0;
  for (; i + W <= n; i += W) {
    const typename V::F u = V::philox_uniform(seed, offset, row, static_cast<uint32_t>(col0 + i));
    const typename V::F g = -V::log(-V::log(u));
    V::store(key + i, V::load(logit + i) + temperature * g);
  }
  for (; i < n; ++i) {
    const float u = philox_uniform(seed, offset, row, static_cast<uint32_t>(col0 + i));
    key[i] = logit[i] + temperature * -std::log(-std::log(u));
  }
}

inline int first_index_of(const float* x, int n, float v) {
  for (int i = 0; i < n; ++i)
    if (x[i] == v) return i;
  return n;
}

inline bool contains(const int64_t* ids, int n, int64_t v) {
  for (int i = 0; i < n; ++i)
    if (ids[i] == v) return true;
  return false;
}

struct RowResult { int64_t token; float prob; };

template <int W>
LLADA_ALWAYS_INLINE RowResult confidence_row(const ConfidenceParams& p, const void* row_ptr, uint32_t row) {
  alignas(64) float logit[kChunk];
  alignas(64) float key_buf[kChunk];
  const bool noisy = p.temperature > 0.0f;
  const bool want_prob = !p.random_confidence;
  const int64_t elt = p.dtype == DType::kFloat32 ? 4 : 2;
  float best_key = kNegInf, best_logit = kNegInf;  // argmax so far; strict '>' keeps the lowest id on ties
  int64_t best_id = -1;
  float run_max = kNegInf, run_sum = 0.0f;  // online softmax over the ids that are neither suppressed nor zero-conf
  for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, p.V - c0));
    bool has_suppressed = false, has_zero_conf = false;
    for (int s = 0; s < p.n_suppress; ++s) has_suppressed |= p.suppress_ids[s] >= c0 && p.suppress_ids[s] < c0 + n;
    for (int s = 0; s < p.n_zero_conf; ++s) has_zero_conf |= p.zero_conf_ids[s] >= c0 && p.zero_conf_ids[s] < c0 + n;
    // fp32 chunks without special ids are read in place; the others are converted or patched in the L1 buffer
    const float* x = logit;
    if (p.dtype == DType::kFloat32 && !has_suppressed && !(has_zero_conf && want_prob)) {
      x = static_cast<const float*>(row_ptr) + c0;
    } else {
      load_chunk<W>(row_ptr, c0, n, p.dtype, logit);
      for (int s = 0; s < p.n_suppress; ++s) {
        const int64_t id = p.suppress_ids[s] - c0;
        if (id >= 0 && id < n) logit[id] = kNegInf;
      }
    }
    const float* key = x;
    if (noisy) {
      add_gumbel<W>(key_buf, x, n, c0, p.temperature, p.seed, p.offset, row);
      key = key_buf;
    }
    const float chunk_best = chunk_max<W>(key, n);
    if (chunk_best > best_key) {
      const int i = first_index_of(key, n, chunk_best);
      best_key = chunk_best;
      best_id = c0 + i;
      best_logit = x[i];
    }
    if (!want_prob) continue;
    if (has_zero_conf) {  // x is the buffer here: zero-confidence ids leave the softmax after the argmax
      for (int s = 0; s < p.n_zero_conf; ++s) {
        const int64_t id = p.zero_conf_ids[s] - c0;
        if (id >= 0 && id < n) logit[id] = kNegInf;
      }
    }
    const float chunk_logit_max = (noisy || has_zero_conf) ? chunk_max<W>(x, n) : chunk_best;
    if (!(chunk_logit_max > kNegInf)) continue;  // nothing of this chunk is in the softmax
    if (chunk_logit_max > run_max) {
      run_sum *= scalar_exp(run_max - chunk_logit_max);
      run_max = chunk_logit_max;
    }
    const int64_t next_n = std::min<int64_t>(kChunk, p.V - c0 - n);
    const char* next = static_cast<const char*>(row_ptr) + (c0 + n) * elt;
    run_sum += chunk_sum_exp<W>(x, n, run_max, next, next_n > 0 ? static_cast<int>(next_n * elt) : 0);
  }
  RowResult r;
  if (best_id < 0) {
    // Every key is -inf (or NaN): the argmax rule with ties to the lowest id picks the lowest id that is not
    // suppressed; its probability is defined as 0 (a softmax over only -inf would be NaN).
    int64_t id = 0;
    while (id < p.V && contains(p.suppress_ids, p.n_suppress, id)) ++id;
    r.token = id < p.V ? id : 0;
    r.prob = 0.0f;
  } else {
    r.token = best_id;
    if (!want_prob || contains(p.zero_conf_ids, p.n_zero_conf, best_id)) r.prob = 0.0f;
    else r.prob = std::exp(best_logit - run_max) / run_sum;
  }
  // Random remasking: the confidence is one Philox draw per row whatever the token (the official code's rand()).
  if (p.random_confidence) r.prob = philox_uniform(p.seed, p.offset, row, kRandomConfidenceColumn);
  return r;
}

// One copy of the row loop per instruction set, picked once per process; the build itself stays portable (no -march).
// The OpenMP loop stays outside: its outlined body would not inherit a target attribute.
using RowFn = RowResult (*)(const ConfidenceParams&, const void*, uint32_t);
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")))
RowResult row_avx512(const ConfidenceParams& p, const void* row_ptr, uint32_t row) {
  return confidence_row<16>(p, row_ptr, row);
}
__attribute__((target("avx2,fma,f16c,bmi2")))
RowResult row_avx2(const ConfidenceParams& p, const void* row_ptr, uint32_t row) {
  return confidence_row<8>(p, row_ptr, row);
}
#endif
RowResult row_generic(const ConfidenceParams& p, const void* row_ptr, uint32_t row) {
  return confidence_row<4>(p, row_ptr, row);
}

RowFn pick_row_fn() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    return row_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    return row_avx2;
#endif
  return row_generic;
}

}  // namespace

void confidence_cpu(const ConfidenceParams& p) {
  static const RowFn row_fn = pick_row_fn();
  const int64_t rows = static_cast<int64_t>(p.B) * p.N;
  const size_t elt = p.dtype == DType::kFloat32 ? 4 : 2;
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1 && static_cast<int64_t>(p.V) * rows >= 65536)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / p.N, n = r % p.N;
    if (!p.masked_ptr[r]) {
      p.token_ptr[r] = -1;
      p.prob_ptr[r] = kNegInf;
      continue;
    }
    const int64_t row_offset = b * p.logits_b_stride + n * p.logits_n_stride;  // elements
    const char* row_ptr = static_cast<const char*>(p.logits_ptr) + row_offset * elt;
    RowResult res = row_fn(p, row_ptr, static_cast<uint32_t>(r));
    p.token_ptr[r] = res.token;
    p.prob_ptr[r] = res.prob;
  }
}

}  // namespace llada
