// SiluMulParams: SwiGLU's silu(gate) * up over rows [gate | up] of a fused gate/up projection.
#pragma once
#include "common.h"

namespace llada {

struct SiluMulParams {
  void* out_ptr;                // [M, F] out, unit stride over F
  const void* gate_up_ptr;      // [M, 2F]: gate in columns [0, F), up in [F, 2F); unit stride over columns
  int64_t out_row_stride;       // elements
  int64_t gate_up_row_stride;   // elements
  int64_t M;
  int F;
  DType dtype;
};

// out = silu(gate) * up, silu(g) = g / (1 + exp(-g)) in fp32 rounded to dtype, the product rounded to dtype
void silu_mul_cpu(const SiluMulParams& p);

}  // namespace llada
