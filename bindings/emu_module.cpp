// PYBIND11_MODULE(_emu): the CUDA kernel sources compiled by the host compiler against csrc/emu, run on CPU fibers.
// Same arguments as the *_cuda functions of _C, on host memory and without a stream; for tests only.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_emu_advance(py::module_& m);
void register_emu_attention(py::module_& m);
void register_emu_confidence(py::module_& m);
void register_emu_linear(py::module_& m);
void register_emu_remask(py::module_& m);

PYBIND11_MODULE(_emu, m) {
  m.doc() = "llada_rt CUDA kernels under the SIMT emulator (tests only; slow)";
  register_emu_advance(m);
  register_emu_attention(m);
  register_emu_confidence(m);
  register_emu_linear(m);
  register_emu_remask(m);
}
