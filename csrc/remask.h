// RemaskParams: per row, commit the most confident masked positions of canvas[:, start:start+N] in place.
#pragma once
#include "common.h"

namespace llada {

enum class RemaskRule : int {
  kTopK = 0,       // commit the k[b] most confident masked positions (fewer if fewer are masked)
  kThreshold = 1,  // commit every masked position with prob >= threshold, always at least the most confident one
  kFactor = 2,     // Fast-dLLM factor rule (LLADA.md 4.4)
};

struct RemaskParams {
  int64_t* canvas_ptr;        // [B, T] token ids, modified in place; a position is masked iff it holds mask_id
  int64_t canvas_b_stride;    // elements
  int32_t* count_ptr;         // [B] out: number of positions committed per row
  const int64_t* token_ptr;   // [B, N] contiguous, block-relative candidate tokens
  const float* prob_ptr;      // [B, N] contiguous, block-relative confidences
  const int64_t* k_ptr;       // [B] tokens to commit per row (kTopK only; may be null otherwise)
  int B, N;
  int64_t start;              // first canvas column of the block
  int64_t mask_id;
  RemaskRule rule;
  float threshold;            // kThreshold
  float factor;               // kFactor
};

void remask_cpu(const RemaskParams& p);
#if defined(LLADA_WITH_CUDA)
void run_remask(const RemaskParams& p, void* stream);
#endif

}  // namespace llada
