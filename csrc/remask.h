// RemaskParams: per row, commit the most confident masked positions of the row's current block in place, each row
// with its own rule and settings (read by the kernel from memory: one launch serves rows of different requests).
#pragma once
#include "common.h"

namespace llada {

constexpr int kRemaskMaxN = 1024;  // longest block: one CUDA thread per position; per-row CPU scratch on the stack

enum class RemaskRule : int32_t {
  kTopK = 0,       // commit the k[b] most confident masked positions (fewer if fewer are masked)
  kThreshold = 1,  // commit every masked position with prob >= threshold[b], always at least the most confident one
  kFactor = 2,     // Fast-dLLM factor rule (LLADA.md 4.4) with factor[b]
};

struct RemaskParams {
  int64_t* block_ptr;            // [B, N] contiguous token ids, modified in place; masked iff it holds mask_id
  int32_t* count_ptr;            // [B] out: positions committed per row (-1: rule[b] is not a rule code)
  const int64_t* token_ptr;      // [B, N] contiguous candidate tokens
  const double* prob_ptr;        // [B, N] contiguous confidences
  const int64_t* k_ptr;          // [B] kTopK
  const int32_t* rule_ptr;       // [B] RemaskRule codes
  const double* threshold_ptr;   // [B] kThreshold
  const double* factor_ptr;      // [B] kFactor
  int B, N;
  int64_t mask_id;
};

void remask_cpu(const RemaskParams& p);
#if defined(LLADA_WITH_CUDA)
void run_remask(const RemaskParams& p, void* stream);
#endif

}  // namespace llada
