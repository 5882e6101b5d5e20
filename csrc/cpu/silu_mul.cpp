// CPU silu_mul: out = silu(gate) * up over rows [gate | up], with torch's two roundings in the dtype (silu rounded,
// then the product). Only exp's polynomial has multiply-adds to fuse; torch's exp (Sleef) differs by an ulp anyway.
#include <algorithm>

#include "cpu/vec.h"
#include "silu_mul.h"

namespace llada {
namespace {

using cpu::Vec;

constexpr int kChunk = 2048;  // columns per task: rows of LLaDA-8B (F = 12288) split over the threads

// exp(x) within ~1 ulp for x in [-87, 88.72] (Cephes expf: x = n ln2 + r with ln2 split in two so n ln2 is exact,
// degree-7 polynomial for e^r), inf above. Below -87 it returns exp(-87) ~ 1.6e-38: silu only adds it to 1.
template <int W>
LLADA_INLINE typename Vec<W>::F exp_silu(const typename Vec<W>::F& x_in) {
  using V = Vec<W>;
  using F = typename V::F;
  using I = typename V::I;
  constexpr float kLnFltMax = 88.72283935546875f;
  const auto overflow = x_in > kLnFltMax;
  const F x = V::min(V::max(x_in, V::splat(-87.0f)), V::splat(kLnFltMax));
  const F shifter = V::splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const F n = (x * 1.44269504088896341f + shifter) - shifter;
  const F r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  F q = V::splat(1.9875691500e-4f);
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const F y = q * (r * r) + r + 1.0f;
  // 2^n for n in [-126, 128] as 2^k * f with k = n - 1 for n > 0, so that both factors are normal floats
  const I ni = __builtin_convertvector(n, I);
  const I k = ni > 0 ? ni - 1 : ni;
  const F f = ni > 0 ? V::splat(2.0f) : V::splat(1.0f);
  const F res = y * V::template bits<F>((k + 127) << 23) * f;
  return overflow ? V::splat(__builtin_inff()) : res;
}

template <int W, class E>
LLADA_INLINE typename Vec<W>::F silu_mul_vec(const typename Vec<W>::F& g, const typename Vec<W>::F& u) {
  using V = Vec<W>;
  const typename V::F silu = g / (1.0f + exp_silu<W>(-g));
  return V::template round<E>(silu) * u;
}

template <int W, class E>
LLADA_INLINE void silu_mul_task(const SiluMulParams& p, int64_t m, int c0) {
  using V = Vec<W>;
  using T = typename E::T;
  const T* g = static_cast<const T*>(p.gate_up_ptr) + m * p.gate_up_row_stride;
  const T* u = g + p.F;
  T* o = static_cast<T*>(p.out_ptr) + m * p.out_row_stride;
  const int c1 = std::min(p.F, c0 + kChunk);
  int i = c0;
  for (; i + W <= c1; i += W)
    V::template store<E>(o + i, silu_mul_vec<W, E>(V::template load<E>(g + i), V::template load<E>(u + i)));
  if (i < c1) {
    const int n = c1 - i;
    const typename V::F res = silu_mul_vec<W, E>(V::template load_n<E>(g + i, n), V::template load_n<E>(u + i, n));
    V::template store_n<E>(o + i, res, n);
  }
}

using TaskFn = void (*)(const SiluMulParams&, int64_t, int);

template <class E>
struct TaskIsa {
  LLADA_TARGET_AVX512 static void avx512(const SiluMulParams& p, int64_t m, int c) { silu_mul_task<16, E>(p, m, c); }
  LLADA_TARGET_AVX2 static void avx2(const SiluMulParams& p, int64_t m, int c) { silu_mul_task<8, E>(p, m, c); }
  static void baseline(const SiluMulParams& p, int64_t m, int c) { silu_mul_task<4, E>(p, m, c); }
};

}  // namespace

void silu_mul_cpu(const SiluMulParams& p) {
  const TaskFn fn = cpu::pick_kernel<TaskFn, TaskIsa>(p.dtype);
  const int64_t chunks = (p.F + kChunk - 1) / kChunk;
#pragma omp parallel for collapse(2) schedule(static) if (p.M * p.F >= (1 << 15))
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t c = 0; c < chunks; ++c) fn(p, m, static_cast<int>(c * kChunk));
}

}  // namespace llada
