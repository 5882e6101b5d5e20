// run_remask: host launcher of remask_kernel (NVTX range, launch error check).
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <stdexcept>
#include <string>

#include "remask.cuh"

namespace llada {
namespace {

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

}  // namespace

void run_remask(const RemaskParams& p, void* stream) {
  NvtxRange range("llada_rt::remask");
  if (p.N > kRemaskMaxN) throw std::invalid_argument("llada_rt remask: the block length N must be <= 1024");
  if (p.B == 0 || p.N == 0) return;
  remask_kernel<<<remask_grid(p), remask_threads(p.N), 0, static_cast<cudaStream_t>(stream)>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("llada_rt remask: kernel launch: ") + cudaGetErrorString(e));
}

}  // namespace llada
