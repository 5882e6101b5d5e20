// CPU linear on the blocked weight layouts of linear.h. Each thread takes a contiguous range of 64-column panels; a
// panel is walked in K-chunks that stay in L2 while register tiles of up to 6 rows x 64 columns run over them, and the
// next chunk is prefetched meanwhile. fp32: FMA on broadcast activations; bf16: AVX512-BF16 dot products of k-pairs;
// int8: x quantized per row to int16, AVX512-VNNI int16 x int8 dot products summed exactly in int32, then both scales
// in fp32 (measured faster than dequantising the weights to bf16 tiles at 1 to 64 rows, and more accurate); W8A8
// (kBlockedInt8x4): x quantized per row to int8, vpdpbusd on k-quads of offset weights, twice the multiply rate.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "linear.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

#define LLADA_ALWAYS_INLINE inline __attribute__((always_inline))
#define LLADA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define LLADA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
#define LLADA_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

namespace llada {
namespace {

constexpr int kPanelBlocks = kLinearPanelN / kLinearBlockN;  // 4 accumulators per row of a tile
constexpr int kTileRows = 6;       // 6 x 4 accumulators + 4 weight vectors + 1 broadcast: 29 of the 32 zmm registers
constexpr int kChunkSteps = 1024;  // k (fp32) or k-pairs per chunk: 4 blocks x 1024 x 64 B = 256 KiB stays in L2
constexpr int kStepElems = 16;     // fp32 elements per block and k-step (kBlockedF32)
constexpr int kPairElems = 32;     // elements per block and k-pair (kBlockedBF16, kBlockedInt8)
constexpr int kQuadElems = 64;     // elements per block and k-quad (kBlockedInt8x4)
constexpr int kInt32Steps = 128;   // k-pairs per int32 sum: 128 x 2 x 32767 x 127 < 2^31, so it cannot overflow
constexpr float kInt16Max = 32767.0f;
constexpr float kInt8Max = 127.0f;
constexpr int32_t kInt8x4Offset = 128;  // kBlockedInt8x4 holds q + 128

inline int32_t load_pair(const uint16_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// The 64-byte lines of the weight chunk this thread reads next (4 block ranges), prefetched into L2 a few per k-step
// while the current chunk's row tiles run: the first tile of a chunk waits on memory and the others compute from
// cache, so without this the memory would sit idle during most of a multi-tile chunk.
struct Prefetch {
  const char* base = nullptr;  // block 0 of the next chunk; null: nothing left to prefetch
  int64_t block_stride = 0;    // bytes between blocks
  int64_t block_lines = 0;     // lines per block in the chunk
  int64_t next = 0;            // lines issued so far, over the 4 blocks
  int per_step = 0;            // lines per k-step of a tile
  LLADA_ALWAYS_INLINE void step() {
    for (int i = 0; i < per_step && next < kPanelBlocks * block_lines; ++i, ++next) {
      const int64_t j = next / block_lines, l = next % block_lines;
      _mm_prefetch(base + j * block_stride + l * 64, _MM_HINT_T1);
    }
  }
};

// The next chunk after chunk s0 of `panel` among this thread's panels [.., panel_end): in the same panel, else the
// first chunk of the next one; its lines spread over the k-steps of every row tile of M rows.
inline Prefetch next_chunk(const char* w, int64_t elt, int64_t step_elems, int64_t steps, int64_t panel,
                           int64_t panel_end, int64_t s0, int M) {
  Prefetch pf;
  const int64_t block_bytes = steps * step_elems * elt;
  int64_t next_steps;
  if (s0 + kChunkSteps < steps) {
    pf.base = w + panel * kPanelBlocks * block_bytes + (s0 + kChunkSteps) * step_elems * elt;
    next_steps = std::min<int64_t>(kChunkSteps, steps - s0 - kChunkSteps);
  } else if (panel + 1 < panel_end) {
    pf.base = w + (panel + 1) * kPanelBlocks * block_bytes;
    next_steps = std::min<int64_t>(kChunkSteps, steps);
  } else {
    return pf;
  }
  pf.block_stride = block_bytes;
  pf.block_lines = (next_steps * step_elems * elt + 63) / 64;
  const int64_t tile_steps = static_cast<int64_t>((M + kTileRows - 1) / kTileRows) *
                             std::min<int64_t>(kChunkSteps, steps - s0);
  pf.per_step = static_cast<int>((kPanelBlocks * pf.block_lines + tile_steps - 1) / tile_steps);
  return pf;
}

// The fp32 column sums of an R-row tile: from c (R x 64, row stride 64) or zero, and back into c.
template <int R>
LLADA_ALWAYS_INLINE LLADA_AVX512 void load_sums(__m512 (&acc)[R][kPanelBlocks], const float* c, bool accumulate) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * kLinearPanelN + 16 * j) : _mm512_setzero_ps();
}
template <int R>
LLADA_ALWAYS_INLINE LLADA_AVX512 void store_sums(float* c, const __m512 (&acc)[R][kPanelBlocks]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j) _mm512_storeu_ps(c + r * kLinearPanelN + 16 * j, acc[r][j]);
}

