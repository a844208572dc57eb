// The row walker shared by every CPU op family.
//
// A row is read in L1-sized chunks. Pass 1 transforms a chunk into a small
// buffer while taking its max, then sums exp(z - max) (and the spread-target
// sums of cross-entropy) from that buffer, and merges the chunk into the
// row's online log-sum-exp state: one read of the logits from memory, one
// exp per element. Pass 2 (softmax output, cross-entropy gradient) reads the
// row again, from cache when the row fits in L2, and writes the result.
//
// Threads: rows are split across OpenMP threads; when there are fewer rows
// than threads and the rows are long, each row is split across threads and
// the partial states are merged (lse_merge of the contract). Small inputs run
// on the calling thread.
#pragma once
#include <math.h>

#include <type_traits>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

constexpr int64_t kChunk = 2048;        // elements per pass-1 chunk (8 KiB in float)
constexpr int64_t kMinPerThread = 1 << 15;  // elements below which a thread is not worth it
constexpr int kMaxThreads = 256;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <class C>
inline bool any(VI<C> m) {
  for (int i = 0; i < Vec<C>::W; ++i)
    if (m[i]) return true;
  return false;
}
template <class C>
inline V<C> lane_index() {
  V<C> v;
  for (int i = 0; i < Vec<C>::W; ++i) v[i] = (C)i;
  return v;
}

// The element transform of the contract, vectorised. SC: softcap on.
template <class C, bool SC>
struct Tr {
  C scale, cap, inv_cap;
  explicit Tr(const Transform& t)
      : scale((C)t.scale), cap((C)t.softcap), inv_cap(t.softcap > 0 ? (C)(1.0 / t.softcap) : (C)0) {}
  V<C> operator()(V<C> x) const {
    V<C> z = x * scale;
    if (SC) z = cap * vtanh<C>(z * inv_cap);
    return z;
  }
  C one(C x) const { return (*this)(splat<C>(x))[0]; }
  V<C> slope(V<C> z) const {
    if (!SC) return splat<C>(scale);
    V<C> u = z * inv_cap;
    return scale * ((C)1 - u * u);
  }
};

// Spread-target generators: t_j of the contract, per column j. vec() for a
// full vector at j, part() for the n < W lanes of a row tail, at() for one.
template <class C>
struct NoSpread {
  static constexpr bool active = false;
  NoSpread row(int64_t) const { return *this; }
  V<C> vec(int64_t) const { return V<C>{}; }
  V<C> part(int64_t, int64_t) const { return V<C>{}; }
  C at(int64_t) const { return 0; }
};
template <class C>
struct UniformSpread {
  static constexpr bool active = true;
  C k;
  UniformSpread row(int64_t) const { return *this; }
  V<C> vec(int64_t) const { return splat<C>(k); }
  V<C> part(int64_t, int64_t) const { return splat<C>(k); }
  C at(int64_t) const { return k; }
};
template <class C>
struct WeightedSpread {
  static constexpr bool active = true;
  C k;
  const C* w;
  WeightedSpread row(int64_t) const { return *this; }
  V<C> vec(int64_t j) const { return k * load(w + j); }
  V<C> part(int64_t j, int64_t n) const { return k * load_partial(w + j, n, (C)0); }
  C at(int64_t j) const { return k * w[j]; }
};
// Probability targets: t_j = w_j * (a q_j + k).
template <class C, bool HasW>
struct ProbSpread {
  static constexpr bool active = true;
  C a, k;
  const C* q;
  int64_t q_stride;
  const C* w;
  ProbSpread row(int64_t r) const { ProbSpread s = *this; s.q = q + r * q_stride; return s; }
  V<C> vec(int64_t j) const {
    V<C> t = a * load(q + j) + k;
    return HasW ? t * load(w + j) : t;
  }
  V<C> part(int64_t j, int64_t n) const {
    V<C> t = a * load_partial(q + j, n, (C)0) + k;
    return HasW ? t * load_partial(w + j, n, (C)0) : t;
  }
  C at(int64_t j) const { return (a * q[j] + k) * (HasW ? w[j] : (C)1); }
};

// Pass-1 result over a column range: LSE state and the spread sums
// sum_j t_j and sum_j t_j z_j. Kept in double across chunks.
struct Partial {
  LseState<double> st;
  double t_sum, tz_sum;
};
inline Partial partial_empty() { return {{-(double)INFINITY, 0.0}, 0.0, 0.0}; }
inline double dexp(double x) { return ::exp(x); }
inline double dlog(double x) { return ::log(x); }
inline Partial merge(const Partial& a, const Partial& b) {
  return {lse_merge(a.st, b.st, dexp), a.t_sum + b.t_sum, a.tz_sum + b.tz_sum};
}

