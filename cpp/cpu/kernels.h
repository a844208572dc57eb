// The CPU kernels as the bindings see them. Each file in cpp/cpu/ops/ is
// compiled once per instruction set into its own namespace (isa_base,
// isa_avx2, isa_avx512) and defines kernel(const Args&) there for its ops
// (declared by LMXENT_OP in lmxent/contract.h); run(args) calls the one of
// the instruction set chosen at load time (dispatch.cpp). A new op needs no
// line here.
#pragma once
#include "lmxent/contract.h"

namespace lmxent {

// Test hook for the vector math (ops/math_check.cpp): out[i] = f(in[i]), f =
// exp (fn 0), tanh (fn 1) or log1p on [0, 1] (fn 2), in the compute type of
// dtype (F32 or F64).
struct MathArgs {
  const void* in;
  void* out;
  int64_t n;
  DType dtype;
  int fn;
};
LMXENT_CPU_OP(MathArgs)

namespace cpu {

enum class Level : int { Base, Avx2, Avx512 };
struct Isa {
  const char* isa;  // "base", "avx2", "avx512"
  Level level;
};

// The instruction set in use, and the names of the ones this build and processor can run.
const Isa& active();
// Select by name ("base", "avx2", "avx512"); false if not available here.
bool select(const char* name);
int available(const char** names, int most);

// Runs the op's kernel of the active instruction set.
template <class Args>
inline void run(const Args& a) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (active().level) {
    case Level::Avx512: return isa_avx512::kernel(a);
    case Level::Avx2: return isa_avx2::kernel(a);
    case Level::Base: break;
  }
#endif
  isa_base::kernel(a);
}

}  // namespace cpu
}  // namespace lmxent
