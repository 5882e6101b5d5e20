// CPU rope: per (b, s, h) row, the pairs (i, i + D/2) rotated by the table row of the row's position. Both halves of a
// chunk are loaded before either is stored, so out may be x. Built with -ffp-contract=off (CMakeLists.txt): torch
// rounds every product before the sum.
#include "cpu/vec.h"
#include "rope.h"

namespace llada {
namespace {

using cpu::Vec;

// (x1, x2) -> (o1, o2) for W pairs. in_fp32 (full_precision, or an fp32 tensor): x1 cos - x2 sin in fp32, rounded
// once by the store. Otherwise torch's op-by-op rounding in the dtype: the table rounded to it, each product rounded,
// the sum rounded.
template <int W, class E>
LLADA_INLINE void rotate(bool in_fp32, const typename Vec<W>::F& x1, const typename Vec<W>::F& x2,
                         const typename Vec<W>::F& c_fp32, const typename Vec<W>::F& s_fp32, typename Vec<W>::F* o1,
                         typename Vec<W>::F* o2) {
  using V = Vec<W>;
  if (in_fp32) {
    *o1 = x1 * c_fp32 - x2 * s_fp32;
    *o2 = x2 * c_fp32 + x1 * s_fp32;
  } else {
    const typename V::F c = V::template round<E>(c_fp32), s = V::template round<E>(s_fp32);
    *o1 = V::template round<E>(x1 * c) - V::template round<E>(x2 * s);  // x1 cos + (-x2) sin: the same float op
    *o2 = V::template round<E>(x2 * c) + V::template round<E>(x1 * s);
  }
}

template <int W, class E>
LLADA_INLINE void rope_row(const RopeParams& p, const typename E::T* x, typename E::T* o, const float* c,
                           const float* s) {
  using V = Vec<W>;
  using F = typename V::F;
  const int half = p.D / 2;
  const bool in_fp32 = p.full_precision || E::kDType == DType::kFloat32;
  int i = 0;
  for (; i + W <= half; i += W) {
    F o1, o2;
    rotate<W, E>(in_fp32, V::template load<E>(x + i), V::template load<E>(x + half + i), V::load(c + i),
                 V::load(s + i), &o1, &o2);
    V::template store<E>(o + i, o1);
    V::template store<E>(o + half + i, o2);
  }
  if (i < half) {
    const int n = half - i;
    F o1, o2;
    rotate<W, E>(in_fp32, V::template load_n<E>(x + i, n), V::template load_n<E>(x + half + i, n),
                 V::template load_n<cpu::F32>(c + i, n), V::template load_n<cpu::F32>(s + i, n), &o1, &o2);
    V::template store_n<E>(o + i, o1, n);
    V::template store_n<E>(o + half + i, o2, n);
  }
}

template <int W, class E>
LLADA_INLINE void rope_rows(const RopeParams& p, int64_t r) {
  using T = typename E::T;
  const int64_t h = r % p.H, bs = r / p.H, s = bs % p.S, b = bs / p.S;
  const int64_t pos = p.positions_ptr[b * p.pos_b_stride + s * p.pos_s_stride];
  const T* x = static_cast<const T*>(p.x_ptr) + b * p.x_b_stride + s * p.x_s_stride + h * p.x_h_stride;
  T* o = static_cast<T*>(p.out_ptr) + b * p.out_b_stride + s * p.out_s_stride + h * p.out_h_stride;
  rope_row<W, E>(p, x, o, p.cos_ptr + pos * (p.D / 2), p.sin_ptr + pos * (p.D / 2));
}

using RowFn = void (*)(const RopeParams&, int64_t);

template <class E>
struct RowIsa {
  LLADA_TARGET_AVX512 static void avx512(const RopeParams& p, int64_t r) { rope_rows<16, E>(p, r); }
  LLADA_TARGET_AVX2 static void avx2(const RopeParams& p, int64_t r) { rope_rows<8, E>(p, r); }
  static void baseline(const RopeParams& p, int64_t r) { rope_rows<4, E>(p, r); }
};

}  // namespace

int64_t rope_cpu(const RopeParams& p) {
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t s = 0; s < p.S; ++s) {
      const int64_t pos = p.positions_ptr[b * p.pos_b_stride + s * p.pos_s_stride];
      if (pos < 0 || pos >= p.P) return b * p.S + s;
    }
  const RowFn fn = cpu::pick_kernel<RowFn, RowIsa>(p.dtype);
  const int64_t rows = static_cast<int64_t>(p.B) * p.S * p.H;
#pragma omp parallel for schedule(static) if (rows > 1 && rows * p.D >= (1 << 16))
  for (int64_t r = 0; r < rows; ++r) fn(p, r);
  return -1;
}

}  // namespace llada
