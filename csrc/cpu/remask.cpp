// CPU remask: per row, rank the masked positions of the block by confidence and commit the rule's count in place.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "remask.h"

namespace llada {

// Number of candidates to commit, given the masked confidences sorted in descending order (shared by every rule).
static int64_t commit_count(const RemaskParams& p, int b, const float* sorted, int64_t m) {
  if (m == 0) return 0;
  switch (p.rule) {
    case RemaskRule::kTopK: {
      const int64_t k = p.k_ptr[b];
      return std::min(std::max<int64_t>(k, 0), m);
    }
    case RemaskRule::kThreshold: {
      int64_t c = 1;  // the most confident one is always committed
      while (c < m && sorted[c] >= p.threshold) ++c;
      return c;
    }
    case RemaskRule::kFactor: {
      // Fast-dLLM get_transfer_index_dynamic: rank i (0-based) needs conf >= 1 - factor / (i + 2), rank 0 always
      // passes; top_i = first failing rank, or m - 1 if none fails. Its quirk is kept on purpose: top_i is then
      // bumped by one when it is 0 or m - 1, so a failure at the last rank still commits all m.
      int64_t top_i = m - 1;
      for (int64_t i = 1; i < m; ++i) {
        const float thr = 1.0f - p.factor / static_cast<float>(i + 2);
        if (sorted[i] < thr) { top_i = i; break; }
      }
      if (top_i == 0 || top_i == m - 1) ++top_i;
      return top_i;
    }
  }
  return 0;
}

void remask_cpu(const RemaskParams& p) {
  std::vector<int> order;
  std::vector<float> conf, sorted;
  for (int b = 0; b < p.B; ++b) {
    int64_t* canvas = p.canvas_ptr + b * p.canvas_b_stride + p.start;
    const float* prob = p.prob_ptr + static_cast<int64_t>(b) * p.N;
    const int64_t* token = p.token_ptr + static_cast<int64_t>(b) * p.N;
    order.clear();
    conf.assign(prob, prob + p.N);
    for (int j = 0; j < p.N; ++j) {
      if (canvas[j] != p.mask_id) continue;
      order.push_back(j);
      if (std::isnan(conf[j])) conf[j] = -std::numeric_limits<float>::infinity();  // keeps the order strict-weak
    }
    // Descending confidence; ties go to the lower position.
    std::sort(order.begin(), order.end(),
              [&](int a, int c) { return conf[a] > conf[c] || (conf[a] == conf[c] && a < c); });
    sorted.resize(order.size());
    for (size_t i = 0; i < order.size(); ++i) sorted[i] = conf[order[i]];
    const int64_t count = commit_count(p, b, sorted.data(), static_cast<int64_t>(order.size()));
    for (int64_t i = 0; i < count; ++i) canvas[order[i]] = token[order[i]];
    p.count_ptr[b] = static_cast<int32_t>(count);
  }
}

}  // namespace llada
