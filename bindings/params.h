// Builds the ops' params structs from the integer pointers and sizes that ops.py passes; shared by _C and _emu.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "attention.h"
#include "confidence.h"
#include "remask.h"

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
                                        int B, int Lq, int Lk, int Hq, int Hkv, int D, float scale, int dtype) {
  if (strides.size() != 12) throw std::invalid_argument("llada_rt: attention expects 12 strides");
  AttentionParams p{};
  p.o_ptr = ptr<void>(o); p.q_ptr = ptr<const void>(q); p.k_ptr = ptr<const void>(k); p.v_ptr = ptr<const void>(v);
  p.o_b_stride = strides[0]; p.o_l_stride = strides[1]; p.o_h_stride = strides[2];
  p.q_b_stride = strides[3]; p.q_l_stride = strides[4]; p.q_h_stride = strides[5];
  p.k_b_stride = strides[6]; p.k_l_stride = strides[7]; p.k_h_stride = strides[8];
  p.v_b_stride = strides[9]; p.v_l_stride = strides[10]; p.v_h_stride = strides[11];
  p.key_start_ptr = ptr<const int32_t>(key_start);
  p.key_end_ptr = ptr<const int32_t>(key_end);
  p.B = B; p.Lq = Lq; p.Lk = Lk; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.scale = scale;
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
      py::arg("key_end"), py::arg("B"), py::arg("Lq"), py::arg("Lk"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"), \
      py::arg("scale"), py::arg("dtype")

}  // namespace llada::bind
