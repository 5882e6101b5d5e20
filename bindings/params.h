// Builds the ops' params structs from the integer pointers and sizes that ops.py passes; shared by _C and _emu.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "advance.h"
#include "attention.h"
#include "confidence.h"
#include "linear.h"
#include "remask.h"
#include "rms_norm.h"
#include "rope.h"
#include "silu_mul.h"

namespace llada::bind {

namespace py = pybind11;

template <class T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

inline ConfidenceParams confidence_params(uintptr_t token, uintptr_t prob, uintptr_t key, uintptr_t num, uintptr_t ref,
                                          uintptr_t denom, uintptr_t random_prob, uintptr_t logits, int64_t b_stride,
                                          int64_t n_stride, uintptr_t masked, uintptr_t temperature, uintptr_t seed,
                                          uintptr_t offset, uintptr_t position, uintptr_t random_confidence,
                                          uintptr_t suppress_mask, uintptr_t zero_conf_mask, int B, int N, int V,
                                          int dtype, int64_t vocab_offset, int64_t full_vocab,
                                          const std::vector<int64_t>& special_ids) {
  const bool state = key && num && ref && denom && random_prob;
  if (prob ? (key || num || ref || denom || random_prob) : !state)
    throw std::invalid_argument("llada_rt confidence: pass either prob (the full op) or all five state outputs "
                                "key, num, ref, denom, random_prob (the partial op)");
  if (special_ids.size() > static_cast<size_t>(kMaxSpecialIds))
    throw std::invalid_argument("llada_rt confidence: at most " + std::to_string(kMaxSpecialIds) +
                                " special ids are supported, got " + std::to_string(special_ids.size()));
  ConfidenceParams p{};
  p.token_ptr = ptr<int64_t>(token);
  p.prob_ptr = ptr<double>(prob);
  p.key_ptr = ptr<double>(key);
  p.num_ptr = ptr<double>(num);
  p.ref_ptr = ptr<int32_t>(ref);
  p.denom_ptr = ptr<double>(denom);
  p.random_prob_ptr = ptr<double>(random_prob);
  p.logits_ptr = ptr<const void>(logits);
  p.logits_b_stride = b_stride;
  p.logits_n_stride = n_stride;
  p.masked_ptr = ptr<const bool>(masked);
  p.temperature_ptr = ptr<const float>(temperature);
  p.seed_ptr = ptr<const int64_t>(seed);
  p.offset_ptr = ptr<const int64_t>(offset);
  p.position_ptr = ptr<const int64_t>(position);
  p.random_confidence_ptr = ptr<const bool>(random_confidence);
  p.suppress_mask_ptr = ptr<const int32_t>(suppress_mask);
  p.zero_conf_mask_ptr = ptr<const int32_t>(zero_conf_mask);
  p.B = B; p.N = N; p.V = V;
  p.dtype = dtype_from_int(dtype);
  p.vocab_offset = vocab_offset;
  p.full_vocab = full_vocab;
  p.n_special = static_cast<int>(special_ids.size());
  for (size_t i = 0; i < special_ids.size(); ++i) p.special_ids[i] = special_ids[i];
  return p;
}

inline RemaskParams remask_params(uintptr_t block, uintptr_t count, uintptr_t token, uintptr_t prob, uintptr_t k,
                                  uintptr_t rule, uintptr_t threshold, uintptr_t factor, int B, int N,
                                  int64_t mask_id) {
  if (N > kRemaskMaxN)
    throw std::invalid_argument("llada_rt remask: the block length N must be <= " + std::to_string(kRemaskMaxN));
  RemaskParams p{};
  p.block_ptr = ptr<int64_t>(block);
  p.count_ptr = ptr<int32_t>(count);
  p.token_ptr = ptr<const int64_t>(token);
  p.prob_ptr = ptr<const double>(prob);
  p.k_ptr = ptr<const int64_t>(k);
  p.rule_ptr = ptr<const int32_t>(rule);
  p.threshold_ptr = ptr<const double>(threshold);
  p.factor_ptr = ptr<const double>(factor);
  p.B = B; p.N = N; p.mask_id = mask_id;
  return p;
}

// strides: 12 element strides in the order o(b,l,h), q(b,l,h), k(b,l,h), v(b,l,h)
inline AttentionParams attention_params(uintptr_t o, uintptr_t q, uintptr_t k, uintptr_t v,
                                        const std::vector<int64_t>& strides, uintptr_t key_start, uintptr_t key_end,
                                        uintptr_t kv_rows, int B, int Lq, int Lk, int Hq, int Hkv, int D, int R,
                                        float scale, int dtype) {
  if (strides.size() != 12) throw std::invalid_argument("llada_rt: attention expects 12 strides");
  AttentionParams p{};
  p.o_ptr = ptr<void>(o); p.q_ptr = ptr<const void>(q); p.k_ptr = ptr<const void>(k); p.v_ptr = ptr<const void>(v);
  p.o_b_stride = strides[0]; p.o_l_stride = strides[1]; p.o_h_stride = strides[2];
  p.q_b_stride = strides[3]; p.q_l_stride = strides[4]; p.q_h_stride = strides[5];
  p.k_b_stride = strides[6]; p.k_l_stride = strides[7]; p.k_h_stride = strides[8];
  p.v_b_stride = strides[9]; p.v_l_stride = strides[10]; p.v_h_stride = strides[11];
  p.key_start_ptr = ptr<const int32_t>(key_start);
  p.key_end_ptr = ptr<const int32_t>(key_end);
  p.kv_rows_ptr = ptr<const int32_t>(kv_rows);
  p.B = B; p.Lq = Lq; p.Lk = Lk; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.R = R; p.scale = scale;
  p.dtype = dtype_from_int(dtype);
  return p;
}

inline RmsNormParams rms_norm_params(uintptr_t out, int64_t out_row_stride, uintptr_t x, int64_t x_row_stride,
                                     uintptr_t weight, int64_t M, int d, float eps, int dtype) {
  RmsNormParams p{};
  p.out_ptr = ptr<void>(out); p.x_ptr = ptr<const void>(x); p.weight_ptr = ptr<const void>(weight);
  p.out_row_stride = out_row_stride; p.x_row_stride = x_row_stride;
  p.M = M; p.d = d; p.eps = eps;
  p.dtype = dtype_from_int(dtype);
  return p;
}

// strides: 8 element strides in the order out(b,s,h), x(b,s,h), positions(b,s)
inline RopeParams rope_params(uintptr_t out, uintptr_t x, const std::vector<int64_t>& strides, uintptr_t positions,
                              uintptr_t cos, uintptr_t sin, int64_t P, int B, int S, int H, int D,
                              bool full_precision, int dtype) {
  if (strides.size() != 8) throw std::invalid_argument("llada_rt: rope expects 8 strides");
  RopeParams p{};
  p.out_ptr = ptr<void>(out); p.x_ptr = ptr<const void>(x);
  p.out_b_stride = strides[0]; p.out_s_stride = strides[1]; p.out_h_stride = strides[2];
  p.x_b_stride = strides[3]; p.x_s_stride = strides[4]; p.x_h_stride = strides[5];
  p.positions_ptr = ptr<const int64_t>(positions); p.pos_b_stride = strides[6]; p.pos_s_stride = strides[7];
  p.cos_ptr = ptr<const float>(cos); p.sin_ptr = ptr<const float>(sin);
  p.P = P; p.B = B; p.S = S; p.H = H; p.D = D;
  p.full_precision = full_precision;
  p.dtype = dtype_from_int(dtype);
  return p;
}

inline SiluMulParams silu_mul_params(uintptr_t out, int64_t out_row_stride, uintptr_t gate_up,
                                     int64_t gate_up_row_stride, int64_t M, int F, int dtype) {
  SiluMulParams p{};
  p.out_ptr = ptr<void>(out); p.gate_up_ptr = ptr<const void>(gate_up);
  p.out_row_stride = out_row_stride; p.gate_up_row_stride = gate_up_row_stride;
  p.M = M; p.F = F;
  p.dtype = dtype_from_int(dtype);
  return p;
}

// The params structs as Python classes built from keyword arguments (ops.py names every field); module_local, so
// that _C and _emu each register their own.
inline void def_confidence_params(py::module_& m) {
  py::class_<ConfidenceParams>(m, "ConfidenceParams", py::module_local())
      .def(py::init(&confidence_params), py::kw_only(), py::arg("token"), py::arg("prob"), py::arg("key"),
           py::arg("num"), py::arg("ref"), py::arg("denom"), py::arg("random_prob"), py::arg("logits"),
           py::arg("b_stride"), py::arg("n_stride"), py::arg("masked"), py::arg("temperature"), py::arg("seed"),
           py::arg("offset"), py::arg("position"), py::arg("random_confidence"), py::arg("suppress_mask"),
           py::arg("zero_conf_mask"), py::arg("B"), py::arg("N"), py::arg("V"), py::arg("dtype"),
           py::arg("vocab_offset"), py::arg("full_vocab"), py::arg("special_ids"));
}
inline void def_remask_params(py::module_& m) {
  py::class_<RemaskParams>(m, "RemaskParams", py::module_local())
      .def(py::init(&remask_params), py::kw_only(), py::arg("block"), py::arg("count"), py::arg("token"),
           py::arg("prob"), py::arg("k"), py::arg("rule"), py::arg("threshold"), py::arg("factor"), py::arg("B"),
           py::arg("N"), py::arg("mask_id"));
}

#define LLADA_ATTENTION_ARGS                                                                                       \
  py::arg("o"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strides"), py::arg("key_start"),               \
      py::arg("key_end"), py::arg("kv_rows"), py::arg("B"), py::arg("Lq"), py::arg("Lk"), py::arg("Hq"),            \
      py::arg("Hkv"), py::arg("D"), py::arg("R"), py::arg("scale"), py::arg("dtype")
#define LLADA_RMS_NORM_ARGS                                                                                       \
  py::arg("out"), py::arg("out_row_stride"), py::arg("x"), py::arg("x_row_stride"), py::arg("weight"),           \
      py::arg("M"), py::arg("d"), py::arg("eps"), py::arg("dtype")
#define LLADA_ROPE_ARGS                                                                                           \
  py::arg("out"), py::arg("x"), py::arg("strides"), py::arg("positions"), py::arg("cos"), py::arg("sin"),       \
      py::arg("P"), py::arg("B"), py::arg("S"), py::arg("H"), py::arg("D"), py::arg("full_precision"),            \
      py::arg("dtype")
#define LLADA_SILU_MUL_ARGS                                                                                       \
  py::arg("out"), py::arg("out_row_stride"), py::arg("gate_up"), py::arg("gate_up_row_stride"), py::arg("M"),   \
      py::arg("F"), py::arg("dtype")

// state: 13 pointers in the order of AdvanceParams (status, canvas, slots, block_start, step, nsteps, k, spb,
// prompt_len, length, rule, early_stop, filled)
inline AdvanceParams advance_params(const std::vector<uintptr_t>& state, int64_t canvas_stride, int B, int N,
                                    int64_t mask_id, int64_t fill_id, const std::vector<int64_t>& stop_ids,
                                    int64_t skip_slot) {
  if (state.size() != 13) throw std::invalid_argument("llada_rt: advance expects 13 state pointers");
  AdvanceParams p{};
  p.status_ptr = ptr<int32_t>(state[0]);
  p.canvas_ptr = ptr<int64_t>(state[1]);
  p.canvas_stride = canvas_stride;
  p.slots_ptr = ptr<const int64_t>(state[2]);
  p.block_start_ptr = ptr<int64_t>(state[3]);
  p.step_ptr = ptr<int64_t>(state[4]);
  p.nsteps_ptr = ptr<int64_t>(state[5]);
  p.k_ptr = ptr<int64_t>(state[6]);
  p.spb_ptr = ptr<const int64_t>(state[7]);
  p.prompt_len_ptr = ptr<const int64_t>(state[8]);
  p.length_ptr = ptr<const int64_t>(state[9]);
  p.rule_ptr = ptr<const int32_t>(state[10]);
  p.early_stop_ptr = ptr<const bool>(state[11]);
  p.filled_ptr = ptr<int32_t>(state[12]);
  p.B = B; p.N = N; p.mask_id = mask_id; p.fill_id = fill_id; p.skip_slot = skip_slot;
  if (stop_ids.size() > static_cast<size_t>(kMaxSpecialIds))
    throw std::invalid_argument("llada_rt advance: at most " + std::to_string(kMaxSpecialIds) + " stop ids, got " +
                                std::to_string(stop_ids.size()));
  p.n_stop = static_cast<int>(stop_ids.size());
  for (size_t i = 0; i < stop_ids.size(); ++i) p.stop_ids[i] = stop_ids[i];
  return p;
}

#define LLADA_ADVANCE_ARGS                                                                                         \
  py::arg("state"), py::arg("canvas_stride"), py::arg("B"), py::arg("N"), py::arg("mask_id"), py::arg("fill_id"), \
      py::arg("stop_ids"), py::arg("skip_slot")

inline LinearParams linear_params(uintptr_t out, uintptr_t x, uintptr_t w, uintptr_t scale, int64_t x_stride,
                                  int64_t out_stride, int M, int N, int K, int x_dtype, int layout, int n_threads) {
  if (layout < 0 || layout > static_cast<int>(WeightLayout::kBlockedInt8x4)) throw std::invalid_argument("llada_rt: unknown weight layout " + std::to_string(layout));
  LinearParams p{};
  p.out_ptr = ptr<void>(out); p.x_ptr = ptr<const void>(x); p.w_ptr = ptr<const void>(w);
  p.scale_ptr = ptr<const float>(scale);
  p.x_stride = x_stride; p.out_stride = out_stride;
  p.M = M; p.N = N; p.K = K;
  p.x_dtype = dtype_from_int(x_dtype);
  p.layout = static_cast<WeightLayout>(layout);
  p.n_threads = n_threads;
  return p;
}

#define LLADA_LINEAR_ARGS                                                                                        \
  py::arg("out"), py::arg("x"), py::arg("w"), py::arg("scale"), py::arg("x_stride"), py::arg("out_stride"),       \
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("x_dtype"), py::arg("layout"), py::arg("n_threads")

}  // namespace llada::bind
