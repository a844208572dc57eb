// The decoding ops on the CPU: process_logits / sample (DecodeArgs) and top_k
// (TopKArgs). The row math is lmxent/decoding.h, shared with CUDA; here the
// walk (one thread per row, blocks of rows over the pool, float64 row buffers
// per thread, reused across calls) and a fast path for the common case.
//
// Why a CPU-only fast path: the shared row math works on a float64 copy of
// the row (bias and penalties need one), so every pass over V entries is
// scalar double code. Without bias and penalties, with top-k, float32/bf16/f16
// logits and 2^-800 <= T <= 2^800, y = x / T is strictly increasing in x (the
// quotients of distinct floats cannot round together, overflow or underflow
// in double), so everything that needs the whole row can run on the raw x in
// float vectors: the max, the NaN check, the top-k candidates (every x >= a
// threshold th read off a sample of the row, as select_candidates does) and,
// for the raw log-probabilities, sum exp(x - th) over the entries below th.
// Only the candidates (about 2k + 8V/1024) go to double: their exps complete
// the raw log-sum, then they are narrowed to the entries >= the kk-th largest
// (kk = max(k, num_logprobs)), y = x / T at those, and the shared
// decode_filters / decode_emit / decode_logprobs run on that compact list
// (DecodeRow.vocab maps it back), so the survivors, the draw and the outputs
// are the general path's. The raw log-sum is sum over candidates of
// exp(x - max) in double plus exp(th - max) times the float sum below th:
// accurate relative to x - max (not to the LSE's magnitude, which large
// logits would spoil), each term below th smaller than the largest.
//
// Memory traffic of the fast path: one read of the logits (and one write of
// the processed row when asked), plus ~1024 sampled entries. Any surprise
// (NaN or +inf, a threshold that leaves fewer than k candidates or is -inf)
// sends the row to the general path, which reads it again.
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

thread_local Buffers tl_cands;  // the fast path's candidates for the raw statistics

// Writes v to every entry of a processed row.
template <class T>
void fill_row(T* o, int64_t V, double v) {
  typedef typename Compute<T>::type C;
  row_emit(o, 0, V, [&](int64_t, int64_t) { return splat<C>((C)v); });
}

constexpr double kSafeTMin = 0x1p-800, kSafeTMax = 0x1p800;
constexpr int64_t kSample = 1024;  // entries read for the candidate threshold

// The sampled entries of a row of `cols` (as select_candidates reads them).
inline int64_t sample_at(int64_t i, int64_t cols, int64_t ns) { return i * cols / ns; }

// The fast path's pass over a row: its max, whether it holds a NaN, the
// candidates x >= th (ascending, into ids) and, with Raw, sum exp(x - th) over
// the entries below th (a NaN reaches that sum: no separate check). Prefetches
// the sample of the next row (`next`, or nullptr) as it goes.
struct Scan {
  float max;
  bool nan;
  int64_t n;
  double below;
};
template <bool Raw, class T>
Scan scan_row(const T* x, int64_t cols, float th, int64_t* ids, const T* next, int64_t ns) {
  typedef float C;
  constexpr int W = Vec<C>::W;
  const V<C> tv = splat<C>(th);
  V<C> mx0 = splat<C>(-(C)INFINITY), mx1 = mx0;
  VI<C> nan = {};
  int64_t n = 0;
  double below = 0;
  auto visit = [&](V<C> v, int64_t j, V<C>& e, V<C>& mx) {
    mx = vmax<C>(mx, v);
    if (!Raw) nan |= v != v;
    V<C> ev = Raw ? vexp_neg(v - tv) : V<C>{};
    if (uint32_t ge = mask_ge(v, tv)) {
      ev = v >= tv ? V<C>{} : ev;
      for (; ge; ge &= ge - 1) ids[n++] = j + __builtin_ctz(ge);
    }
    if (Raw) e += ev;
  };
  for (int64_t b = 0, i = 0; b < cols; b += kChunk) {
    const int64_t nb = imin(kChunk, cols - b), nv = nb - nb % W;
    for (; next && i < ns && sample_at(i, cols, ns) < b + nb; ++i)
      __builtin_prefetch(next + sample_at(i, cols, ns), 0, 3);
    V<C> e0 = {}, e1 = {};
    int64_t j = b;
    for (; j + 2 * W <= b + nv; j += 2 * W) {
      visit(load(x + j), j, e0, mx0);
      visit(load(x + j + W), j + W, e1, mx1);
    }
    if (j < b + nv) visit(load(x + j), j, e0, mx0), j += W;
    if (j < b + nb) visit(load_partial(x + j, b + nb - j, -(C)INFINITY), j, e1, mx1);
    if (Raw) below += (double)hsum<C>(e0 + e1);
  }
  return {hmax<C>(vmax<C>(mx0, mx1)), Raw ? below != below : cpu::any<C>(nan), n, below};
}

