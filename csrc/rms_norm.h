// RmsNormParams: LLaDA's RMSNorm over the last dimension, rounded step by step as its torch composition rounds.
#pragma once
#include "common.h"

namespace llada {

struct RmsNormParams {
  void* out_ptr;             // [M, d] out, unit stride over d
  const void* x_ptr;         // [M, d], unit stride over d
  const void* weight_ptr;    // [d] contiguous, x's dtype
  int64_t out_row_stride;    // elements
  int64_t x_row_stride;      // elements
  int64_t M;
  int d;
  float eps;
  DType dtype;               // of x, weight and out
};

// out = (x * rsqrt(mean(x^2) + eps) in fp32, rounded to dtype) * weight, rounded to dtype
void rms_norm_cpu(const RmsNormParams& p);

}  // namespace llada
