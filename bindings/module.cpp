// PYBIND11_MODULE(_C): one function per op and device, taking integer pointers, sizes and a stream; releases the GIL.
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

  m.def("confidence_cpu", [](uintptr_t token, uintptr_t prob, uintptr_t logits, int64_t b_stride, int64_t n_stride,
                             uintptr_t masked, int B, int N, int V, int dtype, float temperature, uint64_t seed,
                             uint64_t offset, bool random_confidence, std::vector<int64_t> suppress_ids,
                             std::vector<int64_t> zero_conf_ids) {
    ConfidenceParams p = confidence_params(token, prob, logits, b_stride, n_stride, masked, B, N, V, dtype, temperature,
                                           seed, offset, random_confidence, suppress_ids, zero_conf_ids);
    py::gil_scoped_release nogil;
    confidence_cpu(p);
  }, LLADA_CONFIDENCE_ARGS);

  m.def("remask_cpu", [](uintptr_t canvas, int64_t canvas_b_stride, uintptr_t count, uintptr_t token, uintptr_t prob,
                         uintptr_t k, int B, int N, int64_t start, int64_t mask_id, int rule, float threshold,
                         float factor) {
    RemaskParams p = remask_params(canvas, canvas_b_stride, count, token, prob, k, B, N, start, mask_id, rule,
                                   threshold, factor);
    py::gil_scoped_release nogil;
    remask_cpu(p);
  }, LLADA_REMASK_ARGS);

  m.def("advance_cpu", [](std::vector<uintptr_t> state, int64_t canvas_stride, int B, int N, int64_t mask_id,
                          int64_t fill_id, std::vector<int64_t> stop_ids, int64_t skip_slot) {
    AdvanceParams p = advance_params(state, canvas_stride, B, N, mask_id, fill_id, stop_ids, skip_slot);
    py::gil_scoped_release nogil;
    advance_cpu(p);
  }, LLADA_ADVANCE_ARGS);

#if defined(LLADA_WITH_CUDA)
  m.def("advance_cuda", [](std::vector<uintptr_t> state, int64_t canvas_stride, int B, int N, int64_t mask_id,
                           int64_t fill_id, std::vector<int64_t> stop_ids, int64_t skip_slot, uintptr_t stream) {
    AdvanceParams p = advance_params(state, canvas_stride, B, N, mask_id, fill_id, stop_ids, skip_slot);
    py::gil_scoped_release nogil;
    run_advance(p, reinterpret_cast<void*>(stream));
  }, LLADA_ADVANCE_ARGS, py::arg("stream"));

  m.def("confidence_cuda", [](uintptr_t token, uintptr_t prob, uintptr_t logits, int64_t b_stride, int64_t n_stride,
                              uintptr_t masked, int B, int N, int V, int dtype, float temperature, uint64_t seed,
                              uint64_t offset, bool random_confidence, std::vector<int64_t> suppress_ids,
                              std::vector<int64_t> zero_conf_ids, uintptr_t stream) {
    ConfidenceParams p = confidence_params(token, prob, logits, b_stride, n_stride, masked, B, N, V, dtype, temperature,
                                           seed, offset, random_confidence, suppress_ids, zero_conf_ids);
    py::gil_scoped_release nogil;
    run_confidence(p, reinterpret_cast<void*>(stream));
  }, LLADA_CONFIDENCE_ARGS, py::arg("stream"));

  m.def("remask_cuda", [](uintptr_t canvas, int64_t canvas_b_stride, uintptr_t count, uintptr_t token, uintptr_t prob,
                          uintptr_t k, int B, int N, int64_t start, int64_t mask_id, int rule, float threshold,
                          float factor, uintptr_t stream) {
    RemaskParams p = remask_params(canvas, canvas_b_stride, count, token, prob, k, B, N, start, mask_id, rule,
                                   threshold, factor);
    py::gil_scoped_release nogil;
    run_remask(p, reinterpret_cast<void*>(stream));
  }, LLADA_REMASK_ARGS, py::arg("stream"));

  m.def("attention_cuda", [](uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                             uintptr_t key_start, uintptr_t key_end, int B, int Lq, int Lk, int Hq, int Hkv, int D,
                             float scale, int dtype, uintptr_t stream) {
    AttentionParams p = attention_params(o, q, k, v, strides, key_start, key_end, B, Lq, Lk, Hq, Hkv, D, scale, dtype);
    py::gil_scoped_release nogil;
    run_attention(p, reinterpret_cast<void*>(stream));
  }, LLADA_ATTENTION_ARGS, py::arg("stream"));
#endif
}
