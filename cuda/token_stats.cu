// Token statistics in one read of the logits: the target's log-probability,
// the LSE, the entropy, the largest probability and the target's rank (the
// CUDA counterpart of cpp/cpu/ops/token_stats.cpp; formulas in lmxent/contract.h,
// TokenStatsArgs).
//
// Memory traffic: one read of each logit, no pass 2. The entropy sum and the
// rank count ride in the online-LSE walk (EntAcc in rows.cuh); the rank needs
// the target's logit before the walk, which every thread loads (one address
// per warp: a broadcast, no barrier). Few long rows are split across blocks:
// a first kernel writes each slice's state, a second merges them.
//
// A class id outside [0, V) that is not ignore_index (possible only under
// deferred validation) is never used as an index: its row gets a NaN logprob
// and rank -1, and is recorded in g_bad_stats (see take_token_stats_status).
#include <type_traits>

#include "rows.cuh"

namespace lmxent {
namespace cuda {

// Rows with an out-of-range class id since the last take_token_stats_status on
// this device: [0] their count, [1] the largest 2^64 - 1 - row (0: none).
__device__ unsigned long long g_bad_stats[2];

namespace {

struct StatPart {  // one block's state over its slice, u space
  double m, s, h;
  long long above;
};

template <class T>
struct StatsK {
  typedef typename Compute<T>::type C;
  TokenStatsArgs a;
  Tr<C, false> tr;

  __device__ const T* x(int64_t r) const { return (const T*)a.logits.data + r * a.logits.stride; }

  // The target column: -1 ignored, -2 out of range (never read), else t.
  __device__ int64_t target(int64_t r) const {
    const int64_t t = a.targets[r];
    if (t == a.ignore_index) return -1;
    return t < 0 || t >= a.logits.cols ? -2 : t;
  }
  __device__ RankOf<C> rank_of(int64_t r, int64_t t) const { return {t >= 0 ? to_c(x(r)[t]) : (C)0, t}; }

  __device__ EntAcc<C> partial(int64_t r, const RankOf<C>& rk, int64_t c0, int64_t c1) const {
    EntAcc<C> acc = ent_empty<C>();
    row_walk<false>(x(r), (T*)nullptr, c0, c1, [&](int64_t j, auto& v) { ent_add(acc, v, j, rk, tr.k); });
    return acc;
  }

  __device__ EntAcc<C> reduce(const EntAcc<C>& acc, EntAcc<C>* sh) const {
    const Factor<C> k = tr.k;
    return block_merge(acc, ent_empty<C>(), [k](const EntAcc<C>& p, const EntAcc<C>& q) {
      return ent_acc_merge(p, q, k);
    }, sh);
  }

  // The row's outputs from its merged state (token_stats_row, lmxent/row_math.h;
  // one thread), and the record of a bad class id.
  __device__ void finish(int64_t r, const RankOf<C>& rk, const EntAcc<C>& acc) const {
    const LseState<double> st{tr.kz * (double)acc.m, acc.s};
    token_stats_row<C>(a, r, st, tr.kz * acc.h, (double)acc.m, tr.kz, rk.t, (double)rk.ut, (int64_t)acc.above);
    if (rk.t == -2) {
      atomicAdd(&g_bad_stats[0], 1ull);
      atomicMax(&g_bad_stats[1], ~0ull - (unsigned long long)r);
    }
  }
};

// One block per row.
template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) stats_rows(StatsK<T> k) {
  typedef typename Compute<T>::type C;
  __shared__ EntAcc<C> sh[kMaxWarps];
  const int64_t V = k.a.logits.cols;
  for (int64_t r = blockIdx.x; r < k.a.logits.rows; r += gridDim.x) {
    const RankOf<C> rk = k.rank_of(r, k.target(r));
    const EntAcc<C> acc = k.reduce(k.partial(r, rk, 0, V), sh);
    if (threadIdx.x == 0) k.finish(r, rk, acc);
  }
}

// Split rows, kernel 1: block (r, s) writes the state of slice s of row r.
template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) stats_part(StatsK<T> k, StatPart* parts, int64_t slice) {
  typedef typename Compute<T>::type C;
  __shared__ EntAcc<C> sh[kMaxWarps];
  const int64_t V = k.a.logits.cols, S = gridDim.y, s = blockIdx.y;
  const int64_t c0 = s * slice, c1 = c0 + slice < V ? c0 + slice : V;
  for (int64_t r = blockIdx.x; r < k.a.logits.rows; r += gridDim.x) {
    const EntAcc<C> acc = k.reduce(k.partial(r, k.rank_of(r, k.target(r)), c0, c1), sh);
    if (threadIdx.x == 0) parts[r * S + s] = {(double)acc.m, acc.s, acc.h, acc.above};
  }
}

// Split rows, kernel 2: one block per row merges the row's S parts.
template <class T>
__global__ void __launch_bounds__(kMaxThreads, 2) stats_finish(StatsK<T> k, const StatPart* parts, int S) {
  typedef typename Compute<T>::type C;
  __shared__ EntAcc<C> sh[kMaxWarps];
  for (int64_t r = blockIdx.x; r < k.a.logits.rows; r += gridDim.x) {
    EntAcc<C> acc = ent_empty<C>();
    for (int i = threadIdx.x; i < S; i += blockDim.x) {
      const StatPart& p = parts[r * S + i];
      acc = ent_acc_merge(acc, EntAcc<C>{(C)p.m, p.s, p.h, p.above}, k.tr.k);
    }
    acc = k.reduce(acc, sh);
    if (threadIdx.x == 0) k.finish(r, k.rank_of(r, k.target(r)), acc);
  }
}

template <class T>
cudaError_t enqueue(const TokenStatsArgs& a, const Launch& l) {
  typedef typename Compute<T>::type C;
  const Plan p = make_plan(a.logits.rows, a.logits.cols, (int)sizeof(T), l.sm_count);
  const StatsK<T> k{a, Tr<C, false>(a.tr)};
  const cudaStream_t st = (cudaStream_t)l.stream;
  if (p.split == 1) {
    stats_rows<T><<<p.grid_rows, p.threads, 0, st>>>(k);
  } else {
    StatPart* parts = (StatPart*)l.scratch;
    stats_part<T><<<dim3(p.grid_rows, p.split), p.threads, 0, st>>>(k, parts, p.slice);
    stats_finish<T><<<p.grid_rows, p.threads, 0, st>>>(k, parts, p.split);
  }
  return cudaGetLastError();
}

}  // namespace

size_t scratch(const TokenStatsArgs& a, int sm_count) {
  const int64_t n = a.logits.rows;
  if (n == 0 || a.logits.cols == 0) return 0;
  const Plan p = make_plan(n, a.logits.cols, (int)item_size(a.logits.dtype), sm_count);
  return p.split > 1 ? (size_t)n * (size_t)p.split * sizeof(StatPart) : 0;
}

int launch(const TokenStatsArgs& a, const Launch& l) {
  if (a.logits.rows == 0 || a.logits.cols == 0) return (int)cudaSuccess;
  cudaError_t e = cudaSuccess;
  with_dtype(a.logits.dtype, [&](auto* tag) { e = enqueue<std::remove_pointer_t<decltype(tag)>>(a, l); });
  return (int)e;
}

int take_token_stats_status(void* stream, unsigned long long* count, unsigned long long* first_row) {
  return take_record(g_bad_stats, stream, count, first_row);
}

}  // namespace cuda
}  // namespace lmxent
