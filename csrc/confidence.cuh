// confidence_kernel: one block per masked row of logits [B, N, V]; one pass over V with 16-byte loads gives the argmax
// of the (noisy) logits and a float64 softmax sum in base 2 (see confidence.h), reduced over the block; probabilities
// never hit memory. The full op and the vocabulary-shard state share the pass and differ only in what lane 0 writes.
// Compiled by nvcc (confidence.cu) and by g++ against the SIMT emulator (bindings/emu_confidence.cpp, tests/emu).
#pragma once
#include <climits>
#include <type_traits>

#include "confidence.h"
#include "philox.h"
#include "ptx.cuh"

namespace llada {

// Threads per block: long rows get more loads in flight per SM.
inline int confidence_threads(int V) { return V >= 16384 ? 512 : 128; }
inline dim3 confidence_grid(const ConfidenceParams& p) { return dim3(static_cast<unsigned>(p.B) * p.N); }

namespace conf_detail {

constexpr float kNegInf = -INFINITY;
constexpr int kSuppress = 1, kZeroConf = 2;

// IEEE fp32 operations that nvcc never fuses into FMAs, so that a term has the same bits wherever it is computed
LLADA_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
LLADA_DEVICE float add_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
LLADA_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDACC__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
LLADA_DEVICE float fma_rn(float a, float b, float c) {
#if defined(__CUDACC__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
// 2^x for |x| <= ~0.6: the SFU's approximation (a few ulp) on the GPU, the library's exp2 under the emulator
LLADA_DEVICE float ex2(float x) {
#if defined(__CUDACC__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return std::exp2(x);
#endif
}
// 2^e as a double for e <= 0; 0 below the normal range (kRefNone differences land there)
LLADA_DEVICE double pow2(int e) {
  if (e < -1022) return 0.0;
  const long long bits = static_cast<long long>(e + 1023) << 52;
#if defined(__CUDACC__)
  return __longlong_as_double(bits);
#else
  double d;
  memcpy(&d, &bits, 8);
  return d;
#endif
}

// u = kRoundToInt + n for the clamped x (the rounding of t = fl(x kLog2e) to an integer) and f (confidence.h).
LLADA_DEVICE void term_split(float x, float& u, float& f) {
  const float t = mul_rn(x, kLog2e);
  const float e = fma_rn(x, kLog2eLo, fma_rn(x, kLog2e, -t));  // the exact error of t, plus x kLog2eLo
  u = add_rn(t, kRoundToInt);
  f = add_rn(sub_rn(t, sub_rn(u, kRoundToInt)), e);            // t - n is exact
}

// The n of softmax_term for a finite maximum logit x: the reference it sets.
LLADA_DEVICE int term_exponent(float x) {
  float u, f;
  term_split(fminf(x, kLogitClamp), u, f);
  return __float_as_int(u) - __float_as_int(kRoundToInt);
}

// 2^(x log2(e) - ref) in fp32, exact up to the error of 2^f; lo = term_floor(ref) (-inf and NaN land there).
LLADA_DEVICE float softmax_term(float x, int ref, float lo) {
  float u, f;
  term_split(fminf(fmaxf(x, lo), kLogitClamp), u, f);
  const float r = ex2(f);
  const unsigned k = static_cast<unsigned>(__float_as_int(u) - __float_as_int(kRoundToInt) - ref);
  return __uint_as_float(__float_as_uint(r) + (k << 23));  // r 2^k through the exponent bits
}

template <class T> struct Elems;  // elements per 16-byte load
template <> struct Elems<float> { static constexpr int value = 4; };
template <> struct Elems<__half> { static constexpr int value = 8; };
template <> struct Elems<__nv_bfloat16> { static constexpr int value = 8; };

LLADA_DEVICE float to_float(float x) { return x; }
LLADA_DEVICE float to_float(__half x) { return __half2float(x); }
LLADA_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 16 bytes -> floats (bf16: the bits shifted into the high half are the exact fp32 value)
template <class T>
LLADA_DEVICE void unpack16(const uint4& raw, float* out) {
  if constexpr (std::is_same<T, float>::value) {
    out[0] = __uint_as_float(raw.x); out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z); out[3] = __uint_as_float(raw.w);
  } else {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
      } else {
        __half lo, hi;
        const uint16_t l16 = static_cast<uint16_t>(w[i] & 0xffffu), h16 = static_cast<uint16_t>(w[i] >> 16);
        memcpy(&lo, &l16, 2);
        memcpy(&hi, &h16, 2);
        out[2 * i] = __half2float(lo);
        out[2 * i + 1] = __half2float(hi);
      }
    }
  }
}

