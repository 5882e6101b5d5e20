// A C++ CPU attention, the variant measured against torch SDPA for ops.attention's CPU path. SDPA won on every shape,
// so ops.py calls SDPA and this file stays here as the record (STYLE.md: variants live in bench/, not in csrc/).
// 2-core AVX2 box (shared, loaded), bf16, median process CPU ms of 5 runs, this file vs ops.attention (SDPA):
//   B=1 Lq=32 Lk=1024 H=32 D=128: 117 vs 50 | B=1 Lq=1024 Lk=1024 H=8 D=128: 398 vs 187
//   B=4 Lq=64 Lk=512 H=16/4 D=64: 64 vs 46  | B=1 Lq=1 Lk=8192 H=32 D=128: 593 vs 424
// Build: g++ -std=c++17 -O3 -fopenmp -I csrc bench/attention_cpu.cpp -o attention_cpu
// Run: attention_cpu B Lq Lk Hq Hkv D  -> median wall and CPU ms over 5 runs (after a warm-up) and the max error of
// query row 0 against fp64.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include "attention.h"

namespace {

using llada::AttentionParams;

// bf16 -> fp32 is a 16-bit shift; fp16 -> fp32 by F16C
__attribute__((target("avx2,fma,f16c"))) void to_f32(const uint16_t* src, float* dst, int n, bool bf16) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    __m256 f = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
    _mm256_storeu_ps(dst + i, f);
  }
  for (; i < n; ++i) {
    if (bf16) { uint32_t u = uint32_t(src[i]) << 16; std::memcpy(dst + i, &u, 4); }
    else dst[i] = _cvtsh_ss(src[i]);
  }
}

__attribute__((target("avx2,fma,f16c"))) uint16_t from_f32(float x, bool bf16) {
  if (!bf16) return _cvtss_sh(x, 0);
  uint32_t u; std::memcpy(&u, &x, 4);
  u += 0x7FFF + ((u >> 16) & 1);  // round to nearest even (inputs are finite)
  return uint16_t(u >> 16);
}

// One task: query rows [i0, i1) of head h against the kv head's fp32 keys, transposed (Kt [kD][n]), and values
// (V [n][kD]). S is built key-block by key-block with the keys along the vector lanes: no horizontal sums.
template <int kD>
__attribute__((target("avx2,fma,f16c"))) void rows_task(const AttentionParams& p, int b, int h, int i0, int i1,
                                                          const float* Kt, const float* V, int n, float* s) {
  const bool bf16 = p.dtype == llada::DType::kBFloat16;
  const uint16_t* q = static_cast<const uint16_t*>(p.q_ptr) + b * p.q_b_stride + h * p.q_h_stride;
  uint16_t* o = static_cast<uint16_t*>(p.o_ptr) + b * p.o_b_stride + h * p.o_h_stride;
  constexpr int R = 4;     // query rows per pass: each K/V element loaded once serves R rows
  constexpr int kNB = 256; // keys per block of S (R x kNB floats stay in L1)
  for (int i = i0; i < i1; i += R) {
    const int r_n = std::min(R, i1 - i);
    alignas(32) float qf[R][kD], of[R][kD];
    for (int r = 0; r < R; ++r) {
      if (r < r_n) to_f32(q + (int64_t)(i + r) * p.q_l_stride, qf[r], kD, bf16);
      else std::fill(qf[r], qf[r] + kD, 0.f);
      for (int d = 0; d < kD; ++d) qf[r][d] *= p.scale;
      std::fill(of[r], of[r] + kD, 0.f);
    }
    for (int j0 = 0; j0 < n; j0 += kNB) {
      const int nb = std::min(kNB, n - j0);
      float* s0 = s + j0; float* s1 = s + n + j0; float* s2 = s + 2 * n + j0; float* s3 = s + 3 * n + j0;
      for (int j = 0; j < nb; ++j) s0[j] = s1[j] = s2[j] = s3[j] = 0.f;
      for (int d = 0; d < kD; ++d) {
        const float* kt = Kt + (int64_t)d * n + j0;
        const float c0 = qf[0][d], c1 = qf[1][d], c2 = qf[2][d], c3 = qf[3][d];
#pragma omp simd
        for (int j = 0; j < nb; ++j) {
          s0[j] += c0 * kt[j]; s1[j] += c1 * kt[j]; s2[j] += c2 * kt[j]; s3[j] += c3 * kt[j];
        }
      }
    }
    float l[R];
    for (int r = 0; r < R; ++r) {
      float* sr = s + (int64_t)r * n;
      float m = -INFINITY, sum = 0.f;
      for (int j = 0; j < n; ++j) m = std::max(m, sr[j]);
      for (int j = 0; j < n; ++j) { sr[j] = std::exp(sr[j] - m); sum += sr[j]; }
      l[r] = sum;
    }
    for (int j = 0; j < n; ++j) {
      const float* v = V + (int64_t)j * kD;
      const float p0 = s[j], p1 = s[n + j], p2 = s[2 * n + j], p3 = s[3 * n + j];
#pragma omp simd
      for (int d = 0; d < kD; ++d) {
        of[0][d] += p0 * v[d]; of[1][d] += p1 * v[d]; of[2][d] += p2 * v[d]; of[3][d] += p3 * v[d];
      }
    }
    for (int r = 0; r < r_n; ++r)
      for (int d = 0; d < kD; ++d) o[(int64_t)(i + r) * p.o_l_stride + d] = from_f32(of[r][d] / l[r], bf16);
  }
}

