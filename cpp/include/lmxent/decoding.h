// The row math of the decoding ops (DecodeArgs, TopKArgs in contract.h),
// written as LMXENT_HD code: the CPU kernel (cpp/cpu/ops/decoding.cpp) runs
// it on one thread per row, taking the same operations in the same order as
// the float64 reference (python/lmxent/reference.py, docs/decoding.md); the
// CUDA kernel's block-per-row algorithm (cuda/decoding_block.h) shares its
// per-entry steps (penalties, the generator) and its semantics:
// every step is float64, whatever the logits' dtype.
//
// No sort of the vocabulary. Top-k: a threshold read off a strided sample of
// the row (the s-th largest of ~1024 entries, s chosen so that a few times k
// entries lie above it) keeps a small candidate set in one pass; a
// quickselect over the candidates gives the exact k-th largest (the whole row
// when the sample guessed too high). Top-p: the candidates within d of the max
// logit (d = 8, then 4x wider) are sorted by probability until their
// cumulative mass reaches top_p: the threshold is then the probability of the
// token that crossed it. The sample walks the survivors in vocabulary order.
//
// Memory traffic per row: one read of the logits into a float64 row buffer
// (bias, penalties and temperature applied on the way), one pass over it for
// the max, one for the candidates, then only survivors; the raw log-probabilities
// (logprobs_of="raw") read the logits twice more (max and top-n, then the sum).
// The CPU kernel has a fast path for the common cases (top-k, top-p or min-p,
// greedy; penalties and a sparse bias as exceptions: cpp/cpu/ops/decoding.cpp)
// that feeds decode_filters and decode_emit a compact candidate list
// (DecodeRow.vocab).
#pragma once
#include "contract.h"
#include "philox.h"
#ifndef __CUDA_ARCH__
#include <algorithm>
#endif

namespace lmxent {
inline namespace LMXENT_ISA {

template <class E>
LMXENT_HD void dec_swap(E& a, E& b) { E t = a; a = b; b = t; }

// Heap sort of a[0..n) into the order of `before` (a strict weak order).
template <class E, class Before>
LMXENT_HD void dec_sift(E* a, int64_t i, int64_t n, const Before& before) {
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= n) return;
    if (c + 1 < n && before(a[c], a[c + 1])) ++c;
    if (!before(a[i], a[c])) return;
    dec_swap(a[i], a[c]);
    i = c;
  }
}
template <class E, class Before>
LMXENT_HD void dec_sort(E* a, int64_t n, const Before& before) {
  for (int64_t i = n / 2 - 1; i >= 0; --i) dec_sift(a, i, n, before);
  for (int64_t m = n - 1; m > 0; --m) {
    dec_swap(a[0], a[m]);
    dec_sift(a, (int64_t)0, m, before);
  }
}

struct Descending {
  LMXENT_HD bool operator()(double a, double b) const { return a > b; }
};

// Sorts a[0..n) descending: up to 64 entries by their ranks (each entry's
// place is the count of entries before it; compares, no branches to
// mispredict, unlike a heap sort's), more by dec_sort on the GPU and
// std::sort on the host (a few times faster; the sorted doubles are the same).
LMXENT_HD void sort_descending(double* a, int64_t n) {
  constexpr int64_t kRankSort = 64;
#ifdef __CUDA_ARCH__
  if (n > kRankSort) return dec_sort(a, n, Descending());
#else
  if (n > kRankSort) return std::sort(a, a + n, Descending());
#endif
  double out[kRankSort];
  for (int64_t i = 0; i < n; ++i) {
    const double v = a[i];
    int64_t place = 0;  // entries before a[i]: larger ones, and equal ones before it
    for (int64_t j = 0; j < i; ++j) place += a[j] >= v;
    for (int64_t j = i + 1; j < n; ++j) place += a[j] > v;
    out[place] = v;
  }
  for (int64_t i = 0; i < n; ++i) a[i] = out[i];
}

struct Ascending {
  template <class E>
  LMXENT_HD bool operator()(E a, E b) const { return a < b; }
};

