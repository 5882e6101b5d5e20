// PYBIND11_MODULE(_C): one function per op and device, taking a params object (or integer pointers and sizes) and a
// stream; releases the GIL.
#include "cpu/vec.h"
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

  m.def("advance_cpu", [](std::vector<uintptr_t> state, int64_t canvas_stride, int B, int N, int64_t mask_id,
                          int64_t fill_id, std::vector<int64_t> stop_ids, int64_t skip_slot) {
    AdvanceParams p = advance_params(state, canvas_stride, B, N, mask_id, fill_id, stop_ids, skip_slot);
    py::gil_scoped_release nogil;
    advance_cpu(p);
  }, LLADA_ADVANCE_ARGS);
  m.def("rms_norm_cpu", [](uintptr_t out, int64_t out_row_stride, uintptr_t x, int64_t x_row_stride,
                           uintptr_t weight, int64_t M, int d, float eps, int dtype) {
    RmsNormParams p = rms_norm_params(out, out_row_stride, x, x_row_stride, weight, M, d, eps, dtype);
    py::gil_scoped_release nogil;
    rms_norm_cpu(p);
  }, LLADA_RMS_NORM_ARGS);

  m.def("rope_cpu", [](uintptr_t out, uintptr_t x, std::vector<int64_t> strides, uintptr_t positions, uintptr_t cos,
                       uintptr_t sin, int64_t P, int B, int S, int H, int D, bool full_precision, int dtype) {
    RopeParams p = rope_params(out, x, strides, positions, cos, sin, P, B, S, H, D, full_precision, dtype);
    py::gil_scoped_release nogil;
    return rope_cpu(p);
  }, LLADA_ROPE_ARGS, "-1, or the flat (b * S + s) index of the first position outside the table (nothing written)");

  m.def("silu_mul_cpu", [](uintptr_t out, int64_t out_row_stride, uintptr_t gate_up, int64_t gate_up_row_stride,
                           int64_t M, int F, int dtype) {
    SiluMulParams p = silu_mul_params(out, out_row_stride, gate_up, gate_up_row_stride, M, F, dtype);
    py::gil_scoped_release nogil;
    silu_mul_cpu(p);
  }, LLADA_SILU_MUL_ARGS);

  m.def("attention_cpu", [](uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                            uintptr_t key_start, uintptr_t key_end, uintptr_t kv_rows, int B, int Lq, int Lk, int Hq,
                            int Hkv, int D, int R, float scale, int dtype) {
    AttentionParams p = attention_params(o, q, k, v, strides, key_start, key_end, kv_rows, B, Lq, Lk, Hq, Hkv, D, R,
                                         scale, dtype);
    py::gil_scoped_release nogil;
    return attention_cpu(p);
  }, LLADA_ATTENTION_ARGS, "-1, or the first b whose kv_rows[b] is outside [0, R) (nothing written)");

  m.attr("cpu_isas") = std::vector<std::string>(std::begin(cpu::kIsaNames), std::end(cpu::kIsaNames));
  m.def("set_cpu_isa", [](const std::string& name) {
    int i = 0;
    while (i < 3 && name != cpu::kIsaNames[i]) ++i;
    if (i == 3)
      throw std::invalid_argument("llada_rt: unknown instruction set '" + name + "'; use avx512, avx2 or baseline");
    const cpu::Isa previous = cpu::isa_limit().exchange(static_cast<cpu::Isa>(i));
    return std::string(cpu::kIsaNames[static_cast<int>(previous)]);
  }, py::arg("name"),
     "limits the instruction set of the rms_norm, rope, silu_mul and attention CPU kernels; returns the previous one");
  m.def("cpu_isa", [] { return std::string(cpu::kIsaNames[static_cast<int>(cpu::active_isa())]); },
        "the instruction set the rms_norm, rope, silu_mul and attention CPU kernels run with now");

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
  m.def("advance_cuda", [](std::vector<uintptr_t> state, int64_t canvas_stride, int B, int N, int64_t mask_id,
                           int64_t fill_id, std::vector<int64_t> stop_ids, int64_t skip_slot, uintptr_t stream) {
    AdvanceParams p = advance_params(state, canvas_stride, B, N, mask_id, fill_id, stop_ids, skip_slot);
    py::gil_scoped_release nogil;
    run_advance(p, reinterpret_cast<void*>(stream));
  }, LLADA_ADVANCE_ARGS, py::arg("stream"));

  m.def("confidence_cuda", [](const ConfidenceParams& p, uintptr_t stream) {
    py::gil_scoped_release nogil;
    run_confidence(p, reinterpret_cast<void*>(stream));
  }, py::arg("params"), py::arg("stream"));
  m.def("remask_cuda", [](const RemaskParams& p, uintptr_t stream) {
    py::gil_scoped_release nogil;
    run_remask(p, reinterpret_cast<void*>(stream));
  }, py::arg("params"), py::arg("stream"));

  m.def("attention_cuda", [](uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v, std::vector<int64_t> strides,
                             uintptr_t key_start, uintptr_t key_end, uintptr_t kv_rows, int B, int Lq, int Lk, int Hq,
                             int Hkv, int D, int R, float scale, int dtype, uintptr_t stream) {
    AttentionParams p = attention_params(o, q, k, v, strides, key_start, key_end, kv_rows, B, Lq, Lk, Hq, Hkv, D, R,
                                         scale, dtype);
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