template <class T, class TR, class S>
Partial row_partial(const T* x, int64_t c0, int64_t c1, const TR& tr, const S& sp) {
  typedef typename Compute<T>::type C;
  constexpr int W = Vec<C>::W;
  alignas(64) C buf[kChunk];
  const V<C> ninf = splat<C>(-(C)INFINITY), lanes = lane_index<C>();
  Partial acc = partial_empty();
  for (int64_t b = c0; b < c1; b += kChunk) {
    const int64_t n = imin(kChunk, c1 - b), nv = n - n % W;
    const T* xb = x + b;
    V<C> m0 = ninf, m1 = ninf;
    VI<C> bad = {};
    int64_t j = 0;
    for (; j + 2 * W <= nv; j += 2 * W) {
      V<C> z0 = tr(load(xb + j)), z1 = tr(load(xb + j + W));
      store(buf + j, z0);
      store(buf + j + W, z1);
      m0 = vmax<C>(m0, z0);
      m1 = vmax<C>(m1, z1);
      bad |= (z0 != z0) | (z1 != z1);
    }
    for (; j < nv; j += W) {
      V<C> z = tr(load(xb + j));
      store(buf + j, z);
      m0 = vmax<C>(m0, z);
      bad |= z != z;
    }
    if (j < n) {  // row tail: invalid lanes become -inf, after the transform
      V<C> z = tr(load_partial(xb + j, n - j, (C)0));
      z = lanes < (C)(n - j) ? z : ninf;
      store(buf + j, z);
      m0 = vmax<C>(m0, z);
      bad |= z != z;
    }
    const bool has_nan = any<C>(bad);
    const C mc = has_nan ? (C)NAN : hmax<C>(vmax<C>(m0, m1));
    const C shift = lse_shift(mc);
    V<C> s0 = {}, s1 = {}, ts = {}, tz = {};
    const int64_t nall = (n + W - 1) / W * W;
    j = 0;
    if (!has_nan) {
      for (; j + 2 * W <= nall; j += 2 * W) {
        s0 += vexp(load(buf + j) - shift);
        s1 += vexp(load(buf + j + W) - shift);
      }
      for (; j < nall; j += W) s0 += vexp(load(buf + j) - shift);
    }
    if (S::active) {
      for (j = 0; j < nv; j += W) {
        V<C> t = sp.vec(b + j), z = load(buf + j);
        ts += t;
        tz += t == (C)0 ? V<C>{} : t * z;  // a zero target never meets -inf
      }
      if (j < n) {
        V<C> t = sp.part(b + j, n - j), z = load(buf + j);
        t = lanes < (C)(n - j) ? t : V<C>{};
        ts += t;
        tz += t == (C)0 ? V<C>{} : t * z;
      }
    }
    Partial chunk = {{(double)mc, has_nan ? (double)NAN : (double)hsum<C>(s0 + s1)},
                     (double)hsum<C>(ts), (double)hsum<C>(tz)};
    acc = merge(acc, chunk);
  }
  return acc;
}

// out[j] = f(x[j], j, valid lanes) over [c0, c1), whole vectors then the tail.
template <class T, class F>
inline void row_map(const T* x, T* out, int64_t c0, int64_t c1, F f) {
  typedef typename Compute<T>::type C;
  constexpr int W = Vec<C>::W;
  int64_t j = c0;
  for (; j + W <= c1; j += W) store(out + j, f(load(x + j), j, (int64_t)W));
  if (j < c1) store_partial<T>(out + j, f(load_partial(x + j, c1 - j, (C)0), j, c1 - j), c1 - j);
}

inline int threads_for(int64_t elems) {
#ifdef _OPENMP
  int64_t want = elems / kMinPerThread;
  int64_t most = omp_get_max_threads();
  if (most > kMaxThreads) most = kMaxThreads;
  return (int)(want < 1 ? 1 : want > most ? most : want);
#else
  (void)elems;
  return 1;
#endif
}

// Runs an op over all rows. An op provides:
//   Partial partial(r, c0, c1)   pass 1 over a column range
//   K finish(r, const Partial&)  the row's scalars (and its per-row outputs)
//   void pass2(r, const K&, c0, c1)
//   void after(r, const K&)      single-element fix-ups after pass 2
template <class Op>
void run_rows(int64_t rows, int64_t cols, const Op& op) {
  const int nt = threads_for(rows * cols);
  if (nt > 1 && rows < nt && cols >= 4 * kChunk) {
    Partial parts[kMaxThreads];
    for (int64_t r = 0; r < rows; ++r) {
      int used = 1;
#pragma omp parallel num_threads(nt)
      {
        const int tid = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t per = (cols / n + kChunk - 1) / kChunk * kChunk;
        const int64_t c0 = imin(cols, tid * per), c1 = imin(cols, c0 + per);
        parts[tid] = op.partial(r, c0, c1);
        if (tid == 0) used = n;
      }
      Partial p = parts[0];
      for (int i = 1; i < used; ++i) p = merge(p, parts[i]);
      const auto k = op.finish(r, p);
#pragma omp parallel num_threads(used)
      {
        const int tid = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t per = (cols / n + kChunk - 1) / kChunk * kChunk;
        const int64_t c0 = imin(cols, tid * per), c1 = imin(cols, c0 + per);
        op.pass2(r, k, c0, c1);
      }
      op.after(r, k);
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const auto k = op.finish(r, op.partial(r, 0, cols));
    op.pass2(r, k, 0, cols);
    op.after(r, k);
  }
}

// Calls f.template operator()<T>() with the storage type of a dtype.
template <class F>
inline void with_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f((float*)nullptr); break;
    case DType::F64: f((double*)nullptr); break;
    case DType::F16: f((f16_t*)nullptr); break;
    case DType::BF16: f((bf16_t*)nullptr); break;
  }
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
