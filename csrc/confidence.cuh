// confidence_kernel: one block per masked row of logits [B, N, V]; one pass over V with 16-byte loads gives the argmax
// of the (noisy) logits and an online (max, sum-exp) softmax, reduced over the block; probabilities never hit memory.
// Compiled by nvcc (confidence.cu) and by g++ against the SIMT emulator (bindings/emu_confidence.cpp, tests/emu).
#pragma once
#include <climits>
#include <type_traits>

#include "confidence.h"
#include "philox.h"
#include "ptx.cuh"

namespace llada {

constexpr int kConfMaxSpecial = 2 * kMaxSpecialIds;  // suppressed + zero-confidence ids of a row

// Threads per block: long rows get more loads in flight per SM.
inline int confidence_threads(int V) { return V >= 16384 ? 512 : 128; }
inline dim3 confidence_grid(const ConfidenceParams& p) { return dim3(static_cast<unsigned>(p.B) * p.N); }

namespace conf_detail {

constexpr float kNegInf = -INFINITY;
constexpr int kSuppress = 1, kZeroConf = 2;

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

// Gumbel noise of (row, col): -log(-log(u)). The inner log goes through log1p(-(1 - u)) because 1 - u is exact and u
// can be 1 - 2^-24, where a fast log (absolute error ~2^-22) could round -log(u) to 0 and the outer log to -inf.
LLADA_DEVICE float gumbel(uint64_t seed, uint64_t offset, uint32_t row, uint32_t col) {
  const float u = philox_uniform(seed, offset, row, col);
  const float neg_log_u = -log1pf(-(1.0f - u));
  return -__logf(neg_log_u);
}

// Per-thread (and, after the reduction, per-block) state of the pass.
struct State {
  float run_max;   // max of the softmax logits seen
  float run_sum;   // sum of exp(logit - run_max) over them
  float best_key;  // argmax key so far (ties: lowest id)
  float best_logit;
  int best_id;     // INT_MAX while no finite key was seen
};

LLADA_DEVICE void take_key(State& s, float key, float logit, int id) {
  if (key > s.best_key || (key == s.best_key && id < s.best_id && key > kNegInf)) {
    s.best_key = key; s.best_logit = logit; s.best_id = id;
  }
}

LLADA_DEVICE void add_softmax(State& s, float x) {
  if (!(x > kNegInf)) return;
  if (x > s.run_max) {
    s.run_sum = s.run_sum * __expf(s.run_max - x) + 1.0f;  // run_max = -inf: 0 * 0 + 1
    s.run_max = x;
  } else {
    s.run_sum += __expf(x - s.run_max);
  }
}

LLADA_DEVICE State merge(const State& a, const State& b) {
  State r;
  r.run_max = fmaxf(a.run_max, b.run_max);
  if (r.run_max == kNegInf) {
    r.run_sum = 0.0f;
  } else {
    // a side with no softmax logits has run_max = -inf and run_sum = 0: its factor is exp(-inf) = 0
    r.run_sum = a.run_sum * __expf(a.run_max - r.run_max) + b.run_sum * __expf(b.run_max - r.run_max);
  }
  const bool take_b = b.best_key > a.best_key || (b.best_key == a.best_key && b.best_id < a.best_id);
  r.best_key = take_b ? b.best_key : a.best_key;
  r.best_logit = take_b ? b.best_logit : a.best_logit;
  r.best_id = take_b ? b.best_id : a.best_id;
  return r;
}

LLADA_DEVICE State shfl_xor(const State& s, int lane_mask) {
  State r;
  r.run_max = __shfl_xor_sync(0xffffffffu, s.run_max, lane_mask);
  r.run_sum = __shfl_xor_sync(0xffffffffu, s.run_sum, lane_mask);
  r.best_key = __shfl_xor_sync(0xffffffffu, s.best_key, lane_mask);
  r.best_logit = __shfl_xor_sync(0xffffffffu, s.best_logit, lane_mask);
  r.best_id = __shfl_xor_sync(0xffffffffu, s.best_id, lane_mask);
  return r;
}

// Kind (kSuppress / kZeroConf bits) of vocabulary id v; suppression wins when an id is in both lists.
LLADA_DEVICE int special_kind(const int* ids, const int* kinds, int n, int v) {
  int kind = 0;
  for (int i = 0; i < n; ++i) kind |= ids[i] == v ? kinds[i] : 0;
  return kind;
}

}  // namespace conf_detail

// grid: B * N blocks (one per row), block: kThreads. kNoisy: temperature > 0.
template <class T, int kThreads, bool kNoisy>
__global__ void __launch_bounds__(kThreads) confidence_kernel(const ConfidenceParams p) {
  using namespace conf_detail;
  constexpr int kVec = Elems<T>::value;
  constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  __shared__ int s_ids[kConfMaxSpecial];    // special ids in ascending order
  __shared__ int s_kinds[kConfMaxSpecial];
  __shared__ State s_warp[kWarps];

  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  if (!p.masked_ptr[row]) {  // uniform over the block: taken before any barrier
    if (tid == 0) { p.token_ptr[row] = -1; p.prob_ptr[row] = kNegInf; }
    return;
  }
  const int n_special = p.n_suppress + p.n_zero_conf;
  if (tid == 0) {  // insertion sort of at most 16 ids
    for (int i = 0; i < n_special; ++i) {
      const bool sup = i < p.n_suppress;
      const int id = static_cast<int>(sup ? p.suppress_ids[i] : p.zero_conf_ids[i - p.n_suppress]);
      int j = i;
      for (; j > 0 && s_ids[j - 1] > id; --j) { s_ids[j] = s_ids[j - 1]; s_kinds[j] = s_kinds[j - 1]; }
      s_ids[j] = id;
      s_kinds[j] = sup ? kSuppress : kZeroConf;
    }
  }
  __syncthreads();

  const int b = row / p.N, n = row % p.N;
  const T* logits = static_cast<const T*>(p.logits_ptr) + b * p.logits_b_stride + n * p.logits_n_stride;
  const int V = p.V;
  const uint32_t philox_row = static_cast<uint32_t>(row);
  const float temperature = p.temperature;
  const bool want_prob = !p.random_confidence;
  State st{kNegInf, 0.0f, kNegInf, kNegInf, INT_MAX};

  // one element through every rule (ids near special ids, unaligned head and tail)
  auto slow_element = [&](float x, int v) {
    const int kind = special_kind(s_ids, s_kinds, n_special, v);
    if (kind & kSuppress) return;
    float key = x;
    if constexpr (kNoisy) key = x + temperature * gumbel(p.seed, p.offset, philox_row, static_cast<uint32_t>(v));
    take_key(st, key, x, v);
    if (want_prob && !(kind & kZeroConf)) add_softmax(st, x);
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
        const float key = x[e] + temperature * gumbel(p.seed, p.offset, philox_row, static_cast<uint32_t>(v0 + e));
        if (key > st.best_key) { st.best_key = key; st.best_logit = x[e]; st.best_id = v0 + e; }
      }
    } else if (chunk_max > st.best_key) {
      int e_best = 0;
#pragma unroll
      for (int e = kVec - 1; e >= 0; --e) e_best = x[e] == chunk_max ? e : e_best;  // first index of the max
      st.best_key = chunk_max; st.best_logit = chunk_max; st.best_id = v0 + e_best;
    }
    if (want_prob && chunk_max > kNegInf) {
      if (chunk_max > st.run_max) {
        st.run_sum *= __expf(st.run_max - chunk_max);
        st.run_max = chunk_max;
      }
      float s = 0.0f;
#pragma unroll
      for (int e = 0; e < kVec; ++e) s += __expf(x[e] - st.run_max);
      st.run_sum += s;
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

  // block reduction: warps by shuffles, then warp 0 over the warp results
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) s_warp[warp] = st;
  __syncthreads();
  if (warp != 0) return;
  st = lane < kWarps ? s_warp[lane] : State{kNegInf, 0.0f, kNegInf, kNegInf, INT_MAX};
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) st = merge(st, shfl_xor(st, o));
  if (lane != 0) return;

  int64_t token;
  float prob;
  if (st.best_id == INT_MAX) {
    // every key is -inf (or NaN): the lowest id that is not suppressed, probability 0 (as csrc/cpu/confidence.cpp)
    int id = 0;
    while (id < V && (special_kind(s_ids, s_kinds, n_special, id) & kSuppress)) ++id;
    token = id < V ? id : 0;
    prob = 0.0f;
  } else {
    token = st.best_id;
    const bool zero = special_kind(s_ids, s_kinds, n_special, st.best_id) & kZeroConf;
    prob = (!want_prob || zero) ? 0.0f : __expf(st.best_logit - st.run_max) / st.run_sum;
  }
  if (p.random_confidence) prob = philox_uniform(p.seed, p.offset, philox_row, kRandomConfidenceColumn);
  p.token_ptr[row] = token;
  p.prob_ptr[row] = prob;
}

// Picks the instantiation for p (dtype, block size, noise) and calls launch(kernel, threads); shared by run_confidence
// and the emulated launches so that they run the same kernels.
template <class Launch>
void dispatch_confidence(const ConfidenceParams& p, Launch&& launch) {
  const bool noisy = p.temperature > 0.0f;
  auto by_threads = [&](auto type_tag) {
    using T = decltype(type_tag);
    if (confidence_threads(p.V) == 512) {
      if (noisy) launch(confidence_kernel<T, 512, true>, 512);
      else launch(confidence_kernel<T, 512, false>, 512);
    } else {
      if (noisy) launch(confidence_kernel<T, 128, true>, 128);
      else launch(confidence_kernel<T, 128, false>, 128);
    }
  };
  switch (p.dtype) {
    case DType::kFloat32: by_threads(float{}); break;
    case DType::kFloat16: by_threads(__half{}); break;
    case DType::kBFloat16: by_threads(__nv_bfloat16{}); break;
  }
}

}  // namespace llada
