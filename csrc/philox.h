// Philox4x32-10 counter-based RNG (Salmon et al., SC'11), identical on CPU, CUDA and in reference.py.
// Stream layout: key = seed, counter = (column, position, offset_lo, offset_hi): a request's draws depend only on its
// seed, the answer position (low 32 bits) and its own step (offset), never on its batch row.
#pragma once
#include "common.h"

namespace llada {

struct PhiloxOut { uint32_t x, y, z, w; };

LLADA_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

LLADA_HD PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kW0; k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

// Uniform in the open interval (0, 1): the top 23 bits of the first word, centred. 23 and not 24 bits so that k + 0.5
// is exact in fp32 and u never rounds to 1 (log(u) = 0 would make the Gumbel noise infinite).
LLADA_HD float philox_uniform(uint64_t seed, uint64_t offset, uint32_t position, uint32_t col) {
  PhiloxOut r = philox4x32_10(col, position, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                              static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return (static_cast<float>(r.x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// Column of the random-remasking confidence draw of a position (never a vocabulary id, so the same on every rank of a
// vocabulary-sharded run).
constexpr uint32_t kRandomConfidenceColumn = 0xFFFFFFFFu;

}  // namespace llada
