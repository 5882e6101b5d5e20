// CPU confidence: per masked row, one pass over V in L1-sized chunks -> argmax token of the (noisy) logits and its
// float64 softmax probability (or a vocabulary shard's merge state); never materializes probabilities.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "confidence.h"
#include "philox.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's own _mm512_cvtps_pd (an undefined pass-through)

#define LLADA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace llada {
namespace {

constexpr int kChunk = 2048;  // 8 KiB of fp32 per buffer: a chunk is converted once and re-read from L1
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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
  typedef double D __attribute__((vector_size(16)));     // half of an F in float64
};
template <> struct VecTypes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef uint64_t U2 __attribute__((vector_size(32)));  // the same bytes as pairs of 32-bit lanes
  typedef uint16_t H __attribute__((vector_size(16)));
  typedef double D __attribute__((vector_size(32)));     // half of an F in float64
};
template <> struct VecTypes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint32_t U __attribute__((vector_size(64)));
  typedef uint64_t U2 __attribute__((vector_size(64)));  // the same bytes as pairs of 32-bit lanes
  typedef uint16_t H __attribute__((vector_size(32)));
  typedef double D __attribute__((vector_size(64)));     // half of an F in float64
};

// a * b + c with one rounding per lane (the error-free product of term_split needs a true FMA, which GCC's vector
// extensions cannot spell), and the lanes of an F in float64 as two halves. The instructions take a target attribute
// that the always-inline helpers of Vec cannot carry, so these are plain inline functions: GCC inlines them once
// their call sites sit in row_avx512 / row_avx2 (check with objdump: no calls from the row loops).
LLADA_ALWAYS_INLINE VecTypes<4>::F fma_lanes(const VecTypes<4>::F& a, const VecTypes<4>::F& b,
                                             const VecTypes<4>::F& c) {
  VecTypes<4>::F r;
  for (int l = 0; l < 4; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
}
LLADA_ALWAYS_INLINE void to_double_halves(const VecTypes<4>::F& x, VecTypes<4>::D* lo, VecTypes<4>::D* hi) {
  for (int l = 0; l < 2; ++l) { (*lo)[l] = x[l]; (*hi)[l] = x[l + 2]; }
}
// x clamped to [lo, hi], NaN to lo (max/min instructions return their second operand for a NaN)
LLADA_ALWAYS_INLINE VecTypes<4>::F clamp_lanes(VecTypes<4>::F x, float lo, float hi) {
  x = x > lo ? x : VecTypes<4>::F{} + lo;
  return x < hi ? x : VecTypes<4>::F{} + hi;
}
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) inline VecTypes<8>::F fma_lanes(const VecTypes<8>::F& a, const VecTypes<8>::F& b,
                                                                   const VecTypes<8>::F& c) {
  return _mm256_fmadd_ps(a, b, c);
}
__attribute__((target("avx2"))) inline VecTypes<8>::F clamp_lanes(const VecTypes<8>::F& x, float lo, float hi) {
  return _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}
__attribute__((target("avx2,fma"))) inline void to_double_halves(const VecTypes<8>::F& x, VecTypes<8>::D* lo,
                                                                VecTypes<8>::D* hi) {
  *lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
  *hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
}
__attribute__((target("avx512f"))) inline VecTypes<16>::F fma_lanes(const VecTypes<16>::F& a,
                                                                    const VecTypes<16>::F& b,
                                                                    const VecTypes<16>::F& c) {
  return _mm512_fmadd_ps(a, b, c);
}
__attribute__((target("avx512f"))) inline VecTypes<16>::F clamp_lanes(const VecTypes<16>::F& x, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}
__attribute__((target("avx512f,avx512dq"))) inline void to_double_halves(const VecTypes<16>::F& x,
                                                                          VecTypes<16>::D* lo, VecTypes<16>::D* hi) {
  *lo = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 0));
  *hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1));
}
#endif

inline uint32_t float_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }

template <int W>
struct Vec {
  using F = typename VecTypes<W>::F;
  using I = typename VecTypes<W>::I;
  using H = typename VecTypes<W>::H;
  using U = typename VecTypes<W>::U;
  using U2 = typename VecTypes<W>::U2;
  using D = typename VecTypes<W>::D;
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

