// llada_rt._emu.linear: linear_kernel (csrc/linear.cuh) run by the SIMT emulator on host memory.
#include "linear.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

void register_emu_linear(py::module_& m) {
  m.def("linear", [](uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t scale, int64_t x_stride, int64_t out_stride,
                     int M, int N, int K, int x_dtype, int layout, int n_splits) {
    LinearParams p = linear_params(out, x, w, scale, x_stride, out_stride, M, N, K, x_dtype, layout, /*n_threads=*/1);
    py::gil_scoped_release nogil;
    run_linear_emu(p, n_splits);
  }, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("x_stride"), py::arg("out_stride"),
     py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_dtype"), py::arg("layout"), py::arg("n_splits") = 0,
     "linear_kernel (int8 rows weights, bf16 x) under the SIMT emulator (host pointers; slow, for tests). n_splits: "
     "split-K factor, 0 picks it as the CUDA launcher would on an H100");
}
