// The decoding ops on the CPU: process_logits / sample (DecodeArgs) and top_k
// (TopKArgs). The row math is lmxent/decoding.h, shared with CUDA; here the
// walk (one thread per row, blocks of rows over the pool, float64 row buffers
// per thread, reused across calls) and a fast path for the common case.
//
// Why a CPU-only fast path: the shared row math works on a float64 copy of
// the row (a dense bias needs one), so every pass over V entries is scalar
// double code. With float32/bf16/f16 logits and 2^-800 <= T <= 2^800, y = x / T
// is strictly increasing in x (the quotients of distinct floats cannot round
// together, overflow or underflow in double), so everything that needs the
// whole row can run on the raw x in float vectors: the max, the NaN check, the
// candidates (every x >= a threshold th) and sums exp(x - th) (raw) or
// exp((x - th) / T) (processed) over the entries below th. Only the candidates
// go to double: y = x / T at those, and the shared decode_filters /
// decode_emit / decode_logprobs run on that compact list (DecodeRow.vocab maps
// it back), so the survivors, the draw and the outputs are the general path's.
//
// The candidates: with top-k (or greedy), th read off a sample of the row as
// select_candidates does, for kk = max(k, num_logprobs) entries, then narrowed
// to the entries >= the kk-th largest. With top-p / min-p and no top-k,
// th = L * T, L a level below which nothing can survive (min-p's
// max + log(min_p) - 1; top-p's max - d), set from the running max as the
// pass goes (a superset: the max only rises); top-p widens d 1.5x, a pass at
// each fixed level, until the mass above L exceeds top_p (+1e-6, for the
// float tail) of the total; the tail's mass joins top_p_filter's total. Penalties and a sparse (V,) bias change few
// entries (prev_tokens' distinct ids, the bias's nonzero ids): exceptions,
// their y computed as decode_row does and merged into the list whatever their
// raw value; kk counts them, so that enough others remain.
//
// The raw log-sum is sum over candidates of exp(x - max) in double plus
// exp(th - max) times the float sum below th: accurate relative to x - max
// (not to the LSE's magnitude, which large logits would spoil), each term
// below th smaller than the largest.
//
// Memory traffic: one read of the logits (and one more per wider top-p level
// tried, or when a penalty lowered the raw max), one write of the processed row when
// asked, plus ~1024 sampled entries. Any surprise (NaN or +inf, a threshold
// that leaves too few candidates or is -inf, more than V/8 candidates by mass)
// sends the row to the general path, which reads it again.
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <new>

#include "../rows.h"
#include "lmxent/decoding.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

