// W-lane fp32 vectors (GCC vector extensions) with fp32/bf16/fp16 loads and round-to-nearest-even stores, and the
// once-per-process pick of the instruction set that the CPU kernels rms_norm, rope, silu_mul and attention run with.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "common.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

#define LLADA_INLINE inline __attribute__((always_inline))

namespace llada::cpu {

// The kernels are templates on W, instantiated inside functions with a target attribute (AVX-512: W 16, AVX2: W 8,
// baseline x86-64: W 4): explicit lanes vectorize without -ffast-math, and a width above the target's native one
// would be split into scalar code.
template <int W> struct Lanes;
template <> struct Lanes<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef uint32_t U __attribute__((vector_size(16)));
  typedef uint16_t H __attribute__((vector_size(8)));
};
template <> struct Lanes<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(32)));
  typedef uint16_t H __attribute__((vector_size(16)));
};
template <> struct Lanes<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef uint32_t U __attribute__((vector_size(64)));
  typedef uint16_t H __attribute__((vector_size(32)));
};

// Element types: storage type and dtype code. bf16 and fp16 are stored as their bits.
struct F32 { using T = float; static constexpr DType kDType = DType::kFloat32; };
struct BF16 { using T = uint16_t; static constexpr DType kDType = DType::kBFloat16; };
struct F16 { using T = uint16_t; static constexpr DType kDType = DType::kFloat16; };

template <int W>
struct Vec {
  using F = typename Lanes<W>::F;
  using I = typename Lanes<W>::I;
  using U = typename Lanes<W>::U;
  using H = typename Lanes<W>::H;

  template <class To, class From>
  static LLADA_INLINE To bits(const From& v) { To t; std::memcpy(&t, &v, sizeof t); return t; }
  static LLADA_INLINE F splat(float x) { return F{} + x; }
  static LLADA_INLINE F min(const F& a, const F& b) { return a < b ? a : b; }
  static LLADA_INLINE F max(const F& a, const F& b) { return a > b ? a : b; }
  static LLADA_INLINE float hsum(const F& v) { float r = 0.f; for (int l = 0; l < W; ++l) r += v[l]; return r; }
  static LLADA_INLINE float hmax(const F& v) {
    float r = v[0];
    for (int l = 1; l < W; ++l) r = v[l] > r ? v[l] : r;
    return r;
  }

  // fp16 bits -> fp32: shifting exponent and mantissa into place and multiplying by 2^112 rebiases the exponent
  // exactly (subnormal halves become normal floats); inf and NaN keep an all-ones exponent.
  static LLADA_INLINE F from_half(const U& h) {
    const U em = (h & 0x7fffu) << 13;
    const U sign = (h & 0x8000u) << 16;
    const U scaled = bits<U>(bits<F>(em) * 0x1p112f);
    return bits<F>((em >= (0x7c00u << 13) ? (em | 0x7f800000u) : scaled) | sign);
  }
  // fp32 -> bf16 bits, nearest even; NaN -> 0x7fc0 (as c10::BFloat16)
  static LLADA_INLINE U to_bf16(const F& v) {
    const U u = bits<U>(v);
    const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? U{} + 0x7fc0u : rounded;
  }
  // fp32 -> fp16 bits, nearest even, overflow to inf, NaN -> 0x7e00. Results below the normal range are rounded by
  // the FPU itself: adding 0.5 makes the float's ulp equal the fp16 subnormal step, so the add rounds at that bit.
  static LLADA_INLINE U to_half(const F& v) {
    const U u0 = bits<U>(v);
    const U sign = u0 & 0x80000000u;
    const U u = u0 ^ sign;
    const U inf_nan = u > 0x7f800000u ? U{} + 0x7e00u : U{} + 0x7c00u;
    const U sub = bits<U>(bits<F>(u) + 0.5f) - 0x3f000000u;
    const U norm = (u + 0xc8000fffu + ((u >> 13) & 1u)) >> 13;  // rebias by -112 << 23, round half to even
    const U out = u >= 0x47800000u ? inf_nan : (u < 0x38800000u ? sub : norm);
    return out | (sign >> 16);
  }

  // 2^x for x <= 0 (softmax terms: scores minus their max): x = n + f with n = round(x), |f| <= 1/2; 2^f by a
  // degree-5 polynomial (relative error < 2.4e-7), 2^n through the exponent bits. x is clamped at -126, so -inf and
  // anything below give 2^-126 ~ 1.2e-38, never 0 or NaN: callers zero masked terms themselves.
  // (csrc/cpu/confidence.cpp still keeps its own copy of this polynomial, for e^x.)
  static LLADA_INLINE F exp2_nonpos(const F& x_in) {
    const F x = max(x_in, splat(-126.0f));
    const F shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits
    const F u = x + shifter;
    const F f = x - (u - shifter);
    F p = splat(1.3276439858600497e-3f);
    p = p * f + 9.675540961325169e-3f;
    p = p * f + 5.550713464617729e-2f;
    p = p * f + 2.4022120237350464e-1f;
    p = p * f + 6.931469440460205e-1f;
    p = p * f + 1.0000001192092896f;
    return p * bits<F>((bits<I>(u) << 23) + (127 << 23));  // u's low mantissa bits hold n
  }