  // 2^f for |f| <= 0.5 by a degree-5 polynomial fitted for relative error (< 2.4e-7 evaluated in fp32).
  static LLADA_ALWAYS_INLINE F exp2_reduced(const F& f) {
    F p = splat(1.3276439858600497e-3f);
    p = p * f + 9.675540961325169e-3f;
    p = p * f + 5.550713464617729e-2f;
    p = p * f + 2.4022120237350464e-1f;
    p = p * f + 6.931469440460205e-1f;
    return p * f + 1.0000001192092896f;
  }

  // u = kRoundToInt + n for the clamped x and f (confidence.h): t = fl(x kLog2e), its exact error by an FMA.
  static LLADA_ALWAYS_INLINE void term_split(const F& x, F* u, F* f) {
    const F t = x * kLog2e;
    const F e = fma_lanes(x, splat(kLog2eLo), fma_lanes(x, splat(kLog2e), -t));
    *u = t + kRoundToInt;
    *f = (t - (*u - kRoundToInt)) + e;  // t - n is exact
  }

  // n of the softmax term of a finite maximum logit x: the reference it sets.
  static LLADA_ALWAYS_INLINE I term_exponent(const F& x) {
    F u, f;
    term_split(x < kLogitClamp ? x : splat(kLogitClamp), &u, &f);
    return cast<I>(u) - cast<I>(splat(kRoundToInt));
  }

  // The softmax term 2^(x log2(e) - ref) of confidence.h: r 2^(n - ref) with r = 2^f, the scaling done in the
  // exponent bits (exact); lo = term_floor(ref), where -inf and NaN land. (softmax_term_lanes: the same values with
  // AVX-512's own rounding and scaling instructions.)
  static LLADA_ALWAYS_INLINE F softmax_term(const F& x, int32_t ref, float lo) {
    F u, f;
    term_split(clamp_lanes(x, lo, kLogitClamp), &u, &f);
    const U k = cast<U>(u) - static_cast<uint32_t>(float_bits(kRoundToInt) + ref);
    return cast<F>(cast<U>(exp2_reduced(f)) + (k << 23));
  }

  // the lanes of an F in float64, as two halves (to_double_halves below: one conversion per half)
  static LLADA_ALWAYS_INLINE void to_double(const F& x, D* lo, D* hi) { to_double_halves(x, lo, hi); }

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

  // Philox4x32-10 of philox.h for W consecutive columns of one position, as philox_uniform returns them (bit-exact).
  static LLADA_ALWAYS_INLINE F philox_uniform(uint64_t seed, uint64_t offset, uint32_t position, uint32_t col0) {
    U c0, c1 = U{} + position, c2 = U{} + static_cast<uint32_t>(offset), c3 = U{} + static_cast<uint32_t>(offset >> 32);
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

// softmax_term of Vec<W>, and for AVX-512 the same values in fewer instructions: n = roundscale(t), t - n = reduce(t)
// (both exact, nearest-even like the kRoundToInt trick), r 2^(n - ref) by scalef (exact for these normal results).
template <int W>
LLADA_ALWAYS_INLINE typename Vec<W>::F softmax_term_lanes(const typename Vec<W>::F& x, int32_t ref, float lo) {
  return Vec<W>::softmax_term(x, ref, lo);
}
#if defined(__x86_64__) && defined(__GNUC__)
template <>
__attribute__((target("avx512f,avx512dq"))) inline VecTypes<16>::F softmax_term_lanes<16>(const VecTypes<16>::F& x,
                                                                                          int32_t ref, float lo) {
  const __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(lo)), _mm512_set1_ps(kLogitClamp));
  const __m512 log2e = _mm512_set1_ps(kLog2e);
  const __m512 t = _mm512_mul_ps(c, log2e);
  const __m512 e = _mm512_fmadd_ps(c, _mm512_set1_ps(kLog2eLo), _mm512_fmsub_ps(c, log2e, t));
  const __m512 f = _mm512_add_ps(_mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT), e);
  const __m512 k = _mm512_sub_ps(_mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT),
                                 _mm512_set1_ps(static_cast<float>(ref)));  // integers below 2^24: exact
  return _mm512_scalef_ps(Vec<16>::exp2_reduced(f), k);
}
#endif

