// llada_rt._emu.attention: attention_kernel (csrc/attention.cuh) run by the SIMT emulator on host memory.
#include "attention.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

namespace {

template <class T, int kHeadDim>
void launch(const AttentionParams& p) {
  emu::launch(attention_kernel<T, kHeadDim>, attention_grid(p), dim3(kAttnThreads), attention_smem_bytes<T, kHeadDim>(), p);
}

void run_attention_emu(const AttentionParams& p) {
  if (p.Hkv <= 0 || p.Hq % p.Hkv != 0) throw std::invalid_argument("llada_rt attention: Hq must be a multiple of Hkv");
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return;
  if (p.dtype == DType::kBFloat16 && p.D == 128) return launch<__nv_bfloat16, 128>(p);
  if (p.dtype == DType::kBFloat16 && p.D == 64) return launch<__nv_bfloat16, 64>(p);
  if (p.dtype == DType::kFloat16 && p.D == 128) return launch<__half, 128>(p);
  if (p.dtype == DType::kFloat16 && p.D == 64) return launch<__half, 64>(p);
  throw std::invalid_argument("llada_rt attention: supports bf16/fp16 with head dim 64 or 128, got dtype code " +
                              std::to_string(static_cast<int>(p.dtype)) + " and D=" + std::to_string(p.D));
}

}  // namespace

void register_emu_attention(py::module_& m) {
  m.def("attention", [](uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                        uintptr_t key_start, uintptr_t key_end, int B, int Lq, int Lk, int Hq, int Hkv, int D,
                        float scale, int dtype) {
    AttentionParams p = attention_params(o, q, k, v, strides, key_start, key_end, B, Lq, Lk, Hq, Hkv, D, scale, dtype);
    py::gil_scoped_release nogil;
    run_attention_emu(p);
  }, LLADA_ATTENTION_ARGS, "attention_kernel under the SIMT emulator (host pointers; slow, for tests)");
}
