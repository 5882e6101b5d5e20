// run_attention: host launcher of attention_kernel (head dim and dtype switch, smem opt-in, NVTX range).
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include "attention.cuh"

namespace llada {
namespace {

struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("llada_rt attention: ") + what + ": " + cudaGetErrorString(e));
}

template <class T, int kHeadDim>
void launch(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem = attention_smem_bytes<T, kHeadDim>();
  // the > 48 KiB opt-in is per kernel and per device: set it on every launch (a host-side call, ~1 us, capture-safe)
  check(cudaFuncSetAttribute(attention_kernel<T, kHeadDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
        "cudaFuncSetAttribute");
  attention_kernel<T, kHeadDim><<<attention_grid(p), kAttnThreads, smem, stream>>>(p);
  check(cudaGetLastError(), "kernel launch");
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
