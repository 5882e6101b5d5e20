// run_confidence: host launcher of confidence_kernel (NVTX range, launch error check).
#include <stdexcept>

#include "launch.h"
#include "confidence.cuh"

namespace llada {

void run_confidence(const ConfidenceParams& p, void* stream) {
  NvtxRange range("llada_rt::confidence");
  if (p.B == 0 || p.N == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_confidence(p, [&](auto kernel, int threads) { kernel<<<confidence_grid(p), threads, 0, s>>>(p); });
  check_cuda(cudaGetLastError(), "confidence", "kernel launch");
}

}  // namespace llada