// Gumbel noise of (position, col): -log(-log(u)). The inner log goes through log1p(-(1 - u)) because 1 - u is exact
// and u can be 1 - 2^-24, where a fast log (absolute error ~2^-22) could round -log(u) to 0 and the outer log to -inf.
LLADA_DEVICE float gumbel(uint64_t seed, uint64_t offset, uint32_t position, uint32_t col) {
  const float u = philox_uniform(seed, offset, position, col);
  const float neg_log_u = -log1pf(-(1.0f - u));
  return -__logf(neg_log_u);
}

// Per-thread (and, after the reduction, per-block) state of the pass.
struct State {
  float best_key;   // argmax key so far (ties: lowest id)
  float best_logit;
  int best_id;      // INT_MAX while no finite key was seen
  float run_max;    // max of the softmax logits seen
  int ref;          // term_exponent(run_max); kRefNone while no softmax logit was seen
  float lo;         // term_floor(ref)
  double sum;       // sum of softmax_term(x, ref, lo) over them
};

LLADA_DEVICE State empty_state() { return State{kNegInf, kNegInf, INT_MAX, kNegInf, kRefNone, 0.0f, 0.0}; }

LLADA_DEVICE void take_key(State& s, float key, float logit, int id) {
  if (key > s.best_key || (key == s.best_key && id < s.best_id && key > kNegInf)) {
    s.best_key = key; s.best_logit = logit; s.best_id = id;
  }
}

// Before terms of logits up to m are added: moves the sum to m's reference (an exact power-of-two scaling).
LLADA_DEVICE void raise_ref(State& s, float m) {
  if (!(m > s.run_max)) return;
  s.run_max = m;
  const int ref = term_exponent(m);
  if (ref > s.ref) {
    s.sum *= pow2(s.ref - ref);
    s.ref = ref;
    s.lo = term_floor(ref);
  }
}

LLADA_DEVICE void add_softmax(State& s, float x) {
  if (!(x > kNegInf)) return;
  raise_ref(s, x);
  s.sum += static_cast<double>(softmax_term(x, s.ref, s.lo));
}

LLADA_DEVICE State merge(const State& a, const State& b) {
  State r;
  r.run_max = fmaxf(a.run_max, b.run_max);
  r.ref = max(a.ref, b.ref);
  r.lo = a.ref > b.ref ? a.lo : b.lo;
  r.sum = a.sum * pow2(a.ref - r.ref) + b.sum * pow2(b.ref - r.ref);  // a side without terms has sum 0
  const bool take_b = b.best_key > a.best_key || (b.best_key == a.best_key && b.best_id < a.best_id);
  r.best_key = take_b ? b.best_key : a.best_key;
  r.best_logit = take_b ? b.best_logit : a.best_logit;
  r.best_id = take_b ? b.best_id : a.best_id;
  return r;
}

LLADA_DEVICE State shfl_xor(const State& s, int lane_mask) {
  State r;
  r.best_key = __shfl_xor_sync(0xffffffffu, s.best_key, lane_mask);
  r.best_logit = __shfl_xor_sync(0xffffffffu, s.best_logit, lane_mask);
  r.best_id = __shfl_xor_sync(0xffffffffu, s.best_id, lane_mask);
  r.run_max = __shfl_xor_sync(0xffffffffu, s.run_max, lane_mask);
  r.ref = __shfl_xor_sync(0xffffffffu, s.ref, lane_mask);
  r.lo = __shfl_xor_sync(0xffffffffu, s.lo, lane_mask);
  r.sum = __shfl_xor_sync(0xffffffffu, s.sum, lane_mask);
  return r;
}

