// Chooses the instruction set at load time: AVX-512 (F, BW, VL, DQ) where the
// processor and OS support it, else AVX2+FMA+F16C, else the baseline build.
// LMXENT_ISA=base|avx2|avx512 in the environment caps the choice (testing,
// or a processor whose wide vectors clock down).
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

namespace lmxent {
namespace cpu {
namespace {

struct Entry {
  Isa k;
  bool (*supported)();
};

#if defined(__x86_64__) || defined(_M_X64)
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
bool always() { return true; }
const Entry kEntries[] = {
    {{"avx512", Level::Avx512}, has_avx512},
    {{"avx2", Level::Avx2}, has_avx2},
    {{"base", Level::Base}, always},
};
#else
bool always() { return true; }
const Entry kEntries[] = {{{"base", Level::Base}, always}};
#endif
constexpr int kCount = sizeof(kEntries) / sizeof(kEntries[0]);

const Isa* pick(const char* cap) {
  bool reached = cap == nullptr || *cap == 0;
  for (const Entry& e : kEntries) {
    if (!reached && strcmp(e.k.isa, cap) == 0) reached = true;
    if (reached && e.supported()) return &e.k;
  }
  return &kEntries[kCount - 1].k;
}

const Isa* g_active = pick(getenv("LMXENT_ISA"));

}  // namespace

const Isa& active() { return *g_active; }

bool select(const char* name) {
  for (const Entry& e : kEntries)
    if (strcmp(e.k.isa, name) == 0 && e.supported()) {
      g_active = &e.k;
      return true;
    }
  return false;
}

int available(const char** names, int most) {
  int n = 0;
  for (const Entry& e : kEntries)
    if (e.supported() && n < most) names[n++] = e.k.isa;
  return n;
}

}  // namespace cpu
}  // namespace lmxent
