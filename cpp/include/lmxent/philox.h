// Philox-4x32-10 (Salmon et al., SC'11; Random123), the counter-based
// generator of lmxent's sampling, for the CPU and CUDA kernels alike: the
// bit-exact port of python/lmxent/_philox.py (its docstring has the layout).
// No state: row r's uniform depends only on (seed_r, offset_r).
#pragma once
#include "contract.h"

namespace lmxent {
inline namespace LMXENT_ISA {

// The uniform in [0, 1) of (seed, offset): 53 high bits of the first two words
// of philox4x32_10(counter = (offset lo, offset hi, 0, 0), key = (seed lo, seed hi)).
LMXENT_HD double philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = (uint32_t)offset, c1 = (uint32_t)(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int i = 0; i < 10; ++i) {
    const uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
    const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)p1;
    c3 = (uint32_t)p0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const uint64_t bits = (((uint64_t)c1 << 32) | c0) >> 11;
  return (double)bits * (1.0 / 9007199254740992.0);  // 2**-53, exact
}

}  // namespace LMXENT_ISA
}  // namespace lmxent
