// The decoding ops on the CPU: process_logits / sample (DecodeArgs) and top_k
// (TopKArgs). The row math is lmxent/decoding.h, shared with CUDA; here only
// the walk: one thread per row (blocks of rows over the pool), each with its
// own float64 row buffers, reused across calls.
//
// Memory traffic: see lmxent/decoding.h (one read of the logits into a row
// buffer, passes over the buffer, then only the survivors; one write of the
// processed row when asked).
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

template <class T>
void decode_rows(const DecodeArgs& a, int64_t r0, int64_t r1) {
  typedef typename Compute<T>::type C;
  const int64_t V = a.logits.cols;
  const DecodeScratch s =
      decode_scratch(tl_buffers.get(decode_row_bytes(V, a.prev_len, a.num_logprobs)), V, a.prev_len);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = (const T*)a.logits.data + r * a.logits.stride;
    T* o = (T*)a.out.data + r * a.out.stride;
    auto raw = [x](int64_t j) { return (double)to_compute(x[j]); };
    decode_one(a, r, raw,
               [o](int64_t j, double v) { from_compute(o + j, (C)v); },
               [&](double m) { return dec_log_sum(raw, V, m); },
               s, decode_zs(s, a.prev_len));
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
