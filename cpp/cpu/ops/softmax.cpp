// logsumexp, softmax and log_softmax over rows, with a temperature.
//
// Memory traffic: pass 1 reads each row once (online LSE over L1 chunks);
// pass 2, only when an output is asked for, reads the row again (from L2 for
// rows up to ~256K float32 values) and writes the output: one read and one
// write of the tensor from DRAM.
#include "../rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

template <class T, bool Log>
struct SoftmaxOp {
  typedef typename Compute<T>::type C;
  const SoftmaxArgs& a;
  Tr<C, false> tr;
  bool stream;

  const T* x(int64_t r) const { return (const T*)a.x.data + r * a.x.stride; }
  bool keeps() const { return a.out.data && !Log; }
  typedef LsePart Part;
  Part partial(int64_t r, int64_t c0, int64_t c1, const Keep<C>* keep) const {
    return row_partial<Part>(x(r), c0, c1, tr, NoSpread<C>(), keep);
  }
  Part merge(const Part& p, const Part& q) const { return cpu::merge(p, q); }
  struct Row {
    double lse;
    RowShift sh;
  };
  Row finish(int64_t r, const Part& p) const {
    const double lse = lse_final(p.st, dlog);
    if (a.lse) ((C*)a.lse)[r] = (C)lse;
    return {lse, RowShift(p.mu, p.st.s, lse, true)};
  }
  void pass2(int64_t r, const Row& k, int64_t c0, int64_t c1, const Keep<C>* keep) const {
    if (!a.out.data) return;
    T* out = (T*)a.out.data + r * a.out.stride;
    if (keep && keep_usable(k.lse)) {  // softmax = e_j * exp(kz (m_c - M) - L)
      keep_factors(*keep, c0, c1, k.sh, tr.kz, 1.0);
      row_emit(out, c0, c1, [&](int64_t j, int64_t) { return load(keep->e + j) * (C)keep->m[j >> kChunkShift]; }, stream);
      return;
    }
    const ShiftV<C> sh(k.sh, tr.kz);
    auto emit = [&](auto wide) {  // the range handling only where a factor needs it
      row_map(x(r), out, c0, c1, [&](V<C> xv, int64_t, int64_t) {
        V<C> z = sh.template sub<decltype(wide)::value>(xv);
        return Log ? z : vexp_neg(z);
      }, stream);
    };
    if (sh.wide())
      emit(std::true_type());
    else
      emit(std::false_type());
  }
  void after(int64_t, const Row&) const {}
};

void kernel(const SoftmaxArgs& a) {
  with_dtype(a.x.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    typedef typename Compute<T>::type C;
    if (a.log)
      run_rows(a.x.rows, a.x.cols, SoftmaxOp<T, true>{a, Tr<C, false>(a.tr), stream_output(a.out, a.x.data)});
    else
      run_rows(a.x.rows, a.x.cols, SoftmaxOp<T, false>{a, Tr<C, false>(a.tr), stream_output(a.out, a.x.data)});
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