// The k-th largest (k in [1, n]) of v[0..n), no NaN; v is reordered.
// Quickselect with branch-free partitions (a compare decides an index step,
// not a jump: random data would mispredict every other branch): the entries
// > p to the front, then, only when the k-th is not among them, the entries
// == p, so that long runs of ties (masked -inf entries) stay linear.
LMXENT_HD double kth_largest(double* v, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n;
  const int64_t want = k - 1;  // its index in descending order
  for (;;) {
    if (hi - lo <= 1) return v[lo];
    double a = v[lo], b = v[lo + (hi - lo) / 2], c = v[hi - 1];
    if (a < b) dec_swap(a, b);
    if (b < c) dec_swap(b, c);
    if (a < b) dec_swap(a, b);
    const double p = b;  // median of three
    int64_t lt = lo;     // [lo, lt) > p
    for (int64_t i = lo; i < hi; ++i) {
      const double x = v[i];
      v[i] = v[lt];
      v[lt] = x;
      lt += x > p;
    }
    if (want < lt) {
      hi = lt;
      continue;
    }
    int64_t gt = lt;  // [lt, gt) == p
    for (int64_t i = lt; i < hi; ++i) {
      const double x = v[i];
      v[i] = v[gt];
      v[gt] = x;
      gt += x == p;
    }
    if (want < gt) return p;
    lo = gt;
  }
}

LMXENT_HD bool dec_nan(double v) { return v != v; }

// Indices (ascending) of a superset of the k largest entries of y[0..V),
// NaN counted as the largest: every j with y_j >= t or NaN, t the threshold
// guessed from a strided sample of y (in `tmp`, V doubles), or every j when
// fewer than k lie there. Returns their count.
LMXENT_HD int64_t select_candidates(const double* y, int64_t V, int64_t k, int64_t* ids, double* tmp) {
  const int64_t ns = V < 1024 ? V : 1024;
  const int64_t s = 2 * k * ns / V + 8;  // expected candidates: about (2k + 8 V / ns)
  double t = -(double)INFINITY;
  if (s < ns) {
    for (int64_t i = 0; i < ns; ++i) {
      const double v = y[i * V / ns];
      tmp[i] = dec_nan(v) ? (double)INFINITY : v;
    }
    t = kth_largest(tmp, ns, s);
  }
  int64_t n = 0;
  for (int64_t j = 0; j < V; ++j)
    if (y[j] >= t || dec_nan(y[j])) ids[n++] = j;
  if (n >= k) return n;
  for (int64_t j = 0; j < V; ++j) ids[j] = j;
  return V;
}

// Per-row buffers: y and tmp V doubles, ids V indices, hist prev_len indices.
struct DecodeScratch {
  double *y, *tmp;
  int64_t *ids, *hist;
};

// The processed row: its survivors ids[0..n) (ascending, all finite) with
// values y[j] and max m; nan: no distribution (the row is all NaN). vocab:
// the vocabulary id of each index j when y and ids index a compact list of
// entries (ascending ids), or nullptr when they are the vocabulary's own.
struct DecodeRow {
  int64_t n;
  double m;
  bool nan;
  const int64_t* vocab;
  LMXENT_HD int64_t id(int64_t j) const { return vocab && j >= 0 ? vocab[j] : j; }
};

// Keeps the survivors j with keep(j), in order.
template <class Keep>
LMXENT_HD int64_t dec_filter(int64_t* ids, int64_t n, const Keep& keep) {
  int64_t w = 0;
  for (int64_t i = 0; i < n; ++i)
    if (keep(ids[i])) ids[w++] = ids[i];
  return w;
}

struct AtLeast {  // y_j >= t and finite
  const double* y;
  double t;
  LMXENT_HD bool operator()(int64_t j) const { return y[j] >= t && y[j] > -(double)INFINITY; }
};
struct ProbAtLeast {  // exp(y_j - m) / S >= t
  const double *y;
  double m, S, t;
  LMXENT_HD bool operator()(int64_t j) const { return ::exp(y[j] - m) / S >= t; }
};

