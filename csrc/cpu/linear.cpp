// CPU linear on the blocked weight layouts of linear.h. Each thread takes a contiguous range of 64-column panels; a
// panel is walked in K-chunks that stay in L2 while register tiles of up to 6 rows x 64 columns run over them. fp32: FMA
// on broadcast activations; bf16: AVX512-BF16 dot products of k-pairs; int8: each chunk dequantised to bf16 (exact:
// |q| <= 127 has at most 8 significant bits), the bf16 tiles, then the per-column scale in fp32.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_features.h"
#include "linear.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always-inline helpers never cross an ABI boundary

#define LLADA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define LLADA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

namespace llada {
namespace {

constexpr int kPanelBlocks = kLinearPanelN / kLinearBlockN;  // 4 accumulators per row of a tile
constexpr int kTileRows = 6;       // 6 x 4 accumulators + 4 weight vectors + 1 broadcast: 29 of the 32 zmm registers
constexpr int kChunkSteps = 1024;  // k (fp32) or k-pairs per chunk: 4 blocks x 1024 x 64 B = 256 KiB stays in L2
constexpr int kStepElems = 16;     // fp32 elements per block and k-step (kBlockedF32)
constexpr int kPairElems = 32;     // 16-bit elements per block and k-pair (kBlockedBF16, kBlockedInt8)

inline int32_t load_pair(const uint16_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }

// c (R x 64, row stride 64) = [c +] x (R rows, row stride ldx) . tile, over `steps` k-steps; the tile holds 4 blocks,
// bs elements apart, each [steps][16] fp32.
template <int R>
LLADA_AVX512 void tile_f32(float* c, bool accumulate, const float* x, int64_t ldx, const float* w, int64_t bs,
                           int steps) {
  __m512 acc[R][kPanelBlocks];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * kLinearPanelN + 16 * j) : _mm512_setzero_ps();
  for (int s = 0; s < steps; ++s) {
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
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j) _mm512_storeu_ps(c + r * kLinearPanelN + 16 * j, acc[r][j]);
}

// The bf16 twin of tile_f32: x rows are bf16 with an even number of elements, each block [steps][16][2] bf16; one
// vdpbf16ps adds x[2s] w[2s] + x[2s+1] w[2s+1] to each of 16 column accumulators.
template <int R>
LLADA_AVX512_BF16 void tile_bf16(float* c, bool accumulate, const uint16_t* x, int64_t ldx, const uint16_t* w,
                                 int64_t bs, int steps) {
  __m512 acc[R][kPanelBlocks];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j)
      acc[r][j] = accumulate ? _mm512_loadu_ps(c + r * kLinearPanelN + 16 * j) : _mm512_setzero_ps();
  for (int s = 0; s < steps; ++s) {
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
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < kPanelBlocks; ++j) _mm512_storeu_ps(c + r * kLinearPanelN + 16 * j, acc[r][j]);
}

template <class T, class Fn>
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
  const void* x;     // kBlockedF32: fp32 x; the others: bf16 x whose rows hold an even number of elements
  int64_t ldx;       // elements
  int64_t steps;     // k-steps of the layout: K (fp32) or ceil(K / 2)
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

