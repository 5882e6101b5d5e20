// attention_kernel under the SIMT emulator against an fp64 reference, on odd shapes with padding, GQA, strided K/V and
// kv_rows (q row b reads row kv_rows[b] of a persistent cache with R rows).
// Exit status 0 when every case is within tolerance. Also built with -fsanitize=thread/address by tests/test_emu.py.
#include "attention.cuh"

#include <chrono>
#include <random>
#include <string>

using namespace llada;

namespace {

template <class T> float to_f(T x);
template <> float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> float to_f(__half x) { return __half2float(x); }
template <class T> T from_f(float x);
template <> __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __half from_f(float x) { return __float2half(x); }

struct Case {
  int B, Lq, Lk, Hq, Hkv, D;
  bool bf16;
  std::vector<int> key_start, key_end;
  int cache_extra;  // k/v are views of a bigger cache
  int n_splits;     // 1: the plain kernel; > 1: split-KV kernel + combine
  std::vector<int> kv_rows = {};  // empty: q row b reads k/v row b (R = B)
  int R = 0;                      // k/v rows when kv_rows is given
};

template <class T>
double run_case(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const int B = c.B, Lq = c.Lq, Lk = c.Lk, Hq = c.Hq, Hkv = c.Hkv, D = c.D, R = c.kv_rows.empty() ? B : c.R;
  // q, o contiguous [B, Lq, Hq, D]; k, v are views [R, Lk, Hkv, D] of a cache [R, Lk + extra, Hkv, D + 8 * extra]
  const int64_t kv_row = (int64_t)Hkv * (D + 8 * c.cache_extra), kv_b = (int64_t)(Lk + c.cache_extra) * kv_row;
  std::vector<T> q((size_t)B * Lq * Hq * D), o(q.size(), from_f<T>(12345.f)), k((size_t)R * kv_b), v(k.size());
  for (auto& x : q) x = from_f<T>(nd(rng));
  for (auto& x : k) x = from_f<T>(nd(rng));
  for (auto& x : v) x = from_f<T>(nd(rng));
  AttentionParams p{};
  p.o_ptr = o.data(); p.q_ptr = q.data(); p.k_ptr = k.data(); p.v_ptr = v.data();
  p.q_b_stride = p.o_b_stride = (int64_t)Lq * Hq * D; p.q_l_stride = p.o_l_stride = (int64_t)Hq * D;
  p.q_h_stride = p.o_h_stride = D;
  p.k_b_stride = p.v_b_stride = kv_b; p.k_l_stride = p.v_l_stride = kv_row;
  p.k_h_stride = p.v_h_stride = D + 8 * c.cache_extra;
  p.key_start_ptr = c.key_start.empty() ? nullptr : c.key_start.data();
  p.key_end_ptr = c.key_end.empty() ? nullptr : c.key_end.data();
  p.kv_rows_ptr = c.kv_rows.empty() ? nullptr : c.kv_rows.data();
  p.B = B; p.Lq = Lq; p.Lk = Lk; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.R = R;
  p.scale = 1.f / std::sqrt((float)D);
  p.dtype = c.bf16 ? DType::kBFloat16 : DType::kFloat16;
  run_attention_emu(p, c.n_splits);

  double err = 0;
  for (int b = 0; b < B; ++b) {
    int ks = c.key_start.empty() ? 0 : std::max(0, c.key_start[b]);
    int ke = c.key_end.empty() ? Lk : std::min(Lk, c.key_end[b]);
    const size_t kb = c.kv_rows.empty() ? b : c.kv_rows[b];  // the k/v row this q row reads
    for (int h = 0; h < Hq; ++h) {
      const int hk = h / (Hq / Hkv);
      for (int i = 0; i < Lq; ++i) {
        const T* qr = &q[(size_t)b * p.q_b_stride + (size_t)i * p.q_l_stride + (size_t)h * D];
        std::vector<double> w(std::max(0, ke - ks));
        double m = -1e300, l = 0;
        for (int j = ks; j < ke; ++j) {
          const T* kr = &k[kb * kv_b + (size_t)j * kv_row + (size_t)hk * p.k_h_stride];
          double s = 0;
          for (int d = 0; d < D; ++d) s += (double)to_f(qr[d]) * to_f(kr[d]);
          w[j - ks] = s * p.scale;
          m = std::max(m, w[j - ks]);
        }
        for (double& x : w) { x = std::exp(x - m); l += x; }
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int j = ks; j < ke; ++j)
            acc += w[j - ks] * to_f(v[kb * kv_b + (size_t)j * kv_row + (size_t)hk * p.v_h_stride + d]);
          const double ref = ke > ks ? acc / l : 0.0;
          const double got = to_f(o[(size_t)b * p.o_b_stride + (size_t)i * p.o_l_stride + (size_t)h * D + d]);
          const double e = std::abs(got - ref);
          if (!(e <= err)) err = std::isnan(e) ? INFINITY : e;
        }
      }
    }
  }
  return err;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";  // the sanitizer builds run only the first cases
  std::vector<Case> cases = {
      // B Lq Lk Hq Hkv D bf16 key_start key_end cache_extra n_splits
      {2, 70, 150, 2, 1, 64, true, {0, 37}, {150, 101}, 1, 1},  // GQA, padded row, strided cache view, 3 key tiles
      {3, 9, 140, 2, 1, 128, false, {0, 0, 70}, {140, 7, 70}, 1, 3, {1, 1, 2}, 3},  // split-KV over cache slots
      {1, 17, 77, 1, 1, 128, false, {}, {}, 0, 3},               // split-KV: 2 tiles over 3 splits, one split empty
      {2, 20, 130, 2, 2, 64, true, {5, 0}, {130, 90}, 1, 1, {3, 0}, 4},  // cache slots 3 and 0 of 4
      {2, 33, 40, 4, 4, 64, false, {3, 40}, {40, 40}, 2, 1},     // second row has no valid key: zeros
      {2, 33, 300, 4, 2, 64, true, {3, 300}, {290, 300}, 1, 4},  // split-KV with a padded row and an empty row
      {3, 1, 1, 4, 2, 128, true, {}, {}, 0, 1},
      {1, 130, 200, 1, 1, 128, true, {0}, {199}, 1, 2},
  };
  const size_t n = quick ? 2 : cases.size();
  int failures = 0;
  for (size_t i = 0; i < n; ++i) {
    const Case& c = cases[i];
    auto t0 = std::chrono::steady_clock::now();
    double err = c.bf16 ? run_case<__nv_bfloat16>(c, 1 + i) : run_case<__half>(c, 1 + i);
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // output rounding (bf16: 2^-9 relative) plus P rounded to the input dtype before P V, with |o| <~ 3
    const double tol = c.bf16 ? 2e-2 : 3e-3;
    const bool ok = err <= tol;
    failures += !ok;
    std::printf("attention emu B=%d Lq=%d Lk=%d Hq=%d Hkv=%d D=%d %s splits=%d: max abs err %.3g (tol %.1g) %.2fs %s\n",
                c.B, c.Lq, c.Lk, c.Hq, c.Hkv, c.D, c.bf16 ? "bf16" : "fp16", c.n_splits, err, tol, sec, ok ? "ok" : "FAIL");
  }
  return failures ? 1 : 0;
}
