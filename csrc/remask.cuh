// remask_kernel: one block per row; every masked position of the row's block gets its rank by confidence (a count
// over the row in shared memory, ties to the lower position), the row's own rule turns the sorted confidences into a
// count, and the positions ranked below it write their token in place. No host sync: every setting is read on the
// device. Compiled by nvcc (remask.cu) and by g++ against the SIMT emulator (bindings/emu_remask.cpp, tests/emu).
#pragma once
#include <climits>

#include "ptx.cuh"
#include "remask.h"

namespace llada {

// Whole warps, at least one thread per block position.
inline int remask_threads(int N) { return (N + 31) / 32 * 32; }
inline dim3 remask_grid(const RemaskParams& p) { return dim3(static_cast<unsigned>(p.B)); }

namespace remask_detail {

// IEEE-rounded float64 division (as Python's factor / (n + 1) in Fast-dLLM), whatever the compiler flags.
LLADA_DEVICE double div_rn(double a, double b) {
#if defined(__CUDACC__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace remask_detail

// grid: B blocks, block: remask_threads(N) threads (N <= 1024).
__global__ void __launch_bounds__(kRemaskMaxN) remask_kernel(const RemaskParams p) {
  using namespace remask_detail;
  __shared__ double s_conf[kRemaskMaxN];         // confidences, NaN as -inf (a total order)
  __shared__ unsigned char s_masked[kRemaskMaxN];
  __shared__ double s_sorted[kRemaskMaxN];       // masked confidences by rank
  __shared__ int s_warp_count[kRemaskMaxN / 32];
  __shared__ int s_first_fail;

  const int b = blockIdx.x, j = threadIdx.x, N = p.N;
  const int warp = j / 32, lane = j % 32, n_warps = blockDim.x / 32;
  int64_t* block = p.block_ptr + static_cast<int64_t>(b) * N;
  const bool in_block = j < N;
  const bool masked = in_block && block[j] == p.mask_id;
  double conf = masked ? p.prob_ptr[static_cast<int64_t>(b) * N + j] : 0.0;
  if (conf != conf) conf = -INFINITY;  // NaN ranks as -inf, as in the CPU op
  if (in_block) { s_conf[j] = conf; s_masked[j] = masked; }
  // masked positions per row: a ballot per warp, then a sum over the warps
  const unsigned ballot = __ballot_sync(0xffffffffu, masked);
  if (lane == 0) s_warp_count[warp] = __popc(ballot);
  if (j == 0) s_first_fail = INT_MAX;
  __syncthreads();
  int m = 0;
  for (int w = 0; w < n_warps; ++w) m += s_warp_count[w];

  // rank = number of masked positions ordered before this one: higher confidence, or equal and a lower position
  int rank = INT_MAX;
  if (masked) {
    rank = 0;
    for (int i = 0; i < N; ++i) rank += s_masked[i] && (s_conf[i] > conf || (s_conf[i] == conf && i < j));
    s_sorted[rank] = conf;
  }
  __syncthreads();

  const int32_t rule = p.rule_ptr[b];  // uniform over the block, as m: the barriers below are reached by all
  int count = 0;
  if (rule < 0 || rule > 2) {
    count = -1;  // not a rule code: nothing is committed and the count says so
  } else if (m > 0) {
    switch (static_cast<RemaskRule>(rule)) {
      case RemaskRule::kTopK: {
        const int64_t k = p.k_ptr[b];
        count = static_cast<int>(k < 0 ? 0 : (k < m ? k : m));
        break;
      }
      case RemaskRule::kThreshold: {
        // confidences >= threshold form a prefix of the ranking; at least the most confident one is committed
        const bool pass = masked && conf >= p.threshold_ptr[b];
        const unsigned pass_ballot = __ballot_sync(0xffffffffu, pass);
        // s_warp_count is free again: every thread read it for m before the barrier above
        if (lane == 0) s_warp_count[warp] = __popc(pass_ballot);
        __syncthreads();
        for (int w = 0; w < n_warps; ++w) count += s_warp_count[w];
        count = count > 1 ? count : 1;
        break;
      }
      case RemaskRule::kFactor: {
        // Fast-dLLM get_transfer_index_dynamic: rank r (0-based) needs conf >= 1 - factor / (r + 2) in float64,
        // rank 0 always passes; top_i = first failing rank, or m - 1 if none fails. Its quirk is kept on purpose:
        // top_i is then bumped by one when it is 0 or m - 1, so a failure at the last rank still commits all m.
        const int r = j;  // thread j checks rank j
        if (r >= 1 && r < m && s_sorted[r] < 1.0 - div_rn(p.factor_ptr[b], static_cast<double>(r + 2)))
          atomicMin(&s_first_fail, r);
        __syncthreads();
        int top_i = s_first_fail == INT_MAX ? m - 1 : s_first_fail;
        if (top_i == 0 || top_i == m - 1) ++top_i;
        count = top_i;
        break;
      }
    }
  }
  // a committed token is written even if it is mask_id (the position then stays masked, as in the official sampler)
  if (masked && rank < count) block[j] = p.token_ptr[static_cast<int64_t>(b) * N + j];
  if (j == 0) p.count_ptr[b] = count;
}

}  // namespace llada
