// run_advance: host launcher of advance_kernel (NVTX range, launch error check).
#include "advance.cuh"
#include "launch.h"

namespace llada {

void run_advance(const AdvanceParams& p, void* stream) {
  NvtxRange range("llada_rt::advance");
  if (p.B == 0) return;
  advance_kernel<<<advance_grid(p), kAdvanceThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_cuda(cudaGetLastError(), "advance", "kernel launch");
}

}  // namespace llada
