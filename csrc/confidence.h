// ConfidenceParams: per masked row of logits, the argmax token of the (noisy) logits and its float64 softmax
// probability, or (partial) the small state that merges vocabulary shards exactly. Every setting is per batch row and
// read by the kernel from memory, so one launch serves rows of different requests and can be captured in a graph.
#pragma once
#include <cmath>

#include "common.h"
#include "philox.h"

namespace llada {

// Softmax in base 2 with an integer reference (CPU and CUDA): x log2(e) = t + e with t = fl(x kLog2e) and e its
// rounding error (one FMA, exact) plus x kLog2eLo; n = round(t), f = (t - n) + e, |f| <= 0.5 + 2^-23, and
// 2^(x log2(e)) = r 2^n with r = 2^f. f is accurate to an ulp of f whatever |x| is (t alone would carry an error of
// |x| 6e-8 into every term). The term of x relative to an integer reference ref is r 2^(n - ref), an exact scaling:
// its value never depends on the reference it was computed against, so a sum depends on how V is split over threads
// or shards only through float64 rounding, and moving a sum to another reference is exact. x is clamped to
// [term_floor(ref), kLogitClamp]: r 2^(n - ref) stays a normal float, and -inf or NaN logits add about 2^-124 of the
// reference each.
constexpr float kLog2e = 0x1.715476p+0f;        // log2(e) rounded to fp32
constexpr float kLog2eLo = 0x1.4ae0c0p-26f;     // log2(e) - kLog2e
constexpr float kLogitClamp = 2097152.0f;       // 2^21: |t| stays below 2^22, the range of kRoundToInt
constexpr float kRoundToInt = 12582912.0f;      // 1.5 * 2^23: adding it rounds to an integer kept in the low bits
constexpr int kMinTermExp = -124;               // n - ref >= kMinTermExp - 1 above term_floor(ref)
constexpr int32_t kRefNone = -(1 << 30);        // the reference of a state with no softmax term

// The lower clamp of the logits for the reference ref (in double: ref can be ~3e6, where a float product is 0.2 off).
LLADA_HD float term_floor(int32_t ref) { return static_cast<float>((ref + kMinTermExp) * 0.6931471805599453); }

struct ConfidenceParams {
  // outputs, [B, N] contiguous
  int64_t* token_ptr;         // argmax id (global: vocab_offset + local) of the keys; -1 where the row is not masked
  double* prob_ptr;           // full op: softmax prob of the token (0 for a zero-confidence id), -inf if not masked
  // partial op (prob_ptr null): the shard's merge state, see ops.confidence_partial
  double* key_ptr;            // the token's key (logit + noise, computed in fp32); -inf when no key is finite
  double* num_ptr;            // the token's softmax term relative to ref (0 for zero-confidence / dead rows)
  int32_t* ref_ptr;           // the shard's integer softmax reference (kRefNone: no softmax term)
  double* denom_ptr;          // sum of the shard's softmax terms relative to ref
  double* random_prob_ptr;    // the Philox uniform of random_confidence rows, -1 for the others
  // inputs
  const void* logits_ptr;     // [B, N, V] with unit stride over V
  int64_t logits_b_stride;    // elements
  int64_t logits_n_stride;    // elements
  const bool* masked_ptr;     // [B, N] contiguous; rows that are false are skipped (their logits are never read)
  const float* temperature_ptr;       // [B] 0 (or less, or NaN): argmax; > 0: Gumbel-max with Philox noise
  const int64_t* seed_ptr;            // [B] Philox key
  const int64_t* offset_ptr;          // [B] Philox counter words 2-3: the request's own step
  const int64_t* position_ptr;        // [B] answer position of column n = 0 (counter word 1: position + n)
  const bool* random_confidence_ptr;  // [B] prob = Philox uniform at column kRandomConfidenceColumn
  const int32_t* suppress_mask_ptr;   // [B] bit i: special_ids[i] is -inf before the argmax and not in the softmax
  const int32_t* zero_conf_mask_ptr;  // [B] bit i: special_ids[i] may be chosen, gets prob 0, not in the softmax
  int B, N, V;
  DType dtype;
  int64_t vocab_offset;       // global id of local column 0 (vocabulary shards); the Philox column is global
  int64_t full_vocab;         // token written by a shard whose every id is suppressed (loses every merge tie)
  int n_special;
  int64_t special_ids[kMaxSpecialIds];  // global ids; those outside [vocab_offset, vocab_offset + V) are ignored
};

// The settings of row (b, n), read from the per-row arrays (shared by the CPU op and the kernel).
struct RowSettings {
  float temperature;
  uint64_t seed, offset;
  uint32_t position;  // position[b] + n: the Philox counter word 1
  uint32_t col0;      // Philox column of local id 0 (vocab_offset)
  bool random;        // random_confidence[b]: no softmax needed
};
LLADA_HD RowSettings row_settings(const ConfidenceParams& p, int64_t b, int64_t n) {
  RowSettings rs;
  rs.temperature = p.temperature_ptr[b];
  rs.seed = static_cast<uint64_t>(p.seed_ptr[b]);
  rs.offset = static_cast<uint64_t>(p.offset_ptr[b]);
  rs.position = static_cast<uint32_t>(p.position_ptr[b] + n);
  rs.col0 = static_cast<uint32_t>(p.vocab_offset);
  rs.random = p.random_confidence_ptr[b];
  return rs;
}
// Random remasking: the confidence is one Philox draw per position whatever the token (the official code's rand());
// -1 for the other rows.
LLADA_HD double random_prob(const RowSettings& rs) {
  if (!rs.random) return -1.0;
  return static_cast<double>(philox_uniform(rs.seed, rs.offset, rs.position, kRandomConfidenceColumn));
}

// The outputs of row i, shared by the CPU op and the kernel: the full op's prob = num / denom (random_prob for
// random-confidence rows, 0 without a softmax term, -inf for unmasked rows, token -1), or the partial op's state.
LLADA_HD void write_row(const ConfidenceParams& p, int64_t i, int64_t token, double key, double num, int32_t ref,
                        double denom, double random_prob) {
  p.token_ptr[i] = token;
  if (p.prob_ptr != nullptr) {
    p.prob_ptr[i] = token < 0 ? -INFINITY : random_prob >= 0.0 ? random_prob : num > 0.0 ? num / denom : 0.0;
    return;
  }
  p.key_ptr[i] = key;
  p.num_ptr[i] = num;
  p.ref_ptr[i] = ref;
  p.denom_ptr[i] = denom;
  p.random_prob_ptr[i] = random_prob;
}
LLADA_HD void write_unmasked_row(const ConfidenceParams& p, int64_t i) {
  write_row(p, i, -1, -INFINITY, 0.0, kRefNone, 0.0, -1.0);
}

void confidence_cpu(const ConfidenceParams& p);
#if defined(LLADA_WITH_CUDA)
void run_confidence(const ConfidenceParams& p, void* stream);  // stream is a cudaStream_t
#endif

}  // namespace llada
