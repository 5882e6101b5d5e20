// RopeParams: rotary position embedding (NeoX rotate_half layout) of [B, S, H, D] rows from a cos/sin table.
#pragma once
#include "common.h"

namespace llada {

struct RopeParams {
  void* out_ptr;                 // [B, S, H, D] out, unit stride over D; may be x_ptr itself (in place)
  const void* x_ptr;             // [B, S, H, D], unit stride over D
  int64_t out_b_stride, out_s_stride, out_h_stride;  // elements
  int64_t x_b_stride, x_s_stride, x_h_stride;
  const int64_t* positions_ptr;  // [B, S] table row of each (b, s)
  int64_t pos_b_stride, pos_s_stride;
  const float* cos_ptr;          // [P, D/2] contiguous fp32: cos(position * inv_freq[i])
  const float* sin_ptr;          // [P, D/2] contiguous fp32
  int64_t P;
  int B, S, H, D;                // D even
  bool full_precision;           // rotate in fp32 and round once; else round after every op as torch does in dtype
  DType dtype;
};

// out[..., i] = x[..., i] cos_i - x[..., i + D/2] sin_i, out[..., i + D/2] = x[..., i + D/2] cos_i + x[..., i] sin_i.
// Returns -1, or (writing nothing) the flat index b * S + s of the first position outside [0, P).
int64_t rope_cpu(const RopeParams& p);

}  // namespace llada
