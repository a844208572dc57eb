// Cross-entropy forward, fused forward + gradient, and backward from a saved
// LSE, for class-id or probability targets, with class weights, label
// smoothing, z-loss, softcap and logit scale (the formulas are in
// lmxent/contract.h).
//
// Memory traffic: forward reads each logit once. The fused gradient reads
// the row a second time from cache (L2 for rows up to ~256K float32) and
// writes the gradient, possibly over the logits: one DRAM read and one DRAM
// write per element. Backward from a saved LSE skips pass 1 for class ids.
#include "rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

template <class C>
struct RowK {
  bool skip;   // ignored row: zero gradient
  C lse, A, rs, hard_w, x_t;
  int64_t t;
};

template <class T, bool SC, class S>
struct CEOp {
  typedef typename Compute<T>::type C;
  const CEArgs& a;
  Tr<C, SC> tr;
  S spread;
  C hard_k;   // (1 - eps) for class ids, 0 for probability targets
  C t_sum_k;  // sum_j t_j for class ids (the same on every row)

  bool prob() const { return a.probs.data != nullptr; }
  const T* x(int64_t r) const { return (const T*)a.logits.data + r * a.logits.stride; }
  bool ignored(int64_t r) const { return !prob() && a.targets[r] == a.ignore_index; }

  Partial partial(int64_t r, int64_t c0, int64_t c1) const {
    const bool need_lse = !a.lse_given && (!ignored(r) || a.lse);
    const bool need_sums = !ignored(r) && (!a.lse_given || prob());
    if (!need_lse && !need_sums) return partial_empty();
    return row_partial(x(r), c0, c1, tr, spread.row(r));
  }

  RowK<C> finish(int64_t r, const Partial& p) const {
    RowK<C> k{};
    k.lse = a.lse_given ? ((const C*)a.lse)[r] : (C)lse_final(p.st, dlog);
    if (!a.lse_given && a.lse) ((C*)a.lse)[r] = k.lse;
    k.skip = ignored(r);
    if (k.skip) {
      if (a.loss) ((C*)a.loss)[r] = 0;
      return k;
    }
    const C* w = (const C*)a.class_weight;
    k.t = prob() ? -1 : a.targets[r];
    k.hard_w = prob() ? (C)0 : hard_k * (w ? w[k.t] : (C)1);
    k.x_t = prob() ? (C)0 : to_compute(x(r)[k.t]);
    const C t_sum = prob() ? (C)p.t_sum : t_sum_k;
    const C zl = (C)a.z_loss;
    if (a.loss) {
      const C z_t = prob() ? k.lse : tr.one(k.x_t);
      ((C*)a.loss)[r] = ce_loss(k.lse, z_t, k.hard_w, t_sum, (C)p.tz_sum, zl);
    }
    k.A = ce_grad_coef(k.lse, k.hard_w, t_sum, zl);
    k.rs = (C)a.grad_scale * (a.grad_rows ? ((const C*)a.grad_rows)[r] : (C)1);
    return k;
  }

  void pass2(int64_t r, const RowK<C>& k, int64_t c0, int64_t c1) const {
    if (!a.grad.data) return;
    T* g = (T*)a.grad.data + r * a.grad.stride;
    if (k.skip) {
      row_map(x(r), g, c0, c1, [](V<C>, int64_t, int64_t) { return V<C>{}; });
      return;
    }
    const S sp = spread.row(r);
    row_map(x(r), g, c0, c1, [&](V<C> xv, int64_t j, int64_t n) {
      V<C> z = tr(xv);
      V<C> t = n == Vec<C>::W ? sp.vec(j) : sp.part(j, n);
      return (k.A * vexp(z - k.lse) - t) * tr.slope(z) * k.rs;
    });
  }

  // The target element, from the logit saved before pass 2 (which may have
  // overwritten it), rounded once.
  void after(int64_t r, const RowK<C>& k) const {
    if (!a.grad.data || k.skip || prob()) return;
    const C z = tr.one(k.x_t);
    const C p = sexp(z - k.lse);
    const C g = (k.A * p - spread.at(k.t) - k.hard_w) * tr.slope(splat<C>(z))[0] * k.rs;
    from_compute((T*)a.grad.data + r * a.grad.stride + k.t, g);
  }
};

template <class T, bool SC, class S>
static void run_ce(const CEArgs& a, const S& s, typename Compute<T>::type t_sum_k) {
  typedef typename Compute<T>::type C;
  const C hard_k = a.probs.data ? (C)0 : (C)(1.0 - a.smoothing);
  run_rows(a.logits.rows, a.logits.cols, CEOp<T, SC, S>{a, Tr<C, SC>(a.tr), s, hard_k, t_sum_k});
}

template <class T, bool SC>
static void ce_by_spread(const CEArgs& a) {
  typedef typename Compute<T>::type C;
  const int64_t V = a.logits.cols;
  const CESpread cs = ce_spread(a.probs.data != nullptr, a.smoothing, V);
  const C* w = (const C*)a.class_weight;
  if (a.probs.data) {
    const C* q = (const C*)a.probs.data;
    if (w)
      run_ce<T, SC>(a, ProbSpread<C, true>{(C)cs.q_scale, (C)cs.uniform, q, a.probs.stride, w}, 0);
    else
      run_ce<T, SC>(a, ProbSpread<C, false>{(C)cs.q_scale, (C)cs.uniform, q, a.probs.stride, w}, 0);
  } else if (a.smoothing == 0.0) {
    run_ce<T, SC>(a, NoSpread<C>(), 0);
  } else if (w) {
    double wsum = 0;
    for (int64_t j = 0; j < V; ++j) wsum += w[j];
    run_ce<T, SC>(a, WeightedSpread<C>{(C)cs.uniform, w}, (C)(cs.uniform * wsum));
  } else {
    run_ce<T, SC>(a, UniformSpread<C>{(C)cs.uniform}, (C)a.smoothing);
  }
}

void cross_entropy(const CEArgs& a) {
  with_dtype(a.logits.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    if (a.tr.softcap > 0)
      ce_by_spread<T, true>(a);
    else
      ce_by_spread<T, false>(a);
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
