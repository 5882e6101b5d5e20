// CPU attention: bidirectional flash attention forward in fp32 (online softmax in base 2), one task per (b, h, tile of
// query rows). K and V are read in place from the (strided) cache row kv_rows[b], so a call allocates nothing: the
// scaled queries, the output accumulators and one block of scores live on the task's stack.
#include <algorithm>
#include <cmath>
#include <limits>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "attention.h"
#include "cpu/vec.h"

namespace llada {
namespace {

using cpu::Vec;

int omp_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

constexpr int kMaxHeadDim = 256;  // stack scratch per task: 2 x kTileRows x kMaxHeadDim floats (64 KiB)
constexpr int kTileRows = 32;     // query rows per task: every K/V block fetched from memory serves all of them
constexpr int kRows = 4;          // query rows of a register tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Register tiles for W lanes: S = Q K^T as kRows x kKeys dot products along D (W accumulators, reduced into one
// vector), O += P V as kRows x kPvVecs accumulators along D; a block of kBlockN keys shares one softmax rescale.
template <int W> struct Tiles {
  static constexpr int kKeys = W / kRows;
  static constexpr int kBlockN = 4 * W;
  static constexpr int kPvVecs = W == 16 ? 4 : 2;
};

// One level of the lane reduction: vectors (v[2i], v[2i+1]) -> v[i], keeping 2S partial sums of each vector in
// blocks of S lanes. Starting at S = W/2 over W vectors, the last level (S = 1) leaves lane i = sum of input i.
template <int W, int S>
LLADA_INLINE void reduce_level(typename Vec<W>::F* v) {
  typename Vec<W>::I lo, hi;
  for (int lane = 0; lane < W; ++lane) {
    lo[lane] = 2 * (lane / S) * S + lane % S;  // even blocks of S lanes of the pair, concatenated
    hi[lane] = lo[lane] + S;                   // odd blocks
  }
  for (int i = 0; i < S; ++i)
    v[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi);
  if constexpr (S > 1) reduce_level<W, S / 2>(v);
}

template <int W, class E>
struct AttnTask {
  using V = Vec<W>;
  using F = typename V::F;
  using T = typename E::T;
  using Tl = Tiles<W>;

  const AttentionParams& p;
  const T* k;  // this (kv row, kv head)'s keys: key j at k + j * p.k_l_stride
  const T* v;
  int D, n_vec;  // head dim, and D in W-lane vectors (the last one partial when D % W != 0)

  LLADA_INLINE F load_kv(const T* row, int c) const {
    return (c + 1) * W <= D ? V::template load<E>(row + c * W) : V::template load_n<E>(row + c * W, D - c * W);
  }

  // s[r][jt + kk] = q_r . k_(j0 + jt + kk) for the kRows query rows at q (stride kMaxHeadDim) and keys jt.. of the
  // block; keys past `last` repeat the last key (their scores are masked by the softmax).
  LLADA_INLINE void scores(const float* q, int j0, int jt, int last, float (*s)[Tl::kBlockN]) const {
    const T* rows[Tl::kKeys];
    for (int kk = 0; kk < Tl::kKeys; ++kk) rows[kk] = k + (int64_t)std::min(j0 + jt + kk, last) * p.k_l_stride;
    F acc[W] = {};  // [r * kKeys + kk]
    for (int c = 0; c < n_vec; ++c) {
      F kv[Tl::kKeys];
      for (int kk = 0; kk < Tl::kKeys; ++kk) kv[kk] = load_kv(rows[kk], c);
      for (int r = 0; r < kRows; ++r) {
        const F qv = V::load(q + r * kMaxHeadDim + c * W);
        for (int kk = 0; kk < Tl::kKeys; ++kk) acc[r * Tl::kKeys + kk] += qv * kv[kk];
      }
    }
    reduce_level<W, W / 2>(acc);
    for (int r = 0; r < kRows; ++r)
      for (int kk = 0; kk < Tl::kKeys; ++kk) s[r][jt + kk] = acc[0][r * Tl::kKeys + kk];
  }