template <int kD>
void attention_cpu(const AttentionParams& p) {
  const int group = p.Hq / p.Hkv;
  // tasks: (b, kv head, chunk of query rows); each converts its K/V rows to fp32 once for the group's heads
  const int chunks = std::max(1, std::min((p.Lq + 31) / 32, (2 * omp_get_max_threads() + p.B * p.Hkv - 1) / (p.B * p.Hkv)));
  const int rows_per = (p.Lq + chunks - 1) / chunks;
#pragma omp parallel
  {
    std::vector<float> K, V, s;
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int b = 0; b < p.B; ++b)
      for (int hk = 0; hk < p.Hkv; ++hk)
        for (int c = 0; c < chunks; ++c) {
          const int ks = p.key_start_ptr ? std::max(0, p.key_start_ptr[b]) : 0;
          const int ke = p.key_end_ptr ? std::min(p.Lk, p.key_end_ptr[b]) : p.Lk;
          const int n = std::max(0, ke - ks);
          const int i0 = c * rows_per, i1 = std::min(p.Lq, i0 + rows_per);
          if (i0 >= i1) continue;
          const bool bf16 = p.dtype == llada::DType::kBFloat16;
          K.resize((size_t)n * kD); V.resize((size_t)n * kD); s.resize((size_t)4 * n);
          const uint16_t* k = static_cast<const uint16_t*>(p.k_ptr) + b * p.k_b_stride + hk * p.k_h_stride;
          const uint16_t* v = static_cast<const uint16_t*>(p.v_ptr) + b * p.v_b_stride + hk * p.v_h_stride;
          alignas(32) float row[kD];
          for (int j = 0; j < n; ++j) {
            to_f32(k + (int64_t)(ks + j) * p.k_l_stride, row, kD, bf16);
            for (int d = 0; d < kD; ++d) K[(size_t)d * n + j] = row[d];  // transposed: Kt [kD][n]
            to_f32(v + (int64_t)(ks + j) * p.v_l_stride, V.data() + (size_t)j * kD, kD, bf16);
          }
          for (int h = hk * group; h < (hk + 1) * group; ++h) {
            if (n == 0) {
              uint16_t* o = static_cast<uint16_t*>(p.o_ptr) + b * p.o_b_stride + h * p.o_h_stride;
              for (int i = i0; i < i1; ++i) std::fill(o + (int64_t)i * p.o_l_stride, o + (int64_t)i * p.o_l_stride + kD, 0);
            } else {
              rows_task<kD>(p, b, h, i0, i1, K.data(), V.data(), n, s.data());
            }
          }
        }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) { std::fprintf(stderr, "usage: %s B Lq Lk Hq Hkv D\n", argv[0]); return 2; }
  const int B = std::atoi(argv[1]), Lq = std::atoi(argv[2]), Lk = std::atoi(argv[3]), Hq = std::atoi(argv[4]),
            Hkv = std::atoi(argv[5]), D = std::atoi(argv[6]);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<uint16_t> q((size_t)B * Lq * Hq * D), o(q.size()), k((size_t)B * Lk * Hkv * D), v(k.size());
  for (auto& x : q) x = from_f32(nd(rng), true);
  for (auto& x : k) x = from_f32(nd(rng), true);
  for (auto& x : v) x = from_f32(nd(rng), true);
  AttentionParams p{};
  p.o_ptr = o.data(); p.q_ptr = q.data(); p.k_ptr = k.data(); p.v_ptr = v.data();
  p.o_b_stride = p.q_b_stride = (int64_t)Lq * Hq * D; p.o_l_stride = p.q_l_stride = (int64_t)Hq * D;
  p.o_h_stride = p.q_h_stride = D;
  p.k_b_stride = p.v_b_stride = (int64_t)Lk * Hkv * D; p.k_l_stride = p.v_l_stride = (int64_t)Hkv * D;
  p.k_h_stride = p.v_h_stride = D;
  p.B = B; p.Lq = Lq; p.Lk = Lk; p.Hq = Hq; p.Hkv = Hkv; p.D = D; p.scale = 1.f / std::sqrt((float)D);
  p.dtype = llada::DType::kBFloat16;
  auto run = [&] { if (D == 128) attention_cpu<128>(p); else attention_cpu<64>(p); };
  run();
  std::vector<double> ms, cpu_ms;
  auto cpu_now = [] { timespec t; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t); return t.tv_sec * 1e3 + t.tv_nsec * 1e-6; };
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_now();
    run();
    cpu_ms.push_back(cpu_now() - c0);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::sort(cpu_ms.begin(), cpu_ms.end());
  // check query row 0 of head 0, batch 0 against fp64
  auto f = [](uint16_t x) { uint32_t u = uint32_t(x) << 16; float r; std::memcpy(&r, &u, 4); return (double)r; };
  std::vector<double> w(Lk);
  double mx = -1e300, l = 0, err = 0;
  for (int j = 0; j < Lk; ++j) {
    double s = 0;
    for (int d = 0; d < D; ++d) s += f(q[d]) * f(k[(size_t)j * Hkv * D + d]);
    w[j] = s * p.scale; mx = std::max(mx, w[j]);
  }
  for (double& x : w) { x = std::exp(x - mx); l += x; }
  for (int d = 0; d < D; ++d) {
    double acc = 0;
    for (int j = 0; j < Lk; ++j) acc += w[j] * f(v[(size_t)j * Hkv * D + d]);
    err = std::max(err, std::abs(acc / l - f(o[d])));
  }
  const double tflops = 4.0 * B * Hq * Lq * Lk * D / (ms[2] * 1e-3) / 1e12;
  std::printf("cpp attention B=%d Lq=%d Lk=%d Hq=%d Hkv=%d D=%d: %.3f ms wall, %.3f ms cpu (%.4f TFLOP/s, %d threads), "
              "row-0 max err %.2g\n", B, Lq, Lk, Hq, Hkv, D, ms[2], cpu_ms[2], tflops, omp_get_max_threads(), err);
  return 0;
}