// c (R x 64, row stride 64) = [c +] x (R rows, row stride ldx) . tile, over `steps` k-steps; the tile holds 4 blocks,
// bs elements apart, each [steps][16] fp32.
template <int R>
LLADA_AVX512 void tile(float* c, bool accumulate, const float* x, int64_t ldx, const float* w, int64_t bs,
                       int steps, Prefetch& pf) {
  __m512 acc[R][kPanelBlocks];
  load_sums<R>(acc, c, accumulate);
  for (int s = 0; s < steps; ++s) {
    pf.step();
    const float* ws = w + static_cast<int64_t>(s) * kStepElems;
    const __m512 w0 = _mm512_loadu_ps(ws), w1 = _mm512_loadu_ps(ws + bs), w2 = _mm512_loadu_ps(ws + 2 * bs),
                 w3 = _mm512_loadu_ps(ws + 3 * bs);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + s]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xb, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xb, w3, acc[r][3]);
    }
  }
  store_sums<R>(c, acc);
}

// The bf16 twin of the fp32 tile: x rows are bf16 with an even number of elements, each block [steps][16][2] bf16; one
// vdpbf16ps adds x[2s] w[2s] + x[2s+1] w[2s+1] to each of 16 column accumulators.
template <int R>
LLADA_AVX512_BF16 void tile(float* c, bool accumulate, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t bs,
                            int steps, Prefetch& pf) {
  __m512 acc[R][kPanelBlocks];
  load_sums<R>(acc, c, accumulate);
  for (int s = 0; s < steps; ++s) {
    pf.step();
    const uint16_t* ws = w + static_cast<int64_t>(s) * kPairElems;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(ws), w1 = (__m512bh)_mm512_loadu_si512(ws + bs),
                   w2 = (__m512bh)_mm512_loadu_si512(ws + 2 * bs), w3 = (__m512bh)_mm512_loadu_si512(ws + 3 * bs);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(load_pair(x + r * ldx + 2 * s));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
    }
  }
  store_sums<R>(c, acc);
}

// The integer twins share one loop over k-steps: per step, the panel's four 16-lane weight vectors (Int::load) and,
// per row, that row's 4 bytes of x for the step broadcast to every lane; Int::dot adds the products exactly into the
// int32 column sums acc.
template <int R, class Int>
LLADA_AVX512_VNNI LLADA_ALWAYS_INLINE void int_steps(__v16si (&acc)[R][kPanelBlocks], const typename Int::X* x,
                                                     int64_t ldx, const typename Int::W* w, int64_t bs, int steps,
                                                     Prefetch& pf) {
  for (int s = 0; s < steps; ++s) {
    pf.step();
    const typename Int::W* ws = w + static_cast<int64_t>(s) * Int::kStepElems;
    const __v16si w0 = Int::load(ws), w1 = Int::load(ws + bs), w2 = Int::load(ws + 2 * bs),
                  w3 = Int::load(ws + 3 * bs);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, x + r * ldx + Int::kPerStep * s, 4);
      const __v16si xb = __v16si{} + word;
      acc[r][0] = Int::dot(acc[r][0], xb, w0);
      acc[r][1] = Int::dot(acc[r][1], xb, w1);
      acc[r][2] = Int::dot(acc[r][2], xb, w2);
      acc[r][3] = Int::dot(acc[r][3], xb, w3);
    }
  }
}

