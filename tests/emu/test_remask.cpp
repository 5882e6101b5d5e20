// remask_kernel under the SIMT emulator against a sort-based reference written here: every rule, ties, committed
// positions, rows with nothing masked, N from 1 to 1024. Small enough for -fsanitize=thread / address. Exit 0 = pass.
#include "remask.cuh"  // first: pulls in emu/simt.h through ptx.cuh

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace llada;

namespace {

constexpr int64_t kMask = 126336;

// Reference count for one row, from the masked confidences sorted in descending order.
int ref_count(const RemaskParams& p, int b, const std::vector<float>& sorted) {
  const int m = static_cast<int>(sorted.size());
  if (m == 0) return 0;
  if (p.rule == RemaskRule::kTopK) return static_cast<int>(std::min<int64_t>(std::max<int64_t>(p.k_ptr[b], 0), m));
  if (p.rule == RemaskRule::kThreshold) {
    int c = 0;
    for (float x : sorted) c += x >= p.threshold;
    return std::max(c, 1);
  }
  int top_i = m - 1;  // Fast-dLLM loop: break at the first failing rank >= 1
  for (int i = 1; i < m; ++i)
    if (sorted[i] < 1.0f - p.factor / static_cast<float>(i + 2)) { top_i = i; break; }
  if (top_i == 0 || top_i == m - 1) ++top_i;
  return top_i;
}

int run_case(int B, int N, int start, RemaskRule rule, float threshold, float factor, bool tied, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> ud;
  const int T = start + N + 3, stride = T + 5;
  std::vector<int64_t> canvas(B * stride), token(B * N), k(B);
  std::vector<float> prob(B * N);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) canvas[b * stride + t] = t < start ? 5 : kMask;
    for (int j = 0; j < N; ++j) {
      if (ud(rng) < 0.3f || (b == B - 1 && B > 1)) canvas[b * stride + start + j] = 7;  // committed (a whole row too)
      token[b * N + j] = 1000 + b * N + j;
      float x = ud(rng);
      prob[b * N + j] = tied ? std::round(x * 4) / 4 : x;
    }
    k[b] = static_cast<int64_t>(rng() % (N + 3)) - 1;
  }
  if (N > 2) prob[1] = -INFINITY, prob[2] = NAN;
  std::vector<int64_t> expect = canvas;
  std::vector<int32_t> count(B, -7);
  RemaskParams p{};
  p.canvas_ptr = canvas.data(); p.canvas_b_stride = stride; p.count_ptr = count.data();
  p.token_ptr = token.data(); p.prob_ptr = prob.data(); p.k_ptr = k.data();
  p.B = B; p.N = N; p.start = start; p.mask_id = kMask; p.rule = rule; p.threshold = threshold; p.factor = factor;
  emu::launch(remask_kernel, remask_grid(p), dim3(remask_threads(N)), 0, p);
  int fails = 0;
  for (int b = 0; b < B; ++b) {
    std::vector<int> order;
    for (int j = 0; j < N; ++j) if (expect[b * stride + start + j] == kMask) order.push_back(j);
    auto conf = [&](int j) { float x = prob[b * N + j]; return x != x ? -INFINITY : x; };
    std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return conf(a) > conf(c); });
    std::vector<float> sorted;
    for (int j : order) sorted.push_back(conf(j));
    const int c = ref_count(p, b, sorted);
    for (int i = 0; i < c; ++i) expect[b * stride + start + order[i]] = token[b * N + order[i]];
    if (count[b] != c) { ++fails; std::printf("  row %d: count %d, reference %d\n", b, count[b], c); }
  }
  int wrong = 0;
  for (size_t i = 0; i < canvas.size(); ++i) wrong += canvas[i] != expect[i];
  std::printf("B=%d N=%d start=%d rule=%d tied=%d: %d count mismatches, %d canvas mismatches\n", B, N, start,
              static_cast<int>(rule), tied, fails, wrong);
  return fails + wrong;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  int fails = 0;
  const int shapes[][2] = {{1, 1}, {3, 7}, {2, 33}, {2, 64}, {1, 1024}};
  const int n_shapes = quick ? 3 : 5;
  uint32_t seed = 1;
  for (int s = 0; s < n_shapes; ++s)
    for (bool tied : {false, true}) {
      fails += run_case(shapes[s][0], shapes[s][1], 4, RemaskRule::kTopK, 0.f, 0.f, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], 0, RemaskRule::kThreshold, 0.6f, 0.f, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], 2, RemaskRule::kFactor, 0.f, 1.0f, tied, seed++);
      fails += run_case(shapes[s][0], shapes[s][1], 2, RemaskRule::kFactor, 0.f, 0.2f, tied, seed++);
    }
  std::printf(fails ? "FAILED\n" : "all remask checks passed\n");
  return fails ? 1 : 0;
}
