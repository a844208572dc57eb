// KL divergence between the softmax of student and teacher rows (forward,
// reverse, Jensen-Shannon), with the gradient with respect to the student
// logits (formulas in lmxent/contract.h, KLArgs).
//
// Pass 1 reads both rows once, in L1 chunks: the two online LSE states and
// the KL sum weighted by the exps of the side that weights it, every logit
// taken relative to its own row's max (a = zs - ms, b = zt - mt):
//   forward: D = sum_j exp(b_j) (b_j - a_j),  KL = D / St + log Ss - log St
//   reverse: D = sum_j exp(a_j) (a_j - b_j),  KL = D / Ss + log St - log Ss
// (kl_merge_sum in lmxent/contract.h). A teacher-student offset of any size
// cancels exactly, nothing cancels against an LSE where the rows agree, and
// huge finite logits never overflow (no difference of the two rows' raw
// logits is formed). Jensen-Shannon needs both LSEs before its sum, so it
// reads the rows a second time (from L2 for rows that fit). The gradient
// pass reads them once more and writes the gradient; it too takes log p as
// kz (z - m) - log s (LogProb).
//
// Memory traffic: forward and reverse read each logit of both rows once
// without a gradient, twice with one (the second read from L2 for rows that
// fit), and write the gradient. It runs on the row driver of every op
// (run_rows in rows.h): rows are spread over threads, and a few long rows are
// split across them (forward and reverse merge the parts' sums with
// kl_merge_sum; in a split row Jensen-Shannon's second read runs on one thread).
#include "../rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

// Maxima and D in the units of the logits before the scale kz (z = kz u).
struct KLPart {
  LseState<double> s{-(double)INFINITY, 0.0}, t{-(double)INFINITY, 0.0};
  double d = 0;  // the direction's weighted sum (forward: teacher-weighted)
};

struct KzExp {  // exp(kz x): the merges' factor for a move of x in u units
  double kz;
  double operator()(double x) const { return ::exp(kz * x); }
};

inline KLPart kl_merge(const KLPart& a, const KLPart& b, bool teacher_weights, KzExp e) {
  const double d = teacher_weights ? kl_merge_sum(a.t, a.s, a.d, b.t, b.s, b.d, e)
                                   : kl_merge_sum(a.s, a.t, a.d, b.s, b.t, b.d, e);
  return {lse_merge(a.s, b.s, e), lse_merge(a.t, b.t, e), d};
}

template <class T>
struct KLOp {
  typedef typename Compute<T>::type C;
  static constexpr int W = Vec<C>::W;
  const KLArgs& a;
  C kz;  // scale (1 / temperature)

  const T* xs(int64_t r) const { return (const T*)a.student.data + r * a.student.stride; }
  const T* xt(int64_t r) const { return (const T*)a.teacher.data + r * a.teacher.stride; }
  bool forward() const { return a.dir == KLDirection::Forward; }

  // Both rows' values at j (n valid lanes; the rest -inf: zero probability).
  void at(const T* s, const T* t, int64_t j, int64_t n, V<C>& us, V<C>& ut) const {
    const C ninf = -(C)INFINITY;
    us = n == W ? load(s + j) : load_partial(s + j, n, ninf);
    ut = n == W ? load(t + j) : load_partial(t + j, n, ninf);
  }

  bool masked(int64_t r) const { return a.row_mask && !a.row_mask[r]; }

  // run_rows's op interface (rows.h): pass 1 over the columns [c0, c1).
  typedef KLPart Part;
  bool keeps() const { return false; }
  Part partial(int64_t r, int64_t c0, int64_t c1, const Keep<C>*) const {
    const T *s = xs(r), *t = xt(r);
    const C k = kz * kLog2e<C>;
    Part acc;
    if (masked(r)) return acc;
    for (int64_t b = c0; b < c1; b += kChunk) {
      const int64_t n = imin(kChunk, c1 - b);
      V<C> ms = splat<C>(-(C)INFINITY), mt = ms, us, ut;
      for (int64_t j = 0; j < n; j += W) {
        at(s + b, t + b, j, imin(W, n - j), us, ut);
        ms = vmax<C>(ms, us);
        mt = vmax<C>(mt, ut);
      }
      const C Ms = hmax<C>(ms), Mt = hmax<C>(mt);
      const C mxs = Ms == -(C)INFINITY ? (C)0 : Ms, mxt = Mt == -(C)INFINITY ? (C)0 : Mt;
      V<C> ss = {}, st = {}, d = {};
      for (int64_t j = 0; j < n; j += W) {
        prefetch_lines<W * sizeof(T)>((uintptr_t)(s + b + j) + kChunk * sizeof(T));
        prefetch_lines<W * sizeof(T)>((uintptr_t)(t + b + j) + kChunk * sizeof(T));
        at(s + b, t + b, j, imin(W, n - j), us, ut);
        const V<C> cs = us - mxs, ct = ut - mxt;  // centred: never ut - us
        const V<C> es = vexp2_neg<C>(cs * k), et = vexp2_neg<C>(ct * k);
        ss += es;
        st += et;
        d += forward() ? weighted<C, true>(et, ct - cs) : weighted<C, true>(es, cs - ct);
      }
      const Part chunk{{(double)Ms, (double)hsum<C>(ss)}, {(double)Mt, (double)hsum<C>(st)},
                            (double)hsum<C>(d)};
      acc = merge(acc, chunk);
    }
    return acc;
  }
  Part merge(const Part& p, const Part& q) const { return kl_merge(p, q, forward(), KzExp{(double)kz}); }