// int16 x (x quantized per row to int16), blocks [steps][16][2] int8 sign-extended to int16 as loaded: one vpdpwssd
// adds x[2s] q[2s] + x[2s+1] q[2s+1] to each of 16 column sums.
struct Int16Pairs {
  using X = int16_t;
  using W = int8_t;
  static constexpr int kStepElems = kPairElems, kPerStep = 2;
  LLADA_AVX512_VNNI LLADA_ALWAYS_INLINE static __v16si load(const int8_t* p) {
    return (__v16si)_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  LLADA_AVX512_VNNI LLADA_ALWAYS_INLINE static __v16si dot(__v16si acc, __v16si xb, __v16si w) {
    return __builtin_ia32_vpdpwssd_v16si(acc, xb, w);
  }
};

// int8 x (W8A8), blocks [steps][16][4] uint8 (q + 128): one vpdpbusd adds the 4 products x[4s + e] (q[4s + e] + 128)
// to each of 16 column sums (the unsigned operand first: the weights).
struct Int8Quads {
  using X = int8_t;
  using W = uint8_t;
  static constexpr int kStepElems = kQuadElems, kPerStep = 4;
  LLADA_AVX512_VNNI LLADA_ALWAYS_INLINE static __v16si load(const uint8_t* p) {
    return (__v16si)_mm512_loadu_si512(p);
  }
  LLADA_AVX512_VNNI LLADA_ALWAYS_INLINE static __v16si dot(__v16si acc, __v16si xb, __v16si w) {
    return __builtin_ia32_vpdpbusd_v16si(acc, w, xb);
  }
};

// The int8 twin (int16 x): steps <= kInt32Steps, so the sums cannot overflow; they are added to the fp32 c at the end.
template <int R>
LLADA_AVX512_VNNI void tile(float* c, bool accumulate, const int16_t* x, int64_t ldx, const int8_t* w, int64_t bs,
                               int steps, Prefetch& pf) {
  // int32 lanes as the builtin's own type: with __m512i (64-bit lanes) GCC 12 keeps these sums on the stack
  __v16si acc[R][kPanelBlocks];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j) acc[r][j] = __v16si{};
  int_steps<R, Int16Pairs>(acc, x, ldx, w, bs, steps, pf);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j) {
      float* cp = c + r * kLinearPanelN + 16 * j;
      const __m512 v = _mm512_cvtepi32_ps((__m512i)acc[r][j]);
      _mm512_storeu_ps(cp, accumulate ? _mm512_add_ps(v, _mm512_loadu_ps(cp)) : v);
    }
  }
}

// The W8A8 twin (int8 x): the sums stay int32 across tile calls (c holds int32 here; K <= kLinearInt8x4MaxK, so they
// cannot overflow); store_panel removes the offset.
template <int R>
LLADA_AVX512_VNNI void tile(float* c, bool accumulate, const int8_t* x, int64_t ldx, const uint8_t* w, int64_t bs,
                            int steps, Prefetch& pf) {
  int32_t* ci = reinterpret_cast<int32_t*>(c);
  __v16si acc[R][kPanelBlocks];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j)
      acc[r][j] = accumulate ? (__v16si)_mm512_loadu_si512(ci + r * kLinearPanelN + 16 * j) : __v16si{};
  int_steps<R, Int8Quads>(acc, x, ldx, w, bs, steps, pf);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j) _mm512_storeu_si512(ci + r * kLinearPanelN + 16 * j, (__m512i)acc[r][j]);
}

template <class Fn>
void dispatch_rows(int rows, Fn&& fn) {
  switch (rows) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 5: return fn(std::integral_constant<int, 5>{});
    default: return fn(std::integral_constant<int, kTileRows>{});
  }
}

// What every thread of one call shares.
struct Job {
  const LinearParams* p;
  const void* x;     // kBlockedF32: fp32 x; kBlockedBF16: bf16 x, kBlockedInt8: int16 x, rows of an even length;
                     // kBlockedInt8x4: int8 x, rows of a length divisible by 4
  int64_t ldx;       // elements
  int64_t steps;     // k-steps of the layout: K (fp32), ceil(K / 2) or ceil(K / 4) (kBlockedInt8x4)
  const float* x_scale;  // kBlockedInt8, kBlockedInt8x4: (M,) the per-row scales of the quantized x
  const int32_t* x_sum;  // kBlockedInt8x4: (M,) sum_k of each quantized row, for the weights' +128 offset
};