// Kind (kSuppress / kZeroConf bits) of local vocabulary id v; an id in both lists is suppressed.
LLADA_DEVICE int special_kind(const int* ids, const int* kinds, int n, int v) {
  int kind = 0;
  for (int i = 0; i < n; ++i) kind |= ids[i] == v ? kinds[i] : 0;
  return kind;
}

// One thread's share of the pass over a row. kNoisy: temperature > 0.
template <class T, int kThreads, bool kNoisy>
LLADA_DEVICE void row_pass(const T* logits, int V, const RowSettings& rs, const int* s_ids, const int* s_kinds,
                           int n_special, State& st) {
  constexpr int kVec = Elems<T>::value;
  const int tid = threadIdx.x;

  // one element through every rule (ids near special ids, unaligned head and tail)
  auto slow_element = [&](float x, int v) {
    const int kind = special_kind(s_ids, s_kinds, n_special, v);
    if (kind & kSuppress) return;
    float key = x;
    if constexpr (kNoisy) key = x + rs.temperature * gumbel(rs.seed, rs.offset, rs.position, rs.col0 + v);
    take_key(st, key, x, v);
    if (!rs.random && !(kind & kZeroConf)) add_softmax(st, x);
  };

  // Head: elements before the first 16-byte boundary. Body: whole 16-byte vectors, thread t takes vectors t, t +
  // kThreads, ... so that a warp reads 512 contiguous bytes. Tail: the rest. Every thread visits its ids in increasing
  // order (head < body < tail), which the strict '>' of the vector path relies on for the lowest-id tie rule.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(logits);
  const int misalign = static_cast<int>((addr % 16) / sizeof(T));
  const int head = min((kVec - misalign) % kVec, V);
  const int n_vec = (V - head) / kVec;
  const int tail0 = head + n_vec * kVec;
  if (tid < head) slow_element(to_float(logits[tid]), tid);

  const uint4* body = reinterpret_cast<const uint4*>(logits + head);
  int sp = 0;                                                // first special id that may lie at or after this vector
  int next_special = n_special > 0 ? s_ids[0] : INT_MAX;
  auto vector = [&](const uint4& raw, int i) {
    float x[kVec];
    unpack16<T>(raw, x);
    const int v0 = head + i * kVec;
    while (next_special < v0) next_special = ++sp < n_special ? s_ids[sp] : INT_MAX;
    if (next_special < v0 + kVec) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) slow_element(x[e], v0 + e);
      return;
    }
    // fast path: no special id among these kVec elements
    float chunk_max = x[0];
#pragma unroll
    for (int e = 1; e < kVec; ++e) chunk_max = fmaxf(chunk_max, x[e]);
    if constexpr (kNoisy) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float key = x[e] + rs.temperature * gumbel(rs.seed, rs.offset, rs.position, rs.col0 + v0 + e);
        if (key > st.best_key) { st.best_key = key; st.best_logit = x[e]; st.best_id = v0 + e; }
      }
    } else if (chunk_max > st.best_key) {
      int e_best = 0;
#pragma unroll
      for (int e = kVec - 1; e >= 0; --e) e_best = x[e] == chunk_max ? e : e_best;  // first index of the max
      st.best_key = chunk_max; st.best_logit = chunk_max; st.best_id = v0 + e_best;
    }
    if (!rs.random && chunk_max > kNegInf) {
      raise_ref(st, chunk_max);
      double s = 0.0;  // per element in float64: a float partial sum would round its terms against the largest
#pragma unroll
      for (int e = 0; e < kVec; ++e) s += static_cast<double>(softmax_term(x[e], st.ref, st.lo));
      st.sum += s;
    }
  };
  // kUnroll loads are issued before any is used: at 512 threads that keeps 32 KiB per SM in flight, which a
  // memory-bound pass needs to cover DRAM latency. The noisy pass is compute-bound (Philox) and keeps registers.
  constexpr int kUnroll = kNoisy ? 1 : 4;
  int i = tid;
  for (; i + (kUnroll - 1) * kThreads < n_vec; i += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(body + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vector(raw[u], i + u * kThreads);
  }
  for (; i < n_vec; i += kThreads) vector(__ldg(body + i), i);
  for (int v = tail0 + tid; v < V; v += kThreads) slow_element(to_float(logits[v]), v);
}

}  // namespace conf_detail

