// llada_rt._emu.remask: remask_kernel (csrc/remask.cuh) run by the SIMT emulator on host memory.
#include "remask.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_remask(py::module_& m) {
  def_remask_params(m);
  m.def("remask", [](const RemaskParams& p) {
    py::gil_scoped_release nogil;
    if (p.B == 0 || p.N == 0) return;
    emu::launch(remask_kernel, remask_grid(p), dim3(remask_threads(p.N)), 0, p);
  }, py::arg("params"), "remask_kernel under the SIMT emulator (host pointers; slow, for tests)");
}