// M rows split into ceil(M / 6) tiles of nearly equal height (32 rows: 6 6 5 5 5 5, not 6 6 6 6 6 2).
template <class Fn>
void for_row_tiles(int M, Fn&& fn) {
  const int n = (M + kTileRows - 1) / kTileRows, base = M / n, extra = M % n;
  for (int i = 0, r0 = 0; i < n; ++i) {
    const int rows = base + (i < extra);
    fn(r0, rows);
    r0 += rows;
  }
}

// fp32 -> bf16 bits, round to nearest even as torch rounds (NaN stays a quiet NaN), with AVX-512F alone.
LLADA_AVX512 __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// The panel's columns of out from its sums c (M x 64), times x_scale[m] scale[n] when x_scale is given (int8), in
// x_dtype; columns past N are not written. With x_sum (kBlockedInt8x4) c holds int32 sums of x (q + 128), and
// 128 x_sum[m] is taken off in int32 first, so the integer dot product is exact before the scales.
LLADA_AVX512 void store_panel(const LinearParams& p, int64_t panel, const float* c, const float* x_scale,
                              const int32_t* x_sum) {
  for (int m = 0; m < p.M; ++m) {
    for (int j = 0; j < kPanelBlocks; ++j) {
      const int64_t n = panel * kLinearPanelN + 16 * j;
      if (n >= p.N) break;
      const __mmask16 mask = p.N - n >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.N - n)) - 1);
      __m512 v;
      if (x_sum) {
        const __m512i sums = _mm512_loadu_si512(reinterpret_cast<const int32_t*>(c) + m * kLinearPanelN + 16 * j);
        v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, _mm512_set1_epi32(kInt8x4Offset * x_sum[m])));
      } else {
        v = _mm512_loadu_ps(c + m * kLinearPanelN + 16 * j);
      }
      if (x_scale)
        v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(x_scale[m])), _mm512_maskz_loadu_ps(mask, p.scale_ptr + n));
      if (p.x_dtype == DType::kFloat32)
        _mm512_mask_storeu_ps(static_cast<float*>(p.out_ptr) + m * p.out_stride + n, mask, v);
      else
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out_ptr) + m * p.out_stride + n, mask, to_bf16(v));
    }
  }
}

// A layout as the panel loop sees it: element types of W and x, elements per block and k-step of W and of x, k-steps
// per tile call (int8: the int32 sums are flushed every kInt32Steps); the tile kernel is the overload of tile<R> for
// these pointer types, and int8 output is scaled (W8A8: uint8 weights with the +128 offset, int32 sums throughout).
template <class W_, class X_, int kStepW_, int kStepX_, int kTileSteps_>
struct Layout {
  using W = W_;
  using X = X_;
  static constexpr int kStepW = kStepW_, kStepX = kStepX_, kTileSteps = kTileSteps_;
  static constexpr bool kOffset = std::is_same<W, uint8_t>::value;
  static constexpr bool kScaled = std::is_same<W, int8_t>::value || kOffset;
};
using F32Layout = Layout<float, float, kStepElems, 1, kChunkSteps>;
using BF16Layout = Layout<uint16_t, uint16_t, kPairElems, 2, kChunkSteps>;
using Int8Layout = Layout<int8_t, int16_t, kPairElems, 2, kInt32Steps>;
using Int8x4Layout = Layout<uint8_t, int8_t, kQuadElems, 4, kChunkSteps>;