  typedef KLElem<C, V<C>> Elem;  // p, q and the Jensen-Shannon log-ratios (lmxent/row_math.h)

  // sum_j p log(p / m), sum_j q log(q / m) of a row (Jensen-Shannon, pass 2).
  // Summed per chunk in C, across chunks in double.
  void js_sums(int64_t r, int64_t cols, const LogProb<C>& ls, const LogProb<C>& lt, double& js_p, double& js_q) const {
    js_p = js_q = 0;
    for (int64_t b = 0; b < cols; b += kChunk) {
      const int64_t c1 = imin(cols, b + kChunk);
      V<C> sp = {}, sq = {}, us, ut;
      for (int64_t j = b; j < c1; j += W) {
        at(xs(r), xt(r), j, imin(W, c1 - j), us, ut);
        const Elem e(us, ut, ls, lt, true);
        sp += weighted<C, true>(e.p, e.lpm);
        sq += weighted<C, true>(e.q, e.lqm);
      }
      js_p += (double)hsum<C>(sp);
      js_q += (double)hsum<C>(sq);
    }
  }

  // The row's loss and what its gradient needs.
  struct Row {
    bool masked, ok;
    LogProb<C> ls, lt;
    C base, f;  // the gradient's sum_k p_k c_k (reverse: KL; JS: js_p / 2), and kz times the row's factor
  };
  Row finish(int64_t r, const Part& p) const {
    C* loss = (C*)a.loss;
    if (masked(r)) {
      if (loss) loss[r] = 0;
      return Row{true, false, {}, {}, 0, 0};
    }
    const int64_t cols = a.student.cols;
    const bool ok = lse_defined(p.s.m, p.s.s) && lse_defined(p.t.m, p.t.s);
    const double log_ss = ::log(p.s.s), log_st = ::log(p.t.s);
    const LogProb<C> ls{(C)p.s.m, kz, (C)log_ss}, lt{(C)p.t.m, kz, (C)log_st};
    double kl, js_p = 0;
    if (!ok) {
      kl = NAN;
    } else if (a.dir == KLDirection::JS) {
      double js_q;
      js_sums(r, cols, ls, lt, js_p, js_q);
      kl = 0.5 * (js_p + js_q);
    } else {
      kl = kl_row_loss(a.dir, (double)kz, p.d, p.s.s, p.t.s, log_ss, log_st);
    }
    kl = kl_clamp(kl);
    if (loss) loss[r] = (C)kl;
    const C f = (C)((double)kz * a.grad_scale * (a.grad_rows ? (double)((const C*)a.grad_rows)[r] : 1.0));
    return Row{false, ok, ls, lt, (C)(a.dir == KLDirection::JS ? 0.5 * js_p : kl), f};
  }

  // The gradient over the columns [c0, c1).
  void pass2(int64_t r, const Row& k, int64_t c0, int64_t c1, const Keep<C>*) const {
    if (!a.grad.data) return;
    T* g = (T*)a.grad.data + r * a.grad.stride;
    if (k.masked) {
      row_emit(g, c0, c1, [](int64_t, int64_t) { return V<C>{}; });
      return;
    }
    const bool js = a.dir == KLDirection::JS;
    row_emit(g, c0, c1, [&](int64_t j, int64_t n) {
      V<C> us, ut;
      at(xs(r), xt(r), j, n, us, ut);
      if (!k.ok) return splat<C>((C)NAN);
      return Elem(us, ut, k.ls, k.lt, js).grad(a.dir, k.base) * k.f;
    });
  }
  void after(int64_t, const Row&) const {}
};

void kernel(const KLArgs& a) {
  with_dtype(a.student.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    typedef typename Compute<T>::type C;
    run_rows(a.student.rows, a.student.cols, KLOp<T>{a, (C)a.tr.scale});
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
