// The row walker shared by every CPU op family. The math of a row (the
// transform, z - lse relative to the max, the per-row outputs) is
// lmxent/row_math.h, shared with CUDA; Prims below gives it its vector
// primitives.
//
// A row is read in L1-sized chunks. Pass 1 transforms a chunk into a small
// buffer while taking its max, then sums exp(z - max) (and the spread-target
// sums of cross-entropy) from that buffer, and merges the chunk into the
// row's online log-sum-exp state: one read of the logits from memory, one
// exp per element. Pass 2 (softmax output, cross-entropy gradient) reads the
// row again, from cache when the row fits in L2, and writes the result.
//
// Threads: rows are split across the tasks of lmxent's thread pool
// (thread_pool.h); when there are fewer rows than threads and the rows are
// long, each row is split across tasks and the partial states are merged
// (lse_merge of the contract). Small inputs run on the calling thread.
#pragma once
#include <math.h>

#include <stdlib.h>

#include <type_traits>

#include "lmxent/row_math.h"
#include "simd.h"
#include "thread_pool.h"

namespace lmxent {
inline namespace LMXENT_ISA {

// The primitives of the shared row math (lmxent/row_math.h) on vectors of C.
template <class C>
struct Prims {
  typedef cpu::V<C> U;
  static LMXENT_HOT U splat(C v) { return cpu::splat<C>(v); }
  static LMXENT_HOT C lane0(U v) { return v[0]; }
  static LMXENT_HOT U tanh(U v) { return cpu::vtanh<C>(v); }
  static LMXENT_HOT U exp_neg(U v) { return cpu::vexp_neg(v); }
  static LMXENT_HOT U log1p_unit(U v) { return cpu::vlog1p_unit<C>(v); }
  static LMXENT_HOT U max(U a, U b) { return cpu::vmax<C>(a, b); }
  template <class M>
  static LMXENT_HOT U select(M m, U a, U b) { return cpu::vselect<C>(m, a, b); }
};

}  // namespace LMXENT_ISA

namespace cpu {
inline namespace LMXENT_ISA {

constexpr int64_t kChunk = 2048;        // elements per pass-1 chunk (8 KiB in float)
constexpr int64_t kMinPerThread = 1 << 15;  // elements below which a thread is not worth it

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <class C>
inline bool any(VI<C> m) {
  for (int i = 0; i < Vec<C>::W; ++i)
    if (m[i]) return true;
  return false;
}
// Pass 1 alternates a read of a chunk from memory with the exps of that
// chunk from L1; prefetching the chunk after next during the exps keeps memory
// busy through the compute (one chunk ahead left the loads of the max loop
// waiting: 4096 x 32000 float32 on one thread, forward 44.6 -> 36.0 ms, fused
// 69 -> 60 ms). A prefetch never faults, so it may run past the row.
constexpr int64_t kPrefetchChunks = 2;
template <size_t Bytes>
inline void prefetch_lines(uintptr_t p) {
  for (size_t o = 0; o < Bytes; o += 64) __builtin_prefetch((const void*)(p + o), 0, 3);
}
template <class C>
inline V<C> lane_index() {
  V<C> v;
  for (int i = 0; i < Vec<C>::W; ++i) v[i] = (C)i;
  return v;
}

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

// Pass-1 results over a column range (row_partial), kept in double across
// chunks; each op takes the one with the fields it uses. LsePart: the LSE
// state, and mu the largest u (NaN if any): pass 2 works relative to it.
// CEPart adds the spread sums sum_j t_j and sum_j t_j z_j; StatsPart the
// entropy sum h (see ent_merge) and the count of entries ranked above the
// target. merge(a, b): the state of a's columns followed by b's.
inline double dexp(double x) { return ::exp(x); }
inline double dlog(double x) { return ::log(x); }
struct LsePart {
  LseState<double> st{-(double)INFINITY, 0.0};
  double mu = -(double)INFINITY;
};
inline LsePart merge(const LsePart& a, const LsePart& b) {
  return {lse_merge(a.st, b.st, dexp), a.mu > b.mu || a.mu != a.mu ? a.mu : b.mu};
}
struct CEPart : LsePart {
  double t_sum = 0, tz_sum = 0, tu = 0;  // tu: sum_j t_j (u_j - mu)
};
inline CEPart merge(const CEPart& a, const CEPart& b) {
  const LsePart l = merge((const LsePart&)a, b);
  return {l, a.t_sum + b.t_sum, a.tz_sum + b.tz_sum,
          spread_rebase(a.tu, a.t_sum, a.mu, l.mu) + spread_rebase(b.tu, b.t_sum, b.mu, l.mu)};
}
struct StatsPart : LsePart {
  double h = 0;
  int64_t above = 0;
};
inline StatsPart merge(const StatsPart& a, const StatsPart& b) {
  return {merge((const LsePart&)a, b), ent_merge(a.st, a.h, b.st, b.h, dexp), a.above + b.above};
}

// Pass 1 may keep e_j = exp(z_j - kz M_c) for the whole row (plus a chunk of
// padding) and each chunk's max u M_c, so that pass 2 needs no second exp:
// exp(z_j - lse) = e_j * exp(kz (M_c - M) - L) (see RowShift). Used when the
// row fits in L2.
template <class C>
struct Keep {
  C* e;
  double* m;
};
constexpr int64_t kKeepMax = 1 << 18;  // longest row kept (1 MiB of float)
constexpr int kChunkShift = 11;
static_assert((int64_t)1 << kChunkShift == kChunk, "chunk size");

// One chunk's exps are e_j = 2^((u_j - max u) k) with u the pre-transform
// value (z = kz u) and k = kz log2(e) rounded to C: the max term is exactly 1
// (so lse >= max, and a lone finite entry has lse equal to it), and the
// chunk's natural-log shift is kz max(u), kept in double.
template <class C, class K>
inline double chunk_shift(C mu, K kz) {
  if (!(mu > -(C)INFINITY && mu < (C)INFINITY)) return (double)mu;  // +-inf, NaN
  return (double)kz * (double)mu;
}

// Pass 1 over the columns [c0, c1) of a row into the state P (LsePart,
// CEPart with a spread, StatsPart with the entropy and rank).
template <class P, class T, class TR, class S>
P row_partial(const T* x, int64_t c0, int64_t c1, const TR& tr_in, const S& sp,
              const Keep<typename Compute<T>::type>* keep,
              const RankOf<typename Compute<T>::type>* rank = nullptr) {
  typedef typename Compute<T>::type C;
  constexpr bool Stats = std::is_same<P, StatsPart>::value;
  static_assert(!S::active || std::is_same<P, CEPart>::value, "spread sums need a CEPart");
  constexpr int W = Vec<C>::W;
  // Buffer u when it costs more to recompute than to store (a softcap, or a
  // conversion from 16 bits); else read x again, from L1.
  constexpr bool kBuf = TR::kTransforms || !std::is_same<T, C>::value;
  alignas(64) C buf[kBuf ? kChunk : W];
  const V<C> ninf = splat<C>(-(C)INFINITY), lanes = lane_index<C>();
  // local copies: the buffer stores could alias their members
  const TR tr = tr_in;
  const Factor<C> k = tr.k;
  P acc;
  for (int64_t b = c0; b < c1; b += kChunk) {
    const int64_t n = imin(kChunk, c1 - b), nv = n - n % W;
    const T* xb = x + b;
    auto u_at = [&](int64_t j) { return kBuf ? load(buf + j) : tr.pre(load(xb + j)); };
    // The row tail: invalid lanes become -inf, after the transform.
    const V<C> u_tail = nv < n ? (lanes < (C)(n - nv) ? tr.pre(load_partial(xb + nv, n - nv, (C)0)) : ninf) : ninf;
    V<C> m0 = ninf, m1 = ninf, l0 = -ninf, l1 = -ninf;
    int64_t j = 0;
    for (; j + 2 * W <= nv; j += 2 * W) {
      V<C> u0 = tr.pre(load(xb + j)), u1 = tr.pre(load(xb + j + W));
      if (kBuf) {
        store(buf + j, u0);
        store(buf + j + W, u1);
      }
      m0 = vmax<C>(m0, u0);
      m1 = vmax<C>(m1, u1);
      l0 = vmin<C>(l0, u0);
      l1 = vmin<C>(l1, u1);
    }
    for (; j < nv; j += W) {
      V<C> u = tr.pre(load(xb + j));
      if (kBuf) store(buf + j, u);
      m0 = vmax<C>(m0, u);
      l0 = vmin<C>(l0, u);
    }
    m0 = vmax<C>(m0, u_tail);
    // The max skips NaN; a NaN still reaches the sum through exp, except
    // beside +inf (where inf - inf hides it), so only then look for one.
    C mu = hmax<C>(vmax<C>(m0, m1));
    if (mu == (C)INFINITY) {
      bool nan = any<C>(u_tail != u_tail);
      for (j = 0; j < nv && !nan; j += W) nan = any<C>(u_at(j) != u_at(j));
      if (nan) mu = (C)NAN;
    }
    const C mx = mu == -(C)INFINITY ? (C)0 : mu;
    V<C> s0 = {}, s1 = {}, ts = {}, tu = {}, h0 = {}, h1 = {};
    // Rank: u_j > ut, or u_j == ut before the target; the target's index within
    // the chunk is clamped to [-1, n + 1] so that it is exact in C.
    const bool ranks = Stats && rank && rank->t >= 0;
    const int64_t tb = ranks ? rank->t - b : 0;
    const C tl = (C)(tb < 0 ? -1 : tb > n ? n + 1 : tb), ut = ranks ? rank->ut : (C)0;
    VI<C> cnt = {};
    // Only the chunk holding the target needs the index test.
    const bool before = tl >= (C)n, after = tl <= (C)0;
    auto count = [&](V<C> u, int64_t j) {
      if (after)
        cnt -= u > ut;
      else if (before)
        cnt -= u >= ut;
      else
        cnt -= ranks_above(u, ut, lanes + (C)j < tl);
    };
    C* e = keep ? keep->e + b : nullptr;
    // The exps of the whole vectors; their range checks are skipped when the
    // chunk's smallest value cannot underflow (no -inf, no NaN).
    // Wide: the scale is outside C's comfortable range (clamped mode only)
    auto exps = [&](auto clamp, auto wide) {
      constexpr bool kClamp = decltype(clamp)::value, kWide = decltype(wide)::value;
      // 16-bit inputs: the shorter exp polynomial (simd.h), one FMA of eight fewer
      constexpr bool kShort = sizeof(T) == 2 && std::is_same<C, float>::value;
      int64_t i = 0;
      for (; i + 2 * W <= nv; i += 2 * W) {
        prefetch_lines<2 * W * sizeof(T)>((uintptr_t)(xb + i) + kPrefetchChunks * kChunk * sizeof(T));
        const V<C> u0 = u_at(i), u1 = u_at(i + W), d0 = u0 - mx, d1 = u1 - mx;
        V<C> e0 = vexp2_neg<C, kClamp, kShort>(k.template mul<kWide>(d0)),
             e1 = vexp2_neg<C, kClamp, kShort>(k.template mul<kWide>(d1));
        s0 += e0;
        s1 += e1;
        if (Stats) {
          h0 += weighted<C, kClamp>(e0, d0);
          h1 += weighted<C, kClamp>(e1, d1);
          if (ranks) {
            count(u0, i);
            count(u1, i + W);
          }
        }
        if (e) {
          store(e + i, e0);
          store(e + i + W, e1);
        }
      }
      for (; i < nv; i += W) {
        const V<C> u0 = u_at(i), d0 = u0 - mx;
        V<C> e0 = vexp2_neg<C, kClamp, kShort>(k.template mul<kWide>(d0));
        s0 += e0;
        if (Stats) {
          h0 += weighted<C, kClamp>(e0, d0);
          if (ranks) count(u0, i);
        }
        if (e) store(e + i, e0);
      }
    };
    const C lowest = hmin<C>(vmin<C>(l0, l1));
    if (k.wide)
      exps(std::true_type(), std::true_type());
    else if ((lowest - mx) * k.hi > Exp2Neg<C>::lo + 1)
      exps(std::false_type(), std::false_type());
    else
      exps(std::true_type(), std::false_type());
    if (nv < n) {
      V<C> e0 = vexp2_neg<C>(k(u_tail - mx));
      s0 += e0;
      if (Stats) h0 += weighted<C, true>(e0, u_tail - mx);
      if (ranks) cnt -= ranks_above(u_tail, ut, lanes + (C)nv < tl) & (lanes < (C)(n - nv));
      if (e) store(e + nv, e0);
    }
    int64_t above = 0;
    for (int i = 0; Stats && i < W; ++i) above += cnt[i];
    const double shift = chunk_shift(mu, tr.kz);
    if (keep) keep->m[b >> kChunkShift] = (double)mu;
    if (S::active) {  // sums of t_j and t_j (u_j - mu)
      auto add = [&](V<C> t, V<C> u) {
        ts += t;
        tu += t != (C)0 ? t * (u - mx) : V<C>{};  // a zero target never meets -inf
      };
      for (j = 0; j < nv; j += W) add(sp.vec(b + j), u_at(j));
      if (nv < n) {
        const V<C> t = sp.part(b + nv, n - nv);
        add(lanes < (C)(n - nv) ? t : V<C>{}, u_tail);
      }
    }
    // With +inf in the chunk the sum (NaN from inf - inf) does not matter.
    const double sum = mu != mu ? (double)NAN : mu == (C)INFINITY ? 1.0 : (double)hsum<C>(s0 + s1);
    P chunk;
    chunk.st = {shift, sum};
    chunk.mu = (double)mu;
    if constexpr (std::is_same<P, CEPart>::value) {
      chunk.t_sum = (double)hsum<C>(ts);
      // mx = 0 where mu = -inf: then tu is sum_j t_j u_j
      chunk.tu = (double)hsum<C>(tu);
      // sum_j t_j u_j (z = kz u), for rows without a finite LSE: from tu, but
      // beside +inf only the raw sum keeps inf - inf out of the other terms
      double tz = chunk.tu + (double)mx * chunk.t_sum;
      if (mu == (C)INFINITY) {
        tz = 0;
        for (int64_t i = 0; i < n; ++i) {
          const C t = sp.at(b + i);
          if (t != (C)0) tz += (double)t * tr.one_u(to_compute(xb[i]));
        }
      }
      chunk.tz_sum = tr.kz * tz;
    }
    if constexpr (Stats) {
      chunk.h = tr.kz * (double)hsum<C>(h0 + h1);
      chunk.above = above;
    }
    acc = merge(acc, chunk);
  }
  return acc;
}

// Pass 2 may use the kept exps only for a finite LSE: with +inf (or NaN)
// the chunk factor would turn the finite entries into NaN.
inline bool keep_usable(double lse) { return lse > -(double)INFINITY && lse < (double)INFINITY; }

// Turns the kept chunk maxima of [c0, c1) into factors exp(kz (M_c - M) - L) * mul.
template <class C>
inline void keep_factors(const Keep<C>& k, int64_t c0, int64_t c1, const RowShift& rs, double kz, double mul) {
  for (int64_t c = c0 >> kChunkShift; c < (c1 + kChunk - 1) >> kChunkShift; ++c)
    k.m[c] = ::exp(rs.logp(kz, k.m[c])) * mul;
}

// An output much larger than the caches, not written over its input, is
// written with non-temporal stores: they skip the read of each destination
// line that an ordinary store costs, a third of the memory traffic. 16-bit
// outputs too, where a vector of them is whole 16-byte pieces (AVX2, AVX-512):
// 4096 x 32000 bf16 fused gradient, 2 threads, 33-38% -> 38-41% of copy.
constexpr int64_t kStreamBytes = 32 << 20;
inline bool stream_output(const View2D& out, const void* in) {
  const int64_t item = item_size(out.dtype);
  return out.data != in && (item >= 4 || item * Vec<float>::W >= 16) &&
         out.rows * out.cols * item > kStreamBytes;
}

// out[j] = f(j, valid lanes) over [c0, c1): whole vectors, then the tail.
// stream: non-temporal stores where the row is 16-byte aligned (16-bit
// outputs too, converted first, where a vector of them is whole 16-byte
// pieces: not on the baseline ISA).
template <class T, class F>
inline void row_emit(T* out, int64_t c0, int64_t c1, F f, bool stream = false) {
  typedef typename Compute<T>::type C;
  constexpr int W = Vec<C>::W;
  int64_t j = c0;
  auto body = [&](auto put) {
    for (; j + W <= c1; j += W) put(out + j, f(j, (int64_t)W));
  };
  const uintptr_t at = (uintptr_t)(out + c0);
  if constexpr (std::is_same<T, C>::value) {
    if (stream && at % sizeof(V<C>) == 0)
      body([](T* p, V<C> v) { store_stream<true>(p, v); });
    else if (stream && at % 16 == 0)
      body([](T* p, V<C> v) { store_stream<false>(p, v); });
  } else if constexpr (sizeof(T) * W >= 16) {
    if (stream && at % 16 == 0) body([](T* p, V<C> v) { store_stream_narrow(p, v); });
  }
  body([](T* p, V<C> v) { store(p, v); });
  if (j < c1) store_partial<T>(out + j, f(j, c1 - j), c1 - j);
}

// out[j] = f(x[j], j, valid lanes) over [c0, c1).
template <class T, class F>
inline void row_map(const T* x, T* out, int64_t c0, int64_t c1, F f, bool stream = false) {
  typedef typename Compute<T>::type C;
  row_emit(out, c0, c1, [&](int64_t j, int64_t n) {
    return f(n == Vec<C>::W ? load(x + j) : load_partial(x + j, n, (C)0), j, n);
  }, stream);
}

// Orders this thread's non-temporal stores before the caller reads them.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// A per-thread scratch for Keep, reused across calls.
template <class C>
inline Keep<C> scratch_keep(int64_t cols) {
  struct Buf {
    void* p = nullptr;
    size_t n = 0;
    ~Buf() { free(p); }
  };
  static thread_local Buf buf;
  // Each section starts on a 64-byte line: the doubles after an odd number
  // of floats would otherwise be misaligned (undefined behaviour).
  auto line = [](size_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t ne = cols + kChunk, nm = (cols >> kChunkShift) + 2;
  const size_t e_bytes = line(ne * sizeof(C)), need = e_bytes + line(nm * sizeof(double));
  if (buf.n < need) {
    free(buf.p);
    buf.p = aligned_alloc(64, need);
    buf.n = buf.p ? need : 0;
  }
  return {(C*)buf.p, (double*)((char*)buf.p + e_bytes)};
}

// Columns per thread when a row is split: whole chunks (the kept chunk
// shifts are indexed by chunk), rounded up so n threads cover the row.
inline int64_t split_cols(int64_t cols, int n) {
  return ((cols + n - 1) / n + kChunk - 1) / kChunk * kChunk;
}

// Tasks for an input of elems elements: the process-wide thread count, fewer
// when each would get less than kMinPerThread.
inline int threads_for(int64_t elems) {
  const int64_t want = elems / kMinPerThread, most = num_threads();
  return (int)(want < 1 ? 1 : want > most ? most : want);
}

// f(r0, r1) over nt contiguous blocks of the rows, one per task.
template <class F>
inline void parallel_rows(int64_t rows, int nt, const F& f) {
  parallel_tasks(nt, [&](int t, int n) { f(rows * t / n, rows * (t + 1) / n); });
}

// Runs an op over all rows. An op provides:
//   C                                the compute type
//   Part                             its pass-1 state
//   bool keeps()                     whether pass 2 wants the kept exps
//   Part partial(r, c0, c1, keep)    pass 1 over a column range
//   Part merge(const Part&, const Part&)  two adjacent ranges' states (split rows)
//   K finish(r, const Part&)         the row's scalars (and per-row outputs)
//   void pass2(r, const K&, c0, c1, keep)
//   void after(r, const K&)          single-element fix-ups after pass 2
template <class Op>
void run_rows(int64_t rows, int64_t cols, const Op& op) {
  typedef typename Op::C C;
  const int nt = threads_for(rows * cols);
  const bool keeps = op.keeps() && cols <= kKeepMax;
  if (nt > 1 && rows < nt && cols >= 4 * kChunk) {
    typename Op::Part parts[kMaxThreads];
    Keep<C> shared = keeps ? scratch_keep<C>(cols) : Keep<C>{nullptr, nullptr};
    const Keep<C>* keep = shared.e ? &shared : nullptr;
    // The split depends on nt only, so a row's merged state is the same bits
    // whichever threads run the tasks.
    const int64_t per = split_cols(cols, nt);
    auto over_parts = [&](const auto& g) {
      parallel_tasks(nt, [&](int t, int) {
        const int64_t c0 = imin(cols, t * per);
        g(t, c0, imin(cols, c0 + per));
      });
    };
    for (int64_t r = 0; r < rows; ++r) {
      over_parts([&](int t, int64_t c0, int64_t c1) { parts[t] = op.partial(r, c0, c1, keep); });
      typename Op::Part p = parts[0];
      for (int i = 1; i < nt; ++i) p = op.merge(p, parts[i]);
      const auto k = op.finish(r, p);
      over_parts([&](int, int64_t c0, int64_t c1) {
        op.pass2(r, k, c0, c1, keep);
        stream_fence();
      });
      op.after(r, k);
    }
    return;
  }
  parallel_rows(rows, nt, [&](int64_t r0, int64_t r1) {
    Keep<C> mine = keeps ? scratch_keep<C>(cols) : Keep<C>{nullptr, nullptr};
    const Keep<C>* keep = mine.e ? &mine : nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const auto k = op.finish(r, op.partial(r, 0, cols, keep));
      op.pass2(r, k, 0, cols, keep);
      stream_fence();  // after() may store into a streamed line
      op.after(r, k);
    }
  });
}

// Calls f((T*)nullptr) with the storage type T of a dtype.
template <class F>
inline void with_dtype(DType dt, F&& f) {
  with_storage<f16_t, bf16_t>(dt, f);
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
