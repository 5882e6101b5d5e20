// Shared by every op: dtype codes, host/device qualifiers and error checking; no torch, no CUDA runtime needed.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define LLADA_HD __host__ __device__ __forceinline__
#else
#define LLADA_HD inline
#endif

namespace llada {

// Element types as the bindings pass them (ops.py maps torch dtypes to these codes).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline DType dtype_from_int(int code) {
  if (code < 0 || code > 2) throw std::invalid_argument("llada_rt: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

constexpr int kMaxSpecialIds = 8;  // suppressed / zero-confidence ids passed by value (graph-capturable)

}  // namespace llada
