// llada_rt._emu.attention: attention_kernel (csrc/attention.cuh) run by the SIMT emulator on host memory.
#include "attention.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_attention(py::module_& m) {
  m.def("attention", [](uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                        uintptr_t key_start, uintptr_t key_end, uintptr_t kv_rows, int B, int Lq, int Lk, int Hq,
                        int Hkv, int D, int R, float scale, int dtype, int n_splits) {
    AttentionParams p = attention_params(o, q, k, v, strides, key_start, key_end, kv_rows, B, Lq, Lk, Hq, Hkv, D, R,
                                         scale, dtype);
    py::gil_scoped_release nogil;
    run_attention_emu(p, n_splits);
  }, LLADA_ATTENTION_ARGS, py::arg("n_splits") = 0,
     "attention_kernel under the SIMT emulator (host pointers; slow, for tests). n_splits: split-KV factor, 0 picks it "
     "as the CUDA launcher would on an H100");
}