// One 64-column panel: its K-chunks in turn, each through every row tile (the next chunk prefetched meanwhile), then
// the panel's columns of out.
template <class L>
void run_panel(const Job& job, int64_t panel, int64_t panel_end, float* c) {
  const LinearParams& p = *job.p;
  const typename L::X* x = static_cast<const typename L::X*>(job.x);
  const int64_t bs = job.steps * L::kStepW;  // elements between the panel's blocks
  const typename L::W* w_panel = static_cast<const typename L::W*>(p.w_ptr) + panel * kPanelBlocks * bs;
  for (int64_t s0 = 0; s0 < job.steps; s0 += kChunkSteps) {
    const int cs = static_cast<int>(std::min<int64_t>(kChunkSteps, job.steps - s0));
    Prefetch pf = next_chunk(static_cast<const char*>(p.w_ptr), sizeof(typename L::W), L::kStepW, job.steps, panel,
                             panel_end, s0, p.M);
    for_row_tiles(p.M, [&](int r0, int rows) {
      dispatch_rows(rows, [&](auto R) {
        for (int i0 = 0; i0 < cs; i0 += L::kTileSteps) {
          const int64_t s = s0 + i0;
          tile<decltype(R)::value>(c + static_cast<int64_t>(r0) * kLinearPanelN, s > 0, x + r0 * job.ldx + L::kStepX * s,
                                   job.ldx, w_panel + s * L::kStepW, bs, std::min(L::kTileSteps, cs - i0), pf);
        }
      });
    });
  }
  store_panel(p, panel, c, L::kScaled ? job.x_scale : nullptr, L::kOffset ? job.x_sum : nullptr);
}

// 16 elements of an fp32 or bf16 row from k (masked past K) as fp32.
LLADA_AVX512_VNNI __m512 load_x16(const void* src, DType dtype, int k, __mmask16 mask) {
  if (dtype == DType::kFloat32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(src) + k);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(src) + k);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Row m of x quantized to Q (int16 or int8): scale = max |x| / qmax, q = round(x / scale) (half to even), |q| <= qmax;
// dst holds `padded` elements (zero past K); *sum = sum_k q (int8 only: the kBlockedInt8x4 offset correction). An
// all-zero row gets scale 0.
template <class Q>
LLADA_AVX512_VNNI void x_row_quantize(Q* dst, float* scale, int32_t* sum, const void* src, DType dtype, int K,
                                      int padded) {
  constexpr float qmax = std::is_same<Q, int16_t>::value ? kInt16Max : kInt8Max;
  __m512 amax = _mm512_setzero_ps();
  for (int k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(load_x16(src, dtype, k, mask)));
  }
  const float m = _mm512_reduce_max_ps(amax);
  *scale = m / qmax;
  const __m512 inv = _mm512_set1_ps(m > 0.0f ? qmax / m : 0.0f);
  __m512i total = _mm512_setzero_si512();
  for (int k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load_x16(src, dtype, k, mask), inv),
                                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if constexpr (std::is_same<Q, int16_t>::value) {
      _mm256_mask_storeu_epi16(dst + k, mask, _mm512_cvtsepi32_epi16(q));
    } else {
      _mm_mask_storeu_epi8(dst + k, mask, _mm512_cvtsepi32_epi8(q));
      total = _mm512_add_epi32(total, q);  // masked-off lanes loaded as 0, so they add 0
    }
  }
  for (int k = K; k < padded; ++k) dst[k] = 0;
  if (sum) *sum = _mm512_reduce_add_epi32(total);
}

// Row m of bf16 x copied into dst with a zero after an odd K (the pair kernels read k-pairs).
void x_row_pad(uint16_t* dst, const void* src, int K) {
  std::memcpy(dst, src, sizeof(uint16_t) * K);
  if (K % 2) dst[K] = 0;
}

template <class T>
T* grow(std::vector<T>& buf, size_t n) {
  if (buf.size() < n) buf.resize(n);  // grows once per thread to the largest call, then never allocates again
  return buf.data();
}

}  // namespace

bool linear_cpu_supports(WeightLayout layout) {
  const CpuFeatures& f = cpu_features();
  const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma;
  switch (layout) {
    case WeightLayout::kBlockedF32: return avx512;
    case WeightLayout::kBlockedBF16: return avx512 && f.avx512bf16;
    case WeightLayout::kBlockedInt8:
    case WeightLayout::kBlockedInt8x4: return avx512 && f.avx512vnni;
    default: return false;
  }
}

