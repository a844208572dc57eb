// The decoding ops with one GPU block per row: the algorithm of the CUDA
// kernels in cuda/decoding.cu, written over a block type B so that the same
// lines also run on the host under tests/emu/block_emulator.h (a block of
// fibers), which is how they are tested without a GPU. No CUDA header here.
//
// The semantics are lmxent/decoding.h's (and the float64 reference's): the
// same float64 steps on each entry; only sums run in another order (a tree
// across the block instead of left to right), so a sampled token may differ
// from the CPU's where a uniform lies within rounding of a cumulative-weight
// boundary, as the tests allow.
//
// Every filter is a threshold on the processed value y, so the survivors are
// never listed: keep(j) = y_j finite, y_j >= the k-th largest (top-k),
// exp(y_j - m) / S >= the probability of the token crossing top_p (top-p),
// exp(y_j - m) >= min_p (min-p). The k-th largest value and the top-p
// crossing are both "the largest key tau whose weight at or above it reaches
// a target": radix_select, eight passes of an 8-bit digit histogram (in
// shared memory) over the row's order-preserving 64-bit keys, each pass
// narrowing to one bucket. Top-k counts entries; top-p weighs each survivor
// by its probability in 2^-60 fixed point (integer atomics: the same answer
// in any order; the rounding, below 2^-61 per token, is far inside the float
// tolerance of a top_p boundary). The draw: per thread a contiguous segment
// of the row, its weight, an exclusive scan across the block, then the one
// thread whose segment holds u * total walks it. The top-n log-probabilities
// and lx.top_k: radix_select for the n-th largest key (and, on ties, for the
// lowest indices among them), the entries gathered and bitonic-sorted.
// Rows longer than kList: a select first narrows to a candidate list (narrow:
// one pass over the row and a select over a strided sample), when the list
// provably holds the answer and fits; else it runs over the row.
//
// Memory traffic per row: one read of the logits into a float64 row buffer y
// (global scratch, L2-resident while the row is in work), then passes over y:
// max, 1 per narrowed select (8 when not narrowed: short or flat rows), 2 for
// the draw, and for the log-probabilities 3 over the raw logits (max and
// rank, the sum, the top-n's candidates). About 30 barriers per select.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "lmxent/decoding.h"

#ifdef __CUDACC__
#define LMXENT_BLK __device__ __forceinline__
#else
#define LMXENT_BLK inline
#endif