  // o[r][c0..] += sum_j s[r][j] v_(j0 + j) over the nb keys of the block; kFull: every vector of the chunk is inside D
  template <bool kFull>
  LLADA_INLINE void accumulate(float* o, int c0, int j0, int nb, const float (*s)[Tl::kBlockN]) const {
    F acc[kRows][Tl::kPvVecs];
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < Tl::kPvVecs; ++c) acc[r][c] = V::load(o + r * kMaxHeadDim + c0 + c * W);
    for (int j = 0; j < nb; ++j) {
      const T* row = v + (int64_t)(j0 + j) * p.v_l_stride;
      F vv[Tl::kPvVecs];
      for (int c = 0; c < Tl::kPvVecs; ++c) {
        const int col = c0 + c * W;
        vv[c] = kFull ? V::template load<E>(row + col) : (col < D ? load_kv(row, col / W) : F{});
      }
      for (int r = 0; r < kRows; ++r) {
        const F pr = V::splat(s[r][j]);
        for (int c = 0; c < Tl::kPvVecs; ++c) acc[r][c] += pr * vv[c];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < Tl::kPvVecs; ++c) V::store(o + r * kMaxHeadDim + c0 + c * W, acc[r][c]);
  }

  // Query rows [i0, i1) of head h against keys [ks, ke) (ke > ks).
  LLADA_INLINE void run(int b, int h, int i0, int i1, int ks, int ke) const {
    alignas(64) float q[kTileRows][kMaxHeadDim];  // q * scale * log2(e), zero past D and past the last row
    alignas(64) float o[kTileRows][kMaxHeadDim];  // unnormalized output accumulators
    alignas(64) float s[kRows][Tl::kBlockN] = {};  // one register tile's scores, then probabilities
    float row_max[kTileRows], row_sum[kTileRows];
    const int rows = i1 - i0, rows_padded = (rows + kRows - 1) / kRows * kRows, d_padded = n_vec * W;
    const T* qb = static_cast<const T*>(p.q_ptr) + (int64_t)b * p.q_b_stride + (int64_t)h * p.q_h_stride;
    const F scale = V::splat(p.scale * kLog2e);
    for (int r = 0; r < rows_padded; ++r) {
      for (int c = 0; c < n_vec; ++c)
        V::store(&q[r][c * W], r < rows ? load_kv(qb + (int64_t)(i0 + r) * p.q_l_stride, c) * scale : F{});
      std::fill(o[r], o[r] + d_padded, 0.f);
      row_max[r] = kNegInf;
      row_sum[r] = 0.f;
    }
    typename V::I lane;  // 0, 1, ..., W - 1
    for (int l = 0; l < W; ++l) lane[l] = l;
    for (int j0 = ks; j0 < ke; j0 += Tl::kBlockN) {
      const int nb = std::min(Tl::kBlockN, ke - j0);
      for (int r0 = 0; r0 < rows_padded; r0 += kRows) {
        for (int jt = 0; jt < nb; jt += Tl::kKeys) scores(q[r0], j0, jt, ke - 1, s);
        for (int r = 0; r < kRows; ++r) {
          // online softmax over the block: new max, rescale what is accumulated, probabilities (0 past nb)
          F block_max = V::splat(kNegInf);
          for (int j = 0; j < Tl::kBlockN; j += W)
            block_max = V::max(block_max, lane + j < nb ? V::load(&s[r][j]) : V::splat(kNegInf));
          const float new_max = std::max(row_max[r0 + r], V::hmax(block_max));
          const float alpha = std::exp2(row_max[r0 + r] - new_max);  // 0 on the first block (max was -inf)
          row_max[r0 + r] = new_max;
          F sum = F{};
          for (int j = 0; j < Tl::kBlockN; j += W) {
            const F e = V::exp2_nonpos(V::load(&s[r][j]) - new_max);  // masked keys get 2^-126: zeroed next
            const F pr = lane + j < nb ? e : F{};
            V::store(&s[r][j], pr);
            sum += pr;
          }
          row_sum[r0 + r] = row_sum[r0 + r] * alpha + V::hsum(sum);
          if (alpha != 1.0f) {
            const F a = V::splat(alpha);
            for (int c = 0; c < n_vec; ++c) V::store(&o[r0 + r][c * W], V::load(&o[r0 + r][c * W]) * a);
          }
        }
        constexpr int kChunk = Tl::kPvVecs * W;
        for (int c0 = 0; c0 < d_padded; c0 += kChunk) {
          if (c0 + kChunk <= D) accumulate<true>(o[r0], c0, j0, nb, s);
          else accumulate<false>(o[r0], c0, j0, nb, s);
        }
      }
    }
    T* ob = static_cast<T*>(p.o_ptr) + (int64_t)b * p.o_b_stride + (int64_t)h * p.o_h_stride;
    for (int r = 0; r < rows; ++r) {
      const F inv = V::splat(1.0f / row_sum[r]);  // >= 1: the max key contributes 2^0
      T* orow = ob + (int64_t)(i0 + r) * p.o_l_stride;
      for (int c = 0; c < n_vec; ++c) {
        const F val = V::load(&o[r][c * W]) * inv;
        if ((c + 1) * W <= D) V::template store<E>(orow + c * W, val);
        else V::template store_n<E>(orow + c * W, val, D - c * W);
      }
    }
  }
};

// One task: query rows [i0, i1) of (b, h); a batch row without valid keys gets zeros.
template <int W, class E>
LLADA_INLINE void attention_task(const AttentionParams& p, int b, int h, int i0, int i1) {
  using T = typename E::T;
  const int ks = std::max(p.key_start_ptr ? p.key_start_ptr[b] : 0, 0);
  const int ke = std::min(p.key_end_ptr ? p.key_end_ptr[b] : p.Lk, p.Lk);
  if (ke <= ks) {
    T* ob = static_cast<T*>(p.o_ptr) + (int64_t)b * p.o_b_stride + (int64_t)h * p.o_h_stride;
    for (int i = i0; i < i1; ++i) std::fill(ob + (int64_t)i * p.o_l_stride, ob + (int64_t)i * p.o_l_stride + p.D, T{});
    return;
  }
  const int64_t kv_b = p.kv_rows_ptr ? p.kv_rows_ptr[b] : b;
  const int hkv = h / (p.Hq / p.Hkv);
  const AttnTask<W, E> task{p,
                            static_cast<const T*>(p.k_ptr) + kv_b * p.k_b_stride + (int64_t)hkv * p.k_h_stride,
                            static_cast<const T*>(p.v_ptr) + kv_b * p.v_b_stride + (int64_t)hkv * p.v_h_stride,
                            p.D, (p.D + W - 1) / W};
  task.run(b, h, i0, i1, ks, ke);
}

using TaskFn = void (*)(const AttentionParams&, int, int, int, int);

template <class E>
struct TaskIsa {
  LLADA_TARGET_AVX512 static void avx512(const AttentionParams& p, int b, int h, int i0, int i1) {
    attention_task<16, E>(p, b, h, i0, i1);
  }
  LLADA_TARGET_AVX2 static void avx2(const AttentionParams& p, int b, int h, int i0, int i1) {
    attention_task<8, E>(p, b, h, i0, i1);
  }
  static void baseline(const AttentionParams& p, int b, int h, int i0, int i1) {
    attention_task<4, E>(p, b, h, i0, i1);
  }
};

}  // namespace

int64_t attention_cpu(const AttentionParams& p) {
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) throw std::invalid_argument("llada_rt attention: Hq must be a multiple of Hkv");
  if (p.D < 1 || p.D > kMaxHeadDim)
    throw std::invalid_argument("llada_rt attention: the CPU kernel supports head dim D in [1, " +
                                std::to_string(kMaxHeadDim) + "], got " + std::to_string(p.D));
  if (p.kv_rows_ptr)
    for (int b = 0; b < p.B; ++b)
      if (p.kv_rows_ptr[b] < 0 || p.kv_rows_ptr[b] >= p.R) return b;
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return -1;
  const TaskFn fn = cpu::pick_kernel<TaskFn, TaskIsa>(p.dtype);
  // tiles of at most kTileRows rows, smaller when (b, h) alone gives the threads too few tasks
  const int64_t heads = (int64_t)p.B * p.Hq;
  const int64_t want_tiles = (2 * omp_threads() + heads - 1) / heads;
  int tile = (p.Lq + std::max<int64_t>(want_tiles, 1) - 1) / std::max<int64_t>(want_tiles, 1);
  tile = std::min(kTileRows, std::max(kRows, (tile + kRows - 1) / kRows * kRows));
  const int64_t tiles = (p.Lq + tile - 1) / tile;
  const int64_t tasks = heads * tiles;
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t bh = t / tiles;
    const int i0 = static_cast<int>(t % tiles) * tile;
    fn(p, static_cast<int>(bh / p.Hq), static_cast<int>(bh % p.Hq), i0, std::min(p.Lq, i0 + tile));
  }
  return -1;
}

}  // namespace llada