// Top-p over the survivors (see the file comment); n > 0, m their max; tail:
// the mass exp(y - m) of survivors not in ids (0 but for the CPU fast path's
// compact lists, which hold every token top-p can keep).
LMXENT_HD int64_t top_p_filter(const double* y, double m, int64_t* ids, int64_t n, double top_p, double* tmp,
                               double tail) {
  double S = tail;
  for (int64_t i = 0; i < n; ++i) S += ::exp(y[ids[i]] - m);
  for (double d = 8;; d *= 4) {
    const bool all = d > 2048;  // beyond any exp's range: every survivor
    int64_t nc = 0;
    for (int64_t i = 0; i < n; ++i)
      if (all || y[ids[i]] >= m - d) tmp[nc++] = ::exp(y[ids[i]] - m) / S;
    sort_descending(tmp, nc);
    double cum = 0;
    for (int64_t i = 0; i < nc; ++i) {
      cum += tmp[i];
      if (cum >= top_p) return dec_filter(ids, n, ProbAtLeast{y, m, S, tmp[i]});
    }
    if (all || nc == n) return n;  // the mass never reaches top_p: all stay
  }
}

// Top-k, top-p and min-p of a row with values y and finite max m, over
// ids[0..n) (ascending): every finite entry, or with top-k a superset of the
// entries >= the k-th largest (and at least k of them). tmp: n doubles.
// tail: as top_p_filter's.
LMXENT_HD int64_t decode_filters(const DecodeArgs& a, int64_t r, const double* y, double m, int64_t* ids,
                                 int64_t n, double* tmp, double tail = 0) {
  const int64_t k = a.top_k[r];
  if (k > 0 && k < a.logits.cols) {
    for (int64_t i = 0; i < n; ++i) tmp[i] = y[ids[i]];
    n = dec_filter(ids, n, AtLeast{y, kth_largest(tmp, n, k)});  // ties with the k-th stay
  }
  if (a.top_p[r] < 1) n = top_p_filter(y, m, ids, n, a.top_p[r], tmp, tail);
  if (a.min_p[r] > 0) n = dec_filter(ids, n, ProbAtLeast{y, m, 1.0, a.min_p[r]});
  return n;
}

// The penalties of row r on a value v of a token seen c > 0 times: HF's
// repetition penalty, then OpenAI's presence and frequency.
LMXENT_HD double dec_penalize(const DecodeArgs& a, int64_t r, double v, int64_t c) {
  const double x = v < 0 ? v * a.repetition[r] : v / a.repetition[r];
  return x - a.presence[r] - a.frequency[r] * (double)c;
}

// process_logits of row r: raw(j) the logit as a double. Fills s.y and s.ids.
template <class Raw>
LMXENT_HD DecodeRow decode_row(const DecodeArgs& a, int64_t r, const Raw& raw, const DecodeScratch& s) {
  const int64_t V = a.logits.cols;
  double* y = s.y;
  const double* bias = a.bias.data ? (const double*)a.bias.data + (a.bias.rows == 1 ? 0 : r) * a.bias.stride
                                   : nullptr;
  for (int64_t j = 0; j < V; ++j) y[j] = bias ? raw(j) + bias[j] : raw(j);
  if (a.prev) {  // each distinct id once: HF's repetition penalty, then OpenAI's
    int64_t L = 0;
    for (int64_t i = 0; i < a.prev_len; ++i) {
      const int64_t t = a.prev[r * a.prev_len + i];
      if (t >= 0) s.hist[L++] = t;
    }
    dec_sort(s.hist, L, Ascending());
    for (int64_t i = 0; i < L;) {
      const int64_t t = s.hist[i];
      int64_t c = 0;
      for (; i < L && s.hist[i] == t; ++i) ++c;
      y[t] = dec_penalize(a, r, y[t], c);
    }
  }
  const double T = a.temperature[r];
  const double inf = (double)INFINITY;
  if (T == 0) {  // greedy: the first argmax (or first NaN) alone, unscaled
    int64_t best = 0;
    for (int64_t j = 1; j < V && !dec_nan(y[best]); ++j)
      if (y[j] > y[best] || dec_nan(y[j])) best = j;
    const double v = y[best];
    for (int64_t j = 0; j < V; ++j) y[j] = -inf;
    y[best] = v;
  }
  double m = -inf;
  bool nan = false;
  for (int64_t j = 0; j < V; ++j) {
    if (T != 0) y[j] /= T;
    nan |= dec_nan(y[j]) || y[j] == inf;
    m = y[j] > m ? y[j] : m;
  }
  if (nan) return {0, m, true, nullptr};
  if (m == -inf) return {0, m, false, nullptr};
  int64_t n = 0;
  const int64_t k = a.top_k[r];
  if (k > 0 && k < V) {
    n = select_candidates(y, V, k, s.ids, s.tmp);
  } else {
    for (int64_t j = 0; j < V; ++j)
      if (y[j] > -inf) s.ids[n++] = j;
  }
  return {decode_filters(a, r, y, m, s.ids, n, s.tmp), m, false, nullptr};
}