namespace lmxent {
namespace block {

// The block B, one per row in work (every thread of the block calls each
// function below with the same arguments):
//   int tid(), size()                 this thread, the threads of the block
//   void sync()                       barrier (memory visible to the block after)
//   uint64_t* words()                 kWords shared words
//   S reduce(S v, merge)              merge of every thread's v, to every thread
//                                     (S plain data, size a multiple of 4)
//   S scan(S v, S* total)             exclusive prefix sum in thread order, and the total
//   atomic_add(p, v) -> old value     on a shared uint64 or a global uint32
//   exchange(p, v) -> old value       on a global uint32
constexpr int kWords = 264;
constexpr int kHist = 0;       // [0, 256): a radix pass's histogram
constexpr int kPick = 256;     // [256, 259): a radix pass's result
constexpr int kCount = 259;    // the gather's counter

constexpr uint64_t kTop = (uint64_t)1 << 63;

// An order-preserving key: a < b <=> key(a) < key(b); NaN the largest, -0 as +0.
LMXENT_BLK uint64_t order_key(double v) {
  if (v != v) return ~(uint64_t)0;
  v = v == 0 ? 0.0 : v;
  uint64_t u;
  memcpy(&u, &v, 8);
  return u & kTop ? ~u : u | kTop;
}
LMXENT_BLK double key_value(uint64_t k) {
  const uint64_t u = k & kTop ? k & ~kTop : ~k;
  double v;
  memcpy(&v, &u, 8);
  return v;
}

LMXENT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
LMXENT_HD int64_t pow2_at_least(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// The largest key tau such that the weight of the entries with key >= tau
// reaches target (>= 1), over j in [0, n) with weight(j) (integer) and key(j)
// (read only where the weight is nonzero). at, above: the weight at or above
// tau, above it; total: the weight of all. When total < target: tau 0.
struct Select {
  uint64_t tau, at, above, total;
};
template <class B, class Key, class Weight>
LMXENT_BLK Select radix_select(B& b, int64_t n, const Key& key, const Weight& weight, uint64_t target) {
  uint64_t* w = b.words();
  const int t = b.tid(), nt = b.size();
  const int per = (256 + nt - 1) / nt;  // this thread's digits: [d0, d1)
  const int d0 = t * per < 256 ? t * per : 256, d1 = d0 + per < 256 ? d0 + per : 256;
  target = target < 1 ? 1 : target;
  uint64_t prefix = 0, above = 0, total = 0, at = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = t; i < 256; i += nt) w[kHist + i] = 0;
    b.sync();
    const uint64_t high = shift == 56 ? 0 : ~(uint64_t)0 << (shift + 8);
    for (int64_t j = t; j < n; j += nt) {
      const uint64_t wj = weight(j);
      if (!wj) continue;
      const uint64_t k = key(j);
      if ((k & high) == prefix) b.atomic_add(&w[kHist + ((k >> shift) & 255)], wj);
    }
    b.sync();
    uint64_t mine = 0, sum = 0;
    for (int d = d0; d < d1; ++d) mine += w[kHist + d];
    uint64_t below = b.scan(mine, &sum);  // the bucket's weight in digits < d0, and in all
    if (shift == 56) {
      total = sum;
      if (total < target) return {0, total, total, total};
    }
    // the digit d with above + (weight of digits >= d) >= target, the largest
    for (int d = d0; d < d1; ++d) {
      const uint64_t h = w[kHist + d], from_d = sum - below;
      if (above + from_d >= target && above + from_d - h < target) {
        w[kPick] = (uint64_t)d;
        w[kPick + 1] = above + from_d - h;
        w[kPick + 2] = above + from_d;
      }
      below += h;
    }
    b.sync();
    prefix |= w[kPick] << shift;
    above = w[kPick + 1];
    at = w[kPick + 2];
  }
  return {prefix, at, above, total};
}

// Sorts n (a power of 2) entries (lk[i], li[i]) by key descending, then index
// ascending: a bitonic network, a barrier per stage.
template <class B>
LMXENT_BLK void sort_entries(B& b, uint64_t* lk, int64_t* li, int64_t n) {
  auto before = [&](int64_t x, int64_t y) { return lk[x] > lk[y] || (lk[x] == lk[y] && li[x] < li[y]); };
  for (int64_t size = 2; size <= n; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t i = b.tid(); i < n; i += b.size()) {
        const int64_t p = i ^ stride;
        if (p > i && ((i & size) == 0 ? before(p, i) : before(i, p))) {
          const uint64_t k = lk[i];
          lk[i] = lk[p];
          lk[p] = k;
          const int64_t x = li[i];
          li[i] = li[p];
          li[p] = x;
        }
      }
      b.sync();
    }
  }
}

// A candidate list (scratch): the key, weight and row index of up to kList entries.
constexpr int64_t kList = 8192;
struct Cands {
  uint64_t* key;
  uint64_t* weight;
  int64_t* index;
};

// Narrows a select (radix_select's arguments over the row's entries j in
// [0, n)) to a candidate list: the entries of nonzero weight with a key at
// least the threshold read off a strided sample of the row (the one that about
// `hint` entries exceed). When their weight reaches target, the answer and
// every entry at or above it are among them, so a select over the list gives
// the row's tau, at and above, for one pass over the row instead of eight.
// Returns their count, or -1 when the row is short, the hint large, or the
// list would not hold the answer or not fit (select over the row).
template <class B, class Key, class Weight>
LMXENT_BLK int64_t narrow(B& b, int64_t n, const Key& key, const Weight& weight, uint64_t target, int64_t hint,
                          const Cands& c) {
  const int64_t ns = n < 1024 ? n : 1024, s = hint * ns / n + 8;  // sampled entries above it
  if (n <= kList || 4 * hint > kList || s >= ns) return -1;
  const Select g = radix_select(b, ns, [&](int64_t i) { return key(i * n / ns); },
                                [](int64_t) -> uint64_t { return 1; }, (uint64_t)s);
  uint64_t* counter = b.words() + kCount;
  if (b.tid() == 0) *counter = 0;
  b.sync();
  struct Mass {
    uint64_t weight, count;
  } mine = {0, 0};
  for (int64_t j = b.tid(); j < n; j += b.size()) {
    const uint64_t w = weight(j);
    if (!w) continue;
    const uint64_t k = key(j);
    if (k < g.tau) continue;
    mine.weight += w;
    ++mine.count;
    const uint64_t i = b.atomic_add(counter, 1);
    if (i < (uint64_t)kList) c.key[i] = k, c.weight[i] = w, c.index[i] = j;
  }
  const Mass all = b.reduce(mine, [](const Mass& x, const Mass& y) {
    return Mass{x.weight + y.weight, x.count + y.count};
  });
  return all.weight >= target && all.count <= (uint64_t)kList ? (int64_t)all.count : -1;
}

