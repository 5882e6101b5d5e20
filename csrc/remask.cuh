// remask_kernel: one block per row; every masked position of the block gets its rank by confidence (a count over the
// row in shared memory, ties to the lower position), the rule turns the sorted confidences into a count, and the
// positions ranked below it write their token into the canvas. No host sync: k is read on the device.
// Compiled by nvcc (remask.cu) and by g++ against the SIMT emulator (bindings/emu_remask.cpp, tests/emu).
#pragma once
#include <climits>

#include "ptx.cuh"
#include "remask.h"

namespace llada {

constexpr int kRemaskMaxN = 1024;

// Whole warps, at least one thread per block position.
inline int remask_threads(int N) { return (N + 31) / 32 * 32; }
inline dim3 remask_grid(const RemaskParams& p) { return dim3(static_cast<unsigned>(p.B)); }

namespace remask_detail {

// Sort key: descending confidence, then ascending position, as one descending unsigned 64-bit key. The float bits
// are mapped to an order-preserving unsigned (negatives flipped), the position goes in the low word inverted; NaN
// confidences count as -inf. Unmasked positions get key 0, below every masked key (-inf maps to 0x007fffff...).
LLADA_DEVICE uint64_t sort_key(float conf, int pos) {
  if (conf != conf) conf = -INFINITY;
  const uint32_t bits = __float_as_uint(conf);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(0xffffffffu - static_cast<uint32_t>(pos));
}

// IEEE-rounded division, so that the factor thresholds equal the CPU's and reference.py's under --use_fast_math.
LLADA_DEVICE float div_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace remask_detail

// grid: B blocks, block: remask_threads(N) threads (N <= 1024).
__global__ void __launch_bounds__(kRemaskMaxN) remask_kernel(const RemaskParams p) {
  using namespace remask_detail;
  __shared__ uint64_t s_key[kRemaskMaxN];
  __shared__ float s_sorted[kRemaskMaxN];   // masked confidences by rank
  __shared__ int s_warp_count[kRemaskMaxN / 32];
  __shared__ int s_first_fail;

  const int b = blockIdx.x, j = threadIdx.x, N = p.N;
  const int warp = j / 32, lane = j % 32, n_warps = blockDim.x / 32;
  int64_t* canvas = p.canvas_ptr + b * p.canvas_b_stride + p.start;
  const bool in_block = j < N;
  const bool masked = in_block && canvas[j] == p.mask_id;
  const float conf = masked ? p.prob_ptr[static_cast<int64_t>(b) * N + j] : 0.0f;
  const float conf_ordered = conf != conf ? -INFINITY : conf;  // NaN ranks as -inf, as in the CPU op
  const uint64_t key = masked ? sort_key(conf, j) : 0;
  if (in_block) s_key[j] = key;
  // masked positions per row: a ballot per warp, then a sum over the warps
  const unsigned ballot = __ballot_sync(0xffffffffu, masked);
  if (lane == 0) s_warp_count[warp] = __popc(ballot);
  if (j == 0) s_first_fail = INT_MAX;
  __syncthreads();
  int m = 0;
  for (int w = 0; w < n_warps; ++w) m += s_warp_count[w];

  // rank = number of masked positions ordered before this one (keys are unique among masked positions)
  int rank = INT_MAX;
  if (masked) {
    rank = 0;
    for (int i = 0; i < N; ++i) rank += s_key[i] > key;
    s_sorted[rank] = conf_ordered;
  }
  __syncthreads();

  int count = 0;
  if (m > 0) {
    switch (p.rule) {
      case RemaskRule::kTopK: {
        const int64_t k = p.k_ptr[b];
        count = static_cast<int>(k < 0 ? 0 : (k < m ? k : m));
        break;
      }
      case RemaskRule::kThreshold: {
        // confidences >= threshold form a prefix of the ranking; at least the most confident one is committed
        const bool pass = rank < m && conf_ordered >= p.threshold;
        const unsigned pass_ballot = __ballot_sync(0xffffffffu, pass);
        // s_warp_count is free again: every thread read it for m before the barrier above
        if (lane == 0) s_warp_count[warp] = __popc(pass_ballot);
        __syncthreads();
        for (int w = 0; w < n_warps; ++w) count += s_warp_count[w];
        count = count > 1 ? count : 1;
        break;
      }
      case RemaskRule::kFactor: {
        // Fast-dLLM get_transfer_index_dynamic: rank r (0-based) needs conf >= 1 - factor / (r + 2), rank 0 always
        // passes; top_i = first failing rank, or m - 1 if none fails. Its quirk is kept on purpose: top_i is then
        // bumped by one when it is 0 or m - 1, so a failure at the last rank still commits all m.
        const int r = j;  // thread j checks rank j
        if (r >= 1 && r < m && s_sorted[r] < 1.0f - div_rn(p.factor, static_cast<float>(r + 2)))
          atomicMin(&s_first_fail, r);
        __syncthreads();
        int top_i = s_first_fail == INT_MAX ? m - 1 : s_first_fail;
        if (top_i == 0 || top_i == m - 1) ++top_i;
        count = top_i;
        break;
      }
    }
  }
  if (masked && rank < count) canvas[j] = p.token_ptr[static_cast<int64_t>(b) * N + j];
  if (j == 0) p.count_ptr[b] = count;
}

}  // namespace llada
