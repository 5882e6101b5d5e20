// llada_rt._emu.advance: advance_kernel (csrc/advance.cuh) run by the SIMT emulator on host memory.
#include "advance.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_advance(py::module_& m) {
  m.def("advance", [](std::vector<uintptr_t> state, int64_t canvas_stride, int B, int N, int64_t mask_id,
                      int64_t fill_id, std::vector<int64_t> stop_ids, int64_t skip_slot) {
    AdvanceParams p = advance_params(state, canvas_stride, B, N, mask_id, fill_id, stop_ids, skip_slot);
    py::gil_scoped_release nogil;
    if (p.B == 0) return;
    emu::launch(advance_kernel, advance_grid(p), dim3(kAdvanceThreads), 0, p);
  }, LLADA_ADVANCE_ARGS, "advance_kernel under the SIMT emulator (host pointers; slow, for tests)");
}