// radix_select over the list of narrow() when it gave one (listed >= 0), else over the row.
template <class B, class Key, class Weight>
LMXENT_BLK Select select_in(B& b, int64_t listed, const Cands& c, int64_t n, const Key& key,
                            const Weight& weight, uint64_t target) {
  if (listed >= 0)
    return radix_select(b, listed, [&](int64_t i) { return c.key[i]; }, [&](int64_t i) { return c.weight[i]; },
                        target);
  return radix_select(b, n, key, weight, target);
}

// The `want` (>= 1) first of the entries i in [0, n) of nonzero weight(i) (1),
// by key(i) descending then index(i) ascending, into li (their row indices)
// and lk (their keys), in that order; both hold pow2_at_least(want) entries.
// Returns how many (fewer when fewer are in).
template <class B, class Key, class Weight, class Index>
LMXENT_BLK int64_t pick_top(B& b, int64_t n, const Key& key, const Weight& weight, const Index& index,
                            int64_t want, uint64_t* lk, int64_t* li) {
  const Select s = radix_select(b, n, key, weight, want);
  const uint64_t tau = s.tau;
  int64_t last = INT64_MAX;  // entries with key tau are taken up to this row index
  if (s.total > (uint64_t)want && s.at > (uint64_t)want) {  // more ties at tau than places
    const Select lo = radix_select(b, n, [&](int64_t i) { return ~(uint64_t)index(i); },
                                   [&](int64_t i) -> uint64_t { return weight(i) && key(i) == tau ? 1 : 0; },
                                   want - s.above);
    last = (int64_t)~lo.tau;
  }
  uint64_t* counter = b.words() + kCount;
  if (b.tid() == 0) *counter = 0;
  b.sync();
  for (int64_t i = b.tid(); i < n; i += b.size()) {
    if (!weight(i)) continue;
    const uint64_t k = key(i);
    if (k > tau || (k == tau && index(i) <= last)) {
      const uint64_t at = b.atomic_add(counter, 1);
      lk[at] = k;
      li[at] = index(i);
    }
  }
  const int64_t got = min64(want, (int64_t)s.total), p = pow2_at_least(want);
  for (int64_t i = got + b.tid(); i < p; i += b.size()) lk[i] = 0, li[i] = INT64_MAX;  // sorted last
  b.sync();
  sort_entries(b, lk, li, p);
  return got;
}

// pick_top over the row's entries j in [0, n) with in(j), narrowed to a
// candidate list when it can be.
template <class B, class Key, class In>
LMXENT_BLK int64_t top_entries(B& b, int64_t n, const Key& key, const In& in, int64_t want, uint64_t* lk,
                               int64_t* li, const Cands& c) {
  auto weight = [&](int64_t j) -> uint64_t { return in(j) ? 1 : 0; };
  const int64_t listed = narrow(b, n, key, weight, want, 2 * want, c);
  if (listed >= 0)
    return pick_top(b, listed, [&](int64_t i) { return c.key[i]; }, [&](int64_t i) { return c.weight[i]; },
                    [&](int64_t i) { return c.index[i]; }, want, lk, li);
  return pick_top(b, n, key, weight, [](int64_t j) { return j; }, want, lk, li);
}

// ---- reductions' states (merged in any order with the same result) ---------------

