// remask_kernel under the SIMT emulator against a sort-based reference written here: every rule, rows with different
// rules in one launch, ties, committed positions, rows with nothing masked, N from 1 to 1024. Small enough for
// -fsanitize=thread / address. Exit 0 = pass.
#include "remask.cuh"  // first: pulls in emu/simt.h through ptx.cuh

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace llada;

namespace {

constexpr int64_t kMask = 126336;

// Reference count for row b, from its masked confidences sorted in descending order.
int ref_count(const RemaskParams& p, int b, const std::vector<double>& sorted) {
  const int m = static_cast<int>(sorted.size());
  const int32_t rule = p.rule_ptr[b];
  if (rule < 0 || rule > 2) return -1;
  if (m == 0) return 0;
  if (rule == 0) return static_cast<int>(std::min<int64_t>(std::max<int64_t>(p.k_ptr[b], 0), m));
  if (rule == 1) {
    int c = 0;
    for (double x : sorted) c += x >= p.threshold_ptr[b];
    return std::max(c, 1);
  }
  int top_i = m - 1;  // Fast-dLLM loop: break at the first failing rank >= 1, thresholds in float64
  for (int i = 1; i < m; ++i)
    if (sorted[i] < 1.0 - p.factor_ptr[b] / static_cast<double>(i + 2)) { top_i = i; break; }
  if (top_i == 0 || top_i == m - 1) ++top_i;
  return top_i;
}

// rules: the rule code of each row, cycled (7 = not a rule code)
int run_case(int B, int N, const std::vector<int32_t>& rules, double threshold, double factor, bool tied,
             uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> ud;
  std::vector<int64_t> block(B * N), token(B * N), k(B);
  std::vector<double> prob(B * N), thr(B), fac(B);
  std::vector<int32_t> rule(B);
  for (int b = 0; b < B; ++b) {
    for (int j = 0; j < N; ++j) {
      const bool committed = ud(rng) < 0.3 || (b == B - 1 && B > 1);  // a whole row committed too
      block[b * N + j] = committed ? 7 : kMask;
      token[b * N + j] = 1000 + b * N + j;
      const double x = ud(rng);
      prob[b * N + j] = tied ? std::round(x * 4) / 4 : x;
    }
    k[b] = static_cast<int64_t>(rng() % (N + 3)) - 1;
    rule[b] = rules[b % rules.size()];
    thr[b] = threshold + 0.1 * b;
    fac[b] = factor * (1 + b);
  }
  if (N > 2) prob[1] = -INFINITY, prob[2] = NAN;
  std::vector<int64_t> expect = block;
  std::vector<int32_t> count(B, -7);
  RemaskParams p{};
  p.block_ptr = block.data(); p.count_ptr = count.data(); p.token_ptr = token.data(); p.prob_ptr = prob.data();
  p.k_ptr = k.data(); p.rule_ptr = rule.data(); p.threshold_ptr = thr.data(); p.factor_ptr = fac.data();
  p.B = B; p.N = N; p.mask_id = kMask;
  emu::launch(remask_kernel, remask_grid(p), dim3(remask_threads(N)), 0, p);
  int fails = 0;
  for (int b = 0; b < B; ++b) {
    std::vector<int> order;
    for (int j = 0; j < N; ++j) if (expect[b * N + j] == kMask) order.push_back(j);
    auto conf = [&](int j) { double x = prob[b * N + j]; return x != x ? -INFINITY : x; };
    std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return conf(a) > conf(c); });
    std::vector<double> sorted;
    for (int j : order) sorted.push_back(conf(j));
    const int c = ref_count(p, b, sorted);
    for (int i = 0; i < c; ++i) expect[b * N + order[i]] = token[b * N + order[i]];
    if (count[b] != c) { ++fails; std::printf("  row %d: count %d, reference %d\n", b, count[b], c); }
  }
  int wrong = 0;
  for (size_t i = 0; i < block.size(); ++i) wrong += block[i] != expect[i];
  std::printf("B=%d N=%d rules=%zu tied=%d: %d count mismatches, %d block mismatches\n", B, N, rules.size(), tied,
              fails, wrong);
  return fails + wrong;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  int fails = 0;
  const int shapes[][2] = {{1, 1}, {3, 7}, {4, 33}, {2, 64}, {1, 1024}};
  const int n_shapes = quick ? 3 : 5;
  uint32_t seed = 1;
  for (int s = 0; s < n_shapes; ++s)
    for (bool tied : {false, true}) {
      fails += run_case(shapes[s][0], shapes[s][1], {0}, 0.0, 0.0, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], {1}, 0.6, 0.0, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], {2}, 0.0, 1.0, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], {2}, 0.0, 0.2, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], {2, 0, 7, 1}, 0.5, 0.7, tied, seed++);  // mixed, one bad code
    }
  std::printf(fails ? "FAILED\n" : "all remask checks passed\n");
  return fails ? 1 : 0;
}