void linear_cpu(const LinearParams& p) {
  if (!linear_cpu_supports(p.layout))
    throw std::invalid_argument("llada_rt linear: this CPU lacks the instructions of weight layout " +
                                std::to_string(static_cast<int>(p.layout)) + " (AVX-512F; AVX-512 BF16 for bf16, "
                                "AVX-512 VNNI for int8 and W8A8)");
  if (p.layout == WeightLayout::kBlockedF32 && p.x_dtype != DType::kFloat32)
    throw std::invalid_argument("llada_rt linear: the fp32 weight layout takes fp32 activations");
  if (p.layout == WeightLayout::kBlockedBF16 && p.x_dtype != DType::kBFloat16)
    throw std::invalid_argument("llada_rt linear: the bf16 weight layout takes bf16 activations");
  const bool int8 = p.layout == WeightLayout::kBlockedInt8, int8x4 = p.layout == WeightLayout::kBlockedInt8x4;
  if ((int8 || int8x4) && p.x_dtype == DType::kFloat16)
    throw std::invalid_argument("llada_rt linear: the int8 weight layouts take fp32 or bf16 activations");
  if ((int8 || int8x4) && p.scale_ptr == nullptr)
    throw std::invalid_argument("llada_rt linear: the int8 weight layouts need their scales");
  if (int8x4 && p.K > kLinearInt8x4MaxK)
    throw std::invalid_argument("llada_rt linear: the W8A8 layout sums in int32 over K <= " +
                                std::to_string(kLinearInt8x4MaxK) + ", got K = " + std::to_string(p.K) +
                                "; use the int8 layout with int16 activations");
  if (p.M <= 0 || p.N <= 0) return;
  const int64_t panels = (p.N + kLinearPanelN - 1) / kLinearPanelN;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.n_threads, panels)));
  const bool f32 = p.layout == WeightLayout::kBlockedF32;
  const int64_t K2 = (p.K + 1) / 2, K4 = (p.K + 3) / 4;
  Job job{&p, p.x_ptr, p.x_stride, f32 ? p.K : int8x4 ? K4 : K2, nullptr, nullptr};
  // the pair kernels read x in k-pairs: int8 quantizes x to int16 rows, bf16 pads odd-K rows with a zero; W8A8
  // quantizes x to int8 rows padded to k-quads
  const bool copy_x = int8 || int8x4 || (!f32 && p.K % 2);
  static thread_local std::vector<uint16_t> x_buf;
  static thread_local std::vector<float> x_scale_buf;
  static thread_local std::vector<int32_t> x_sum_buf;
  if (copy_x) {
    job.ldx = int8x4 ? 4 * K4 : 2 * K2;
    job.x = grow(x_buf, static_cast<size_t>(p.M) * (int8x4 ? 2 * K4 : 2 * K2));  // 4 K4 int8 = 2 K4 uint16
  }
  if (int8 || int8x4) job.x_scale = grow(x_scale_buf, static_cast<size_t>(p.M));
  if (int8x4) job.x_sum = grow(x_sum_buf, static_cast<size_t>(p.M));
  const size_t elt = p.x_dtype == DType::kFloat32 ? 4 : 2;
#pragma omp parallel num_threads(nt)
  {
    if (copy_x) {
#pragma omp for schedule(static)
      for (int m = 0; m < p.M; ++m) {
        const char* src = static_cast<const char*>(p.x_ptr) + m * p.x_stride * elt;
        float* scale = const_cast<float*>(job.x_scale) + m;
        if (int8x4) {
          int8_t* dst = const_cast<int8_t*>(static_cast<const int8_t*>(job.x)) + m * job.ldx;
          x_row_quantize(dst, scale, const_cast<int32_t*>(job.x_sum) + m, src, p.x_dtype, p.K,
                         static_cast<int>(job.ldx));
        } else {
          uint16_t* dst = const_cast<uint16_t*>(static_cast<const uint16_t*>(job.x)) + m * job.ldx;
          if (int8) x_row_quantize(reinterpret_cast<int16_t*>(dst), scale, nullptr, src, p.x_dtype, p.K,
                                   static_cast<int>(job.ldx));
          else x_row_pad(dst, src, p.K);
        }
      }
    }
    static thread_local std::vector<float> c_buf;
    float* c = grow(c_buf, static_cast<size_t>(p.M) * kLinearPanelN);
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    // contiguous panel ranges: each thread streams its own part of the weight
    const int64_t first = panels * t / n, end = panels * (t + 1) / n;
    for (int64_t panel = first; panel < end; ++panel) {
      if (f32) run_panel<F32Layout>(job, panel, end, c);
      else if (int8) run_panel<Int8Layout>(job, panel, end, c);
      else if (int8x4) run_panel<Int8x4Layout>(job, panel, end, c);
      else run_panel<BF16Layout>(job, panel, end, c);
    }
  }
}

}  // namespace llada
