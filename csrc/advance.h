// AdvanceParams: after a denoising step, move each stepped row's block/step counters on and detect finished rows.
#pragma once
#include "common.h"

namespace llada {

constexpr int kAdvanceBlockDone = 1;  // status bits (llada_rt/reference.py ADVANCE_*)
constexpr int kAdvanceDone = 2;
constexpr int kAdvanceEarly = 4;
constexpr int kRuleTopK = 0;          // RULES in llada_rt/engine.py (remask's rule codes)

struct AdvanceParams {
  // per-slot state, [R] each, updated in place for the rows in slots
  int32_t* status_ptr;          // out: kAdvance* bits
  int64_t* canvas_ptr;          // [R, canvas_stride] token ids: read, and written past the first stop id on early stop
  int64_t canvas_stride;        // elements
  const int64_t* slots_ptr;     // [B] the rows that just took a step
  int64_t* block_start_ptr;     // canvas column of the current block
  int64_t* step_ptr;            // steps done in the current block
  int64_t* nsteps_ptr;          // steps done in total (the next step's Philox offset)
  int64_t* k_ptr;               // out: fixed-schedule commits of the next step
  const int64_t* spb_ptr;       // steps per block
  const int64_t* prompt_len_ptr;
  const int64_t* length_ptr;    // prompt + gen_length
  const int32_t* rule_ptr;      // 0: fixed schedule (top-k); else threshold/factor (dynamic, capped at N steps)
  const bool* early_stop_ptr;
  int32_t* filled_ptr;          // out: masks overwritten with fill_id by early stop
  int B, N;                     // rows in slots, block length
  int64_t mask_id, fill_id;
  int n_stop;
  int64_t stop_ids[kMaxSpecialIds];
  int64_t skip_slot;            // a slot left alone (the engine's scratch row), or -1
};

// The counters of slot s after its step, on the CPU and in the kernel: bs the block's first column, L the row's
// length, masked the block's positions still masked after the step, early whether early stop ended the row. The
// fixed schedule ends a block after spb steps; the dynamic rules when it has no mask left, and never run more than
// N steps on one block (every step commits at least one position unless the model predicts the mask id itself: the
// cap keeps that from looping forever).
LLADA_HD void advance_schedule(const AdvanceParams& p, int64_t s, int64_t bs, int64_t L, int64_t masked, bool early) {
  const int64_t step = p.step_ptr[s] + 1, spb = p.spb_ptr[s];
  p.nsteps_ptr[s] += 1;
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

void advance_cpu(const AdvanceParams& p);
#if defined(LLADA_WITH_CUDA)
void run_advance(const AdvanceParams& p, void* stream);
#endif

}  // namespace llada