// The fast path of row r (see the file comment); false: not taken, nothing
// written. next: the next row's logits (its sample is prefetched during the
// pass), or nullptr.
template <class T>
bool decode_fast(const DecodeArgs& a, int64_t r, const T* x, const T* next, T* o, const DecodeScratch& s,
                 double* zs) {
  constexpr int WD = Vec<double>::W;
  const int64_t cols = a.logits.cols, k = a.top_k[r];
  const double temp = a.temperature[r], inf = (double)INFINITY;
  if (a.bias.data || a.prev || !(k > 0 && k < cols) || !(temp >= kSafeTMin && temp <= kSafeTMax)) return false;
  const bool raw = a.tokens && a.logprobs_raw;
  const int64_t nl = raw ? imin(a.num_logprobs, cols) : 0, kk = k > nl ? k : nl;
  // The threshold: as select_candidates, for the larger of k and the top-n.
  const int64_t ns = imin(cols, kSample), si = 2 * kk * ns / cols + 8;
  if (si >= ns) return false;
  for (int64_t i = 0; i < ns; ++i) {
    const double v = (double)to_compute(x[sample_at(i, cols, ns)]);
    if (v != v || v == inf) return false;
    s.tmp[i] = v;
  }
  const double th = kth_largest(s.tmp, ns, si);
  if (th == -inf) return false;
  // The pass, then the candidates as a compact list: vocabulary ids, raw
  // values (padded to whole vectors), processed values; s.ids becomes their indices.
  const Scan sc = raw ? scan_row<true>(x, cols, (float)th, s.ids, next, ns)
                      : scan_row<false>(x, cols, (float)th, s.ids, next, ns);
  int64_t n = sc.n;
  const double below = sc.below;
  if (sc.nan || sc.max == (float)INFINITY || n < kk) return false;
  const double mr = (double)sc.max;  // the raw max
  int64_t* cids = (int64_t*)tl_cands.get(8 * (3 * n + WD));
  double *cx = (double*)(cids + n), *cy = cx + n + WD;
  for (int64_t i = 0; i < n; ++i) {
    cids[i] = s.ids[i];
    cx[i] = (double)to_compute(x[cids[i]]);
    cy[i] = cx[i] / temp;
    s.ids[i] = i;
  }
  // The raw log-sum: the candidates' terms in double, then the float sum below th.
  double sum = 0;
  if (raw) {
    V<double> acc = {};
    for (int64_t i = n; i % WD; ++i) cx[i] = -inf;
    for (int64_t i = 0; i < n; i += WD) acc += vexp_neg(load(cx + i) - mr);
    sum = hsum<double>(acc) + ::exp(th - mr) * below;
  }
  // Narrowed to the entries >= the kk-th largest (about kk of ~8V/1024): still
  // every top-k survivor, every entry above one (its rank) and the top-n.
  if (n > 2 * kk) {
    for (int64_t i = 0; i < n; ++i) s.tmp[i] = cx[i];
    const double t2 = kth_largest(s.tmp, n, kk);
    int64_t w = 0;
    for (int64_t i = 0; i < n; ++i)
      if (cx[i] >= t2) cids[w] = cids[i], cx[w] = cx[i], cy[w] = cy[i], s.ids[w] = w, ++w;
    n = w;
  }
  const DecodeRow d{decode_filters(a, r, cy, mr / temp, s.ids, n, s.tmp), mr / temp, false, cids};
  auto raw_stats = [&](int64_t t) {
    decode_logprobs(a, r, t, (double)to_compute(x[t]), [&](auto f) {
      for (int64_t i = 0; i < n; ++i) f(cids[i], cx[i]);
    }, [&](double) { return ::log(sum); }, false, zs);
  };
  const DecodeScratch cs{cy, s.tmp, s.ids, s.hist};
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
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = (const T*)a.logits.data + r * a.logits.stride;
    T* o = (T*)a.out.data + r * a.out.stride;
    if constexpr (!std::is_same<T, double>::value) {
      const T* next = r + 1 < r1 ? x + a.logits.stride : nullptr;
      if (decode_fast(a, r, x, next, o, s, zs)) continue;
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
