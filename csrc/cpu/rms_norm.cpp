// CPU rms_norm: per row, the sum of squares in the order torch's CPU sum adds them (so that the result is torch's
// composition bit for bit), then one vectorized pass that normalises, rounds to the dtype and multiplies by the weight.
// Built with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would round differently from torch.
#include <algorithm>
#include <cmath>

#include "cpu/vec.h"
#include "rms_norm.h"

namespace llada {
namespace {

using cpu::Vec;

// utils::CeilLog2 of ATen: 1 for x <= 2
int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(static_cast<uint64_t>(x - 1)); }

// torch's row_sum(multi_row_sum) of SumKernel.cpp (cascade_sum) over the n elements elem(0..n-1) of type A (a float,
// or a vector of floats added lane by lane): 4 interleaved partial sums, each a 4-level cascade that folds a level
// into the next every 2^level_power groups, then the leftovers, then the partials in order.
template <class A, class Elem>
LLADA_INLINE A torch_row_sum(const Elem& elem, int64_t n) {
  const int64_t groups = n / 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(groups) / 4);
  const int64_t step = int64_t(1) << level_power, mask = step - 1;
  A acc[4][4] = {};  // [level][partial]
  int64_t i = 0;
  while (i + step <= groups) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] += elem(4 * i + k);
    for (int l = 1; l < 4; ++l) {
      for (int k = 0; k < 4; ++k) {
        acc[l][k] += acc[l - 1][k];
        acc[l - 1][k] = A{};
      }
      if ((i & (mask << (l * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] += elem(4 * i + k);
  for (int l = 1; l < 4; ++l)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[l][k];
  for (int64_t e = groups * 4; e < n; ++e) acc[0][0] += elem(e);
  for (int k = 1; k < 4; ++k) acc[0][0] += acc[0][k];
  return acc[0][0];
}

// x_i^2 and (x_8i..x_8i+7)^2: the elements torch sums (x.pow(2) is x * x)
template <class E>
struct Square {
  const typename E::T* x;
  LLADA_INLINE float operator()(int64_t i) const { const float v = cpu::load_scalar<E>(x + i); return v * v; }
};
template <class E>
struct Square8 {
  const typename E::T* x;
  LLADA_INLINE Vec<8>::F operator()(int64_t i) const { const Vec<8>::F v = Vec<8>::load<E>(x + 8 * i); return v * v; }
};

// sum(x^2) over a row as torch's vectorized_inner_sum computes it: measured on torch 2.13, its sum kernel works in
// 8-lane vectors also on AVX-512 machines. Rows shorter than one vector take the scalar cascade.
template <class E>
LLADA_INLINE float torch_sum_squares(const typename E::T* x, int d) {
  if (d < 8) return torch_row_sum<float>(Square<E>{x}, d);
  const int64_t n_vec = d / 8;
  const Vec<8>::F acc = torch_row_sum<Vec<8>::F>(Square8<E>{x}, n_vec);
  float total = 0.f;
  for (int64_t i = n_vec * 8; i < d; ++i) {
    const float v = cpu::load_scalar<E>(x + i);
    total += v * v;
  }
  for (int l = 0; l < 8; ++l) total += acc[l];
  return total;
}

template <int W, class E>
LLADA_INLINE void rms_norm_row(const RmsNormParams& p, int64_t row) {
  using V = Vec<W>;
  using T = typename E::T;
  const T* x = static_cast<const T*>(p.x_ptr) + row * p.x_row_stride;
  const T* w = static_cast<const T*>(p.weight_ptr);
  T* o = static_cast<T*>(p.out_ptr) + row * p.out_row_stride;
  // torch: mean = sum / d, then rsqrt(mean + eps) = 1 / sqrt(.) with both steps rounded
  const float mean = torch_sum_squares<E>(x, p.d) / static_cast<float>(p.d);
  const typename V::F r = V::splat(1.0f / std::sqrt(mean + p.eps));
  int i = 0;
  for (; i + W <= p.d; i += W) {
    const typename V::F y = V::template round<E>(V::template load<E>(x + i) * r);
    V::template store<E>(o + i, y * V::template load<E>(w + i));
  }
  if (i < p.d) {
    const int n = p.d - i;
    const typename V::F y = V::template round<E>(V::template load_n<E>(x + i, n) * r);
    V::template store_n<E>(o + i, y * V::template load_n<E>(w + i, n), n);
  }
}

using RowFn = void (*)(const RmsNormParams&, int64_t);

template <class E>
struct RowIsa {
  LLADA_TARGET_AVX512 static void avx512(const RmsNormParams& p, int64_t r) { rms_norm_row<16, E>(p, r); }
  LLADA_TARGET_AVX2 static void avx2(const RmsNormParams& p, int64_t r) { rms_norm_row<8, E>(p, r); }
  static void baseline(const RmsNormParams& p, int64_t r) { rms_norm_row<4, E>(p, r); }
};

}  // namespace

void rms_norm_cpu(const RmsNormParams& p) {
  const RowFn fn = cpu::pick_kernel<RowFn, RowIsa>(p.dtype);
  // a row of LLaDA-8B (4096 elements) is ~1 us of work: threads pay from a few dozen rows on
#pragma omp parallel for schedule(static) if (p.M > 1 && p.M * p.d >= (1 << 16))
  for (int64_t r = 0; r < p.M; ++r) fn(p, r);
}

}  // namespace llada
