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
// fit), and write the gradient. Rows are spread over threads; one long row
// is not split.
#include "../rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

// Maxima and D in the units of the logits before the scale kz (z = kz u).
struct KLPartial {
  LseState<double> s, t;
  double d;  // the direction's weighted sum (forward: teacher-weighted)
};

struct KzExp {  // exp(kz x): the merges' factor for a move of x in u units
  double kz;
  double operator()(double x) const { return ::exp(kz * x); }
};

inline KLPartial kl_merge(const KLPartial& a, const KLPartial& b, bool teacher_weights, KzExp e) {
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

  KLPartial pass1(int64_t r, int64_t cols) const {
    const T *s = xs(r), *t = xt(r);
    const C k = kz * kLog2e<C>;
    KLPartial acc{{-(double)INFINITY, 0.0}, {-(double)INFINITY, 0.0}, 0.0};
    for (int64_t b = 0; b < cols; b += kChunk) {
      const int64_t n = imin(kChunk, cols - b);
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
      const KLPartial chunk{{(double)Ms, (double)hsum<C>(ss)}, {(double)Mt, (double)hsum<C>(st)},
                            (double)hsum<C>(d)};
      acc = kl_merge(acc, chunk, forward(), KzExp{(double)kz});
    }
    return acc;
  }

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

  void row(int64_t r) const {
    const int64_t cols = a.student.cols;
    T* g = a.grad.data ? (T*)a.grad.data + r * a.grad.stride : nullptr;
    C* loss = (C*)a.loss;
    if (a.row_mask && !a.row_mask[r]) {
      if (loss) loss[r] = 0;
      if (g) row_emit(g, 0, cols, [](int64_t, int64_t) { return V<C>{}; });
      return;
    }
    const KLPartial p = pass1(r, cols);
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
    if (!g) return;
    const C f = (C)((double)kz * a.grad_scale * (a.grad_rows ? (double)((const C*)a.grad_rows)[r] : 1.0));
    const C base = (C)(a.dir == KLDirection::JS ? 0.5 * js_p : kl);
    const bool js = a.dir == KLDirection::JS;
    row_emit(g, 0, cols, [&](int64_t j, int64_t n) {
      V<C> us, ut;
      at(xs(r), xt(r), j, n, us, ut);
      if (!ok) return splat<C>((C)NAN);
      return Elem(us, ut, ls, lt, js).grad(a.dir, base) * f;
    });
  }
};

void kernel(const KLArgs& a) {
  with_dtype(a.student.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    typedef typename Compute<T>::type C;
    const KLOp<T> op{a, (C)a.tr.scale};
    const int64_t rows = a.student.rows;
    const int nt = threads_for(rows * a.student.cols);
    parallel_rows(rows, nt, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) op.row(r);
    });
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
