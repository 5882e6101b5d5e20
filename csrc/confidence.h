// ConfidenceParams: masked-logit softmax -> (argmax token, its softmax probability) per masked row.
#pragma once
#include "common.h"

namespace llada {

struct ConfidenceParams {
  // outputs, [B, N] contiguous
  int64_t* token_ptr;        // argmax of (logits + temperature * gumbel); -1 where the row is not masked
  float* prob_ptr;           // softmax(logits)[token] in fp32 (0 if token is a zero-confidence id); -inf if not masked
  // inputs
  const void* logits_ptr;    // [B, N, V] with unit stride over V
  int64_t logits_b_stride;   // elements
  int64_t logits_n_stride;   // elements
  const bool* masked_ptr;    // [B, N] contiguous; rows that are false are skipped
  int B, N, V;
  DType dtype;
  float temperature;         // 0: plain argmax; > 0: Gumbel-max with Philox noise
  uint64_t seed, offset;     // Philox key and counter offset (see philox.h); row index = b * N + n
  int random_confidence;     // 1: prob is a Philox uniform draw (random remasking) instead of the softmax probability
  int n_suppress;            // ids whose logits are -inf before everything (logits_eos_inf)
  int64_t suppress_ids[kMaxSpecialIds];
  int n_zero_conf;           // ids excluded from the softmax after the argmax (confidence_eos_eot_inf)
  int64_t zero_conf_ids[kMaxSpecialIds];
};

void confidence_cpu(const ConfidenceParams& p);
#if defined(LLADA_WITH_CUDA)
void run_confidence(const ConfidenceParams& p, void* stream);  // stream is a cudaStream_t
#endif

}  // namespace llada
