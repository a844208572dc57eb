// The decoding ops on the CPU: process_logits / sample (DecodeArgs) and top_k
// (TopKArgs). The row math is lmxent/decoding.h, shared with CUDA; here only
// the walk: one thread per row (blocks of rows over the pool), each with its
// own float64 row buffers, reused across calls.
//
// Memory traffic: see lmxent/decoding.h (one read of the logits into a row
// buffer, passes over the buffer, then only the survivors; one write of the
// processed row when asked).
#include <vector>

#include "../rows.h"
#include "lmxent/decoding.h"

namespace lmxent {
namespace cpu {
inline namespace LMXENT_ISA {

namespace {

// This thread's row buffers, grown to the call's sizes.
struct Buffers {
  std::vector<double> y, tmp, zs;
  std::vector<int64_t> ids, hist;
  DecodeScratch get(int64_t V, int64_t L, int64_t n_top) {
    y.resize(V);
    tmp.resize(V);
    ids.resize(V);
    hist.resize(L);
    zs.resize(n_top < V ? n_top : V);
    return {y.data(), tmp.data(), ids.data(), hist.data()};
  }
};
thread_local Buffers tl_buffers;

template <class T>
void decode_rows(const DecodeArgs& a, int64_t r0, int64_t r1) {
  const int64_t V = a.logits.cols;
  const DecodeScratch s = tl_buffers.get(V, a.prev_len, a.num_logprobs);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = (const T*)a.logits.data + r * a.logits.stride;
    auto raw = [x](int64_t j) { return (double)to_compute(x[j]); };
    const DecodeRow d = decode_row(a, r, raw, s);
    if (a.out.data) {
      typedef typename Compute<T>::type C;
      T* o = (T*)a.out.data + r * a.out.stride;
      const C fill = d.nan ? (C)NAN : -(C)INFINITY;
      for (int64_t j = 0; j < V; ++j) from_compute(o + j, fill);
      for (int64_t i = 0; i < d.n; ++i) from_compute(o + s.ids[i], (C)s.y[s.ids[i]]);
    }
    if (!a.tokens) continue;
    const int64_t t = decode_draw(d, s.y, s.ids, philox_uniform(a.seed[r], a.offset[r]));
    a.tokens[r] = t;
    if (a.logprobs_raw) {
      decode_logprobs(a, r, t, t >= 0 ? raw(t) : 0.0, [&](auto f) {
        for (int64_t j = 0; j < V; ++j) f(j, raw(j));
      }, false, tl_buffers.zs.data());
    } else {
      decode_logprobs(a, r, t, t >= 0 ? s.y[t] : 0.0, [&](auto f) {
        for (int64_t i = 0; i < d.n; ++i) f(s.ids[i], s.y[s.ids[i]]);
      }, d.nan || d.n == 0, tl_buffers.zs.data());
    }
  }
}

template <class T>
void top_k_rows(const TopKArgs& a, int64_t r0, int64_t r1) {
  const int64_t V = a.x.cols, k = a.k;
  const DecodeScratch s = tl_buffers.get(V, 0, 0);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = (const T*)a.x.data + r * a.x.stride;
    for (int64_t j = 0; j < V; ++j) s.y[j] = (double)to_compute(x[j]);
    const int64_t n = select_candidates(s.y, V, k, s.ids, s.tmp);
    dec_sort(s.ids, n, TopKBefore{s.y});
    T* vals = (T*)a.values.data + r * a.values.stride;
    for (int64_t i = 0; i < k; ++i) {
      vals[i] = x[s.ids[i]];
      a.indices[r * k + i] = s.ids[i];
    }
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