struct MaxNan {
  double m;
  int32_t nan, pad;
};
struct Best {  // the first argmax, a NaN before anything (decode_row's greedy)
  double v;
  int64_t j;
};
LMXENT_BLK Best better(const Best& a, const Best& b) {
  const bool na = a.v != a.v, nb = b.v != b.v;
  if (na != nb) return na ? a : b;
  if (!na && a.v != b.v) return a.v > b.v ? a : b;
  return a.j < b.j ? a : b;
}
struct Draw {  // the first crossing, the last positive weight
  int64_t found, last;
};
struct Stats {  // decode_logprobs' max, NaN flag and rank
  double m;
  int64_t rank;
  int32_t nan, pad;
};

// The row buffers of one block: y (V doubles, none for lx.top_k), then
// `aux`: the penalties' counts (V uint32), or the candidate list (kList
// entries, rows longer than that) followed by the gathered entries' indices
// and keys (P each, P = pow2_at_least of the top-n or k); the counts are
// never needed with the others.
LMXENT_HD int64_t cands_bytes(int64_t V) { return V > kList ? 24 * kList : 0; }
// A multiple of 16 bytes: the next block's buffers start aligned (y is doubles).
LMXENT_HD int64_t row_bytes(int64_t V, bool y, bool prev, int64_t listed) {
  const int64_t counts = prev ? 4 * V : 0;
  const int64_t lists = cands_bytes(V) + (listed > 0 ? 16 * pow2_at_least(listed) : 0);
  return ((y ? 8 * V : 0) + (counts > lists ? counts : lists) + 15) & ~(int64_t)15;
}
// The per-block bytes of each op.
LMXENT_HD int64_t row_bytes(const DecodeArgs& a) {
  const int64_t V = a.logits.cols, n = a.tokens ? a.num_logprobs : 0;
  return row_bytes(V, true, a.prev != nullptr, n < V ? n : V);
}
LMXENT_HD int64_t row_bytes(const TopKArgs& a) { return row_bytes(a.x.cols, false, false, a.k); }
LMXENT_BLK Cands cands_at(unsigned char* aux) {
  uint64_t* k = (uint64_t*)aux;
  return {k, k + kList, (int64_t*)(k + 2 * kList)};
}

// decode_logprobs of decoding.h: logprob and rank of token tok and the top-n
// of the row z(j) (z: raw, or processed with -inf for the removed); nan0: no
// distribution known beforehand.
template <class B, class Z>
LMXENT_BLK void block_logprobs(B& b, const DecodeArgs& a, int64_t r, int64_t tok, const Z& z, bool nan0,
                               unsigned char* aux) {
  const int64_t V = a.logits.cols, n = a.num_logprobs, t = b.tid(), nt = b.size();
  const double inf = (double)INFINITY;
  const double zt = tok >= 0 ? z(tok) : 0.0;
  Stats st = {-inf, 0, 0, 0};
  for (int64_t j = t; j < V; j += nt) {
    const double v = z(j);
    st.nan |= dec_nan(v);
    st.m = v > st.m ? v : st.m;
    st.rank += v > zt || (v == zt && j < tok);
  }
  st = b.reduce(st, [](const Stats& x, const Stats& y) {
    return Stats{y.m > x.m ? y.m : x.m, x.rank + y.rank, x.nan | y.nan, 0};
  });
  const double m = st.m;
  const bool defined = !nan0 && !st.nan && m > -inf && m < inf;
  double ls = 0;  // log-sum-exp - m
  if (defined) {
    double s = 0;
    for (int64_t j = t; j < V; j += nt) s += ::exp(z(j) - m);
    ls = ::log(b.reduce(s, [](double x, double y) { return x + y; }));
  }
  if (t == 0) {
    if (a.logprob) a.logprob[r] = tok >= 0 && defined ? (float)((zt - m) - ls) : (float)NAN;
    if (a.rank) a.rank[r] = tok >= 0 ? st.rank : -1;
  }
  const int64_t want = min64(n, V);
  if (want == 0) return;
  int64_t* li = (int64_t*)(aux + cands_bytes(V));
  uint64_t* lk = (uint64_t*)(li + pow2_at_least(want));
  const int64_t have = defined ? top_entries(b, V, [&](int64_t j) { return order_key(z(j)); },
                                             [&](int64_t j) { return z(j) > -inf; }, want, lk, li, cands_at(aux))
                               : 0;
  for (int64_t i = t; i < n; i += nt) {
    const bool alive = i < have;
    a.top_ids[r * n + i] = alive ? li[i] : -1;
    a.top_logprobs[r * n + i] = alive ? (float)((z(li[i]) - m) - ls) : defined ? -(float)INFINITY : (float)NAN;
  }
  b.sync();  // the entries are read before the next row's use of aux
}

