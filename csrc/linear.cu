// run_linear: host launcher of linear_kernel (m16-tile count switch, split-K workspace, NVTX range).
#include "launch.h"
#include "linear.cuh"

namespace llada {

namespace {
void check(cudaError_t e, const char* what) { check_cuda(e, "linear", what); }
}  // namespace

void run_linear(const LinearParams& p, void* stream) {
  NvtxRange range("llada_rt::linear");
  check_linear_cuda_params(p);
  if (p.M <= 0 || p.N <= 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  LinearSplit split = linear_split(p, num_sms("linear"));
  if (split.n_splits > 1)  // stream-ordered workspace: capturable in a CUDA graph, recycled by the driver's pool
    check(cudaMallocAsync(reinterpret_cast<void**>(&split.partial), linear_split_floats(p, split) * sizeof(float), s),
          "cudaMallocAsync (split-K workspace)");
  dispatch_linear(p, [&](auto kernel, size_t smem) {
    kernel<<<linear_grid(p, split), kLinearThreads, smem, s>>>(p, split);
  });
  check(cudaGetLastError(), "kernel launch");
  if (split.n_splits > 1) {
    linear_combine_kernel<<<linear_combine_grid(p), kLinearCombineThreads, 0, s>>>(p, split);
    check(cudaGetLastError(), "combine kernel launch");
    check(cudaFreeAsync(split.partial, s), "cudaFreeAsync");
  }
}

}  // namespace llada
