// AttentionParams: bidirectional flash attention forward over per-row valid key ranges.
#pragma once
#include "common.h"

namespace llada {

struct AttentionParams {
  void* o_ptr;                 // [B, Lq, Hq, D] out
  const void* q_ptr;           // [B, Lq, Hq, D]
  const void* k_ptr;           // [R, Lk, Hkv, D] (may be a strided view of a cache)
  const void* v_ptr;           // [R, Lk, Hkv, D]
  int64_t o_b_stride, o_l_stride, o_h_stride;  // elements; the D dimension has unit stride everywhere
  int64_t q_b_stride, q_l_stride, q_h_stride;
  int64_t k_b_stride, k_l_stride, k_h_stride;
  int64_t v_b_stride, v_l_stride, v_h_stride;
  const int32_t* key_start_ptr;  // [B] first valid key per row, or null for 0
  const int32_t* key_end_ptr;    // [B] one past the last valid key per row, or null for Lk
  const int32_t* kv_rows_ptr;    // [B] row of k/v (in [0, R)) that q row b attends, or null for b (then R = B)
  int B, Lq, Lk, Hq, Hkv, D, R;
  float scale;                 // softmax scale, 1/sqrt(D) for LLaDA
  DType dtype;                 // CUDA: kFloat16 or kBFloat16; CPU: also kFloat32
};

// CPU kernel (csrc/cpu/attention.cpp). Returns -1, or (writing nothing) the first b whose kv_rows[b] is outside [0, R).
int64_t attention_cpu(const AttentionParams& p);
#if defined(LLADA_WITH_CUDA)
void run_attention(const AttentionParams& p, void* stream);
#endif

}  // namespace llada
