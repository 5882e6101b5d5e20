// CPU advance: after a denoising step, move each stepped row's counters on and detect finished rows (advance.cuh).
#include "advance.h"

namespace llada {

static bool is_stop(const AdvanceParams& p, int64_t t) {
  for (int i = 0; i < p.n_stop; ++i)
    if (t == p.stop_ids[i]) return true;
  return false;
}

void advance_cpu(const AdvanceParams& p) {
  for (int b = 0; b < p.B; ++b) {
    const int64_t s = p.slots_ptr[b];
    if (s == p.skip_slot) continue;
    int64_t* row = p.canvas_ptr + s * p.canvas_stride;
    const int64_t bs = p.block_start_ptr[s], L = p.length_ptr[s], P = p.prompt_len_ptr[s];
    int masked = 0;
    for (int64_t j = 0; j < p.N; ++j) masked += row[bs + j] == p.mask_id;
    bool early = false;
    if (p.early_stop_ptr[s]) {
      int64_t first = P;
      while (first < L && !is_stop(p, row[first])) ++first;
      bool mask_before = false;
      for (int64_t c = P; c < first && !mask_before; ++c) mask_before = row[c] == p.mask_id;
      if (first < L && !mask_before) {  // the text is final: everything after the first stop id becomes fill_id
        early = true;
        int filled = 0;
        for (int64_t c = first + 1; c < L; ++c) {
          filled += row[c] == p.mask_id;
          row[c] = p.fill_id;
        }
        p.filled_ptr[s] = filled;
      }
    }
    const int64_t step = p.step_ptr[s] + 1, spb = p.spb_ptr[s];
    p.nsteps_ptr[s] += 1;
    // see advance.cuh: the dynamic rules never run more than N steps on one block
    const bool block_done = p.rule_ptr[s] == kRuleTopK ? step >= spb : (masked == 0 || step >= p.N);
    bool done = early;
    int64_t next_step = step;
    if (block_done) {
      p.block_start_ptr[s] = bs + p.N;
      next_step = 0;
      done = done || bs + p.N >= L;
    }
    p.step_ptr[s] = next_step;
    if (spb > 0) p.k_ptr[s] = p.N / spb + (next_step < p.N % spb ? 1 : 0);
    p.status_ptr[s] = (done ? kAdvanceDone : 0) | (block_done ? kAdvanceBlockDone : 0) | (early ? kAdvanceEarly : 0);
  }
}

}  // namespace llada
