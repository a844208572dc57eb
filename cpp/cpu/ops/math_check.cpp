// Array versions of the kernels' vector exp (vexp_neg: defined for x <= 0,
// as the kernels use it), tanh and log1p on [0, 1] (vlog1p_unit), so tests can measure their error against
// the C library on every instruction-set build.
#include "../kernels.h"
#include "../rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

template <class C>
static void map_math(const C* in, C* out, int64_t n, int fn) {
  row_map(in, out, 0, n, [fn](V<C> x, int64_t, int64_t) { return fn == 0 ? vexp_neg(x) : fn == 1 ? vtanh<C>(x) : vlog1p_unit<C>(x); });
}

void kernel(const MathArgs& a) {
  if (a.dtype == DType::F64)
    map_math((const double*)a.in, (double*)a.out, a.n, a.fn);
  else
    map_math((const float*)a.in, (float*)a.out, a.n, a.fn);
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
