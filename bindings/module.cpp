// PYBIND11_MODULE(_C): one function per op and device, taking integer pointers, sizes and a stream; releases the GIL.
#include "cpu/cpu_features.h"
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

  m.def("linear_cpu", [](uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t scale, int64_t x_stride,
                         int64_t out_stride, int M, int N, int K, int x_dtype, int layout, int n_threads) {
    LinearParams p = linear_params(out, x, w, scale, x_stride, out_stride, M, N, K, x_dtype, layout, n_threads);
    py::gil_scoped_release nogil;
    linear_cpu(p);
  }, LLADA_LINEAR_ARGS);
  m.def("linear_cpu_supports", [](int layout) { return linear_cpu_supports(static_cast<WeightLayout>(layout)); },
        py::arg("layout"));
  m.def("cpu_features", []() {
    const CpuFeatures& f = cpu_features();
    py::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl; d["avx512dq"] = f.avx512dq; d["avx512_bf16"] = f.avx512bf16;
    d["avx512_vnni"] = f.avx512vnni; d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16;
    d["amx_int8"] = f.amx_int8;
    return d;
  }, "x86 extensions from cpuid (AVX-512 ones only when the OS saves the AVX-512 state)");

#if defined(LLADA_WITH_CUDA)
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

  m.def("linear_cuda", [](uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t scale, int64_t x_stride,
                          int64_t out_stride, int M, int N, int K, int x_dtype, int layout, uintptr_t stream) {
    LinearParams p = linear_params(out, x, w, scale, x_stride, out_stride, M, N, K, x_dtype, layout, /*n_threads=*/1);
    py::gil_scoped_release nogil;
    run_linear(p, reinterpret_cast<void*>(stream));
  }, py::arg("out"), py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("x_stride"), py::arg("out_stride"),
     py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_dtype"), py::arg("layout"), py::arg("stream"));
#endif
}