LLADA_ALWAYS_INLINE float scalar_half_to_float(uint16_t h) {
  return Vec<4>::half_to_float(Vec<4>::I{} + static_cast<int32_t>(h))[0];
}


// n elements of a row from column c0 as fp32, then -inf up to n_pad (a multiple of W): every element, the last ones
// included, goes through the same vector code, so a term or a key never depends on where a chunk or a shard ends.
template <int W>
LLADA_ALWAYS_INLINE void load_chunk(const void* row, int64_t c0, int n, int n_pad, DType dtype,
                                    float* __restrict__ dst) {
  using V = Vec<W>;
  int i = 0;
  if (dtype == DType::kFloat32) {
    std::memcpy(dst, static_cast<const float*>(row) + c0, sizeof(float) * n);
    i = n;
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(row) + c0;
    if (dtype == DType::kBFloat16) {
      for (; i + W <= n; i += W) V::store(dst + i, V::template cast<typename V::F>(V::load_u16(src + i) << 16));
      for (; i < n; ++i) { uint32_t u = static_cast<uint32_t>(src[i]) << 16; std::memcpy(dst + i, &u, 4); }
    } else {
      for (; i + W <= n; i += W) V::store(dst + i, V::half_to_float(V::load_u16(src + i)));
      for (; i < n; ++i) dst[i] = scalar_half_to_float(src[i]);
    }
  }
  for (; i < n_pad; ++i) dst[i] = kNegInf;
}

