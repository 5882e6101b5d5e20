// linear_kernel: out (M, N) = x (M, K) @ (q (N, K) * scale[:, None])^T for int8 weights (WeightLayout::kRowsInt8), bf16
// activations and output. The int8 weights are dequantised in registers into mma.sync m16n8k16 bf16 B fragments (exact:
// |q| <= 127), accumulated in fp32, and scaled per column at the end. Compiled by nvcc (linear.cu) and by g++ against the
// SIMT emulator (bindings/emu_linear.cpp, tests/emu/test_linear.cpp).
#pragma once
#include "linear.h"
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "ptx.cuh"

namespace llada {

constexpr int kLinearTileN = 128;    // output columns per block: 4 warps x 32
constexpr int kLinearWarpN = 32;     // 4 n8 accumulator tiles per warp
constexpr int kLinearTileK = 64;     // k per shared-memory stage: 4 k16 steps
constexpr int kLinearTileM = 64;     // rows per block (4 m16 tiles); more rows take more blocks along z
constexpr int kLinearThreads = 128;
// smem rows are padded: 144-byte x rows put the 8 rows of an ldmatrix in 8 different 4-bank groups, 80-byte W rows put
// the 8 rows (columns n) of a B fragment in 8 different bank pairs
constexpr int kLinearXStride = kLinearTileK + 8;   // bf16 elements
constexpr int kLinearWStride = kLinearTileK + 16;  // bytes

template <int kMTiles>
constexpr size_t kLinearXStageBytes = size_t(kMTiles) * 16 * kLinearXStride * 2;
template <int kMTiles>
constexpr size_t kLinearStageBytes = kLinearXStageBytes<kMTiles> + size_t(kLinearTileN) * kLinearWStride;
// double-buffered x and W tiles: 38 KiB for 4 m16 tiles, under the 48 KiB that needs no opt-in
template <int kMTiles>
constexpr size_t kLinearSmemBytes = 2 * kLinearStageBytes<kMTiles>;

// Split-K: when the column blocks cannot fill the GPU (N = 4096 gives 32 blocks), the K chunks are divided among the
// blocks of grid.y; each writes its unscaled fp32 partial sums and linear_combine_kernel adds them up.
struct LinearSplit {
  float* partial;        // [n_splits][M][N]; unused when n_splits == 1
  int n_splits;
  int chunks_per_split;  // kLinearTileK chunks of K per split
};

LLADA_HD int linear_chunks(const LinearParams& p) { return (p.K + kLinearTileK - 1) / kLinearTileK; }

// n_splits <= 0: enough splits for two blocks per SM, never an empty one
inline LinearSplit linear_split(const LinearParams& p, int num_sms, int n_splits = 0) {
  const int chunks = std::max(linear_chunks(p), 1);
  if (n_splits <= 0) {
    const int64_t blocks = (int64_t)((p.N + kLinearTileN - 1) / kLinearTileN) * ((p.M + kLinearTileM - 1) / kLinearTileM);
    n_splits = blocks >= 2 * num_sms ? 1 : (int)std::min<int64_t>((2 * num_sms + blocks - 1) / blocks, chunks);
  }
  const int per = (chunks + std::min(n_splits, chunks) - 1) / std::min(n_splits, chunks);
  return LinearSplit{nullptr, (chunks + per - 1) / per, per};
}

inline size_t linear_split_floats(const LinearParams& p, const LinearSplit& s) {
  return s.n_splits > 1 ? (size_t)s.n_splits * p.M * p.N : 0;
}

inline dim3 linear_grid(const LinearParams& p, const LinearSplit& s) {
  return dim3((p.N + kLinearTileN - 1) / kLinearTileN, s.n_splits, (p.M + kLinearTileM - 1) / kLinearTileM);
}
constexpr int kLinearCombineThreads = 256;
inline dim3 linear_combine_grid(const LinearParams& p) {
  return dim3((p.N + kLinearCombineThreads - 1) / kLinearCombineThreads, p.M);
}

namespace linear_detail {

// Two int8 weights (k, k + 1 of one column n, adjacent in smem) -> one bf16x2 B-fragment register, k in the low half.
LLADA_DEVICE uint32_t dequant_pair(const int8_t* q) {
  uint16_t u;
  std::memcpy(&u, q, 2);
  const int8_t lo = static_cast<int8_t>(u & 0xff), hi = static_cast<int8_t>(u >> 8);
  return ptx::pack2<__nv_bfloat16>(static_cast<float>(lo), static_cast<float>(hi));
}

// cp.async of one K chunk: x rows [0, 16 kMTiles) (zero past `rows` or K) and W rows [n0, n0 + 128) (zero past N or K).
template <int kMTiles>
LLADA_DEVICE void load_stage(unsigned char* stage, const LinearParams& p, const __nv_bfloat16* x, int rows,
                             const int8_t* w, int n0, int k0, int tid) {
  __nv_bfloat16* sx = reinterpret_cast<__nv_bfloat16*>(stage);
  int8_t* sw = reinterpret_cast<int8_t*>(stage + kLinearXStageBytes<kMTiles>);
  constexpr int kXChunks = kLinearTileK / 8;   // 16-byte pieces of a chunk's x row
  constexpr int kWChunks = kLinearTileK / 16;  // 16-byte pieces of a chunk's W row
#pragma unroll
  for (int i = tid; i < kMTiles * 16 * kXChunks; i += kLinearThreads) {
    const int r = i / kXChunks, col = (i % kXChunks) * 8;
    const bool in = r < rows && k0 + col < p.K;  // K % 16 == 0: a piece is wholly inside or outside
    // out-of-range pieces point at the tensor start so that no address past it is ever formed
    const __nv_bfloat16* src = x + (in ? (int64_t)r * p.x_stride + k0 + col : 0);
    ptx::cp_async_16(ptx::smem_addr(sx + r * kLinearXStride + col), src, in);
  }
#pragma unroll
  for (int i = tid; i < kLinearTileN * kWChunks; i += kLinearThreads) {
    const int r = i / kWChunks, col = (i % kWChunks) * 16;
    const bool in = n0 + r < p.N && k0 + col < p.K;
    const int8_t* src = w + (in ? (int64_t)(n0 + r) * p.K + k0 + col : 0);
    ptx::cp_async_16(ptx::smem_addr(sw + r * kLinearWStride + col), src, in);
  }
}

}  // namespace linear_detail

// grid linear_grid(p, split), block 128, dynamic smem kLinearSmemBytes<kMTiles>. Block (x, y, z) computes columns
// [128 x, 128 x + 128) of rows [64 z, 64 z + 64) over split y's K chunks; warp w owns columns [32 w, 32 w + 32) of the
// block and every row, so each dequantised B fragment feeds kMTiles mma.sync.
template <int kMTiles>
__global__ void __launch_bounds__(kLinearThreads) linear_kernel(const LinearParams p, const LinearSplit split) {
  static_assert(kMTiles >= 1 && kMTiles * 16 <= kLinearTileM, "1 to 4 m16 tiles");
  LLADA_DYN_SMEM(unsigned char, smem);
  constexpr size_t kStage = kLinearStageBytes<kMTiles>;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // fragment groupID / threadID_in_group
  const int n0 = blockIdx.x * kLinearTileN, m0 = blockIdx.z * kLinearTileM;
  const int rows = min(kMTiles * 16, p.M - m0);
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x_ptr) + (int64_t)m0 * p.x_stride;
  const int8_t* w = static_cast<const int8_t*>(p.w_ptr);
  const int c_begin = blockIdx.y * split.chunks_per_split;
  const int c_end = min(linear_chunks(p), c_begin + split.chunks_per_split);