  template <class E = F32>
  static LLADA_INLINE F load(const typename E::T* p) {
    if constexpr (E::kDType == DType::kFloat32) {
      F v;
      std::memcpy(&v, p, sizeof v);
      return v;
    } else {
      H h;
      std::memcpy(&h, p, sizeof h);
      const U u = __builtin_convertvector(h, U);
      if constexpr (E::kDType == DType::kBFloat16) return bits<F>(u << 16);
      else return from_half(u);
    }
  }
  template <class E = F32>
  static LLADA_INLINE void store(typename E::T* p, const F& v) {
    if constexpr (E::kDType == DType::kFloat32) {
      std::memcpy(p, &v, sizeof v);
    } else {
      const H h = __builtin_convertvector(E::kDType == DType::kBFloat16 ? to_bf16(v) : to_half(v), H);
      std::memcpy(p, &h, sizeof h);
    }
  }
  // v rounded to E and back to fp32: what storing an intermediate result in E does (torch rounds after every op)
  template <class E>
  static LLADA_INLINE F round(const F& v) {
    if constexpr (E::kDType == DType::kFloat32) return v;
    else if constexpr (E::kDType == DType::kBFloat16) return bits<F>(to_bf16(v) << 16);
    else return from_half(to_half(v));
  }
  // the first n < W lanes (zeros after) / store of the first n lanes: row tails, through an L1 buffer
  template <class E>
  static LLADA_INLINE F load_n(const typename E::T* p, int n) {
    typename E::T buf[W] = {};
    std::memcpy(buf, p, n * sizeof(typename E::T));
    return load<E>(buf);
  }
  template <class E>
  static LLADA_INLINE void store_n(typename E::T* p, const F& v, int n) {
    typename E::T buf[W];
    store<E>(buf, v);
    std::memcpy(p, buf, n * sizeof(typename E::T));
  }
};

template <class E>
LLADA_INLINE float load_scalar(const typename E::T* p) { return Vec<4>::load_n<E>(p, 1)[0]; }
template <class E>
LLADA_INLINE void store_scalar(typename E::T* p, float x) { Vec<4>::store_n<E>(p, Vec<4>::splat(x), 1); }

enum class Isa { kAvx512, kAvx2, kBaseline };                      // widest first
constexpr const char* kIsaNames[] = {"avx512", "avx2", "baseline"};  // by Isa

// The widest instruction set this CPU runs (AVX-512 F/BW/DQ/VL, else AVX2 + FMA + F16C, else baseline), once.
inline Isa host_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

// A narrower instruction set than the host's for every kernel of this file's users, so that tests run the AVX2 and
// baseline paths on an AVX-512 machine (set_cpu_isa in bindings/module.cpp).
inline std::atomic<Isa>& isa_limit() {
  static std::atomic<Isa> limit{Isa::kAvx512};
  return limit;
}

// The instruction set the kernels run now: the host's, narrowed by isa_limit() (the enum goes widest first).
inline Isa active_isa() { return std::max(host_isa(), isa_limit().load(std::memory_order_relaxed)); }

// One function per instruction set (defined with LLADA_TARGET_*), chosen by active_isa() on every call.
template <class Fn>
Fn pick_isa(Fn avx512, Fn avx2, Fn baseline) {
  switch (active_isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return baseline;
  }
}

// The kernel for dtype at the active instruction set. Isa<E> is a kernel file's struct of the three instantiations
// for element type E: static functions avx512 / avx2 / baseline of type Fn.
template <class Fn, template <class> class Isa>
Fn pick_kernel(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return pick_isa<Fn>(Isa<F32>::avx512, Isa<F32>::avx2, Isa<F32>::baseline);
    case DType::kFloat16: return pick_isa<Fn>(Isa<F16>::avx512, Isa<F16>::avx2, Isa<F16>::baseline);
    default: return pick_isa<Fn>(Isa<BF16>::avx512, Isa<BF16>::avx2, Isa<BF16>::baseline);
  }
}

}  // namespace llada::cpu

#if defined(__x86_64__) && defined(__GNUC__)
#define LLADA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")))
#define LLADA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))
#else
#define LLADA_TARGET_AVX512
#define LLADA_TARGET_AVX2
#endif