// The sampled token of a processed row: the first survivor whose cumulative
// weight exp(y - m) exceeds u * total (the last with a positive weight if
// rounding leaves none); -1 without a distribution.
LMXENT_HD int64_t decode_draw(const DecodeRow& d, const double* y, const int64_t* ids, double u) {
  if (d.nan || d.n == 0) return -1;
  double total = 0;
  for (int64_t i = 0; i < d.n; ++i) total += ::exp(y[ids[i]] - d.m);
  const double target = u * total;
  double cum = 0;
  int64_t last = -1;
  for (int64_t i = 0; i < d.n; ++i) {
    const double w = ::exp(y[ids[i]] - d.m);
    cum += w;
    if (cum > target) return ids[i];
    if (w > 0) last = ids[i];
  }
  return last;
}

// log sum_j exp(raw(j) - m) over [0, V), m the (finite) max: the log-sum-exp
// relative to the max, exact however large the logits.
template <class Raw>
LMXENT_HD double dec_log_sum(const Raw& raw, int64_t V, double m) {
  double sum = 0;
  for (int64_t j = 0; j < V; ++j) sum += ::exp(raw(j) - m);
  return ::log(sum);
}

// Log-probability statistics of a row z (raw or processed) visited as
// z(j) for j in a sequence: max, sum, rank of the token, the n most likely.
struct TopN {  // ids/lps of the row's top-n slot range, lps holding z meanwhile
  int64_t* ids;
  float* lps;
  int64_t n, have;
  double* zs;  // the z of each slot (n doubles)
  // A candidate (visited in ascending j): after all entries >= z.
  LMXENT_HD void offer(int64_t j, double z) {
    if (n == 0 || !(z > -(double)INFINITY)) return;
    if (have == n && !(z > zs[n - 1])) return;
    int64_t i = have < n ? have++ : n - 1;
    for (; i > 0 && zs[i - 1] < z; --i) { zs[i] = zs[i - 1]; ids[i] = ids[i - 1]; }
    zs[i] = z;
    ids[i] = j;
  }
};

// Writes logprob, rank and top-n of the token t for the row visited by
// `each(f)` (f(j, z) over the row's entries, -inf ones may be skipped).
// nan: the row is known to have no distribution. zs: min(num_logprobs, V) doubles.
template <class Each, class LogSum>
LMXENT_HD void decode_logprobs(const DecodeArgs& a, int64_t r, int64_t t, double zt, const Each& each,
                               const LogSum& log_sum_of, bool nan, double* zs) {
  const int64_t n = a.num_logprobs, V = a.logits.cols;
  TopN top{a.top_ids + r * n, a.top_logprobs + r * n, n < V ? n : V, 0, zs};
  const double inf = (double)INFINITY;
  double m = -inf;
  int64_t rank = 0;
  each([&](int64_t j, double z) {
    nan |= dec_nan(z);
    m = z > m ? z : m;
    rank += z > zt || (z == zt && j < t);
    top.offer(j, z);
  });
  const bool defined = !nan && m > -inf && m < inf;
  const double ls = defined ? log_sum_of(m) : 0.0;  // log-sum-exp - m
  if (a.logprob) a.logprob[r] = t >= 0 && defined ? (float)((zt - m) - ls) : (float)NAN;
  if (a.rank) a.rank[r] = t >= 0 ? rank : -1;
  for (int64_t i = 0; i < n; ++i) {
    const bool alive = defined && i < top.have;
    top.ids[i] = alive ? top.ids[i] : -1;
    top.lps[i] = alive ? (float)((zs[i] - m) - ls) : defined ? -(float)INFINITY : (float)NAN;
  }
}

