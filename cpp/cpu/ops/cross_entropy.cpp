// Cross-entropy forward, fused forward + gradient, and backward from a saved
// LSE, for class-id or probability targets, with class weights, label
// smoothing, z-loss, softcap and logit scale (the formulas are in
// lmxent/contract.h).
//
// Memory traffic: forward reads each logit once. The fused gradient reads
// the row a second time from cache (L2 for rows up to ~256K float32) and
// writes the gradient, possibly over the logits: one DRAM read and one DRAM
// write per element. Backward from a saved LSE skips pass 1 for class ids.
#include <limits>

#include "../rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

template <class T, bool SC, class S>
struct CEOp {
  typedef typename Compute<T>::type C;
  const CEArgs& a;
  Tr<C, SC> tr;
  S spread;
  double hard_k;   // (1 - eps) for class ids, 0 for probability targets
  double t_sum_k;  // sum_j t_j for class ids (the same on every row)
  bool stream;     // non-temporal gradient stores

  bool prob() const { return a.probs.data != nullptr; }
  // Pass 2 reuses pass 1's exps unless it has no pass 1 or needs z (softcap).
  bool keeps() const { return a.grad.data && !a.lse_given && !SC; }
  const T* x(int64_t r) const { return (const T*)a.logits.data + r * a.logits.stride; }
  bool ignored(int64_t r) const { return !prob() && a.targets[r] == a.ignore_index; }

  typedef CEPart Part;
  Part partial(int64_t r, int64_t c0, int64_t c1, const Keep<C>* keep) const {
    const bool need_lse = !a.lse_given && (!ignored(r) || a.lse);
    const bool need_sums = !ignored(r) && (!a.lse_given || prob());
    if (!need_lse && !need_sums) return Part();
    return row_partial<Part>(x(r), c0, c1, tr, spread.row(r), keep);
  }
  Part merge(const Part& p, const Part& q) const { return cpu::merge(p, q); }

  // The row's scalars (CERow, lmxent/row_math.h) and its loss and LSE.
  CERow finish(int64_t r, const Part& p) const {
    CERow k{};
    k.lse = a.lse_given ? (double)((const C*)a.lse)[r] : lse_final(p.st, dlog);
    if (!a.lse_given && a.lse) ((C*)a.lse)[r] = (C)k.lse;
    k.sh = RowShift(p.mu, p.st.s, k.lse, !a.lse_given);
    k.state = ignored(r) ? 1 : 0;
    if (k.state) {
      if (a.loss) ((C*)a.loss)[r] = 0;
      return k;
    }
    k.t = prob() ? -1 : a.targets[r];
    k.x_t = k.t < 0 ? 0.0 : (double)to_compute(x(r)[k.t]);
    k.u_t = tr.one_u((C)k.x_t);
    ce_row<C>(a, r, tr.kz, hard_k, SpreadSums{prob() ? p.t_sum : t_sum_k, p.tz_sum, p.tu}, true, k);
    return k;
  }

  void pass2(int64_t r, const CERow& k, int64_t c0, int64_t c1, const Keep<C>* keep) const {
    if (!a.grad.data) return;
    T* g = (T*)a.grad.data + r * a.grad.stride;
    if (k.state) {
      row_emit(g, c0, c1, [](int64_t, int64_t) { return V<C>{}; }, stream);
      return;
    }
    const S sp = spread.row(r);
    // the kept exps, where the factors are plain C values (else 0 * inf)
    const double fa = k.A * tr.s * k.rs, ft = tr.s * k.rs, big = 0x1p-4 * (double)std::numeric_limits<C>::max();
    if (keep && keep_usable(k.lse) && fabs(fa) < big && fabs(ft) < big) {
      // g_j = (A e_j exp(kz (m_c - M) - L) - t_j) * scale * rs, no softcap here
      const C ts = (C)ft;
      keep_factors(*keep, c0, c1, k.sh, tr.kz, fa);
      row_emit(g, c0, c1, [&](int64_t j, int64_t n) {
        V<C> t = n == Vec<C>::W ? sp.vec(j) : sp.part(j, n);
        return load(keep->e + j) * (C)keep->m[j >> kChunkShift] - t * ts;
      }, stream);
      return;
    }
    const ShiftV<C> sh(k.sh, tr.kz);
    const Factor<C> A(k.A * k.rs), rs(k.rs);
    const auto tr = this->tr;  // a local copy: the gradient stores could alias it
    // z - lse <= 0 with our own LSE; a caller's saved one may be smaller than
    // the row's max (then exp may overflow): the exp for any argument.
    // Wide: some factor is outside C's comfortable range (checked per row, not per vector)
    auto emit = [&](auto any_sign, auto wide) {
      constexpr bool Wd = decltype(wide)::value;
      row_map(x(r), g, c0, c1, [&](V<C> xv, int64_t j, int64_t n) {
        V<C> th, u = tr.pre(xv, &th);
        // a caller's LSE: M = 0, z - lse directly (one subtraction less)
        V<C> d = decltype(any_sign)::value && !Wd ? sh.L.sub(u * sh.kz.hi) : sh.template sub<Wd>(u);
        // a caller's LSE is almost always >= the row's logits: then the exp of
        // x <= 0 (cheaper) serves; NaN passes through either
        V<C> p = decltype(any_sign)::value && any_positive(d) ? vexp<C>(d) : vexp_neg(d);
        if (!S::active) return tr.template times_slope<Wd>(A.template mul<Wd>(p), th);
        V<C> t = n == Vec<C>::W ? sp.vec(j) : sp.part(j, n);
        return tr.template times_slope<Wd>(A.template mul<Wd>(p) - rs.template mul<Wd>(t), th);
      }, stream);
    };
    const bool wide = sh.wide() || A.wide || rs.wide || tr.wide();
    auto by_range = [&](auto any_sign) {
      if (wide)
        emit(any_sign, std::true_type());
      else
        emit(any_sign, std::false_type());
    };
    if (a.lse_given)
      by_range(std::true_type());
    else
      by_range(std::false_type());
  }

  // The target element, from the logit saved before pass 2 (which may have
  // overwritten it), rounded once.
  void after(int64_t r, const CERow& k) const {
    if (!a.grad.data || k.state || k.t < 0) return;
    const double g = ce_target_grad(k, tr.kz, (double)spread.at(k.t), tr.slope_one(k.x_t));
    from_compute((T*)a.grad.data + r * a.grad.stride + k.t, (C)g);
  }
};

template <class T, bool SC, class S>
static void run_ce(const CEArgs& a, const S& s, double t_sum_k) {
  typedef typename Compute<T>::type C;
  const double hard_k = a.probs.data ? 0.0 : 1.0 - a.smoothing;
  run_rows(a.logits.rows, a.logits.cols, CEOp<T, SC, S>{a, Tr<C, SC>(a.tr), s, hard_k, t_sum_k, stream_output(a.grad, a.logits.data)});
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
    // sum_j t_j from the rounded t_j the kernels use, so gradient rows sum to 0
    const WeightedSpread<C> s{(C)cs.uniform, w};
    double t_sum = 0;
    for (int64_t j = 0; j < V; ++j) t_sum += (double)s.at(j);
    run_ce<T, SC>(a, s, t_sum);
  } else {
    const UniformSpread<C> s{(C)cs.uniform};
    run_ce<T, SC>(a, s, (double)s.k * (double)V);
  }
}

void kernel(const CEArgs& a) {
  with_dtype(a.logits.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    typedef typename Compute<T>::type C;
    if (softcaps<C>(a.tr))
      ce_by_spread<T, true>(a);
    else
      ce_by_spread<T, false>(a);
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
