// linear_kernel (int8 weights, bf16 x) under the SIMT emulator against an fp64 reference written here: rows 1 to 70
// (several m16 tiles, a second block along z), N not a multiple of the 128-column tile, K not a multiple of the 64-k
// chunk, strided x, split-K with its combine kernel. Exit status 0 = pass. Also built with -fsanitize=thread/address;
// the first two cases run at least 3 chunks per block, so that a buffer is reused (the race check needs that).
#include "linear.cuh"  // first: pulls in emu/simt.h through ptx.cuh

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace llada;

namespace {

struct Case {
  int M, N, K;
  int x_pad;     // x rows are K + x_pad elements apart (x_pad % 8 == 0)
  int n_splits;  // 1: the kernel alone; > 1: split-K partials + linear_combine_kernel; 0: as on an H100
};

// max over outputs of |got - ref| / tol, tol = bf16 output rounding (2^-8 relative) + fp32 accumulation error
double run_case(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::uniform_int_distribution<int> qd(-127, 127);
  const int M = c.M, N = c.N, K = c.K;
  const int64_t ldx = K + c.x_pad;
  std::vector<__nv_bfloat16> x((size_t)M * ldx), out((size_t)M * N, __float2bfloat16(12345.f));
  std::vector<int8_t> q((size_t)N * K);
  std::vector<float> scale(N);
  for (auto& v : x) v = __float2bfloat16(nd(rng));
  for (auto& v : q) v = static_cast<int8_t>(qd(rng));
  for (int n = 0; n < N; ++n) scale[n] = 0.01f * (1 + n % 7);
  q[0] = 127; q[1] = -127;  // the extremes of the symmetric range
  LinearParams p{};
  p.out_ptr = out.data(); p.x_ptr = x.data(); p.w_ptr = q.data(); p.scale_ptr = scale.data();
  p.x_stride = ldx; p.out_stride = N;
  p.M = M; p.N = N; p.K = K;
  p.x_dtype = DType::kBFloat16;
  p.layout = WeightLayout::kRowsInt8;
  run_linear_emu(p, c.n_splits);
  double worst = 0;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int k = 0; k < K; ++k) {
        const double prod = (double)__bfloat162float(x[(size_t)m * ldx + k]) * q[(size_t)n * K + k] * scale[n];
        ref += prod;
        mag += std::abs(prod);
      }
      const double got = __bfloat162float(out[(size_t)m * N + n]);
      const double tol = std::abs(ref) * (1.0 / 256) + mag * 1e-5 + 1e-30;
      const double r = std::abs(got - ref) / tol;
      if (!(r <= worst)) worst = std::isnan(r) ? INFINITY : r;
    }
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";  // the sanitizer builds run only the first cases
  const std::vector<Case> cases = {
      // M   N    K    x_pad splits
      {7, 100, 336, 8, 1},     // 1 m16 tile, N and K tails, strided x, 6 chunks through the double buffer
      {33, 140, 464, 0, 3},    // 3 m16 tiles, 2 column blocks, split-K: 8 chunks as 3 + 3 + 2
      {1, 8, 16, 0, 1},        // the smallest shape: one row, one n8 tile, one k16 step
      {64, 130, 64, 0, 1},     // 4 m16 tiles (all rows of a block), one column past a tile
      {70, 40, 96, 16, 2},     // a second block along z (rows 64..69), split-K
      {16, 256, 1040, 0, 0},   // the split the launcher picks for an H100 (2 column blocks: 17 splits of 1 chunk)
  };
  const size_t n = quick ? 2 : cases.size();
  int failures = 0;
  for (size_t i = 0; i < n; ++i) {
    const Case& c = cases[i];
    auto t0 = std::chrono::steady_clock::now();
    const double worst = run_case(c, 1 + i);
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const bool ok = worst <= 1.0;
    failures += !ok;
    std::printf("linear emu M=%d N=%d K=%d x_pad=%d splits=%d: max err / tol %.3g %.2fs %s\n", c.M, c.N, c.K, c.x_pad,
                c.n_splits, worst, sec, ok ? "ok" : "FAIL");
  }
  return failures ? 1 : 0;
}
