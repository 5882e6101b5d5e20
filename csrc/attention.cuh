// attention_kernel: bidirectional flash attention forward (mma.sync m16n8k16, ldmatrix, cp.async double buffering).
// Compiled by nvcc (attention.cu) and by g++ against the SIMT emulator (bindings/emu_attention.cpp, tests/emu).
#pragma once
#include "attention.h"
#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "ptx.cuh"

namespace llada {

constexpr int kAttnBlockM = 64;   // query rows per block: 4 warps x 16 rows
constexpr int kAttnBlockN = 64;   // keys per tile
constexpr int kAttnThreads = 128;

// smem rows are padded by 16 bytes: 8 ldmatrix rows then start in 8 different 4-bank groups (conflict-free)
template <int kHeadDim> constexpr int kAttnSmemStride = kHeadDim + 8;

// Q tile + double-buffered K and V tiles
template <class T, int kHeadDim>
constexpr size_t attention_smem_bytes() {
  return size_t(kAttnBlockM + 4 * kAttnBlockN) * kAttnSmemStride<kHeadDim> * sizeof(T);
}

// Split-KV: when the (query block, head, batch) grid cannot fill the GPU (a block of queries against a long cached
// prefix), the key tiles are divided among n_splits blocks per query block; each writes an fp32 partial output and its
// log-sum-exp, and attention_combine_kernel merges them.
struct AttentionSplit {
  float* o_partial;  // [n_splits][B][Hq][Lq][D], each normalized by its own softmax sum
  float* lse;        // [n_splits][B][Hq][Lq], base 2, -inf where a split saw no key
  int n_splits;
};

inline int attention_num_splits(const AttentionParams& p, int num_sms) {
  const int64_t blocks = (int64_t)((p.Lq + kAttnBlockM - 1) / kAttnBlockM) * p.Hq * p.B;
  const int tiles = (p.Lk + kAttnBlockN - 1) / kAttnBlockN;
  if (blocks >= num_sms || tiles < 2) return 1;
  const int64_t want = (2 * num_sms + blocks - 1) / blocks;  // two resident blocks per SM
  return (int)std::min<int64_t>(std::min<int64_t>(want, tiles), 32);
}

inline size_t attention_split_floats(const AttentionParams& p, int n_splits) {
  return (size_t)n_splits * p.B * p.Hq * p.Lq * (p.D + 1);
}

inline AttentionSplit attention_split_views(const AttentionParams& p, int n_splits, float* workspace) {
  return AttentionSplit{workspace, workspace + (size_t)n_splits * p.B * p.Hq * p.Lq * p.D, n_splits};
}

inline dim3 attention_grid(const AttentionParams& p, int n_splits = 1) {
  return dim3((p.Lq + kAttnBlockM - 1) / kAttnBlockM, p.Hq, p.B * n_splits);
}
inline dim3 attention_combine_grid(const AttentionParams& p) { return dim3((p.Lq + 3) / 4, p.Hq, p.B); }

namespace attn_detail {

// Issues cp.async for rows [row0, row0 + kRows) of a [L, D] head slice into smem (row stride kStride), zero-filling
// rows >= row_end. Every thread of the block takes part.
template <class T, int kHeadDim, int kRows>
LLADA_DEVICE void load_tile(T* smem, const T* gmem, int64_t row_stride, int row0, int row_end, int tid) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  constexpr int kStride = kAttnSmemStride<kHeadDim>;
#pragma unroll
  for (int c = tid; c < kRows * kChunks; c += kAttnThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool in = row0 + r < row_end;
    // out-of-range rows point at the slice start so that no address past the tensor is ever formed
    const T* src = gmem + (in ? (int64_t)(row0 + r) * row_stride + col : 0);
    ptx::cp_async_16(ptx::smem_addr(smem + r * kStride + col), src, in);
  }
}

}  // namespace attn_detail