LLADA_AVX512 void panel_f32(const Job& job, int64_t panel, float* c) {
  const LinearParams& p = *job.p;
  const float* x = static_cast<const float*>(job.x);
  const int64_t bs = job.steps * kStepElems;
  const float* w_panel = static_cast<const float*>(p.w_ptr) + panel * kPanelBlocks * bs;
  for (int64_t s0 = 0; s0 < job.steps; s0 += kChunkSteps) {
    const int cs = static_cast<int>(std::min<int64_t>(kChunkSteps, job.steps - s0));
    const float* w = w_panel + s0 * kStepElems;
    for_row_tiles(p.M, [&](int r0, int rows) {
      dispatch_rows<float>(rows, [&](auto R) {
        tile_f32<decltype(R)::value>(c + static_cast<int64_t>(r0) * kLinearPanelN, s0 > 0, x + r0 * job.ldx + s0,
                                     job.ldx, w, bs, cs);
      });
    });
  }
  float* out = static_cast<float*>(p.out_ptr);
  for (int m = 0; m < p.M; ++m) {
    for (int j = 0; j < kPanelBlocks; ++j) {
      const int64_t n = panel * kLinearPanelN + 16 * j;
      if (n >= p.N) break;
      const __mmask16 mask = p.N - n >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.N - n)) - 1);
      _mm512_mask_storeu_ps(out + m * p.out_stride + n, mask, _mm512_loadu_ps(c + m * kLinearPanelN + 16 * j));
    }
  }
}

// int8 chunk (4 blocks, block stride bs, [cs][16][2] each) -> bf16 [4][cs][16][2], the integers exactly.
LLADA_AVX512_BF16 void dequant_chunk(uint16_t* dst, const int8_t* src, int64_t bs, int cs) {
  for (int j = 0; j < kPanelBlocks; ++j) {
    const int8_t* s = src + j * bs;
    uint16_t* d = dst + static_cast<int64_t>(j) * cs * kPairElems;
    for (int i = 0; i < cs; ++i) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i * kPairElems));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
      _mm512_storeu_si512(d + i * kPairElems, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  // lo -> elements 0..15
    }
  }
}

LLADA_AVX512_BF16 void panel_bf16(const Job& job, int64_t panel, float* c, uint16_t* deq) {
  const LinearParams& p = *job.p;
  const uint16_t* x = static_cast<const uint16_t*>(job.x);
  const bool int8 = p.layout == WeightLayout::kBlockedInt8;
  const int64_t bs = job.steps * kPairElems;
  const int64_t panel_offset = panel * kPanelBlocks * bs;
  for (int64_t s0 = 0; s0 < job.steps; s0 += kChunkSteps) {
    const int cs = static_cast<int>(std::min<int64_t>(kChunkSteps, job.steps - s0));
    const uint16_t* w;
    int64_t tile_bs;
    if (int8) {
      dequant_chunk(deq, static_cast<const int8_t*>(p.w_ptr) + panel_offset + s0 * kPairElems, bs, cs);
      w = deq;
      tile_bs = static_cast<int64_t>(cs) * kPairElems;
    } else {
      w = static_cast<const uint16_t*>(p.w_ptr) + panel_offset + s0 * kPairElems;
      tile_bs = bs;
    }
    for_row_tiles(p.M, [&](int r0, int rows) {
      dispatch_rows<uint16_t>(rows, [&](auto R) {
        tile_bf16<decltype(R)::value>(c + static_cast<int64_t>(r0) * kLinearPanelN, s0 > 0,
                                      x + r0 * job.ldx + 2 * s0, job.ldx, w, tile_bs, cs);
      });
    });
  }
  for (int m = 0; m < p.M; ++m) {
    for (int j = 0; j < kPanelBlocks; ++j) {
      const int64_t n = panel * kLinearPanelN + 16 * j;
      if (n >= p.N) break;
      const __mmask16 mask = p.N - n >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.N - n)) - 1);
      __m512 v = _mm512_loadu_ps(c + m * kLinearPanelN + 16 * j);
      if (int8) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, p.scale_ptr + n));
      if (p.x_dtype == DType::kFloat32) {
        _mm512_mask_storeu_ps(static_cast<float*>(p.out_ptr) + m * p.out_stride + n, mask, v);
      } else {
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);  // round to nearest even, as torch rounds
        _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out_ptr) + m * p.out_stride + n, mask, h);
      }
    }
  }
}

