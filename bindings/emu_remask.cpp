// llada_rt._emu.remask: remask_kernel (csrc/remask.cuh) run by the SIMT emulator on host memory.
#include "remask.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_remask(py::module_& m) {
  m.def("remask", [](uintptr_t canvas, int64_t canvas_b_stride, uintptr_t count, uintptr_t token, uintptr_t prob,
                     uintptr_t k, int B, int N, int64_t start, int64_t mask_id, int rule, float threshold,
                     float factor) {
    RemaskParams p = remask_params(canvas, canvas_b_stride, count, token, prob, k, B, N, start, mask_id, rule,
                                   threshold, factor);
    if (p.N > kRemaskMaxN) throw std::invalid_argument("llada_rt remask: the block length N must be <= 1024");
    py::gil_scoped_release nogil;
    if (p.B == 0 || p.N == 0) return;
    emu::launch(remask_kernel, remask_grid(p), dim3(remask_threads(p.N)), 0, p);
  }, LLADA_REMASK_ARGS, "remask_kernel under the SIMT emulator (host pointers; slow, for tests)");
}