// grid attention_grid(p, n_splits), block 128, dynamic smem attention_smem_bytes<T, kHeadDim>().
// Warp w owns query rows [16w, 16w + 16) of the block; per key tile: S = Q K^T (fp32), online softmax in base 2,
// O += P V with P rounded to T. All rows of a block share the batch row's key range, so every tile holds a valid key.
// kSplit: block z = b * n_splits + split handles its share of the key tiles and writes split.o_partial / split.lse.
template <class T, int kHeadDim, bool kSplit>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const AttentionParams p, const AttentionSplit split) {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim 64 or 128");
  constexpr int kStride = kAttnSmemStride<kHeadDim>;
  constexpr int kTileElems = kAttnBlockN * kStride;
  constexpr int kKSteps = kHeadDim / 16;      // k-steps of S = Q K^T
  constexpr int kNTiles = kAttnBlockN / 8;    // 8-key accumulator tiles of S
  constexpr int kDTiles = kHeadDim / 8;       // 8-column accumulator tiles of O
  LLADA_DYN_SMEM(T, smem);
  T* sQ = smem;
  T* sK = sQ + kAttnBlockM * kStride;  // [2][kAttnBlockN][kStride]
  T* sV = sK + 2 * kTileElems;         // [2][kAttnBlockN][kStride]

  const int n_splits = kSplit ? split.n_splits : 1;
  const int m0 = blockIdx.x * kAttnBlockM, h = blockIdx.y, b = blockIdx.z / n_splits, split_idx = blockIdx.z % n_splits;
  const int hkv = h / (p.Hq / p.Hkv);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // fragment groupID / threadID_in_group

  int key_start = p.key_start_ptr ? p.key_start_ptr[b] : 0;
  int key_end = p.key_end_ptr ? p.key_end_ptr[b] : p.Lk;
  key_start = max(key_start, 0);
  key_end = min(key_end, p.Lk);

  const T* q = static_cast<const T*>(p.q_ptr) + b * p.q_b_stride + h * p.q_h_stride;
  // the k/v batch row of this q row (a slot of the persistent cache); ops.attention documents kv_rows in [0, R)
  const int64_t kv_b = p.kv_rows_ptr ? p.kv_rows_ptr[b] : b;
  const T* k = static_cast<const T*>(p.k_ptr) + kv_b * p.k_b_stride + hkv * p.k_h_stride;
  const T* v = static_cast<const T*>(p.v_ptr) + kv_b * p.v_b_stride + hkv * p.v_h_stride;
  T* o = static_cast<T*>(p.o_ptr) + b * p.o_b_stride + h * p.o_h_stride;
  // this lane's two output rows (fragment rows g and g + 8 of the warp's 16)
  const int row_lo = m0 + warp * 16 + g, row_hi = row_lo + 8;

  // this block's key tiles: all of them, or its split's share
  const int tiles_total = key_end > key_start ? (key_end - key_start + kAttnBlockN - 1) / kAttnBlockN : 0;
  int tile_begin = 0, tile_end = tiles_total;
  if (kSplit) {
    const int per_split = (tiles_total + n_splits - 1) / n_splits;
    tile_begin = min(split_idx * per_split, tiles_total);
    tile_end = min(tile_begin + per_split, tiles_total);
  }
  // partial-output row of (split, b, h, row) in split.o_partial / split.lse
  auto split_row = [&](int row) { return (((int64_t)split_idx * p.B + b) * p.Hq + h) * p.Lq + row; };

  if (tile_begin >= tile_end) {  // no key here: zeros (lse -inf for a split); uniform per block, before any barrier
#pragma unroll
    for (int nd = 0; nd < kDTiles; ++nd) {
      const int col = nd * 8 + 2 * t;
      if (kSplit) {
        if (row_lo < p.Lq) *reinterpret_cast<float2*>(split.o_partial + split_row(row_lo) * kHeadDim + col) = float2{0.f, 0.f};
        if (row_hi < p.Lq) *reinterpret_cast<float2*>(split.o_partial + split_row(row_hi) * kHeadDim + col) = float2{0.f, 0.f};
      } else {
        if (row_lo < p.Lq) *reinterpret_cast<uint32_t*>(o + (int64_t)row_lo * p.o_l_stride + col) = 0u;
        if (row_hi < p.Lq) *reinterpret_cast<uint32_t*>(o + (int64_t)row_hi * p.o_l_stride + col) = 0u;
      }
    }
    if (kSplit && t == 0) {
      if (row_lo < p.Lq) split.lse[split_row(row_lo)] = -INFINITY;
      if (row_hi < p.Lq) split.lse[split_row(row_hi)] = -INFINITY;
    }
    return;
  }

  const int n_tiles = tile_end - tile_begin;
  const int key0 = key_start + tile_begin * kAttnBlockN;  // first key of this block's first tile
  attn_detail::load_tile<T, kHeadDim, kAttnBlockM>(sQ, q, p.q_l_stride, m0, p.Lq, tid);
  attn_detail::load_tile<T, kHeadDim, kAttnBlockN>(sK, k, p.k_l_stride, key0, key_end, tid);
  attn_detail::load_tile<T, kHeadDim, kAttnBlockN>(sV, v, p.v_l_stride, key0, key_end, tid);
  ptx::cp_async_commit();

  const float scale_log2 = p.scale * 1.4426950408889634f;  // softmax in base 2: exp(x) = exp2(x * log2 e)
  uint32_t qf[kKSteps][4];                                 // the warp's Q rows as A fragments, loaded once
  float acc[kDTiles][4];
#pragma unroll
  for (int nd = 0; nd < kDTiles; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int it = 0; it < n_tiles; ++it) {
    const int n0 = key0 + it * kAttnBlockN;
    const int buf = it & 1;
    if (it + 1 < n_tiles) {  // prefetch the next tile into the other buffer while this one is used
      attn_detail::load_tile<T, kHeadDim, kAttnBlockN>(sK + (buf ^ 1) * kTileElems, k, p.k_l_stride,
                                                       n0 + kAttnBlockN, key_end, tid);
      attn_detail::load_tile<T, kHeadDim, kAttnBlockN>(sV + (buf ^ 1) * kTileElems, v, p.v_l_stride,
                                                       n0 + kAttnBlockN, key_end, tid);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();  // this tile (and Q) written by every thread's copies

    if (it == 0) {
      // A fragment = 4 8x8 matrices: (rows 0-7 | 8-15) x (cols 0-7 | 8-15), lane 8i+j addresses row j of matrix i
      const T* qrow = sQ + (warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * kStride + (lane >> 4) * 8;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) ptx::ldmatrix_x4(qf[kk], ptx::smem_addr(qrow + kk * 16));
    }

    // S = Q K^T. K is [key][d] in smem, which is B^T row-major: non-transposed ldmatrix gives the B fragment.
    // x4 matrices: (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15).
    const T* kb = sK + buf * kTileElems;
    const T* krow = kb + ((lane >> 4) * 8 + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;
    float s[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t kf[4];
        ptx::ldmatrix_x4(kf, ptx::smem_addr(krow + np * 16 * kStride + kk * 16));
        ptx::mma_m16n8k16<T>(s[2 * np], qf[kk], kf, s[2 * np]);
        ptx::mma_m16n8k16<T>(s[2 * np + 1], qf[kk], kf + 2, s[2 * np + 1]);
      }
    }

    // online softmax; keys past key_end (only in the last tile) get -inf
    const bool partial = n0 + kAttnBlockN > key_end;
    float new_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int key = n0 + nt * 8 + 2 * t + (i & 1);  // C fragment column
        float x = s[nt][i] * scale_log2;
        if (partial && key >= key_end) x = -INFINITY;
        s[nt][i] = x;
        new_max[i >> 1] = fmaxf(new_max[i >> 1], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // a row's 8-key slices live in the 4 lanes of a quad
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 1));
      new_max[r] = fmaxf(new_max[r], __shfl_xor_sync(0xffffffffu, new_max[r], 2));
      alpha[r] = exp2f(row_max[r] - new_max[r]);  // first tile: exp2(-inf) = 0 (new_max is finite)
      row_max[r] = new_max[r];
      row_sum[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = exp2f(s[nt][i] - row_max[i >> 1]);
        row_sum[i >> 1] += s[nt][i];
      }
    }
#pragma unroll
    for (int nd = 0; nd < kDTiles; ++nd) {
      acc[nd][0] *= alpha[0]; acc[nd][1] *= alpha[0];
      acc[nd][2] *= alpha[1]; acc[nd][3] *= alpha[1];
    }

    // O += P V. The C fragments of two adjacent 8-key tiles of S are the A fragment of one 16-key step.
    // V is [key][d] (B row-major): transposed ldmatrix gives the B fragment.
    // x4.trans matrices: (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15).
    const T* vb = sV + buf * kTileElems;
    const T* vrow = vb + (((lane >> 3) & 1) * 8 + (lane & 7)) * kStride + (lane >> 4) * 8;
#pragma unroll
    for (int j = 0; j < kAttnBlockN / 16; ++j) {
      const uint32_t pa[4] = {ptx::pack2<T>(s[2 * j][0], s[2 * j][1]), ptx::pack2<T>(s[2 * j][2], s[2 * j][3]),
                              ptx::pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                              ptx::pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t vf[4];
        ptx::ldmatrix_x4_trans(vf, ptx::smem_addr(vrow + j * 16 * kStride + dp * 16));
        ptx::mma_m16n8k16<T>(acc[2 * dp], pa, vf, acc[2 * dp]);
        ptx::mma_m16n8k16<T>(acc[2 * dp + 1], pa, vf + 2, acc[2 * dp + 1]);
      }
    }
#ifndef LLADA_PLANT_RACE
    __syncthreads();  // every warp is done with this buffer before the next iteration's prefetch overwrites it
#endif
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
    inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
  }
