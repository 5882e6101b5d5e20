// advance_kernel: one block per stepped row. The threads count the block's masks and, with early stop, find the first
// committed stop id of the answer and whether a mask precedes it; thread 0 then moves the counters on. Compiled by
// nvcc (advance.cu) and by g++ against the SIMT emulator (bindings/emu_advance.cpp, tests/emu/test_advance.cpp).
#pragma once
#include <climits>

#include "advance.h"
#include "ptx.cuh"

namespace llada {

constexpr int kAdvanceThreads = 128;
inline dim3 advance_grid(const AdvanceParams& p) { return dim3(static_cast<unsigned>(p.B)); }

__global__ void __launch_bounds__(kAdvanceThreads) advance_kernel(const AdvanceParams p) {
  __shared__ int s_masked;      // masks in the current block
  __shared__ int s_first_stop;  // first answer column holding a stop id (INT_MAX: none)
  __shared__ int s_mask_before; // 1 if a mask precedes it
  __shared__ int s_filled;
  const int64_t s = p.slots_ptr[blockIdx.x];
  if (s == p.skip_slot) return;  // uniform over the block: no thread reaches a barrier
  const int t = threadIdx.x;
  int64_t* row = p.canvas_ptr + s * p.canvas_stride;
  const int64_t bs = p.block_start_ptr[s], L = p.length_ptr[s], P = p.prompt_len_ptr[s];
  const bool early_stop = p.early_stop_ptr[s];
  if (t == 0) { s_masked = 0; s_first_stop = INT_MAX; s_mask_before = 0; s_filled = 0; }
  __syncthreads();
  int masked = 0;
  for (int64_t j = t; j < p.N; j += blockDim.x) masked += row[bs + j] == p.mask_id;
  if (masked) atomicAdd(&s_masked, masked);
  if (early_stop) {
    for (int64_t c = P + t; c < L; c += blockDim.x) {
      bool stop = false;
      for (int i = 0; i < p.n_stop; ++i) stop |= row[c] == p.stop_ids[i];
      if (stop) { atomicMin(&s_first_stop, static_cast<int>(c)); break; }   // c grows: later ones cannot be first
    }
  }
  __syncthreads();
  const int first = s_first_stop;
  const bool found = early_stop && first != INT_MAX;
  if (found) {
    for (int64_t c = P + t; c < first; c += blockDim.x)
      if (row[c] == p.mask_id) { atomicMax(&s_mask_before, 1); break; }
  }
  __syncthreads();
  const bool early = found && !s_mask_before;
  if (early) {  // the text is final: everything after the first stop id becomes fill_id
    int filled = 0;
    for (int64_t c = first + 1 + t; c < L; c += blockDim.x) {
      filled += row[c] == p.mask_id;
      row[c] = p.fill_id;
    }
    if (filled) atomicAdd(&s_filled, filled);
  }
  __syncthreads();
  if (t == 0) {
    const int64_t step = p.step_ptr[s] + 1, spb = p.spb_ptr[s];
    p.nsteps_ptr[s] += 1;
    // the fixed schedule ends a block after spb steps; the dynamic rules when it has no mask left, and never run
    // more than N steps on one block (every step commits at least one position, unless the model predicts the
    // mask id itself: the cap keeps that from looping forever)
    const bool block_done = p.rule_ptr[s] == kRuleTopK ? step >= spb : (s_masked == 0 || step >= p.N);
    bool done = early;
    int64_t next_step = step;
    if (block_done) {
      p.block_start_ptr[s] = bs + p.N;
      next_step = 0;
      done = done || bs + p.N >= L;
    }
    p.step_ptr[s] = next_step;
    if (spb > 0) p.k_ptr[s] = p.N / spb + (next_step < p.N % spb ? 1 : 0);
    if (early) p.filled_ptr[s] = s_filled;
    p.status_ptr[s] = (done ? kAdvanceDone : 0) | (block_done ? kAdvanceBlockDone : 0) | (early ? kAdvanceEarly : 0);
  }
}

}  // namespace llada