  float acc[kMTiles][4][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;

  if (c_begin < c_end) {
    linear_detail::load_stage<kMTiles>(smem, p, x, rows, w, n0, c_begin * kLinearTileK, tid);
    ptx::cp_async_commit();
  }
  for (int c = c_begin; c < c_end; ++c) {
    unsigned char* stage = smem + ((c - c_begin) & 1) * kStage;
    if (c + 1 < c_end) {  // prefetch the next chunk into the other buffer while this one is used
      linear_detail::load_stage<kMTiles>(smem + (((c - c_begin) & 1) ^ 1) * kStage, p, x, rows, w, n0,
                                         (c + 1) * kLinearTileK, tid);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // this chunk written by every thread's copies

    const __nv_bfloat16* sx = reinterpret_cast<const __nv_bfloat16*>(stage);
    const int8_t* sw = reinterpret_cast<const int8_t*>(stage + kLinearXStageBytes<kMTiles>);
    // A fragment = 4 8x8 matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15): lane 8i+j addresses row j of matrix i
    const __nv_bfloat16* xrow = sx + (((lane >> 3) & 1) * 8 + (lane & 7)) * kLinearXStride + (lane >> 4) * 8;
    // B fragment of n8 tile nt: column n = g of the tile, k = 2t, 2t + 1 (b[0]) and 2t + 8, 2t + 9 (b[1])
    const int8_t* wrow = sw + (warp * kLinearWarpN + g) * kLinearWStride + 2 * t;
#pragma unroll
    for (int ks = 0; ks < kLinearTileK / 16; ++ks) {
      uint32_t b[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        b[nt][0] = linear_detail::dequant_pair(wrow + nt * 8 * kLinearWStride + ks * 16);
        b[nt][1] = linear_detail::dequant_pair(wrow + nt * 8 * kLinearWStride + ks * 16 + 8);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        uint32_t a[4];
        ptx::ldmatrix_x4(a, ptx::smem_addr(xrow + mt * 16 * kLinearXStride + ks * 16));
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) ptx::mma_m16n8k16<__nv_bfloat16>(acc[mt][nt], a, b[nt], acc[mt][nt]);
      }
    }
#ifndef LLADA_PLANT_RACE
    __syncthreads();  // every warp is done with this buffer before the next iteration's prefetch overwrites it
#endif
  }

  // C fragment element i: row g (i < 2) or g + 8 of the m16 tile, column 2t + (i & 1) of the n8 tile
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out_ptr);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = mt * 16 + g + (i >= 2 ? 8 : 0);
        const int col = n0 + warp * kLinearWarpN + nt * 8 + 2 * t + (i & 1);
        if (row >= rows || col >= p.N) continue;
        if (split.n_splits > 1)
          split.partial[((int64_t)blockIdx.y * p.M + m0 + row) * p.N + col] = acc[mt][nt][i];
        else
          out[(int64_t)(m0 + row) * p.out_stride + col] = __float2bfloat16(acc[mt][nt][i] * p.scale_ptr[col]);
      }
    }
  }
}

