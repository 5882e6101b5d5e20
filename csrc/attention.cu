// run_attention: host launcher of attention_kernel (head dim and dtype switch, smem opt-in, NVTX range).
#include "attention.cuh"
#include "launch.h"

namespace llada {
namespace {

void check(cudaError_t e, const char* what) { check_cuda(e, "attention", what); }

int num_sms() {
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

template <class T, int kHeadDim>
void launch(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = attention_smem_bytes<T, kHeadDim>();
  const int n_splits = attention_num_splits(p, num_sms());
  // the > 48 KiB opt-in is per kernel and per device: set it on every launch (a host-side call, ~1 us, capture-safe)
  if (n_splits == 1) {
    check(cudaFuncSetAttribute(attention_kernel<T, kHeadDim, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)smem), "cudaFuncSetAttribute");
    attention_kernel<T, kHeadDim, false><<<attention_grid(p), kAttnThreads, smem, stream>>>(p, AttentionSplit{});
    check(cudaGetLastError(), "kernel launch");
    return;
  }
  // stream-ordered workspace: capturable in a CUDA graph, recycled by the driver's pool
  float* workspace = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&workspace), attention_split_floats(p, n_splits) * sizeof(float), stream),
        "cudaMallocAsync (split-KV workspace)");
  const AttentionSplit split = attention_split_views(p, n_splits, workspace);
  check(cudaFuncSetAttribute(attention_kernel<T, kHeadDim, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)smem), "cudaFuncSetAttribute");
  attention_kernel<T, kHeadDim, true><<<attention_grid(p, n_splits), kAttnThreads, smem, stream>>>(p, split);
  check(cudaGetLastError(), "kernel launch");
  attention_combine_kernel<T, kHeadDim><<<attention_combine_grid(p), kAttnThreads, 0, stream>>>(p, split);
  check(cudaGetLastError(), "combine kernel launch");
  check(cudaFreeAsync(workspace, stream), "cudaFreeAsync");
}

}  // namespace

void run_attention(const AttentionParams& p, void* stream) {
  NvtxRange range("llada_rt::attention");
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) throw std::invalid_argument("llada_rt attention: Hq must be a multiple of Hkv");
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::kBFloat16 && p.D == 128) return launch<__nv_bfloat16, 128>(p, s);
  if (p.dtype == DType::kBFloat16 && p.D == 64) return launch<__nv_bfloat16, 64>(p, s);
  if (p.dtype == DType::kFloat16 && p.D == 128) return launch<__half, 128>(p, s);
  if (p.dtype == DType::kFloat16 && p.D == 64) return launch<__half, 64>(p, s);
  throw std::invalid_argument("llada_rt attention: supports bf16/fp16 with head dim 64 or 128, got dtype code " +
                              std::to_string(static_cast<int>(p.dtype)) + " and D=" + std::to_string(p.D));
}

}  // namespace llada