// Row m of x as bf16 into dst (2 K2 elements, the last one zero when K is odd): converted from fp32 (round to nearest
// even) or copied.
LLADA_AVX512_BF16 void x_row_to_bf16(uint16_t* dst, const void* src, DType dtype, int K) {
  int k = 0;
  if (dtype == DType::kFloat32) {
    const float* s = static_cast<const float*>(src);
    for (; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
      _mm256_mask_storeu_epi16(dst + k, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, s + k)));
    }
  } else {
    std::memcpy(dst, src, sizeof(uint16_t) * K);
  }
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
    case WeightLayout::kBlockedBF16:
    case WeightLayout::kBlockedInt8: return avx512 && f.avx512bf16;
    default: return false;
  }
}

void linear_cpu(const LinearParams& p) {
  if (!linear_cpu_supports(p.layout))
    throw std::invalid_argument("llada_rt linear: this CPU lacks the instructions of weight layout " +
                                std::to_string(static_cast<int>(p.layout)) + " (AVX-512F, and AVX-512 BF16 for the "
                                "bf16 and int8 layouts)");
  if (p.layout == WeightLayout::kBlockedF32 && p.x_dtype != DType::kFloat32)
    throw std::invalid_argument("llada_rt linear: the fp32 weight layout takes fp32 activations");
  if (p.layout == WeightLayout::kBlockedBF16 && p.x_dtype != DType::kBFloat16)
    throw std::invalid_argument("llada_rt linear: the bf16 weight layout takes bf16 activations");
  if (p.layout == WeightLayout::kBlockedInt8 && p.x_dtype == DType::kFloat16)
    throw std::invalid_argument("llada_rt linear: the int8 weight layout takes fp32 or bf16 activations");
  if (p.layout == WeightLayout::kBlockedInt8 && p.scale_ptr == nullptr)
    throw std::invalid_argument("llada_rt linear: the int8 weight layout needs its scales");
  if (p.M <= 0 || p.N <= 0) return;
  const int64_t panels = (p.N + kLinearPanelN - 1) / kLinearPanelN;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(p.n_threads, panels)));
  const bool f32 = p.layout == WeightLayout::kBlockedF32;
  const int64_t K2 = (p.K + 1) / 2;
  Job job{&p, p.x_ptr, p.x_stride, f32 ? p.K : K2};
  // the bf16 kernels read x in k-pairs: fp32 x (int8 layout) is rounded to bf16, odd-K rows get a zero pad
  const bool copy_x = !f32 && (p.x_dtype != DType::kBFloat16 || p.K % 2);
  static thread_local std::vector<uint16_t> x_buf;
  if (copy_x) {
    job.x = grow(x_buf, static_cast<size_t>(p.M) * 2 * K2);
    job.ldx = 2 * K2;
  }
  const size_t elt = p.x_dtype == DType::kFloat32 ? 4 : 2;
#pragma omp parallel num_threads(nt)
  {
    if (copy_x) {
#pragma omp for schedule(static)
      for (int m = 0; m < p.M; ++m)
        x_row_to_bf16(const_cast<uint16_t*>(static_cast<const uint16_t*>(job.x)) + m * job.ldx,
                      static_cast<const char*>(p.x_ptr) + m * p.x_stride * elt, p.x_dtype, p.K);
    }
    static thread_local std::vector<float> c_buf;
    static thread_local std::vector<uint16_t> deq_buf;
    float* c = grow(c_buf, static_cast<size_t>(p.M) * kLinearPanelN);
    uint16_t* deq = p.layout == WeightLayout::kBlockedInt8
                        ? grow(deq_buf, static_cast<size_t>(kPanelBlocks) * kChunkSteps * kPairElems) : nullptr;
    const int t = omp_get_thread_num(), n = omp_get_num_threads();
    // contiguous panel ranges: each thread streams its own part of the weight
    for (int64_t panel = panels * t / n; panel < panels * (t + 1) / n; ++panel) {
      if (f32) panel_f32(job, panel, c);
      else panel_bf16(job, panel, c, deq);
    }
  }
}

}  // namespace llada