// out[m][n] = bf16(scale[n] * sum over splits of partial[s][m][n]); grid linear_combine_grid(p), block 256.
static __global__ void __launch_bounds__(kLinearCombineThreads) linear_combine_kernel(const LinearParams p,
                                                                                      const LinearSplit split) {
  const int col = blockIdx.x * kLinearCombineThreads + threadIdx.x, row = blockIdx.y;
  if (col >= p.N) return;
  float s = 0.f;
  for (int i = 0; i < split.n_splits; ++i) s += split.partial[((int64_t)i * p.M + row) * p.N + col];
  static_cast<__nv_bfloat16*>(p.out_ptr)[(int64_t)row * p.out_stride + col] = __float2bfloat16(s * p.scale_ptr[col]);
}

inline void check_linear_cuda_params(const LinearParams& p) {
  if (p.layout != WeightLayout::kRowsInt8 || p.x_dtype != DType::kBFloat16)
    throw std::invalid_argument("llada_rt linear: the CUDA kernel takes int8 rows weights (layout 3) and bf16 x, got "
                                "layout " + std::to_string(static_cast<int>(p.layout)) + " and dtype code " +
                                std::to_string(static_cast<int>(p.x_dtype)));
  if (p.K <= 0 || p.K % 16 != 0 || p.x_stride % 8 != 0)
    throw std::invalid_argument("llada_rt linear: the CUDA kernel needs K % 16 == 0 and x rows 16-byte aligned, got "
                                "K=" + std::to_string(p.K) + ", x_stride=" + std::to_string(p.x_stride));
  if (p.scale_ptr == nullptr) throw std::invalid_argument("llada_rt linear: int8 weights need their scales");
}

template <class Launch>
void dispatch_linear(const LinearParams& p, Launch&& launch) {
  switch ((std::min(p.M, kLinearTileM) + 15) / 16) {
    case 1: return launch(linear_kernel<1>, kLinearSmemBytes<1>);
    case 2: return launch(linear_kernel<2>, kLinearSmemBytes<2>);
    case 3: return launch(linear_kernel<3>, kLinearSmemBytes<3>);
    default: return launch(linear_kernel<4>, kLinearSmemBytes<4>);
  }
}

#if !defined(__CUDACC__)
// The emulator's launcher (bindings/emu_linear.cpp, tests/emu): the kernels and split logic of run_linear on host
// memory. n_splits 0 picks the split as run_linear would on an H100 (132 SMs).
inline void run_linear_emu(const LinearParams& p, int n_splits = 0) {
  check_linear_cuda_params(p);
  if (p.M <= 0 || p.N <= 0) return;
  LinearSplit split = linear_split(p, /*num_sms=*/132, n_splits);
  std::vector<float> workspace(linear_split_floats(p, split));
  split.partial = workspace.data();
  dispatch_linear(p, [&](auto kernel, size_t smem) {
    emu::launch(kernel, linear_grid(p, split), dim3(kLinearThreads), smem, p, split);
  });
  if (split.n_splits > 1)
    emu::launch(linear_combine_kernel, linear_combine_grid(p), dim3(kLinearCombineThreads), 0, p, split);
}
#endif

}  // namespace llada
