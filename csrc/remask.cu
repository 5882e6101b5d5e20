// run_remask: host launcher of remask_kernel (NVTX range, launch error check).
#include <stdexcept>

#include "launch.h"
#include "remask.cuh"

namespace llada {

void run_remask(const RemaskParams& p, void* stream) {
  NvtxRange range("llada_rt::remask");
  if (p.N > kRemaskMaxN) throw std::invalid_argument("llada_rt remask: the block length N must be <= 1024");
  if (p.B == 0 || p.N == 0) return;
  remask_kernel<<<remask_grid(p), remask_threads(p.N), 0, static_cast<cudaStream_t>(stream)>>>(p);
  check_cuda(cudaGetLastError(), "remask", "kernel launch");
}

}  // namespace llada