namespace {

// This thread's row buffers (lmxent/decoding.h's layout), grown to the call's sizes.
struct Buffers {
  void* p = nullptr;
  int64_t bytes = 0;
  ~Buffers() { free(p); }
  void* get(int64_t need) {
    if (need > bytes) {
      free(p);
      p = malloc(need);
      bytes = p ? need : 0;
      if (!p) throw std::bad_alloc();
    }
    return p;
  }
};
thread_local Buffers tl_buffers;

thread_local Buffers tl_cands;  // the fast path's compact list
thread_local Buffers tl_exc;    // the fast path's exceptions of a row
thread_local Buffers tl_bias;   // the ids of a sparse bias

// Writes v to every entry of a processed row.
template <class T>
void fill_row(T* o, int64_t V, double v) {
  typedef typename Compute<T>::type C;
  row_emit(o, 0, V, [&](int64_t, int64_t) { return splat<C>((C)v); });
}

constexpr double kSafeTMin = 0x1p-800, kSafeTMax = 0x1p800;
constexpr int64_t kSample = 1024;     // entries read for the candidate threshold
constexpr int64_t kMaxBiasIds = 1024;  // nonzero entries of a (V,) bias taken as exceptions

// The sampled entries of a row of `cols` (as select_candidates reads them).
inline int64_t sample_at(int64_t i, int64_t cols, int64_t ns) { return i * cols / ns; }

// The fast path's pass over a row: its max, whether it holds a NaN, the
// candidates x >= th (ascending, into ids) and, with Raw, sum exp(x - th) over
// the entries below th (a NaN reaches that sum: no separate check), with Proc
// sum exp((x - th) * inv) over them (inv = 1/T: the processed tail). The
// threshold th = level(max so far), read before each chunk, never decreasing
// (the sums are rescaled to the last, returned). Prefetches the sample of the
// next row (`next`, or nullptr) as it goes.
struct Scan {
  float max;
  bool nan;
  int64_t n;
  double below, pbelow;
  float th;
};
template <bool Raw, bool Proc, class T, class Level>
Scan scan_row(const T* x, int64_t cols, const Level& level, int64_t* ids, const T* next, int64_t ns,
              float inv = 1) {
  typedef float C;
  constexpr int W = Vec<C>::W;
  float th = level(-(C)INFINITY);
  V<C> tv = splat<C>(th);
  const V<C> iv2 = splat<C>(inv * kLog2e<C>);
  // 16-bit logits: the shorter exp polynomial (simd.h), as cross-entropy's pass 1
  constexpr bool kShort = sizeof(T) == 2;
  V<C> mx0 = splat<C>(-(C)INFINITY), mx1 = mx0;
  VI<C> nan = {};
  int64_t n = 0;
  double below = 0, pbelow = 0;
  auto visit = [&](V<C> v, int64_t j, V<C>& e, V<C>& p, V<C>& mx) {
    mx = vmax<C>(mx, v);
    if (!Raw) nan |= v != v;
    V<C> ev = Raw ? vexp2_neg<C, true, kShort>((v - tv) * kLog2e<C>) : V<C>{};
    V<C> pv = Proc ? vexp2_neg<C, true, kShort>((v - tv) * iv2) : V<C>{};
    if (uint32_t ge = mask_ge(v, tv)) {
      ev = v >= tv ? V<C>{} : ev;
      pv = v >= tv ? V<C>{} : pv;
      for (; ge; ge &= ge - 1) ids[n++] = j + __builtin_ctz(ge);
    }
    if (Raw) e += ev;
    if (Proc) p += pv;
  };
  for (int64_t b = 0, i = 0; b < cols; b += kChunk) {
    const int64_t nb = imin(kChunk, cols - b), nv = nb - nb % W;
    for (; next && i < ns && sample_at(i, cols, ns) < b + nb; ++i)
      __builtin_prefetch(next + sample_at(i, cols, ns), 0, 3);
    if (const float t = level(hmax<C>(vmax<C>(mx0, mx1))); t != th) {
      if (Raw && below != 0) below *= ::exp((double)th - t);
      if (Proc && pbelow != 0) pbelow *= ::exp(((double)th - t) * inv);
      th = t, tv = splat<C>(t);
    }
    V<C> e0 = {}, e1 = {}, p0 = {}, p1 = {};
    int64_t j = b;
    for (; j + 2 * W <= b + nv; j += 2 * W) {
      visit(load(x + j), j, e0, p0, mx0);
      visit(load(x + j + W), j + W, e1, p1, mx1);
    }
    if (j < b + nv) visit(load(x + j), j, e0, p0, mx0), j += W;
    if (j < b + nb) visit(load_partial(x + j, b + nb - j, -(C)INFINITY), j, e1, p1, mx1);
    if (Raw) below += (double)hsum<C>(e0 + e1);
    if (Proc) pbelow += (double)hsum<C>(p0 + p1);
  }
  return {hmax<C>(vmax<C>(mx0, mx1)), Raw ? below != below : cpu::any<C>(nan), n, below, pbelow, th};
}

// The entries of a (V,) logit bias that are not 0 (the exceptions of every
// row), ascending; n = -1: none usable (a per-row bias, or a dense one).
struct SparseBias {
  const double* b;
  const int64_t* ids;
  int64_t n;
};
SparseBias sparse_bias(const DecodeArgs& a) {
  if (!a.bias.data) return {nullptr, nullptr, 0};
  const double* b = (const double*)a.bias.data;
  if (a.bias.rows != 1) return {b, nullptr, -1};
  int64_t* ids = (int64_t*)tl_bias.get(8 * kMaxBiasIds);
  int64_t n = 0;
  for (int64_t j = 0; j < a.logits.cols; ++j)
    if (b[j] != 0) {
      if (n == kMaxBiasIds) return {b, nullptr, -1};
      ids[n++] = j;
    }
  return {b, ids, n};
}

// A list of entries, ascending ids: raw values x, processed values y.
struct Entries {
  int64_t n;
  int64_t* id;
  double *x, *y;
};
Entries entries(Buffers& buf, int64_t cap) {
  int64_t* id = (int64_t*)buf.get(8 * (3 * cap + 1));
  return {0, id, (double*)(id + cap), (double*)(id + 2 * cap)};
}

// The exceptions of row r: the sparse bias's ids and the distinct ids of
// prev_tokens, their processed values as decode_row computes them (bias,
// penalties, then / T unless greedy). false: one is NaN or +inf.
template <class T>
bool exceptions(const DecodeArgs& a, int64_t r, const T* x, const SparseBias& sb, const DecodeScratch& s,
                Entries& e) {
  int64_t L = 0;
  for (int64_t i = 0; a.prev && i < a.prev_len; ++i) {
    const int64_t t = a.prev[r * a.prev_len + i];
    if (t >= 0) s.hist[L++] = t;
  }
  dec_sort(s.hist, L, Ascending());
  e = entries(tl_exc, sb.n + L);
  const double temp = a.temperature[r];
  for (int64_t i = 0, b = 0; i < L || b < sb.n;) {
    const int64_t h = i < L ? s.hist[i] : INT64_MAX, bj = b < sb.n ? sb.ids[b] : INT64_MAX;
    const int64_t j = h < bj ? h : bj;
    int64_t c = 0;
    for (; i < L && s.hist[i] == j; ++i) ++c;
    b += bj == j;
    const double v = (double)to_compute(x[j]);
    double y = sb.b ? v + sb.b[j] : v;
    if (c > 0) y = dec_penalize(a, r, y, c);
    y = temp != 0 ? y / temp : y;
    if (y != y || y == (double)INFINITY) return false;
    e.id[e.n] = j, e.x[e.n] = v, e.y[e.n] = y, ++e.n;
  }
  return true;
}

// The compact list of a row: the candidates ids[0..n) (ascending) whose raw
// value is >= lo, merged with the exceptions e (their own values).
template <class T>
Entries merge(const T* x, const int64_t* ids, int64_t n, double lo, const Entries& e, double temp) {
  Entries c = entries(tl_cands, n + e.n);
  for (int64_t i = 0, q = 0; i < n || q < e.n;) {
    const int64_t j = i < n ? ids[i] : INT64_MAX, je = q < e.n ? e.id[q] : INT64_MAX;
    if (je <= j) {
      c.id[c.n] = je, c.x[c.n] = e.x[q], c.y[c.n] = e.y[q], ++c.n, ++q;
      i += je == j;
      continue;
    }
    const double v = (double)to_compute(x[j]);
    ++i;
    if (v >= lo) c.id[c.n] = j, c.x[c.n] = v, c.y[c.n] = temp != 0 ? v / temp : v, ++c.n;
  }
  return c;
}

// sum exp(x_j - mr) over the candidates ids[0..n), their raw values left in tmp.
template <class T>
double cand_sum(const T* x, const int64_t* ids, int64_t n, double mr, double* tmp) {
  constexpr int WD = Vec<double>::W;
  for (int64_t i = 0; i < n; ++i) tmp[i] = (double)to_compute(x[ids[i]]);
  V<double> acc = {};
  int64_t i = 0;
  for (; i + WD <= n; i += WD) acc += vexp_neg(load(tmp + i) - mr);
  double sum = hsum<double>(acc);
  for (; i < n; ++i) sum += ::exp(tmp[i] - mr);
  return sum;
}

// The fast path of row r (see the file comment); false: not taken, nothing
// written. next: the next row's logits (its sample is prefetched during the
// first pass), or nullptr.
template <class T>
bool decode_fast(const DecodeArgs& a, int64_t r, const T* x, const T* next, T* o, const DecodeScratch& s,
                 double* zs, const SparseBias& sb) {
  const int64_t cols = a.logits.cols, k = a.top_k[r];
  const double temp = a.temperature[r], top_p = a.top_p[r], min_p = a.min_p[r], inf = (double)INFINITY;
  const bool greedy = temp == 0, topk = k > 0 && k < cols, by_mass = !greedy && !topk;
  const float inv = (float)(1 / temp);
  if (sb.n < 0 || !(greedy || (temp >= kSafeTMin && temp <= kSafeTMax))) return false;
  if (by_mass && (!(top_p < 1 || min_p > 0) || !(inv > 0 && inv < FLT_MAX))) return false;
  Entries e;
  if (!exceptions(a, r, x, sb, s, e)) return false;
  const bool raw = a.tokens && a.logprobs_raw;
  const int64_t nl = raw ? imin(a.num_logprobs, cols) : 0, kt = topk ? k : 1;
  const int64_t kk = (kt > nl ? kt : nl) + e.n;  // candidates: at least kk - e.n not exceptions
  // The first threshold: as select_candidates, for kk entries.
  const int64_t ns = imin(cols, kSample), si = 2 * kk * ns / cols + 8;
  if (si >= ns) return false;
  for (int64_t i = 0; i < ns; ++i) {
    const double v = (double)to_compute(x[sample_at(i, cols, ns)]);
    if (v != v || v == inf) return false;
    s.tmp[i] = v;
  }
  double smax = -inf;  // the sample's max: at most the row's
  for (int64_t i = 0; i < ns; ++i) smax = s.tmp[i] > smax ? s.tmp[i] : smax;
  const double th1 = kth_largest(s.tmp, ns, si);
  if (th1 == -inf) return false;
  // By mass: L = m - dd is the level below which nothing survives (min-p's
  // max + log(min_p) - 1; top-p's max - 8, then wider); level_of(L) the
  // largest float t with t / T <= L (at most th1 with the raw statistics:
  // then the list holds the top-n and every entry above them).
  const double dd = top_p < 1 ? 8 : 1 - ::log(min_p);
  auto level_of = [&](double L) {
    float t = (float)(L * temp);
    while ((double)t / temp > L) t = nextafterf(t, -INFINITY);
    return raw && t > th1 ? (float)th1 : t;
  };
  auto fixed = [](float t) { return [t](float) { return t; }; };
  // One pass: the max, the NaN check and the candidates: with top-k, x >= th1;
  // by mass, x >= level_of(running max / T - dd) (a superset of the entries
  // above the final level), with the processed tail below it.
  const T* none = nullptr;
  Scan sc;
  if (!by_mass) {
    sc = raw ? scan_row<true, false>(x, cols, fixed((float)th1), s.ids, next, ns)
             : scan_row<false, false>(x, cols, fixed((float)th1), s.ids, next, ns);
  } else {
    auto running = [&](float M) { return level_of((M > smax ? M : smax) / temp - dd); };
    sc = raw ? scan_row<true, true>(x, cols, running, s.ids, next, ns, inv)
             : scan_row<false, true>(x, cols, running, s.ids, next, ns, inv);
  }
  if (sc.nan || sc.max == (float)INFINITY) return false;
  const double mr = (double)sc.max;  // the raw max
  int64_t n = sc.n;
  double th = sc.th, below = sc.below, tail = 0, m = -inf;
  Entries c;
  if (!by_mass && n < kk) return false;
  if (by_mass) {
    if (n > cols / 8) return false;  // a flat row: the general path
    int64_t above = 0;  // entries >= th: at least one not an exception, and the top-n
    for (int64_t i = 0; i < n; ++i) above += (double)to_compute(x[s.ids[i]]) >= th;
    if (above < kk) return false;
    c = merge(x, s.ids, n, -inf, e, temp);
    for (int64_t i = 0; i < c.n; ++i) m = c.y[i] > m ? c.y[i] : m;  // the processed max
    // Top-p: the list (every entry >= t / T, and some below) must hold more
    // than top_p of the mass, the tail the float sum below t less the
    // exceptions' terms there (their own values are in the list).
    auto enough = [&](float t, double pbelow) {
      if (!(top_p < 1)) return true;
      for (int64_t i = 0, q = 0; q < e.n; ++q) {
        for (; i < n && s.ids[i] < e.id[q]; ++i) {}
        if (i == n || s.ids[i] != e.id[q]) pbelow -= (double)vexp_neg(splat<float>(((float)e.x[q] - t) * inv))[0];
      }
      const double Lr = t / temp;
      tail = pbelow > 0 ? ::exp(Lr - m) * pbelow : 0;
      constexpr int WD = Vec<double>::W;
      const V<double> lv = splat<double>(Lr);
      V<double> sv = {}, uv = {};
      for (int64_t i = 0; i < c.n; i += WD) {
        const V<double> y = load_partial(c.y + i, imin(WD, c.n - i), -inf);
        const V<double> w = vexp_neg(y - m);
        sv += w;
        uv += y >= lv ? w : V<double>{};
      }
      return hsum<double>(uv) >= (top_p + 1e-6) * (hsum<double>(sv) + tail);
    };
    // The running level was at most the final one (it is not when a penalty
    // lowered the raw max): one pass was enough, unless top-p needs it wider.
    const bool first = sc.th <= level_of(m - dd);
    if (!(first && enough(sc.th, sc.pbelow))) {
      for (double d = first ? dd * 1.5 : dd;; d *= 1.5) {  // more passes, at fixed levels
        if (d > 2048) return false;
        const float t2 = level_of(m - d);
        if (!(t2 > -INFINITY)) return false;
        const Scan s2 = raw ? scan_row<true, true>(x, cols, fixed(t2), s.ids, none, ns, inv)
                            : scan_row<false, true>(x, cols, fixed(t2), s.ids, none, ns, inv);
        if (s2.n > cols / 8 || s2.n < kk) return false;
        th = t2, n = s2.n, below = s2.below;
        c = merge(x, s.ids, n, th, e, temp);
        if (enough(t2, s2.pbelow)) break;
      }
    }
  }
  // The raw log-sum: the candidates' terms in double, then the float sum below th.
  const double sum = raw ? cand_sum(x, s.ids, n, mr, s.tmp) + ::exp(th - mr) * below : 0;
  if (!by_mass) {
    // Narrowed to the entries >= the kk-th largest (about kk of ~8V/1024): still
    // every top-k survivor, every entry above one (its rank) and the top-n.
    if (n > 2 * kk) {
      if (!raw)
        for (int64_t i = 0; i < n; ++i) s.tmp[i] = (double)to_compute(x[s.ids[i]]);
      th = kth_largest(s.tmp, n, kk);
    }
    c = merge(x, s.ids, n, th, e, temp);
    for (int64_t i = 0; i < c.n; ++i) m = c.y[i] > m ? c.y[i] : m;
  }
  // The processed row on the list (DecodeRow.vocab): its finite entries, or
  // greedy's first argmax alone.
  int64_t nf = 0;
  for (int64_t i = 0; i < c.n; ++i)
    if (greedy ? c.y[i] == m : c.y[i] > -inf) {
      s.ids[nf++] = i;
      if (greedy) break;
    }
  const DecodeRow d{decode_filters(a, r, c.y, m, s.ids, nf, s.tmp, tail), m, false, c.id};
  // The raw statistics on the list: it holds every entry >= th and the top-n;
  // a token below th (an exception) reads the whole row for its rank.
  auto raw_stats = [&](int64_t t) {
    const double xt = (double)to_compute(x[t]);
    auto log_sum = [&](double) { return ::log(sum); };
    if (xt >= th) {
      decode_logprobs(a, r, t, xt, [&](auto f) {
        for (int64_t i = 0; i < c.n; ++i) f(c.id[i], c.x[i]);
      }, log_sum, false, zs);
    } else {
      decode_logprobs(a, r, t, xt, [&](auto f) {
        for (int64_t j = 0; j < cols; ++j) f(j, (double)to_compute(x[j]));
      }, log_sum, false, zs);
    }
  };
  const DecodeScratch cs{c.y, s.tmp, s.ids, s.hist};
  decode_emit(a, r, d, cs, [&](double v) { fill_row(o, cols, v); },
              [o](int64_t j, double v) { from_compute(o + j, (typename Compute<T>::type)v); }, raw_stats, zs);
  return true;
}

template <class T>
void decode_rows(const DecodeArgs& a, int64_t r0, int64_t r1) {
  typedef typename Compute<T>::type C;
  const int64_t V = a.logits.cols;
  const DecodeScratch s =
      decode_scratch(tl_buffers.get(decode_row_bytes(V, a.prev_len, a.num_logprobs)), V, a.prev_len);
  double* zs = decode_zs(s, a.prev_len);
  const SparseBias sb = sparse_bias(a);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = (const T*)a.logits.data + r * a.logits.stride;
    T* o = (T*)a.out.data + r * a.out.stride;
    if constexpr (!std::is_same<T, double>::value) {
      const T* next = r + 1 < r1 ? x + a.logits.stride : nullptr;
      if (decode_fast(a, r, x, next, o, s, zs, sb)) continue;
    }
    auto raw = [x](int64_t j) { return (double)to_compute(x[j]); };
    decode_one(a, r, raw, [&](double v) { fill_row(o, V, v); },
               [o](int64_t j, double v) { from_compute(o + j, (C)v); },
               [&](double m) { return dec_log_sum(raw, V, m); }, s, zs);
  }
}

