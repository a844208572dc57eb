// The kernel contract shared by the CPU and CUDA backends: what a kernel takes
// (row-major 2-D views, options) and the scalar math of one row (online
// log-sum-exp state and its merge, the cross-entropy loss and gradient
// coefficients). Backends differ only in how they walk memory.
//
// Everything with code lives in an inline namespace named after the
// instruction set the including file is compiled for, so the copies compiled
// with AVX-512, AVX2 and baseline flags never collide at link time.
#pragma once
#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define LMXENT_HD __host__ __device__ __forceinline__
#else
#define LMXENT_HD inline
#endif
#ifndef LMXENT_ISA
#define LMXENT_ISA generic
#endif

namespace lmxent {

enum class DType : int32_t { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// rows x cols, element (r, c) at data[r * stride + c]; stride in elements.
struct View2D {
  void* data = nullptr;
  int64_t rows = 0, cols = 0, stride = 0;
  DType dtype = DType::F32;
};

// The per-element transform before the softmax:
//   z = scale * x, then, when softcap > 0, z = softcap * tanh(z / softcap).
// Softmax-family temperature T is scale = 1/T without softcap.
struct Transform {
  double scale = 1.0;
  double softcap = 0.0;
};

// Softmax family. "Compute type" C below is double for F64 input, else float.
struct SoftmaxArgs {
  View2D x;
  View2D out;          // same dtype as x; data == nullptr: only lse
  void* lse = nullptr; // rows values of C, or nullptr
  Transform tr;
  bool log = false;    // out = log_softmax (else softmax)
};

// Cross-entropy over rows. Per row, with z the transformed logits, lse its
// log-sum-exp and t_j the "spread" target term (see ce_spread below):
//   loss = hard_w * (lse - z_t) + lse * sum_j t_j - sum_j t_j z_j + z_loss * lse^2
//   dL/dz_j = A * p_j - t_j - hard_w * [j == t],  A = hard_w + sum_j t_j + 2 z_loss lse
struct CEArgs {
  View2D logits;
  const int64_t* targets = nullptr; // class ids (validated), or nullptr
  View2D probs;                     // probability targets in C, or data == nullptr
  const void* class_weight = nullptr; // V values of C, or nullptr
  int64_t ignore_index = -100;
  Transform tr;
  double smoothing = 0.0;
  double z_loss = 0.0;
  void* loss = nullptr;  // out: rows values of C, or nullptr
  void* lse = nullptr;   // rows values of C: out, or in when lse_given
  bool lse_given = false;
  View2D grad;           // out: dtype of logits, may alias logits; data == nullptr: no grad
  double grad_scale = 1.0;          // multiplies every gradient row
  const void* grad_rows = nullptr;  // rows values of C multiplying each row, or nullptr
};

// Token statistics of class-id targets, one read of each row: z = scale * x
// (scale = 1 / temperature). Outputs (rows values each, any may be nullptr):
//   logprob = z_t - lse, lse, entropy = -sum_j p_j log p_j, top_prob = max_j p_j,
//   rank = #{j : z_j > z_t} + #{j < t : z_j == z_t} (the target's place in a
//   stable descending sort: rank 0 is argmax == target, first index on ties).
// Ignored targets get logprob 0 and rank -1 (lse, entropy, top_prob are still
// computed); a NaN row gets rank -1.
struct TokenStatsArgs {
  View2D logits;
  const int64_t* targets = nullptr;  // validated class ids
  int64_t ignore_index = -100;
  Transform tr;                      // scale only
  void *logprob = nullptr, *lse = nullptr, *entropy = nullptr, *top_prob = nullptr;  // C
  int64_t* rank = nullptr;
};

// KL divergence between softmax(student * scale) = p and softmax(teacher * scale) = q
// over each row (scale = 1 / temperature):
//   forward  KL(q || p) = sum_j q_j (log q_j - log p_j)
//   reverse  KL(p || q) = sum_j p_j (log p_j - log q_j)
//   js       JS(p, q)   = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
// A class with zero probability on the weighting side contributes 0 (even
// against -inf on the other side). The gradient with respect to the student
// logits is written when grad.data is set, times grad_scale * grad_rows[r].
enum class KLDirection : int32_t { Forward = 0, Reverse = 1, JS = 2 };
struct KLArgs {
  View2D student, teacher;           // same shape and dtype
  const uint8_t* row_mask = nullptr; // rows with 0 are skipped (loss 0, zero gradient)
  Transform tr;                      // scale only
  KLDirection dir = KLDirection::Forward;
  void* loss = nullptr;              // out: rows values of C
  View2D grad;                       // out: student dtype, may alias the student
  double grad_scale = 1.0;
  const void* grad_rows = nullptr;
};

inline namespace LMXENT_ISA {

// Online log-sum-exp: sum exp(z - m) = s, with m the largest z seen. Merging
// two states rescales the smaller side once. A NaN m marks a NaN seen.
template <class C>
struct LseState {
  C m, s;
};

template <class C>
LMXENT_HD bool lse_isnan(C v) { return v != v; }

// exp() is passed in so CUDA and CPU use their own fast scalar exp.
template <class C, class Exp>
LMXENT_HD LseState<C> lse_merge(LseState<C> a, LseState<C> b, Exp exp_fn) {
  if (lse_isnan(a.m) || lse_isnan(b.m)) return {a.m + b.m, a.s + b.s};
  if (a.m < b.m) { LseState<C> t = a; a = b; b = t; }
  // a.m >= b.m; when both are -inf (or both +inf) the scale is 1, not NaN.
  C f = (a.m == b.m) ? (C)1 : exp_fn(b.m - a.m);
  return {a.m, a.s + b.s * f};
}

template <class C, class Log>
LMXENT_HD C lse_final(LseState<C> st, Log log_fn) {
  // A NaN met beside a larger entry (even +inf) lives in the sum.
  if (lse_isnan(st.m) || lse_isnan(st.s)) return st.m + st.s;
  if (st.m == (C)INFINITY || st.m == -(C)INFINITY) return st.m;
  return st.m + log_fn(st.s);
}

// A sum weighted by exp(z - m), carried beside its LSE state (the KL sums),
// merges like s: the larger side's plus exp(m_small - m_large) times the
// smaller side's, where the smaller side has anything.
template <class C, class Exp>
LMXENT_HD C lse_merge_sum(LseState<C> a, C da, LseState<C> b, C db, Exp exp_fn) {
  if (lse_isnan(a.m) || lse_isnan(b.m)) return a.m + b.m;
  if (a.m < b.m) {
    LseState<C> t = a; a = b; b = t;
    C u = da; da = db; db = u;
  }
  if (b.s == (C)0) return da;
  return a.m == b.m ? da + db : da + exp_fn(b.m - a.m) * db;
}

// Entropy rides along the online LSE as h = sum_j exp(z_j - m) (z_j - m), so
// that H = log s - h / s. Moving a state to a larger max M scales s by
// f = exp(m - M) and h by f with a shift: h' = f (h + (m - M) s).
template <class C, class Exp>
LMXENT_HD C ent_merge(LseState<C> a, C ha, LseState<C> b, C hb, Exp exp_fn) {
  if (lse_isnan(a.m) || lse_isnan(b.m)) return a.m + b.m;
  if (a.m < b.m) {
    LseState<C> t = a; a = b; b = t;
    C u = ha; ha = hb; hb = u;
  }
  if (b.s == (C)0) return ha;  // nothing on the smaller side (m = -inf among them)
  if (a.m == b.m) return ha + hb;
  const C d = b.m - a.m;
  return ha + exp_fn(d) * (hb + d * b.s);
}

// -sum p log p; NaN where the softmax is undefined (NaN, +inf, all -inf).
template <class C, class Log>
LMXENT_HD C ent_final(LseState<C> st, C h, Log log_fn) {
  if (lse_isnan(st.m) || lse_isnan(h) || !(st.m > -(C)INFINITY && st.m < (C)INFINITY)) return (C)NAN;
  return log_fn(st.s) - h / st.s;
}

// The shift used inside a block whose running max is m: exp(z - shift) must
// not see -inf - -inf.
template <class C>
LMXENT_HD C lse_shift(C m) { return m == -(C)INFINITY ? (C)0 : m; }

// Cross-entropy per-row coefficients. For class-id targets the "hard" part
// has weight hard_w = (1 - eps) * w[t]; the smoothing part spreads
// t_j = eps / V * w_j over every class. For probability targets q,
// hard_w = 0 and t_j = w_j * ((1 - eps) q_j + eps / V).
struct CESpread {
  double q_scale;  // (1 - eps) for probability targets, 0 for class ids
  double uniform;  // eps / V
};

LMXENT_HD CESpread ce_spread(bool prob_targets, double eps, int64_t V) {
  return {prob_targets ? 1.0 - eps : 0.0, eps / (double)V};
}

// A zero weight contributes nothing, even against a -inf logit (the masked
// vocabulary case), so 0 * inf is never formed; nor is a zero z_loss times an
// infinite LSE. lse_zt = lse - z_t, passed formed (relative to the row's max
// where z and lse are huge).
template <class C>
LMXENT_HD C ce_loss(C lse, C lse_zt, C hard_w, C t_sum, C tz_sum, C z_loss) {
  C hard = hard_w == (C)0 ? (C)0 : hard_w * lse_zt;
  C spread = t_sum == (C)0 ? (C)0 : lse * t_sum - tz_sum;
  C zl = z_loss == (C)0 ? (C)0 : z_loss * lse * lse;
  return hard + spread + zl;
}

// A in dL/dz_j = A * p_j - t_j - hard_w [j == t].
template <class C>
LMXENT_HD C ce_grad_coef(C lse, C hard_w, C t_sum, C z_loss) {
  return hard_w + t_sum + (z_loss == (C)0 ? (C)0 : (C)2 * z_loss * lse);
}

// dz/dx of the transform, given z: scale, times 1 - tanh^2 under a softcap.
template <class C>
LMXENT_HD C transform_slope(C z, C scale, C softcap) {
  if (softcap > (C)0) {
    C u = z / softcap;
    return scale * ((C)1 - u * u);
  }
  return scale;
}

}  // namespace LMXENT_ISA
}  // namespace lmxent
