// The per-row math of the kernels, written once for both backends: the
// element transform and its slope, the split factors that keep the double
// options exact, z - lse relative to the row's max, the cross-entropy row
// scalars and target fix-up, the token-statistics outputs, the KL row loss and
// gradient element, the Jensen-Shannon log-ratios, item sizes and the dtype
// switch. cpp/cpu/rows.h and cuda/rows.cuh only walk memory around it.
//
// Element code is templated on the value type U: a SIMD vector of C on the
// CPU, C itself on CUDA. The few primitives that differ (tanh, exp of x <= 0,
// log1p on [0, 1], max, select) come from Prims<C>, which each backend
// defines (rows.h: vectors; rows.cuh: scalars) before using this file's
// element code; U is Prims<C>::U.
#pragma once
#include <float.h>

#include "contract.h"

namespace lmxent {
inline namespace LMXENT_ISA {

template <class C>
struct Prims;  // per backend: U, splat, lane0, tanh, exp_neg, log1p_unit, max, select

LMXENT_HD int64_t item_size(DType d) { return d == DType::F64 ? 8 : d == DType::F32 ? 4 : 2; }

// Calls f((T*)nullptr) with the storage type T of a dtype; each backend names
// its 16-bit types (F16, BF16).
template <class F16, class BF16, class F>
inline void with_storage(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f((float*)nullptr); break;
    case DType::F64: f((double*)nullptr); break;
    case DType::F16: f((F16*)nullptr); break;
    case DType::BF16: f((BF16*)nullptr); break;
  }
}

// A double factor f applied to values of C, v f, as v hi (lo1 lo2): one
// multiply where f is a comfortable C value; beyond that, hi keeps f's
// mantissa and the lo's the rest of its power of two, each clamped to C's
// range, so that 0 stays 0 (never 0 * inf) and v f under- or overflows where
// the exact product does (the options are doubles: a temperature of 1e-300
// is a scale far outside float's range).
template <class C>
struct Factor {
  C hi, lo1 = 1, lo2 = 1;
  bool wide = false;
  LMXENT_HD explicit Factor(double f) {
    constexpr int kE = sizeof(C) == 4 ? 100 : 900, kMax = sizeof(C) == 4 ? 127 : 1023,
                  kMin = sizeof(C) == 4 ? -149 : -1074;
    const bool huge = f > DBL_MAX || f < -DBL_MAX;
    int e = 1 << 12;
    const double m = huge ? copysign(0.5, f) : frexp(f, &e);
    if (f == 0 || f != f || (e > -kE && e < kE)) {
      hi = (C)f;
      return;
    }
    wide = true;
    const int eh = e > 0 ? kE : -kE;
    hi = (C)ldexp(m, eh);
    auto clamp = [&](int x) { return x > kMax ? kMax : x < kMin ? kMin : x; };
    const int e1 = clamp(e - eh), e2 = clamp(e - eh - e1);
    lo1 = (C)ldexp(1.0, e1);
    lo2 = (C)ldexp(1.0, e2);
  }
  template <class U>
  LMXENT_HOT U operator()(U v) const { return wide ? v * hi * lo1 * lo2 : v * hi; }
  // the same, with the range handling only when Wide (a loop picks it once)
  template <bool Wide, class U>
  LMXENT_HOT U mul(U v) const { return Wide ? (*this)(v) : v * hi; }
};

// The element transform of the contract. SC: softcap on.
// z = kz * pre(x) = kz * u: without a softcap u is x and the scale is folded
// into the exps (kz = scale, k = kz log2(e)); with one, u is the whole
// transform (kz = 1). The options stay exact in double (s, kz) and meet C
// values as Factors, so that any positive scale or cap works.
//
// Scales beyond 2^894 act as 2^894 in float: z = s x then overflows float for
// every nonzero x, and all differences of z underflow its exp, either way;
// it keeps kz max(u), the chunk shift, within double's range.
template <class C>
LMXENT_HD double scale_max() { return sizeof(C) == 4 ? 0x1p894 : DBL_MAX; }
template <class C, bool SC>
struct Tr {
  typedef Prims<C> P;
  static constexpr bool kTransforms = SC;
  double s, kz, cap_d;         // scale, z = kz u, softcap
  Factor<C> scale, w, cap, k;  // s, s / cap, cap, kz log2(e)
  LMXENT_HD explicit Tr(const Transform& t)
      : s(t.scale < scale_max<C>() ? t.scale : scale_max<C>()), kz(SC ? 1.0 : s), cap_d(t.softcap),
        scale(s), w(SC ? s / t.softcap : 1.0), cap(SC ? t.softcap : 1.0), k(kz * 1.4426950408889634073599) {}
  // u; under a softcap also th = tanh(s x / cap), the slope's factor (u / cap
  // loses it where cap is tiny)
  template <class U>
  LMXENT_HOT U pre(U x, U* th = nullptr) const {
    if (!SC) return x;
    const U y = w(x), t = P::tanh(y);
    if (th) *th = t;
    if (!w.wide && !cap.wide) return t * cap.hi;
    // where tanh(y) rounds to y, z = s x: exact also where y underflowed
    const C tiny = sizeof(C) == 4 ? (C)0x1p-12 : (C)0x1p-27;
    return P::select((y < (C)0 ? -y : y) < tiny, scale(x), cap(t));
  }
  // u of one element, in double, rounded as in the element code (exact without a softcap)
  LMXENT_HD double one_u(C x) const { return SC ? (double)P::lane0(pre(P::splat(x))) : (double)x; }
  // v dz/dx: v s, times 1 - th^2 under a softcap
  template <bool Wide = true, class U>
  LMXENT_HOT U times_slope(U v, U th) const {
    return scale.template mul<Wide>(SC ? v * ((C)1 - th * th) : v);
  }
  LMXENT_HD bool wide() const { return scale.wide; }
  LMXENT_HD double slope_one(double x) const {
    if (!SC) return s;
    const double t = ::tanh(s * x / cap_d);
    return s * (1.0 - t * t);
  }
};

// Whether a softcap acts: a cap that no finite z can approach (|z / cap| <
// 2^-27) changes nothing, and one beyond C's range would only form inf * 0.
template <class C>
LMXENT_HD bool softcaps(const Transform& t) {
  return t.softcap > 0 && !(t.softcap > t.scale * (sizeof(C) == 4 ? (double)FLT_MAX : DBL_MAX) * 0x1p27);
}

// z - lse for a double lse, as (z - hi) - lo with hi = lse rounded to C:
// z - hi is exact near the max, so the result keeps the double's accuracy
// where it matters (probabilities near 1) instead of ulp(lse) / 2.
template <class C>
struct LseSplit {
  C hi, lo;
  LMXENT_HD explicit LseSplit(double lse)
      : hi((C)lse), lo(lse > -(double)INFINITY && lse < (double)INFINITY ? (C)(lse - (double)(C)lse) : (C)0) {}
  template <class U>
  LMXENT_HOT U sub(U z) const { return (z - hi) - lo; }
};

// z - lse in pass 2, as kz (u - M) - L with L = lse - kz M, the log of the
// row's sum relative to its largest u (M): u - M is exact near the max, and
// kz (u - M) <= 0 can only overflow to -inf (probability 0), for any scale,
// while z and lse themselves may be far outside C's range. Without a finite
// relative form (no pass 1, a non-finite LSE) M = 0 and L = lse.
// mu: the row's largest u; s: its sum of exp(z - kz mu).
// Trivially constructible (CUDA keeps one in shared memory): value-initialise it.
struct RowShift {
  double M, L;
  bool rel;
  RowShift() = default;
  LMXENT_HD RowShift(double mu, double s, double lse, bool has_pass1) {
    rel = has_pass1 && lse > -(double)INFINITY && lse < (double)INFINITY && s > 0;
    M = rel ? mu : 0.0;
    L = rel ? ::log(s) : lse;
  }
  // log p of one element given its u, in double
  LMXENT_HD double logp(double kz, double u) const { return kz * (u - M) - L; }
};
// RowShift for values of C.
template <class C>
struct ShiftV {
  typedef Prims<C> P;
  C M;
  Factor<C> kz;
  LseSplit<C> L;
  bool L_inf;  // a caller's LSE of +inf: p = 0 for any finite z, which kz u may not be in C
  LMXENT_HD ShiftV(const RowShift& r, double kz) : M((C)r.M), kz(kz), L(r.L), L_inf(r.L == (double)INFINITY) {}
  LMXENT_HD bool wide() const { return kz.wide || L_inf; }
  template <bool Wide = true, class U>
  LMXENT_HOT U sub(U u) const {
    if (Wide && L_inf) return P::select(u == (C)INFINITY, P::splat((C)NAN), P::splat(-(C)INFINITY));
    return L.sub(kz.template mul<Wide>(u - M));
  }
};

// ---- cross-entropy rows ----------------------------------------------------------

// A row's scalars, in double: the LSE's rounding to float would otherwise
// enter every probability. t: the target column (-1 for probability targets
// and a target in another vocabulary slice: no hard term).
// state: 0 counted, 1 ignored (zero gradient), 2 a bad class id (CUDA's
// deferred validation: NaN loss and gradient).
struct CERow {
  double lse, A, rs, hard_w, x_t, u_t;
  int64_t t;
  int state;
  RowShift sh;
};

// The spread sums of a row: sum_j t_j, kz sum_j t_j u_j, and sum_j t_j (u_j - M)
// relative to the row's largest u (spread_rebase of the contract).
struct SpreadSums {
  double t_sum, tz, tu;
};

// The scalars of a counted row (not ignored, a valid class id) from its lse,
// sh, t, x_t and u_t (already set) and its spread sums; writes its loss when
// `write`.
template <class C>
LMXENT_HD void ce_row(const CEArgs& a, int64_t r, double kz, double hard_k, const SpreadSums& sp, bool write,
                      CERow& k) {
  const bool hard = k.t >= 0;
  const C* w = (const C*)a.class_weight;
  k.hard_w = hard ? hard_k * (w ? (double)w[k.t] : 1.0) : 0.0;
  const double t_sum = sp.t_sum;
  if (write && a.loss) {
    const double lse_zt = hard ? -k.sh.logp(kz, k.u_t) : 0.0;
    // relative to the row's max where the LSE is (see RowShift)
    const double spread = t_sum == 0 ? 0.0 : k.sh.rel ? t_sum * k.sh.L - kz * sp.tu : k.lse * t_sum - sp.tz;
    ((C*)a.loss)[r] = (C)ce_loss(k.lse, lse_zt, k.hard_w, spread, a.z_loss);
  }
  // A scale beyond scale_max acts as scale_max on the elements (Tr), but the
  // z-loss coefficient 2 z_loss lse needs the row's true lse, scale M + L
  // (a tiny z_loss can make it O(1)); the loss is inf in C either way.
  const double lse_z =
      kz == scale_max<C>() && a.tr.scale > kz && k.sh.rel ? a.tr.scale * k.sh.M + k.sh.L : k.lse;
  k.A = a.grad_coef ? (double)((const C*)a.grad_coef)[r] : ce_grad_coef(lse_z, k.hard_w, t_sum, a.z_loss);
  k.rs = a.grad_scale * (a.grad_rows ? (double)((const C*)a.grad_rows)[r] : 1.0);
}

// The gradient at the target column (class ids), in double and rounded once
// by the caller: (A p_t - t_t - hard_w) dz/dx rs, from the logit saved before
// pass 2 (which may have overwritten it). t_t: the spread target there; slope:
// dz/dx at x_t.
LMXENT_HD double ce_target_grad(const CERow& k, double kz, double t_t, double slope) {
  const double p = ::exp(k.sh.logp(kz, k.u_t));
  const double Ap = p == 0 ? 0.0 : k.A * p;  // A may be huge (z_loss) where p underflowed
  return (Ap - t_t - k.hard_w) * slope * k.rs;
}

// ---- token statistics --------------------------------------------------------------

// The target's value and column: u_j ranks above it when u_j > ut, or when
// u_j == ut at a column j < t (the target's place in a stable descending
// sort; before: j < t). t < 0: no rank (ignored or out-of-range target).
template <class C>
struct RankOf {
  C ut;
  int64_t t;
};
template <class U, class C, class B>
LMXENT_HOT auto ranks_above(U u, C ut, B before) {
  return (u > ut) | ((u == ut) & before);
}

// The row's outputs from its merged state: st the LSE state of z (st.m = kz
// mu), h the entropy sum of z (ent_merge), mu the largest u, above the count
// ranked above the target. t: the target column, -1 ignored, -2 a bad class
// id (CUDA's deferred validation: NaN logprob); x_t its logit.
template <class C>
LMXENT_HD void token_stats_row(const TokenStatsArgs& a, int64_t r, LseState<double> st, double h, double mu,
                               double kz, int64_t t, double x_t, int64_t above) {
  struct Log {
    LMXENT_HD double operator()(double v) const { return ::log(v); }
  };
  const double lse = lse_final(st, Log());
  auto put = [&](void* out, double v) {
    if (out) ((C*)out)[r] = (C)v;
  };
  put(a.lse, lse);
  put(a.entropy, ent_final(st, h, Log()));
  // relative to the row's max (z and lse may be beyond C's range); its term
  // of the sum is exactly 1
  const RowShift sh(mu, st.s, lse, true);
  put(a.top_prob, sh.rel ? ::exp(-sh.L) : ::exp(st.m - lse));
  put(a.logprob, t == -1 ? 0.0 : t < 0 ? (double)NAN : sh.logp(kz, x_t));
  if (a.rank) a.rank[r] = t < 0 || lse != lse ? -1 : above;
}

// ---- KL divergence -----------------------------------------------------------------

// Forward or reverse KL of a row from its pass-1 sums (d, the sides' sums s
// and their logs; see the KL sums in contract.h). Only rounding makes it
// negative: the caller clamps with kl_clamp.
LMXENT_HD double kl_row_loss(KLDirection dir, double kz, double d, double ss, double st, double log_ss,
                             double log_st) {
  return dir == KLDirection::Forward ? kz * d / st + log_ss - log_st : kz * d / ss + log_st - log_ss;
}
LMXENT_HD double kl_clamp(double kl) { return kl < 0 ? 0.0 : kl; }

// e * d with e = 0 contributing 0 even where d is -inf (e underflowed or the
// entry is -inf): the entropy and KL sums weight d by a probability.
// Guard false: the caller knows no e is 0 where d may be infinite.
template <class C, bool Guard = true, class U>
LMXENT_HOT U weighted(U e, U d) {
  return Guard ? Prims<C>::select(e > (C)0, e * d, Prims<C>::splat((C)0)) : e * d;
}

// One element of a KL row: log p and log q (LogProb), p, q, and for
// Jensen-Shannon log(p / m) and log(q / m), m = (p + q) / 2, as
// log 2 - softplus(log q - log p) and the same for q.
template <class C, class U>
struct KLElem {
  typedef Prims<C> P;
  U ls, lt, p, q, lpm, lqm;
  LMXENT_HOT KLElem(U us, U ut, const LogProb<C>& lps, const LogProb<C>& lpt, bool js)
      : ls(lps(us)), lt(lpt(ut)), p(P::exp_neg(ls)), q(P::exp_neg(lt)) {
    if (js) {
      const U dd = lt - ls, ad = P::max(dd, -dd), zero = P::splat((C)0);
      const U l = P::log1p_unit(P::exp_neg(-ad));
      const C ln2 = (C)0.69314718055994530942;
      lpm = ln2 - (P::max(dd, zero) + l);
      lqm = ln2 - (P::max(-dd, zero) + l);
    }
  }
  // d KL / d zs_j / kz: forward p - q; reverse and Jensen-Shannon p (c - base)
  // with c = log p - log q (reverse), log(p / m) / 2 (JS), base = sum_k p_k c_k.
  LMXENT_HOT U grad(KLDirection dir, C base) const {
    if (dir == KLDirection::Forward) return p - q;
    const U c = dir == KLDirection::JS ? lpm * (C)0.5 : ls - lt;
    return weighted<C>(p, c - base);
  }
};

}  // namespace LMXENT_ISA
}  // namespace lmxent