// grid: B * N blocks (one per row), block: kThreads.
template <class T, int kThreads>
__global__ void __launch_bounds__(kThreads) confidence_kernel(const ConfidenceParams p) {
  using namespace conf_detail;
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  __shared__ int s_ids[kMaxSpecialIds];    // this row's special ids inside the shard, local, ascending
  __shared__ int s_kinds[kMaxSpecialIds];
  __shared__ int s_n_special;
  __shared__ State s_warp[kWarps];

  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  if (!p.masked_ptr[row]) {  // uniform over the block: taken before any barrier
    if (tid == 0) write_unmasked_row(p, row);
    return;
  }
  const int b = row / p.N, n = row % p.N;
  const int V = p.V;
  if (tid == 0) {  // insertion sort of at most 8 ids; a repeated id gets the union of its kinds
    const int32_t sup = p.suppress_mask_ptr[b], zero = p.zero_conf_mask_ptr[b];
    int count = 0;
    for (int i = 0; i < p.n_special; ++i) {
      const int kind = ((sup >> i) & 1 ? kSuppress : 0) | ((zero >> i) & 1 ? kZeroConf : 0);
      const int64_t local = p.special_ids[i] - p.vocab_offset;
      if (kind == 0 || local < 0 || local >= V) continue;
      const int id = static_cast<int>(local);
      int j = 0;
      while (j < count && s_ids[j] != id) ++j;
      if (j < count) { s_kinds[j] |= kind; continue; }
      for (j = count; j > 0 && s_ids[j - 1] > id; --j) { s_ids[j] = s_ids[j - 1]; s_kinds[j] = s_kinds[j - 1]; }
      s_ids[j] = id;
      s_kinds[j] = kind;
      ++count;
    }
    s_n_special = count;
  }
  __syncthreads();
  const int n_special = s_n_special;

  const T* logits = static_cast<const T*>(p.logits_ptr) + b * p.logits_b_stride + n * p.logits_n_stride;
  const RowSettings rs = row_settings(p, b, n);
  State st = empty_state();
  if (rs.temperature > 0.0f) row_pass<T, kThreads, true>(logits, V, rs, s_ids, s_kinds, n_special, st);
  else row_pass<T, kThreads, false>(logits, V, rs, s_ids, s_kinds, n_special, st);

  // block reduction: warps by shuffles, then warp 0 over the warp results
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) s_warp[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  st = lane < kWarps ? s_warp[lane] : empty_state();
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
  if (lane != 0) return;

  // The row's state -> token, key and the token's softmax term (the same function as its term in the sum).
  int64_t token;
  double key, num = 0.0;
  if (st.best_id == INT_MAX) {
    // every key is -inf (or NaN): the lowest id that is not suppressed, probability 0 (as csrc/cpu/confidence.cpp);
    // a shard whose every id is suppressed answers full_vocab, which loses every tie of the merge
    int id = 0;
    while (id < V && (special_kind(s_ids, s_kinds, n_special, id) & kSuppress)) ++id;
    token = id < V ? p.vocab_offset + id : p.full_vocab;
    key = kNegInf;
  } else {
    token = p.vocab_offset + st.best_id;
    key = st.best_key;
    const bool zero = special_kind(s_ids, s_kinds, n_special, st.best_id) & kZeroConf;
    if (!rs.random && !zero) num = static_cast<double>(softmax_term(st.best_logit, st.ref, st.lo));
  }
  write_row(p, row, token, key, num, st.ref, st.sum, random_prob(rs));
}

// Picks the instantiation for p (dtype, block size) and calls launch(kernel, threads); shared by run_confidence and
// the emulated launches so that they run the same kernels.
template <class Launch>
void dispatch_confidence(const ConfidenceParams& p, Launch&& launch) {
  auto by_threads = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (confidence_threads(p.V) == 512) launch(confidence_kernel<T, 512>, 512);
    else launch(confidence_kernel<T, 128>, 128);
  };
  switch (p.dtype) {
    case DType::kFloat32: by_threads(float{}); break;
    case DType::kFloat16: by_threads(__half{}); break;
    case DType::kBFloat16: by_threads(__nv_bfloat16{}); break;
  }
}

}  // namespace llada
