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

void advance_cpu(const AdvanceParams& p);
#if defined(LLADA_WITH_CUDA)
void run_advance(const AdvanceParams& p, void* stream);
#endif

}  // namespace llada
