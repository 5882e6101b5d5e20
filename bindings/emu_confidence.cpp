// llada_rt._emu.confidence: confidence_kernel (csrc/confidence.cuh) run by the SIMT emulator on host memory.
#include "confidence.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_confidence(py::module_& m) {
  m.def("confidence", [](uintptr_t token, uintptr_t prob, uintptr_t logits, int64_t b_stride, int64_t n_stride,
                         uintptr_t masked, int B, int N, int V, int dtype, float temperature, uint64_t seed,
                         uint64_t offset, bool random_confidence, std::vector<int64_t> suppress_ids,
                         std::vector<int64_t> zero_conf_ids) {
    ConfidenceParams p = confidence_params(token, prob, logits, b_stride, n_stride, masked, B, N, V, dtype, temperature,
                                           seed, offset, random_confidence, suppress_ids, zero_conf_ids);
    py::gil_scoped_release nogil;
    if (p.B == 0 || p.N == 0) return;
    dispatch_confidence(p, [&](auto kernel, int threads) {
      emu::launch(kernel, confidence_grid(p), dim3(threads), 0, p);
    });
  }, LLADA_CONFIDENCE_ARGS, "confidence_kernel under the SIMT emulator (host pointers; slow, for tests)");
}
