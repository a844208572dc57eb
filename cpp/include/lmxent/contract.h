// The kernel contract shared by the CPU and CUDA backends: what a kernel takes
// (row-major 2-D views, options) and the scalar math of one row (online
// log-sum-exp state and its merge, the KL sums, the cross-entropy loss and
// gradient coefficients); lmxent/row_math.h builds the rest of a row's math
// on it (the transform, z - lse, per-row outputs). Backends differ only in
// how they walk memory.
//
// Each op's argument struct is followed by LMXENT_OP(Args), which declares its
// kernels: the CPU kernel in every instruction-set namespace (cpu::run in
// cpp/cpu/kernels.h calls the one of the active ISA) and the CUDA launcher and
// scratch size (cuda/kernels.h). An op is then its Args here, one file in
// cpp/cpu/ops/ defining cpu::kernel(const Args&) and one in cuda/ defining
// cuda::launch and cuda::scratch: no list elsewhere names it.
//
// Everything with code lives in an inline namespace named after the
// instruction set the including file is compiled for, so the copies compiled
// with AVX-512, AVX2 and baseline flags never collide at link time.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>

// LMXENT_HOT: element code of the hot loops. GCC's inliner gives up on the
// vector math inside the large pass-2 bodies (a call per vector, its
// constants reloaded each time), so the CPU build forces it.
#ifdef __CUDACC__
#define LMXENT_HD __host__ __device__ __forceinline__
#define LMXENT_HOT LMXENT_HD
#else
#define LMXENT_HD inline
#define LMXENT_HOT inline __attribute__((always_inline))
#endif
#ifndef LMXENT_ISA
#define LMXENT_ISA generic
#endif

