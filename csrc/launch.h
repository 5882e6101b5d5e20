// Host-side helpers of the .cu launchers: an NVTX range per run_<op>, CUDA error checks that throw, the SM count.
#pragma once
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <stdexcept>
#include <string>

namespace llada {

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

// throws "llada_rt <op>: <what>: <CUDA error>" (pybind11 turns it into a Python RuntimeError)
inline void check_cuda(cudaError_t e, const char* op, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("llada_rt ") + op + ": " + what + ": " + cudaGetErrorString(e));
}

// streaming multiprocessors of the current device (split heuristics of the launchers)
inline int num_sms(const char* op) {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), op, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), op, "cudaDeviceGetAttribute");
  return sms;
}

}  // namespace llada