#pragma unroll
  for (int nd = 0; nd < kDTiles; ++nd) {
    const int col = nd * 8 + 2 * t;
    if (kSplit) {
      if (row_lo < p.Lq)
        *reinterpret_cast<float2*>(split.o_partial + split_row(row_lo) * kHeadDim + col) =
            float2{acc[nd][0] * inv[0], acc[nd][1] * inv[0]};
      if (row_hi < p.Lq)
        *reinterpret_cast<float2*>(split.o_partial + split_row(row_hi) * kHeadDim + col) =
            float2{acc[nd][2] * inv[1], acc[nd][3] * inv[1]};
    } else {
      if (row_lo < p.Lq)
        *reinterpret_cast<uint32_t*>(o + (int64_t)row_lo * p.o_l_stride + col) =
            ptx::pack2<T>(acc[nd][0] * inv[0], acc[nd][1] * inv[0]);
      if (row_hi < p.Lq)
        *reinterpret_cast<uint32_t*>(o + (int64_t)row_hi * p.o_l_stride + col) =
            ptx::pack2<T>(acc[nd][2] * inv[1], acc[nd][3] * inv[1]);
    }
  }
  if (kSplit && t == 0) {  // log2 of the split's softmax sum, in the same base-2 units as row_max
    if (row_lo < p.Lq) split.lse[split_row(row_lo)] = row_max[0] + __log2f(row_sum[0]);
    if (row_hi < p.Lq) split.lse[split_row(row_hi)] = row_max[1] + __log2f(row_sum[1]);
  }
}