namespace lmxent {

// The ISA namespace a CPU kernel file is compiled for is inline (its code
// refers to its own names unqualified); it must be declared inline before
// LMXENT_OP reopens it.
namespace cpu {
inline namespace LMXENT_ISA {}
}
namespace cuda {
struct Launch;  // cuda/kernels.h
}

// The CPU kernel of an op, one per instruction set (the list of ISAs is
// CMakeLists.txt's lmxent_isa calls).
#define LMXENT_CPU_OP(Args)                            \
  namespace cpu {                                      \
  namespace isa_base { void kernel(const Args&); }     \
  namespace isa_avx2 { void kernel(const Args&); }     \
  namespace isa_avx512 { void kernel(const Args&); }   \
  }
// An op of both backends: its CPU kernels, and its CUDA launcher (enqueues on
// the stream, returns a cudaError_t) and scratch bytes (0: none).
#define LMXENT_OP(Args)                                \
  LMXENT_CPU_OP(Args)                                  \
  namespace cuda {                                     \
  int launch(const Args& a, const Launch& l);          \
  size_t scratch(const Args& a, int sm_count);         \
  }

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
LMXENT_OP(SoftmaxArgs)

// Cross-entropy over rows. Per row, with z the transformed logits, lse its
// log-sum-exp and t_j the "spread" target term (see ce_spread below):
//   loss = hard_w * (lse - z_t) + lse * sum_j t_j - sum_j t_j z_j + z_loss * lse^2
//   dL/dz_j = A * p_j - t_j - hard_w * [j == t],  A = hard_w + sum_j t_j + 2 z_loss lse
// Vocabulary slices (lmxent.distributed): with vocab_slice, the class id -1
// (unless it is ignore_index) marks a counted row whose target lies in another
// slice: no hard term here (hard_w = 0, no z_t). grad_coef gives each row's A,
// formed from the whole vocabulary by the caller.
struct CEArgs {
  View2D logits;
  const int64_t* targets = nullptr; // class ids (validated), or nullptr
  bool vocab_slice = false;
  const void* grad_coef = nullptr;  // rows values of C, or nullptr
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
LMXENT_OP(CEArgs)

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
LMXENT_OP(TokenStatsArgs)

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
LMXENT_OP(KLArgs)

// Decoding (process_logits and sample; the row math in lmxent/decoding.h, the
// semantics in docs/decoding.md). Per-row parameters are arrays of `rows`
// values ("off": temperature 1, top_k 0, top_p 1, min_p 0, repetition 1,
// presence and frequency 0); all math is float64.
struct DecodeArgs {
  View2D logits;
  View2D bias;                       // F64, 1 or logits.rows rows of V, or data == nullptr
  const int64_t* prev = nullptr;     // rows x prev_len token ids, -1 padding, or nullptr
  int64_t prev_len = 0;
  const double *temperature = nullptr, *top_p = nullptr, *min_p = nullptr;
  const double *repetition = nullptr, *presence = nullptr, *frequency = nullptr;
  const int64_t* top_k = nullptr;
  View2D out;                        // processed logits (dtype of logits), or data == nullptr
  // Sampling, when tokens is set: row r's uniform is Philox(seed[r], offset[r]).
  const uint64_t *seed = nullptr, *offset = nullptr;
  int64_t* tokens = nullptr;
  float* logprob = nullptr;          // of the sampled token
  int64_t* rank = nullptr;
  int64_t num_logprobs = 0;
  int64_t* top_ids = nullptr;        // rows x num_logprobs
  float* top_logprobs = nullptr;     // rows x num_logprobs
  bool logprobs_raw = true;          // statistics of the raw logits (else the processed)
};
LMXENT_OP(DecodeArgs)

// The k largest entries of each row, descending (NaN first, ties lower index
// first): values (dtype of x, rows x k) and indices (rows x k).
struct TopKArgs {
  View2D x;
  int64_t k = 0;
  View2D values;
  int64_t* indices = nullptr;
};
LMXENT_OP(TopKArgs)

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

// The KL sums. Each side's log-probabilities are taken relative to that
// side's own max m and sum s (u the pre-scale logits, z = kz u):
//   log p_j = kz a_j - log s,  a_j = u_j - m,
// so the weighted sum of the direction,
//   d = sum_j e_j (a_j - b_j),  e_j = exp(kz a_j),  a: the weighting side, b: the other,
// gives KL = kz d / s_a + log s_b - log s_a, and the two rows' logits are never
// subtracted from each other: an offset between teacher and student of any
// size cancels exactly, and huge finite logits (3e38) never overflow.
// When the maxima move (a merge, or an online lift) to M_a, M_b, the centred
// values move by kl_shift(m, M) = m - M; with f = exp(kz (m_a - M_a)), the
// factor of the weighting side's sums, and s_a its sum before the move,
//   d' = f (d + (kl_shift(m_a, M_a) - kl_shift(m_b, M_b)) s_a).
template <class C>
LMXENT_HD C kl_shift(C m, C M) { return m == M ? (C)0 : m - M; }  // 0 also for -inf to -inf

template <class C>
LMXENT_HD C kl_move(C d, C s, C f, C ma, C Ma, C mb, C Mb) {
  if (f == (C)0) return (C)0;  // the weights underflowed: no term counts, as e_j = 0 in the sum
  if (s == (C)0) return d;     // nothing weighted yet (the shift may be -inf: never 0 * inf)
  return f * (d + (kl_shift(ma, Ma) - kl_shift(mb, Mb)) * s);
}

// Merges two parts' d: (wa, oa) and (wb, ob) the weighting and other side's
// LSE states of each part (maxima in the units of d; exp_fn(x) = exp(kz x)).
template <class C, class Exp>
LMXENT_HD C kl_merge_sum(LseState<C> wa, LseState<C> oa, C da, LseState<C> wb, LseState<C> ob, C db,
                         Exp exp_fn) {
  const C W = wa.m < wb.m ? wb.m : wa.m, O = oa.m < ob.m ? ob.m : oa.m;
  const C fa = wa.m == W ? (C)1 : exp_fn(wa.m - W), fb = wb.m == W ? (C)1 : exp_fn(wb.m - W);
  return kl_move(da, wa.s, fa, wa.m, W, oa.m, O) + kl_move(db, wb.s, fb, wb.m, W, ob.m, O);
}

// A side's softmax (and the KL with it) is defined when its max is finite
// and no NaN reached its sum.
template <class C, class S>
LMXENT_HD bool lse_defined(C m, S s) { return m > -(C)INFINITY && m < (C)INFINITY && s == s; }

// log p_j = kz (u_j - m) - log s of one side (see the KL sums above): exact
// where every logit carries a large offset, unlike z_j - lse. U: C or a vector of C.
template <class C>
struct LogProb {
  C m, kz, log_s;
  template <class U>
  LMXENT_HOT U operator()(U u) const { return (u - m) * kz - log_s; }
};

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
// spread = sum_j t_j (lse - z_j), also passed formed (ce_row in row_math.h,
// relative to the row's max; see spread_rebase).
template <class C>
LMXENT_HD C ce_loss(C lse, C lse_zt, C hard_w, C spread, C z_loss) {
  C hard = hard_w == (C)0 ? (C)0 : hard_w * lse_zt;
  C zl = z_loss == (C)0 ? (C)0 : z_loss * lse * lse;
  return hard + spread + zl;
}

// The spread sums are kept relative to the largest u seen, m:
// tu = sum_j t_j (u_j - m), so that the spread loss, t_sum lse - kz sum_j t_j
// u_j, is formed as t_sum L - kz tu (lse = kz M + L) and never cancels where
// lse and kz u_j are far larger than their difference (a huge logit scale).
// spread_rebase moves tu to a larger max M. A -inf m means every u was -inf:
// tu is then sum_j t_j u_j itself (0 or -inf).
template <class C>
LMXENT_HD C spread_rebase(C tu, C t_sum, C m, C M) {
  return m == M || m == -(C)INFINITY ? tu : tu + t_sum * (m - M);
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