template <class T>
void top_k_rows(const TopKArgs& a, int64_t r0, int64_t r1) {
  const int64_t V = a.x.cols, k = a.k;
  const DecodeScratch s = decode_scratch(tl_buffers.get(decode_row_bytes(V, 0, 0)), V, 0);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = (const T*)a.x.data + r * a.x.stride;
    T* vals = (T*)a.values.data + r * a.values.stride;
    int64_t* ids = a.indices + r * k;
    top_k_one(a, [x](int64_t j) { return (double)to_compute(x[j]); },
              [&](int64_t i, int64_t j) { vals[i] = x[j]; ids[i] = j; }, s);
  }
}

}  // namespace

void kernel(const DecodeArgs& a) {
  with_dtype(a.logits.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    parallel_rows(a.logits.rows, threads_for(a.logits.rows * a.logits.cols),
                  [&](int64_t r0, int64_t r1) { decode_rows<T>(a, r0, r1); });
  });
}

void kernel(const TopKArgs& a) {
  if (a.k == 0) return;
  with_dtype(a.x.dtype, [&](auto* tag) {
    typedef typename std::remove_pointer<decltype(tag)>::type T;
    parallel_rows(a.x.rows, threads_for(a.x.rows * a.x.cols),
                  [&](int64_t r0, int64_t r1) { top_k_rows<T>(a, r0, r1); });
  });
}

}  // namespace LMXENT_ISA
}  // namespace cpu
}  // namespace lmxent