// Max over n (a multiple of W) elements. NaN compares false, so a NaN logit is never the maximum.
template <int W>
LLADA_ALWAYS_INLINE float chunk_max(const float* __restrict__ x, int n) {
  using V = Vec<W>;
  typename V::F m = V::splat(kNegInf);
  for (int i = 0; i < n; i += W) {
    typename V::F v = V::load(x + i);
    m = v > m ? v : m;
  }
  float r = kNegInf;
  for (int l = 0; l < W; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

// Sum in float64 of the softmax terms of the first n elements (x is padded to a multiple of W). While this
// compute-bound loop runs, the next chunk of the row (pf, pf_bytes) is prefetched, so that its DRAM reads overlap the
// exps instead of stalling the next load.
template <int W>
LLADA_ALWAYS_INLINE double chunk_sum_terms(const float* __restrict__ x, int n, int32_t ref, const char* pf,
                                           int pf_bytes) {
  const float floor = term_floor(ref);
  using V = Vec<W>;
  using D = typename V::D;
  D s0{}, s1{}, s2{}, s3{};  // independent chains for the out-of-order core
  const int pf_step = std::max(1, pf_bytes / std::max(1, n / (2 * W)));
  int i = 0, pf_off = 0;
  D lo, hi;
  for (; i + 2 * W <= n; i += 2 * W, pf_off += pf_step) {
    if (pf_off < pf_bytes) __builtin_prefetch(pf + pf_off);
    V::to_double(softmax_term_lanes<W>(V::load(x + i), ref, floor), &lo, &hi);
    s0 += lo;
    s1 += hi;
    V::to_double(softmax_term_lanes<W>(V::load(x + i + W), ref, floor), &lo, &hi);
    s2 += lo;
    s3 += hi;
  }
  typename V::I lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  for (; i < n; i += W) {  // the last vector may be partly padding: those lanes add nothing
    const typename V::F t = softmax_term_lanes<W>(V::load(x + i), ref, floor);
    V::to_double(lane < n - i ? t : V::splat(0.0f), &lo, &hi);
    s0 += lo;
    s1 += hi;
  }
  const D s = (s0 + s1) + (s2 + s3);
  double r = 0.0;
  for (int l = 0; l < W / 2; ++l) r += s[l];
  return r;
}

// key = logit + temperature * gumbel, gumbel = -log(-log(u)) with u the Philox draw of (position, column), W columns
// at a time (bit-exact Philox, polynomial logs); n is a multiple of W.
template <int W>
LLADA_ALWAYS_INLINE void add_gumbel(float* __restrict__ key, const float* __restrict__ logit, int n, uint32_t col0,
                                    float temperature, uint64_t seed, uint64_t offset, uint32_t position) {
  using V = Vec<W>;
  for (int i = 0; i < n; i += W) {
    const typename V::F u = V::philox_uniform(seed, offset, position, col0 + static_cast<uint32_t>(i));
    const typename V::F g = -V::log(-V::log(u));
    V::store(key + i, V::load(logit + i) + temperature * g);
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

// The settings of one (b, n) row and its special ids inside the shard (local ids).
struct Row : RowSettings {
  int n_suppress, n_zero_conf;
  int64_t suppress[kMaxSpecialIds], zero_conf[kMaxSpecialIds];
};

Row row_of(const ConfidenceParams& p, int64_t b, int64_t n) {
  Row r;
  static_cast<RowSettings&>(r) = row_settings(p, b, n);
  r.n_suppress = r.n_zero_conf = 0;
  for (int i = 0; i < p.n_special; ++i) {
    const int64_t local = p.special_ids[i] - p.vocab_offset;
    if (local < 0 || local >= p.V) continue;
    if ((p.suppress_mask_ptr[b] >> i) & 1) r.suppress[r.n_suppress++] = local;
    if ((p.zero_conf_mask_ptr[b] >> i) & 1) r.zero_conf[r.n_zero_conf++] = local;
  }
  return r;
}

// A row's result before the merge: the token (global id), its key, its softmax term relative to ref, and the sum of
// the row's softmax terms relative to ref. The full op is prob = num / denom.
struct RowResult { int64_t token; double key, num; int32_t ref; double denom; };

template <int W>
LLADA_ALWAYS_INLINE RowResult confidence_row(const ConfidenceParams& p, const Row& r, const void* row_ptr) {
  using V = Vec<W>;
  alignas(64) float buf[kChunk];
  alignas(64) float key_buf[kChunk];
  const bool noisy = r.temperature > 0.0f;
  const bool want_prob = !r.random;
  const int64_t elt = p.dtype == DType::kFloat32 ? 4 : 2;
  float best_key = kNegInf, best_logit = kNegInf;  // argmax so far; strict '>' keeps the lowest id on ties
  int64_t best_id = -1;
  float run_max = kNegInf;  // softmax over the ids that are neither suppressed nor zero-conf, in base 2 against ref
  int32_t ref = kRefNone;
  double sum = 0.0;
  for (int64_t c0 = 0; c0 < p.V; c0 += kChunk) {
    const int n = static_cast<int>(std::min<int64_t>(kChunk, p.V - c0));
    const int n_pad = (n + W - 1) / W * W;
    bool has_suppressed = false, has_zero_conf = false;
    for (int s = 0; s < r.n_suppress; ++s) has_suppressed |= r.suppress[s] >= c0 && r.suppress[s] < c0 + n;
    for (int s = 0; s < r.n_zero_conf; ++s) has_zero_conf |= r.zero_conf[s] >= c0 && r.zero_conf[s] < c0 + n;
    // whole fp32 chunks without special ids are read in place; the others are converted or patched in the L1 buffer
    const float* logit = buf;
    if (p.dtype == DType::kFloat32 && n == n_pad && !has_suppressed && !(has_zero_conf && want_prob)) {
      logit = static_cast<const float*>(row_ptr) + c0;
    } else {
      load_chunk<W>(row_ptr, c0, n, n_pad, p.dtype, buf);
      for (int s = 0; s < r.n_suppress; ++s) {
        const int64_t id = r.suppress[s] - c0;
        if (id >= 0 && id < n) buf[id] = kNegInf;
      }
    }
    const float* key = logit;
    if (noisy) {
      add_gumbel<W>(key_buf, logit, n_pad, r.col0 + static_cast<uint32_t>(c0), r.temperature, r.seed, r.offset,
                    r.position);
      key = key_buf;
    }
    const float chunk_best = chunk_max<W>(key, n_pad);
    if (chunk_best > best_key) {
      const int i = first_index_of(key, n, chunk_best);
      best_key = chunk_best;
      best_id = c0 + i;
      best_logit = logit[i];
    }
    if (!want_prob) continue;
    if (has_zero_conf) {  // logit is the buffer here: zero-confidence ids leave the softmax after the argmax
      for (int s = 0; s < r.n_zero_conf; ++s) {
        const int64_t id = r.zero_conf[s] - c0;
        if (id >= 0 && id < n) buf[id] = kNegInf;
      }
    }
    const float chunk_logit_max = (noisy || has_zero_conf) ? chunk_max<W>(logit, n_pad) : chunk_best;
    if (!(chunk_logit_max > kNegInf)) continue;  // nothing of this chunk is in the softmax
    if (chunk_logit_max > run_max) {  // move the sum to the new reference: an exact power-of-two scaling
      run_max = chunk_logit_max;
      const int32_t new_ref = V::term_exponent(V::splat(chunk_logit_max))[0];
      if (new_ref > ref) {
        sum = std::ldexp(sum, ref - new_ref);
        ref = new_ref;
      }
    }
    const int64_t next_n = std::min<int64_t>(kChunk, p.V - c0 - n);
    const char* next = static_cast<const char*>(row_ptr) + (c0 + n) * elt;
    sum += chunk_sum_terms<W>(logit, n, ref, next, next_n > 0 ? static_cast<int>(next_n * elt) : 0);
  }
  RowResult res{0, kNegInf, 0.0, ref, sum};
  if (best_id < 0) {
    // Every key is -inf (or NaN): the argmax rule with ties to the lowest id picks the lowest id that is not
    // suppressed, with probability 0 (a softmax over only -inf would be NaN); a shard whose every id is suppressed
    // answers full_vocab, which loses every tie of the merge.
    int64_t id = 0;
    while (id < p.V && contains(r.suppress, r.n_suppress, id)) ++id;
    res.token = id < p.V ? p.vocab_offset + id : p.full_vocab;
  } else {
    res.token = p.vocab_offset + best_id;
    res.key = best_key;
    if (want_prob && !contains(r.zero_conf, r.n_zero_conf, best_id))  // the same function as its term in the sum
      res.num = softmax_term_lanes<W>(V::splat(best_logit), ref, term_floor(ref))[0];
  }
  return res;
}

// One copy of the row loop per instruction set, picked once per process; the build itself stays portable (no -march).
// The OpenMP loop stays outside: its outlined body would not inherit a target attribute.
using RowFn = RowResult (*)(const ConfidenceParams&, const Row&, const void*);
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")))
RowResult row_avx512(const ConfidenceParams& p, const Row& r, const void* row_ptr) {
  return confidence_row<16>(p, r, row_ptr);
}
__attribute__((target("avx2,fma,f16c,bmi2")))
RowResult row_avx2(const ConfidenceParams& p, const Row& r, const void* row_ptr) {
  return confidence_row<8>(p, r, row_ptr);
}
#endif
RowResult row_generic(const ConfidenceParams& p, const Row& r, const void* row_ptr) {
  return confidence_row<4>(p, r, row_ptr);
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
  for (int b = 0; b < p.B; ++b) {  // host memory: per-row settings can be checked for free, before any write
    const float t = p.temperature_ptr[b];
    if (!(t >= 0.0f))
      throw std::invalid_argument("llada_rt confidence: temperature[" + std::to_string(b) + "] = " +
                                  std::to_string(t) + "; temperatures must be >= 0 (0 = greedy argmax)");
  }
  const int64_t rows = static_cast<int64_t>(p.B) * p.N;
  const size_t elt = p.dtype == DType::kFloat32 ? 4 : 2;
#pragma omp parallel for schedule(dynamic, 1) if (rows > 1 && static_cast<int64_t>(p.V) * rows >= 65536)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t b = i / p.N, n = i % p.N;
    if (!p.masked_ptr[i]) {
      write_unmasked_row(p, i);
      continue;
    }
    const Row r = row_of(p, b, n);
    const int64_t row_offset = b * p.logits_b_stride + n * p.logits_n_stride;  // elements
    const char* row_ptr = static_cast<const char*>(p.logits_ptr) + row_offset * elt;
    const RowResult res = row_fn(p, r, row_ptr);
    write_row(p, i, res.token, res.key, res.num, res.ref, res.denom, random_prob(r));
  }
}

}  // namespace llada
