// PYBIND11_MODULE(_C): one function per op and device, taking a params object (or integer pointers and sizes) and a
// stream; releases the GIL.
#include "params.h"

namespace py = pybind11;
using namespace llada;
using namespace llada::bind;

PYBIND11_MODULE(_C, m) {
  m.doc() = "llada_rt compiled ops (use llada_rt.ops, not this module)";
#if defined(LLADA_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  def_confidence_params(m);
  def_remask_params(m);
  m.def("confidence_cpu", [](const ConfidenceParams& p) {
    py::gil_scoped_release nogil;
    confidence_cpu(p);
  }, py::arg("params"));
  m.def("remask_cpu", [](const RemaskParams& p) {
    py::gil_scoped_release nogil;
    remask_cpu(p);
  }, py::arg("params"));

#if defined(LLADA_WITH_CUDA)
  m.def("confidence_cuda", [](const ConfidenceParams& p, uintptr_t stream) {
    py::gil_scoped_release nogil;
    run_confidence(p, reinterpret_cast<void*>(stream));
  }, py::arg("params"), py::arg("stream"));
  m.def("remask_cuda", [](const RemaskParams& p, uintptr_t stream) {
    py::gil_scoped_release nogil;
    run_remask(p, reinterpret_cast<void*>(stream));
  }, py::arg("params"), py::arg("stream"));

  m.def("attention_cuda", [](uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                             uintptr_t key_start, uintptr_t key_end, int B, int Lq, int Lk, int Hq, int Hkv, int D,
                             float scale, int dtype, uintptr_t stream) {
    AttentionParams p = attention_params(o, q, k, v, strides, key_start, key_end, B, Lq, Lk, Hq, Hkv, D, scale, dtype);
    py::gil_scoped_release nogil;
    run_attention(p, reinterpret_cast<void*>(stream));
  }, LLADA_ATTENTION_ARGS, py::arg("stream"));
#endif
}
