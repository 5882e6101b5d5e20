// run_confidence: host launcher of confidence_kernel (NVTX range, launch error check).
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <stdexcept>
#include <string>

#include "confidence.cuh"

namespace llada {
namespace {

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

}  // namespace

void run_confidence(const ConfidenceParams& p, void* stream) {
  NvtxRange range("llada_rt::confidence");
  if (p.B == 0 || p.N == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_confidence(p, [&](auto kernel, int threads) { kernel<<<confidence_grid(p), threads, 0, s>>>(p); });
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("llada_rt confidence: kernel launch: ") + cudaGetErrorString(e));
}

}  // namespace llada
