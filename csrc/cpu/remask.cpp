// CPU remask: per row, rank the masked positions of its block by confidence and commit its rule's count in place.
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

#include "remask.h"

namespace llada {

// Number of candidates to commit, given the masked confidences sorted in descending order (shared by every rule).
static int64_t commit_count(const RemaskParams& p, int b, const double* sorted, int64_t m) {
  if (m == 0) return 0;
  switch (static_cast<RemaskRule>(p.rule_ptr[b])) {
    case RemaskRule::kTopK: {
      const int64_t k = p.k_ptr[b];
      return std::min(std::max<int64_t>(k, 0), m);
    }
    case RemaskRule::kThreshold: {
      int64_t c = 1;  // the most confident one is always committed
      while (c < m && sorted[c] >= p.threshold_ptr[b]) ++c;
      return c;
    }
    case RemaskRule::kFactor: {
      // Fast-dLLM get_transfer_index_dynamic: rank i (0-based) needs conf >= 1 - factor / (i + 2) in float64, rank 0
      // always passes; top_i = first failing rank, or m - 1 if none fails. Its quirk is kept on purpose: top_i is
      // then bumped by one when it is 0 or m - 1, so a failure at the last rank still commits all m.
      int64_t top_i = m - 1;
      for (int64_t i = 1; i < m; ++i) {
        const double thr = 1.0 - p.factor_ptr[b] / static_cast<double>(i + 2);
        if (sorted[i] < thr) { top_i = i; break; }
      }
      if (top_i == 0 || top_i == m - 1) ++top_i;
      return top_i;
    }
  }
  return 0;
}

void remask_cpu(const RemaskParams& p) {
  if (p.N > kRemaskMaxN) throw std::invalid_argument("llada_rt remask: the block length N must be <= 1024");
  for (int b = 0; b < p.B; ++b) {  // host memory: rule codes can be checked for free, before any write
    const int32_t rule = p.rule_ptr[b];
    if (rule < 0 || rule > 2)
      throw std::invalid_argument("llada_rt remask: rule[" + std::to_string(b) + "] = " + std::to_string(rule) +
                                  " is not a rule code (0 top-k, 1 threshold, 2 factor)");
  }
  int order[kRemaskMaxN];
  double conf[kRemaskMaxN], sorted[kRemaskMaxN];
  for (int b = 0; b < p.B; ++b) {
    int64_t* block = p.block_ptr + static_cast<int64_t>(b) * p.N;
    const double* prob = p.prob_ptr + static_cast<int64_t>(b) * p.N;
    const int64_t* token = p.token_ptr + static_cast<int64_t>(b) * p.N;
    int m = 0;
    for (int j = 0; j < p.N; ++j) {
      if (block[j] != p.mask_id) continue;
      order[m++] = j;
      conf[j] = std::isnan(prob[j]) ? -std::numeric_limits<double>::infinity() : prob[j];  // a strict weak order
    }
    // Descending confidence; ties go to the lower position.
    std::sort(order, order + m, [&](int a, int c) { return conf[a] > conf[c] || (conf[a] == conf[c] && a < c); });
    for (int i = 0; i < m; ++i) sorted[i] = conf[order[i]];
    const int64_t count = commit_count(p, b, sorted, m);
    // a committed token is written even if it is mask_id (the position then stays masked, as the official sampler)
    for (int64_t i = 0; i < count; ++i) block[order[i]] = token[order[i]];
    p.count_ptr[b] = static_cast<int32_t>(count);
  }
}

}  // namespace llada
