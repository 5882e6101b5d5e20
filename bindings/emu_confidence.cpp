// llada_rt._emu.confidence: confidence_kernel (csrc/confidence.cuh) run by the SIMT emulator on host memory.
#include "confidence.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_confidence(py::module_& m) {
  def_confidence_params(m);
  m.def("confidence", [](const ConfidenceParams& p) {
    py::gil_scoped_release nogil;
    if (p.B == 0 || p.N == 0) return;
    dispatch_confidence(p, [&](auto kernel, int threads) {
      emu::launch(kernel, confidence_grid(p), dim3(threads), 0, p);
    });
  }, py::arg("params"), "confidence_kernel under the SIMT emulator (host pointers; slow, for tests)");
}
