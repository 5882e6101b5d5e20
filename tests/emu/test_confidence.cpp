// confidence_kernel under the SIMT emulator against an fp64 reference written here: odd V, unaligned rows, -inf,
// ties, per-row settings (noise, special-id masks, random confidence), and two vocabulary shards merged back into the
// whole; then the CPU kernel's row loop in every instruction-set copy this machine can run (the op itself only ever
// runs the widest one). Small enough for -fsanitize=thread / address. Exit status 0 = pass.
#include "confidence.cuh"  // first: pulls in emu/simt.h through ptx.cuh
#include "cpu/confidence.cpp"

#include <cstdio>
#include <random>
#include <string>
#include <vector>

using namespace llada;

namespace {

template <class T> T from_f(float x);
template <> float from_f(float x) { return x; }
template <> __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <> __half from_f(float x) { return __float2half(x); }
template <class T> float to_f(T x) { return conf_detail::to_float(x); }

// Per-row settings of a case (cycled over the rows b) and the special ids.
struct Opt {
  std::vector<float> temperature;
  std::vector<bool> random;
  std::vector<int32_t> suppress, zero_conf;
  std::vector<int64_t> special;
};

struct Rows {  // the per-row arrays the kernel reads
  std::vector<float> temperature;
  std::vector<int64_t> seed, offset, position;
  std::vector<unsigned char> random;
  std::vector<int32_t> suppress, zero_conf;
};

Rows make_rows(int B, const Opt& o) {
  Rows r;
  for (int b = 0; b < B; ++b) {
    r.temperature.push_back(o.temperature[b % o.temperature.size()]);
    r.seed.push_back(0x123456789ll + b);
    r.offset.push_back(77 + 1000 * b);
    r.position.push_back(b == 1 ? 0xFFFFFFFEll : 5 * b);  // row 1: position + n wraps the 32-bit counter word
    r.random.push_back(o.random[b % o.random.size()]);
    r.suppress.push_back(o.suppress[b % o.suppress.size()]);
    r.zero_conf.push_back(o.zero_conf[b % o.zero_conf.size()]);
  }
  return r;
}

bool has_bit(const std::vector<int64_t>& ids, int32_t mask, int v) {
  for (size_t i = 0; i < ids.size(); ++i)
    if (ids[i] == v && ((mask >> i) & 1)) return true;
  return false;
}

// fp64 reference of one row: the same rules as reference.confidence
void ref_row(const std::vector<double>& x, const Opt& o, const Rows& rw, int b, int n, int64_t* token, double* prob,
             double* gap) {
  const int V = static_cast<int>(x.size());
  const uint64_t seed = rw.seed[b], offset = rw.offset[b];
  const uint32_t position = static_cast<uint32_t>(rw.position[b] + n);
  auto sup = [&](int v) { return has_bit(o.special, rw.suppress[b], v); };
  auto zero = [&](int v) { return has_bit(o.special, rw.zero_conf[b], v); };
  double best = -INFINITY, second = -INFINITY;
  int64_t best_id = -1;
  for (int v = 0; v < V; ++v) {
    if (sup(v)) continue;
    double key = x[v];
    if (rw.temperature[b] > 0) {
      double u = philox_uniform(seed, offset, position, static_cast<uint32_t>(v));
      key += rw.temperature[b] * -std::log(-std::log(u));
    }
    if (key > best) { second = best; best = key; best_id = v; }
    else if (key > second) second = key;
  }
  *gap = best - second;
  double m = -INFINITY, s = 0;
  for (int v = 0; v < V; ++v) if (!sup(v) && !zero(v)) m = std::max(m, x[v]);
  for (int v = 0; v < V; ++v) if (!sup(v) && !zero(v) && m > -INFINITY) s += std::exp(x[v] - m);
  if (best_id < 0) {
    int64_t id = 0;
    while (sup(static_cast<int>(id))) ++id;
    *token = id; *prob = 0; *gap = INFINITY;
  } else {
    *token = best_id;
    *prob = zero(static_cast<int>(best_id)) ? 0.0 : std::exp(x[best_id] - m) / s;
  }
  if (rw.random[b]) *prob = philox_uniform(seed, offset, position, kRandomConfidenceColumn);
}

// Outputs of one launch: the full op's (token, prob), or a shard's state.
struct Out {
  std::vector<int64_t> token;
  std::vector<double> prob, key, num, denom, random_prob;
  std::vector<int32_t> ref;
  explicit Out(int rows, bool partial)
      : token(rows, 12345), prob(partial ? 0 : rows, 12345.0), key(partial ? rows : 0), num(partial ? rows : 0),
        denom(partial ? rows : 0), random_prob(partial ? rows : 0), ref(partial ? rows : 0) {}
};

template <class T>
void launch(const T* logits, int64_t b_stride, int64_t n_stride, const bool* masked, const Rows& rw, const Opt& o,
            int B, int N, int V, int64_t vocab_offset, int64_t full_vocab, Out& out) {
  ConfidenceParams p{};
  const bool partial = out.prob.empty();
  p.token_ptr = out.token.data();
  p.prob_ptr = partial ? nullptr : out.prob.data();
  if (partial) {
    p.key_ptr = out.key.data(); p.num_ptr = out.num.data(); p.ref_ptr = out.ref.data();
    p.denom_ptr = out.denom.data(); p.random_prob_ptr = out.random_prob.data();
  }
  p.logits_ptr = logits; p.logits_b_stride = b_stride; p.logits_n_stride = n_stride;
  p.masked_ptr = masked;
  p.temperature_ptr = rw.temperature.data(); p.seed_ptr = rw.seed.data(); p.offset_ptr = rw.offset.data();
  p.position_ptr = rw.position.data(); p.random_confidence_ptr = reinterpret_cast<const bool*>(rw.random.data());
  p.suppress_mask_ptr = rw.suppress.data(); p.zero_conf_mask_ptr = rw.zero_conf.data();
  p.B = B; p.N = N; p.V = V;
  p.dtype = std::is_same<T, float>::value    ? DType::kFloat32
            : std::is_same<T, __half>::value ? DType::kFloat16
                                             : DType::kBFloat16;
  p.vocab_offset = vocab_offset; p.full_vocab = full_vocab;
  p.n_special = static_cast<int>(o.special.size());
  for (size_t i = 0; i < o.special.size(); ++i) p.special_ids[i] = o.special[i];
  dispatch_confidence(p, [&](auto kernel, int threads) {
    emu::launch(kernel, confidence_grid(p), dim3(threads), 0, p);
  });
}

// The merge of two shard states into (token, prob), as ops.confidence_merge.
void merge2(const Out& a, const Out& b, int r, int64_t* token, double* prob) {
  if (a.token[r] < 0) { *token = -1; *prob = -INFINITY; return; }
  const int ref = std::max(a.ref[r], b.ref[r]);
  const double sa = conf_detail::pow2(a.ref[r] - ref), sb = conf_detail::pow2(b.ref[r] - ref);
  const bool take_b = b.key[r] > a.key[r] || (b.key[r] == a.key[r] && b.token[r] < a.token[r]);
  *token = take_b ? b.token[r] : a.token[r];
  const double num = take_b ? b.num[r] * sb : a.num[r] * sa;
  *prob = num > 0 ? num / (a.denom[r] * sa + b.denom[r] * sb) : 0.0;
  if (a.random_prob[r] >= 0) *prob = a.random_prob[r];
}

// Returns the number of failures; logits live at an odd element offset inside a padded buffer.
template <class T>
int run_case(int B, int N, int V, const Opt& o, uint32_t rng_seed) {
  std::mt19937 rng(rng_seed);
  std::normal_distribution<float> nd(0.f, 3.f);
  std::uniform_real_distribution<float> ud;
  const int64_t n_stride = V + 3, b_stride = (N + 1) * n_stride, pad = 1;
  std::vector<T> buf(pad + B * b_stride + 8);
  std::vector<std::vector<double>> rows(B * N, std::vector<double>(V));
  std::vector<unsigned char> masked_bytes(B * N);
  for (int r = 0; r < B * N; ++r) {
    const int b = r / N, n = r % N;
    for (int v = 0; v < V; ++v) {
      float f = ud(rng) < 0.03f ? -INFINITY : nd(rng);
      if (r == B * N - 1 && B * N > 2) f = -INFINITY;         // all -inf row
      if (r == 0 && V > 10 && (v == V / 2 || v == V - 1)) f = 30.f;  // exact tie
      T t = from_f<T>(f);
      buf[pad + b * b_stride + n * n_stride + v] = t;
      rows[r][v] = to_f(t);
    }
    masked_bytes[r] = (r == 0 || r == B * N - 1 || ud(rng) < 0.7f) ? 1 : 0;
  }
  if (!o.special.empty()) {  // the last special id wins row 0: prob 0 where it is a zero-confidence id of row 0
    rows[0][o.special.back()] = 40.0;
    buf[pad + o.special.back()] = from_f<T>(40.f);
  }
  const bool* masked = reinterpret_cast<const bool*>(masked_bytes.data());
  const Rows rw = make_rows(B, o);
  const T* logits = buf.data() + pad;
  Out full(B * N, false);
  launch(logits, b_stride, n_stride, masked, rw, o, B, N, V, 0, V, full);
  // two uneven shards [0, cut) and [cut, V), merged: the same tokens, the same prob to float64 rounding
  const int cut = V / 3 + 1;
  Out lo(B * N, true), hi(B * N, true);
  launch(logits, b_stride, n_stride, masked, rw, o, B, N, cut, 0, V, lo);
  launch(logits + cut, b_stride, n_stride, masked, rw, o, B, N, V - cut, cut, V, hi);
  int fails = 0;
  double max_rel = 0, max_shard = 0;
  for (int r = 0; r < B * N; ++r) {
    int64_t mt;
    double mp;
    merge2(lo, hi, r, &mt, &mp);
    if (mt != full.token[r] || !(std::abs(mp - full.prob[r]) <= 1e-12 || mp == full.prob[r])) {
      ++fails;
      std::printf("  row %d: merged shards %lld %.17g, whole %lld %.17g\n", r, (long long)mt, mp,
                  (long long)full.token[r], full.prob[r]);
    }
    if (masked[r]) max_shard = std::max(max_shard, std::abs(mp - full.prob[r]));
    if (!masked[r]) {
      if (full.token[r] != -1 || !(full.prob[r] == -INFINITY)) ++fails;
      continue;
    }
    const int b = r / N, n = r % N;
    int64_t rt; double rp, gap;
    ref_row(rows[r], o, rw, b, n, &rt, &rp, &gap);
    // without noise the keys are exact, so ties too must go to the lowest id; with noise, fp32 vs fp64 keys
    const double tol = rw.temperature[b] > 0 ? 1e-3 : -1.0;
    if (full.token[r] != rt && gap > tol) {
      ++fails;
      std::printf("  row %d: token %lld, reference %lld (gap %g)\n", r, (long long)full.token[r], (long long)rt, gap);
    }
    if (full.token[r] == rt) {
      const double err = std::abs(full.prob[r] - rp), scale = rp * (1 - rp);
      if (rw.random[b] ? err != 0 : err > 1e-6 * scale + 1e-13) {
        ++fails;
        std::printf("  row %d: prob %.17g, reference %.17g\n", r, full.prob[r], rp);
      }
      if (scale > 0) max_rel = std::max(max_rel, err / scale);
    }
  }
  std::printf("B=%d N=%d V=%d specials=%zu dtype=%d: max |prob - p64| / (p (1 - p)) %.3g, shards vs whole %.3g, "
              "%d failures\n", B, N, V, o.special.size(), static_cast<int>(std::is_same<T, float>::value ? 0
              : std::is_same<T, __half>::value ? 1 : 2), max_rel, max_shard, fails);
  return fails;
}

// The CPU row functions (generic, AVX2, AVX-512) on the rows of a case, against ref_row.
int run_cpu_case(int N, int V, const Opt& o, uint32_t rng_seed) {
  std::mt19937 rng(rng_seed);
  std::normal_distribution<float> nd(0.f, 4.f);
  std::uniform_real_distribution<float> ud;
  const int B = 3;
  std::vector<float> logits(static_cast<size_t>(B) * N * V);
  for (float& x : logits) x = ud(rng) < 0.02f ? -INFINITY : nd(rng) + 20.f;  // an offset: |x| matters for accuracy
  std::vector<unsigned char> masked(B * N, 1);
  const Rows rw = make_rows(B, o);
  ConfidenceParams p{};
  p.logits_ptr = logits.data(); p.logits_b_stride = static_cast<int64_t>(N) * V; p.logits_n_stride = V;
  p.masked_ptr = reinterpret_cast<const bool*>(masked.data());
  p.temperature_ptr = rw.temperature.data(); p.seed_ptr = rw.seed.data(); p.offset_ptr = rw.offset.data();
  p.position_ptr = rw.position.data(); p.random_confidence_ptr = reinterpret_cast<const bool*>(rw.random.data());
  p.suppress_mask_ptr = rw.suppress.data(); p.zero_conf_mask_ptr = rw.zero_conf.data();
  p.B = B; p.N = N; p.V = V; p.dtype = DType::kFloat32; p.vocab_offset = 0; p.full_vocab = V;
  p.n_special = static_cast<int>(o.special.size());
  for (size_t i = 0; i < o.special.size(); ++i) p.special_ids[i] = o.special[i];
  struct Isa { const char* name; RowFn fn; bool ok; };
  std::vector<Isa> isas = {{"generic", row_generic, true}};
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  isas.push_back({"avx2", row_avx2, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") != 0});
  isas.push_back({"avx512", row_avx512, __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") != 0});
#endif
  int fails = 0;
  for (const Isa& isa : isas) {
    if (!isa.ok) { std::printf("  CPU %s: not supported here, skipped\n", isa.name); continue; }
    double max_rel = 0;
    for (int r = 0; r < B * N; ++r) {
      const int b = r / N, n = r % N;
      const float* x = logits.data() + static_cast<size_t>(r) * V;
      std::vector<double> row(x, x + V);
      int64_t rt; double rp, gap;
      ref_row(row, o, rw, b, n, &rt, &rp, &gap);
      const RowResult res = isa.fn(p, row_of(p, b, n), x);
      const double prob = rw.random[b] ? rp : (res.num > 0 ? res.num / res.denom : 0.0);
      const double tol = rw.temperature[b] > 0 ? 1e-3 : -1.0;
      if (res.token != rt && gap > tol) {
        ++fails;
        std::printf("  CPU %s row %d: token %lld, reference %lld\n", isa.name, r, (long long)res.token, (long long)rt);
      }
      if (res.token != rt) continue;
      const double err = std::abs(prob - rp), scale = rp * (1 - rp);
      if (err > 1e-6 * scale + 1e-13) {
        ++fails;
        std::printf("  CPU %s row %d: prob %.17g, reference %.17g\n", isa.name, r, prob, rp);
      }
      if (scale > 0) max_rel = std::max(max_rel, err / scale);
    }
    std::printf("CPU %s N=%d V=%d: max |prob - p64| / (p (1 - p)) %.3g\n", isa.name, N, V, max_rel);
  }
  return fails;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  int fails = 0;
  fails += run_case<float>(2, 3, 111, {{0.f}, {false}, {0}, {0}, {}}, 1);
  fails += run_case<__nv_bfloat16>(3, 4, 333, {{0.8f, 0.f}, {false}, {0b11, 0}, {0, 0b10}, {1, 7}}, 2);
  fails += run_case<__half>(3, 2, 97, {{0.f}, {false, true}, {0b0011}, {0b1100, 0b0100}, {0, 3, 5, 9}}, 3);
  fails += run_case<float>(2, 3, 50, {{0.f, 1.2f}, {true, false}, {0}, {0b1}, {2}}, 4);
  if (!quick) {
    fails += run_case<__nv_bfloat16>(2, 2, 20000, {{0.f}, {false}, {0b01}, {0b10}, {19999, 12345}}, 5);
    fails += run_case<float>(2, 2, 17000, {{1.5f, 0.f}, {false}, {0}, {0b1}, {3}}, 6);
  }
  fails += run_cpu_case(3, 5003, {{0.f, 0.7f}, {false}, {0b01}, {0b10}, {17, 4000}}, 7);
  if (!quick) fails += run_cpu_case(2, 40000, {{0.f}, {false}, {0}, {0}, {}}, 8);
  std::printf(fails ? "FAILED\n" : "all confidence checks passed\n");
  return fails ? 1 : 0;
}