// process_logits / sample of row r (decode_one of decoding.h): raw(j) reads
// logit j as a double, store(j, v) writes v to entry j of a.out.
template <class B, class Raw, class Store>
LMXENT_BLK void decode_block(B& b, const DecodeArgs& a, int64_t r, const Raw& raw, const Store& store, double* y,
                             unsigned char* aux) {
  const int64_t V = a.logits.cols, t = b.tid(), nt = b.size();
  const double inf = (double)INFINITY;
  const double* bias = a.bias.data ? (const double*)a.bias.data + (a.bias.rows == 1 ? 0 : r) * a.bias.stride
                                   : nullptr;
  for (int64_t j = t; j < V; j += nt) y[j] = bias ? raw(j) + bias[j] : raw(j);
  b.sync();
  if (a.prev) {  // each distinct id once, with its count: the first thread to take its count applies it
    const int64_t* prev = a.prev + r * a.prev_len;
    uint32_t* count = (uint32_t*)aux;
    for (int64_t i = t; i < a.prev_len; i += nt)
      if (prev[i] >= 0) count[prev[i]] = 0;
    b.sync();
    for (int64_t i = t; i < a.prev_len; i += nt)
      if (prev[i] >= 0) b.atomic_add(&count[prev[i]], 1u);
    b.sync();
    for (int64_t i = t; i < a.prev_len; i += nt) {
      const uint32_t c = prev[i] >= 0 ? b.exchange(&count[prev[i]], 0u) : 0u;
      if (c) y[prev[i]] = dec_penalize(a, r, y[prev[i]], c);
    }
    b.sync();
  }
  const double T = a.temperature[r];
  MaxNan mn;
  if (T == 0) {  // greedy: the first argmax (or first NaN) alone, unscaled
    Best best = {-inf, INT64_MAX};
    for (int64_t j = t; j < V; j += nt) best = better(best, Best{y[j], j});
    best = b.reduce(best, [](const Best& x, const Best& z) { return better(x, z); });
    for (int64_t j = t; j < V; j += nt)
      if (j != best.j) y[j] = -inf;
    b.sync();
    mn = {dec_nan(best.v) ? -inf : best.v, dec_nan(best.v) || best.v == inf, 0};
  } else {
    mn = {-inf, 0, 0};
    for (int64_t j = t; j < V; j += nt) {
      const double v = y[j] / T;
      y[j] = v;
      mn.nan |= dec_nan(v) || v == inf;
      mn.m = v > mn.m ? v : mn.m;
    }
    mn = b.reduce(mn, [](const MaxNan& x, const MaxNan& z) { return MaxNan{z.m > x.m ? z.m : x.m, x.nan | z.nan, 0}; });
  }
  const double m = mn.m;
  const bool nan = mn.nan, live = !nan && m > -inf;  // live: a distribution to draw from
  // top-k: keep y >= the k-th largest value
  const Cands c = cands_at(aux);
  auto ykey = [&](int64_t j) { return order_key(y[j]); };
  double kth = -inf;
  int64_t listed = -1;  // >= 0: every top-k survivor is in the candidate list
  const int64_t k = a.top_k[r];
  const bool greedy = T == 0;  // one finite entry left: every filter keeps it
  if (live && !greedy && k > 0 && k < V) {
    auto one = [](int64_t) -> uint64_t { return 1; };
    listed = narrow(b, V, ykey, one, (uint64_t)k, 2 * k, c);
    kth = key_value(select_in(b, listed, c, V, ykey, one, (uint64_t)k).tau);
  }
  auto kept_k = [&](int64_t j) { return y[j] >= kth && y[j] > -inf; };
  // top-p over the top-k survivors: keep p >= that of the token crossing top_p
  double S = 1, pt = 0;
  const double top_p = a.top_p[r], min_p = a.min_p[r];
  bool use_p = live && !greedy && top_p < 1;
  if (use_p) {
    // the entries with a weight: top-k's list when there is one (it holds every survivor), else the row
    const int64_t ne = listed >= 0 ? listed : V;
    auto at = [&](int64_t i) { return listed >= 0 ? c.index[i] : i; };
    double s = 0;
    for (int64_t i = t; i < ne; i += nt)
      if (kept_k(at(i))) s += ::exp(y[at(i)] - m);
    S = b.reduce(s, [](double x, double z) { return x + z; });
    constexpr double kFix = 0x1p60;  // probabilities in 2^-60 units
    const uint64_t target = (uint64_t)::ceil(top_p * kFix);
    auto weight = [&](int64_t j) -> uint64_t {
      return kept_k(j) ? (uint64_t)(::exp(y[j] - m) / S * kFix + 0.5) : 0;
    };
    const int64_t np = listed >= 0 ? -1 : narrow(b, V, ykey, weight, target, kList / 4, c);
    const Select sel = np >= 0 ? select_in(b, np, c, V, ykey, weight, target)
                               : radix_select(b, ne, [&](int64_t i) { return ykey(at(i)); },
                                              [&](int64_t i) { return weight(at(i)); }, target);
    use_p = sel.total >= target;  // else the mass never reaches top_p: all stay
    pt = ::exp(key_value(sel.tau) - m) / S;
  }
  auto keep = [&](int64_t j) {
    return live && kept_k(j) && (!use_p || ::exp(y[j] - m) / S >= pt) && (!(min_p > 0) || ::exp(y[j] - m) >= min_p);
  };
  if (a.out.data)
    for (int64_t j = t; j < V; j += nt) store(j, nan ? (double)NAN : keep(j) ? y[j] : -inf);
  if (!a.tokens) {
    b.sync();  // y is read before the next row overwrites it
    return;
  }
  int64_t tok = -1;
  if (live) {  // the inverse CDF in vocabulary order
    const int64_t seg = (V + nt - 1) / nt, j0 = min64(t * seg, V), j1 = min64(j0 + seg, V);
    double s = 0;
    for (int64_t j = j0; j < j1; ++j)
      if (keep(j)) s += ::exp(y[j] - m);
    double total;
    double cum = b.scan(s, &total);
    const double target = philox_uniform(a.seed[r], a.offset[r]) * total;
    Draw d = {INT64_MAX, -1};
    for (int64_t j = j0; j < j1; ++j) {
      if (!keep(j)) continue;
      const double wj = ::exp(y[j] - m);
      cum += wj;
      if (wj > 0 && cum > target) {  // never a zero weight (the scan's rounding at a segment's start)
        d.found = j;
        break;
      }
      if (wj > 0) d.last = j;
    }
    d = b.reduce(d, [](const Draw& x, const Draw& z) {
      return Draw{x.found < z.found ? x.found : z.found, x.last > z.last ? x.last : z.last};
    });
    tok = d.found != INT64_MAX ? d.found : d.last;
  }
  if (t == 0) a.tokens[r] = tok;
  if (a.logprobs_raw)
    block_logprobs(b, a, r, tok, raw, false, aux);
  else
    block_logprobs(b, a, r, tok, [&](int64_t j) { return keep(j) ? y[j] : -inf; }, !live, aux);
}

// lx.top_k of row r: raw(j) reads x_j as a double, put(i, j) writes the i-th
// largest (x_j, j).
template <class B, class Raw, class Put>
LMXENT_BLK void top_k_block(B& b, const TopKArgs& a, int64_t r, const Raw& raw, const Put& put, unsigned char* aux) {
  const int64_t k = a.k;
  int64_t* li = (int64_t*)(aux + cands_bytes(a.x.cols));
  uint64_t* lk = (uint64_t*)(li + pow2_at_least(k));
  top_entries(b, a.x.cols, [&](int64_t j) { return order_key(raw(j)); }, [](int64_t) { return true; }, k, lk, li,
              cands_at(aux));
  for (int64_t i = b.tid(); i < k; i += b.size()) put(i, li[i]);
  b.sync();
}

}  // namespace block
}  // namespace lmxent
