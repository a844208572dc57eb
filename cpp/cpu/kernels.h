// The CPU kernel table. Each kernel source is compiled once per instruction
// set into its own namespace (isa_base, isa_avx2, isa_avx512); dispatch.cpp
// picks one table at load time from what the processor supports.
#pragma once
#include "lmxent/contract.h"

namespace lmxent {
namespace cpu {

struct Kernels {
  const char* isa;
  void (*softmax)(const SoftmaxArgs&);
  void (*cross_entropy)(const CEArgs&);
  void (*token_stats)(const TokenStatsArgs&);
  void (*kl_divergence)(const KLArgs&);
  // Test hooks for the vector math: out[i] = f(in[i]), f = exp (fn 0), tanh
  // (fn 1) or log1p on [0, 1] (fn 2), in the compute type of dtype (F32 or F64).
  void (*math)(const void* in, void* out, int64_t n, DType dtype, int fn);
};

#define LMXENT_DECLARE_ISA(ns)                                            \
  namespace ns {                                                          \
  void softmax(const SoftmaxArgs&);                                       \
  void cross_entropy(const CEArgs&);                                      \
  void token_stats(const TokenStatsArgs&);                                \
  void kl_divergence(const KLArgs&);                                      \
  void math(const void* in, void* out, int64_t n, DType dtype, int fn);  \
  }
LMXENT_DECLARE_ISA(isa_base)
LMXENT_DECLARE_ISA(isa_avx2)
LMXENT_DECLARE_ISA(isa_avx512)
#undef LMXENT_DECLARE_ISA

// The table in use, and the names of the ones this build and processor can run.
const Kernels& active();
// Select by name ("base", "avx2", "avx512"); false if not available here.
bool select(const char* name);
int available(const char** names, int most);

}  // namespace cpu
}  // namespace lmxent
