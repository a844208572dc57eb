// Token statistics in one read of the logits: the target's log-probability,
// the LSE, the entropy, the largest probability and the target's rank (the
// formulas are in lmxent/contract.h, TokenStatsArgs).
//
// Memory traffic: one read of each logit. The entropy sum rides in the same
// exp loop as the LSE (row_partial into a StatsPart); the rank count re-reads
// each chunk from L1. No pass 2.
#include "../rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

template <class T>
struct TokenStatsOp {
  typedef typename Compute<T>::type C;
  const TokenStatsArgs& a;
  Tr<C, false> tr;

  const T* x(int64_t r) const { return (const T*)a.logits.data + r * a.logits.stride; }
  int64_t target(int64_t r) const {
    const int64_t t = a.targets[r];
    return t == a.ignore_index ? -1 : t;
  }
  bool keeps() const { return false; }

  typedef StatsPart Part;
  Part partial(int64_t r, int64_t c0, int64_t c1, const Keep<C>*) const {
    const int64_t t = target(r);
    const RankOf<C> rank{t >= 0 ? to_compute(x(r)[t]) : (C)0, t};
    return row_partial<Part>(x(r), c0, c1, tr, NoSpread<C>(), nullptr, &rank);
  }
  Part merge(const Part& p, const Part& q) const { return cpu::merge(p, q); }

  int finish(int64_t r, const Part& p) const {
    const int64_t t = target(r);
    token_stats_row<C>(a, r, p.st, p.h, p.mu, tr.kz, t, t < 0 ? 0.0 : (double)to_compute(x(r)[t]), p.above);
    return 0;
  }
  void pass2(int64_t, int, int64_t, int64_t, const Keep<C>*) const {}
  void after(int64_t, int) const {}
};

void kernel(const TokenStatsArgs& a) {
  with_dtype(a.logits.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    typedef typename Compute<T>::type C;
    run_rows(a.logits.rows, a.logits.cols, TokenStatsOp<T>{a, Tr<C, false>(a.tr)});
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
