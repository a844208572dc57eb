// KL divergence between the softmax of student and teacher rows (forward,
// reverse, Jensen-Shannon), with the gradient with respect to the student
// logits (formulas in lmxent/contract.h, KLArgs).
//
// Pass 1 reads both rows once, in L1 chunks: the two online LSE states and
// the KL sum weighted by the exps of the side that weights it,
//   forward: D = sum_j exp(zt_j - mt) (zt_j - zs_j),  KL = D / St + lse_s - lse_t
//   reverse: D = sum_j exp(zs_j - ms) (zs_j - zt_j),  KL = D / Ss + lse_t - lse_s
// (differences of logits, not of log-probabilities: no cancellation against
// the LSE where the two rows agree). Jensen-Shannon needs both LSEs before
// its sum, so it reads the rows a second time (from L2 for rows that fit).
// The gradient pass reads them once more and writes the gradient.
//
// Memory traffic: forward and reverse read each logit of both rows once
// without a gradient, twice with one (the second read from L2 for rows that
// fit), and write the gradient. Rows are spread over threads; one long row
// is not split.
#include "rows.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

struct KLPartial {
  LseState<double> s, t;
  double d;  // the direction's weighted sum (forward: teacher-weighted)
};

inline KLPartial kl_merge(const KLPartial& a, const KLPartial& b, bool teacher_weights) {
  const double d = teacher_weights ? lse_merge_sum(a.t, a.d, b.t, b.d, dexp) : lse_merge_sum(a.s, a.d, b.s, b.d, dexp);
  return {lse_merge(a.s, b.s, dexp), lse_merge(a.t, b.t, dexp), d};
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
        const V<C> es = vexp2_neg<C>((us - mxs) * k), et = vexp2_neg<C>((ut - mxt) * k);
        ss += es;
        st += et;
        d += forward() ? weighted<C, true>(et, ut - us) : weighted<C, true>(es, us - ut);
      }
      const KLPartial chunk{{chunk_shift(Ms, kz), (double)hsum<C>(ss)},
                            {chunk_shift(Mt, kz), (double)hsum<C>(st)},
                            (double)kz * (double)hsum<C>(d)};
      acc = kl_merge(acc, chunk, forward());
    }
    return acc;
  }

  // Per element: p, q, and for Jensen-Shannon log(p / m) and log(q / m).
  struct Elem {
    V<C> p, q, lpm, lqm;
  };
  Elem elem(V<C> us, V<C> ut, const LseSplit<C>& ls, const LseSplit<C>& lt, bool js) const {
    const V<C> a_s = ls.sub(us * kz), a_t = lt.sub(ut * kz);
    Elem e{vexp_neg(a_s), vexp_neg(a_t), {}, {}};
    if (js) {  // log(p / m) = log 2 - softplus(a_t - a_s), and the same for q
      const V<C> dd = a_t - a_s, ad = vmax<C>(dd, -dd);
      const V<C> l = vlog1p_unit<C>(vexp_neg(-ad));
      const C ln2 = (C)0.69314718055994530942;
      e.lpm = ln2 - (vmax<C>(dd, V<C>{}) + l);
      e.lqm = ln2 - (vmax<C>(-dd, V<C>{}) + l);
    }
    return e;
  }

  // sum_j p log(p / m), sum_j q log(q / m) of a row (Jensen-Shannon, pass 2).
  // Summed per chunk in C, across chunks in double.
  void js_sums(int64_t r, int64_t cols, const LseSplit<C>& ls, const LseSplit<C>& lt, double& js_p, double& js_q) const {
    js_p = js_q = 0;
    for (int64_t b = 0; b < cols; b += kChunk) {
      const int64_t c1 = imin(cols, b + kChunk);
      V<C> sp = {}, sq = {}, us, ut;
      for (int64_t j = b; j < c1; j += W) {
        at(xs(r), xt(r), j, imin(W, c1 - j), us, ut);
        const Elem e = elem(us, ut, ls, lt, true);
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
    const double lse_s = lse_final(p.s, dlog), lse_t = lse_final(p.t, dlog);
    const bool ok = keep_usable(lse_s) && keep_usable(lse_t);  // both distributions defined
    const LseSplit<C> ls(lse_s), lt(lse_t);
    double kl, js_p = 0;
    if (!ok) {
      kl = NAN;
    } else if (a.dir == KLDirection::JS) {
      double js_q;
      js_sums(r, cols, ls, lt, js_p, js_q);
      kl = 0.5 * (js_p + js_q);
    } else {
      kl = forward() ? p.d / p.t.s + lse_s - lse_t : p.d / p.s.s + lse_t - lse_s;
    }
    kl = kl < 0 ? 0 : kl;  // only rounding makes it negative
    if (loss) loss[r] = (C)kl;
    if (!g) return;
    const C f = (C)((double)kz * a.grad_scale * (a.grad_rows ? (double)((const C*)a.grad_rows)[r] : 1.0));
    const C base = (C)(a.dir == KLDirection::JS ? 0.5 * js_p : kl);
    const bool js = a.dir == KLDirection::JS;
    row_emit(g, 0, cols, [&](int64_t j, int64_t n) {
      V<C> us, ut;
      at(xs(r), xt(r), j, n, us, ut);
      if (!ok) return splat<C>((C)NAN);
      const Elem e = elem(us, ut, ls, lt, js);
      if (forward()) return (e.p - e.q) * f;
      // d/dzs_j = p_j (c_j - sum_k p_k c_k): c = log p - log q (reverse), log(p / m) / 2 (JS)
      const V<C> c = js ? e.lpm * (C)0.5 : ls.sub(us * kz) - lt.sub(ut * kz);
      return weighted<C, true>(e.p, c - base) * f;
    });
  }
};

void kl_divergence(const KLArgs& a) {
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