// The outputs of a processed row d (survivors s.ids, values s.y, d.id their
// vocabulary ids): fill(v) writes v to every entry of the processed row and
// store(j, v) entry j (when a.out is set); raw_stats(t) writes logprob, rank
// and top-n of the raw row for the drawn token t (logprobs_raw; see
// decode_logprobs). zs: min(num_logprobs, V) doubles.
template <class Fill, class Store, class RawStats>
LMXENT_HD void decode_emit(const DecodeArgs& a, int64_t r, const DecodeRow& d, const DecodeScratch& s,
                           const Fill& fill, const Store& store, const RawStats& raw_stats, double* zs) {
  if (a.out.data) {
    fill(d.nan ? (double)NAN : -(double)INFINITY);
    for (int64_t i = 0; i < d.n; ++i) store(d.id(s.ids[i]), s.y[s.ids[i]]);
  }
  if (!a.tokens) return;
  const int64_t j = decode_draw(d, s.y, s.ids, philox_uniform(a.seed[r], a.offset[r]));
  a.tokens[r] = d.id(j);
  if (a.logprobs_raw) {
    raw_stats(d.id(j));
  } else {
    const double* y = s.y;
    const int64_t* ids = s.ids;
    auto each = [&](auto f) {
      for (int64_t i = 0; i < d.n; ++i) f(d.id(ids[i]), y[ids[i]]);
    };
    decode_logprobs(a, r, d.id(j), j >= 0 ? y[j] : 0.0, each, [&](double m) {
      double sum = 0;
      each([&](int64_t, double z) { sum += ::exp(z - m); });
      return ::log(sum);
    }, d.nan || d.n == 0, zs);
  }
}

// The whole decode op on row r: raw(j) reads logit j as a double, fill and
// store write the processed row (decode_emit), raw_log_sum(m) is the raw
// row's dec_log_sum (m its finite max; asked only for logprobs_raw).
template <class Raw, class Fill, class Store, class RawLogSum>
LMXENT_HD void decode_one(const DecodeArgs& a, int64_t r, const Raw& raw, const Fill& fill, const Store& store,
                          const RawLogSum& raw_log_sum, const DecodeScratch& s, double* zs) {
  const int64_t V = a.logits.cols;
  const DecodeRow d = decode_row(a, r, raw, s);
  decode_emit(a, r, d, s, fill, store, [&](int64_t t) {
    decode_logprobs(a, r, t, t >= 0 ? raw(t) : 0.0, [&](auto f) {
      for (int64_t j = 0; j < V; ++j) f(j, raw(j));
    }, raw_log_sum, false, zs);
  }, zs);
}

// lx.top_k of one row: (value, index) descending, NaN first, ties lower index
// first. y: the row as doubles.
struct TopKBefore {
  const double* y;
  LMXENT_HD bool operator()(int64_t i, int64_t j) const {
    const bool ni = dec_nan(y[i]), nj = dec_nan(y[j]);
    if (ni != nj) return ni;
    if (!ni && y[i] != y[j]) return y[i] > y[j];
    return i < j;
  }
};

// The whole top_k op on row r: load(j) reads x_j as a double into s.y;
// put(i, j) writes the i-th largest, x_j.
template <class Load, class Put>
LMXENT_HD void top_k_one(const TopKArgs& a, const Load& load, const Put& put, const DecodeScratch& s) {
  const int64_t V = a.x.cols;
  for (int64_t j = 0; j < V; ++j) s.y[j] = load(j);
  const int64_t n = select_candidates(s.y, V, a.k, s.ids, s.tmp);
  dec_sort(s.ids, n, TopKBefore{s.y});
  for (int64_t i = 0; i < a.k; ++i) put(i, s.ids[i]);
}

// Scratch of one row: y, tmp (doubles), ids (V), hist (prev_len), zs.
LMXENT_HD int64_t decode_row_bytes(int64_t V, int64_t prev_len, int64_t num_logprobs) {
  return 8 * (3 * V + prev_len + (num_logprobs < V ? num_logprobs : V));
}
LMXENT_HD DecodeScratch decode_scratch(void* base, int64_t V, int64_t prev_len) {
  double* y = (double*)base;
  int64_t* ids = (int64_t*)(y + 2 * V);
  return {y, y + V, ids, ids + V};
}
LMXENT_HD double* decode_zs(const DecodeScratch& s, int64_t prev_len) { return (double*)(s.hist + prev_len); }

}  // namespace LMXENT_ISA
}  // namespace lmxent
