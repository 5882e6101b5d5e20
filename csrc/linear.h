// LinearParams: out (M, N) = x (M, K) @ W^T, W (N, K) held in one of the weight layouts below.
#pragma once
#include "common.h"

namespace llada {

constexpr int kLinearBlockN = 16;  // columns per block of the blocked layouts: the fp32 lanes of a 512-bit vector
constexpr int kLinearPanelN = 64;  // the blocked layouts pad N to a multiple of this (a panel of 4 blocks)

// How the weight W (N, K) is stored. The blocked layouts are made at load for the CPU kernels (csrc/cpu/linear.cpp);
// Np = N rounded up to kLinearPanelN, K2 = ceil(K / 2), K4 = ceil(K / 4); padding is zero (kBlockedInt8x4: q = 0).
enum class WeightLayout : int {
  kBlockedF32 = 0,   // fp32 [Np/16][K][16]:        w[(b K + k) 16 + i] = W[16 b + i][k]
  kBlockedBF16 = 1,  // bf16 [Np/16][K2][16][2]:    w[((b K2 + p) 16 + i) 2 + e] = W[16 b + i][2 p + e]
  kBlockedInt8 = 2,  // int8, the order of kBlockedBF16; out = (x @ q^T) * scale[n] (CPU: x quantized per row to int16)
  kRowsInt8 = 3,     // int8 (N, K) row-major, as the quantized checkpoint stores it (the CUDA kernel's layout)
  // W8A8: uint8 [Np/16][K4][16][4]: w[((b K4 + p) 16 + i) 4 + e] = q[16 b + i][4 p + e] + 128; out = (x @ q^T) *
  // scale[n] with x quantized per row to int8 (scale max |x| / 127) for AVX512-VNNI vpdpbusd (u8 x s8, 4 products per
  // int32 lane, twice the multiply rate of the int16 x of kBlockedInt8). The weights carry the +128 offset (vpdpbusd
  // needs one unsigned side) so that the correction 128 sum_k xq[m, k] is per row of x, made while x is quantized, and
  // the layout needs nothing beyond q and the scales. Sums are exact in int32 over all of K: K <= kLinearInt8x4MaxK.
  kBlockedInt8x4 = 4,
};
// K4 quads x 4 x 255 x 127 (the largest |u8 x s8| sum of one column and row) stays below 2^31 up to this K
constexpr int kLinearInt8x4MaxK = 65536;

struct LinearParams {
  void* out_ptr;            // (M, N), row stride out_stride, in x_dtype
  const void* x_ptr;        // (M, K), row stride x_stride, unit stride over K
  const void* w_ptr;        // W in `layout`
  const float* scale_ptr;   // (N,) per-output-channel scales of the int8 layouts (W = q * scale[n]); null otherwise
  int64_t x_stride, out_stride;  // elements
  int M, N, K;
  DType x_dtype;            // activations and output
  WeightLayout layout;
  int n_threads;            // CPU: OpenMP threads to use (ops.py passes torch.get_num_threads()); unused on CUDA
};

void linear_cpu(const LinearParams& p);
// Whether this CPU has the instructions of the layout's CPU kernel (kBlockedF32: AVX-512F; kBlockedBF16: AVX-512 BF16;
// kBlockedInt8, kBlockedInt8x4: AVX-512 VNNI). ops.py never offers a layout the CPU cannot run; linear_cpu throws if
// asked to.
bool linear_cpu_supports(WeightLayout layout);
#if defined(LLADA_WITH_CUDA)
void run_linear(const LinearParams& p, void* stream);  // kRowsInt8 with bf16 x; stream is a cudaStream_t
#endif

}  // namespace llada