// Merges the splits: o = sum_s 2^(lse_s - max) o_s / sum_s 2^(lse_s - max). grid attention_combine_grid(p), block 128:
// one warp per (b, h, query row), lanes along D.
template <class T, int kHeadDim>
__global__ void __launch_bounds__(kAttnThreads) attention_combine_kernel(const AttentionParams p,
                                                                         const AttentionSplit split) {
  constexpr int kPerLane = kHeadDim / 32;
  const int lane = threadIdx.x & 31, row = blockIdx.x * 4 + (threadIdx.x >> 5), h = blockIdx.y, b = blockIdx.z;
  if (row >= p.Lq) return;
  auto split_row = [&](int s) { return (((int64_t)s * p.B + b) * p.Hq + h) * p.Lq + row; };
  float m = -INFINITY;
  for (int s = 0; s < split.n_splits; ++s) m = fmaxf(m, split.lse[split_row(s)]);
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  float w_sum = 0.f;
  if (m != -INFINITY) {
    for (int s = 0; s < split.n_splits; ++s) {
      const float w = exp2f(split.lse[split_row(s)] - m);  // 0 for a split without keys
      w_sum += w;
      const float* os = split.o_partial + split_row(s) * kHeadDim;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[i] += w * os[lane + 32 * i];
    }
  }
  const float inv = w_sum > 0.f ? 1.f / w_sum : 0.f;  // no key in any split: zeros
  T* o = static_cast<T*>(p.o_ptr) + b * p.o_b_stride + (int64_t)row * p.o_l_stride + h * p.o_h_stride;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) o[lane + 32 * i] = ptx::from_float<T>(acc[i] * inv);
}

#if !defined(__CUDACC__)
// The emulator's launcher (bindings/emu_attention.cpp, tests/emu): the same kernels and split logic as run_attention,
// on host memory. n_splits = 0 picks it as run_attention would on an H100 (132 SMs).
template <class T, int kHeadDim>
void run_attention_emu_typed(const AttentionParams& p, int n_splits) {
  constexpr size_t smem = attention_smem_bytes<T, kHeadDim>();
  if (n_splits == 1) {
    emu::launch(attention_kernel<T, kHeadDim, false>, attention_grid(p), dim3(kAttnThreads), smem, p, AttentionSplit{});
    return;
  }
  std::vector<float> workspace(attention_split_floats(p, n_splits));
  const AttentionSplit split = attention_split_views(p, n_splits, workspace.data());
  emu::launch(attention_kernel<T, kHeadDim, true>, attention_grid(p, n_splits), dim3(kAttnThreads), smem, p, split);
  emu::launch(attention_combine_kernel<T, kHeadDim>, attention_combine_grid(p), dim3(kAttnThreads), 0, p, split);
}

inline void run_attention_emu(const AttentionParams& p, int n_splits = 0) {
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) throw std::invalid_argument("llada_rt attention: Hq must be a multiple of Hkv");
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return;
  if (n_splits <= 0) n_splits = attention_num_splits(p, /*num_sms=*/132);
  if (p.dtype == DType::kBFloat16 && p.D == 128) return run_attention_emu_typed<__nv_bfloat16, 128>(p, n_splits);
  if (p.dtype == DType::kBFloat16 && p.D == 64) return run_attention_emu_typed<__nv_bfloat16, 64>(p, n_splits);
  if (p.dtype == DType::kFloat16 && p.D == 128) return run_attention_emu_typed<__half, 128>(p, n_splits);
  if (p.dtype == DType::kFloat16 && p.D == 64) return run_attention_emu_typed<__half, 64>(p, n_splits);
  throw std::invalid_argument("llada_rt attention: supports bf16/fp16 with head dim 64 or 128, got dtype code " +
                              std::to_string(static_cast<int>(p.dtype)) + " and D=" + std::to_string(p.D));
}
#endif

}  // namespace llada
