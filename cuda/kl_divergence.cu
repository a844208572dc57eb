// KL divergence between the softmax of student and teacher rows (forward,
// reverse, Jensen-Shannon) with the gradient with respect to the student
// logits (the CUDA counterpart of cpp/cpu/ops/kl_divergence.cpp; formulas in
// lmxent/contract.h, KLArgs).
//
// One block per row. Pass 1 reads both rows once: two online LSE states and
// the direction's weighted sum (KLAcc in rows.cuh), every logit taken
// relative to its own row's max (a = zs - ms, b = zt - mt),
//   forward: D = sum_j exp(b_j) (b_j - a_j),  KL = D / St + log Ss - log St
//   reverse: D = sum_j exp(a_j) (a_j - b_j),  KL = D / Ss + log St - log Ss
// (kl_merge_sum in lmxent/contract.h: a teacher-student offset of any size
// cancels exactly, nothing cancels against an LSE where the rows agree, huge
// finite logits never overflow). Jensen-Shannon needs both LSEs before its
// sums, so it reads the rows a second time (from L2: the block does it right
// after pass 1). The gradient pass reads them once more and writes the
// gradient, possibly over the student (each element is read and written by
// the same thread); both take log p as kz (z - m) - log s (LogProb).
//
// Rows are not split across blocks (as on the CPU): one long row runs on one
// block.
#include <type_traits>

#include "rows.cuh"

namespace lmxent {
namespace cuda {
namespace {

constexpr int kForward = (int)KLDirection::Forward, kReverse = (int)KLDirection::Reverse,
              kJS = (int)KLDirection::JS;

// The row's scalars, shared with the whole block.
struct KLRow {
  double ms, mt;              // the rows' maxima (u units)
  double log_ss, log_st;      // log of the rows' sums relative to their maxima
  double base;                // the gradient's sum_k p_k c_k (reverse: KL; JS: js_p / 2)
  bool ok;                    // both distributions defined (finite maxima, no NaN)
};

template <class T, int Dir>
struct KLK {
  typedef typename Compute<T>::type C;
  static constexpr bool TW = Dir == kForward;  // the sum is weighted by the teacher
  KLArgs a;
  C kz;         // scale (1 / temperature), in C as on the CPU (cpp/cpu/ops/kl_divergence.cpp)
  Factor<C> k;  // kz log2(e)

  __device__ const T* xs(int64_t r) const { return (const T*)a.student.data + r * a.student.stride; }
  __device__ const T* xt(int64_t r) const { return (const T*)a.teacher.data + r * a.teacher.stride; }
  __device__ T* g(int64_t r) const { return a.grad.data ? (T*)a.grad.data + r * a.grad.stride : nullptr; }
  __device__ void put_loss(int64_t r, double kl) const {
    if (a.loss) ((C*)a.loss)[r] = (C)kl_clamp(kl);
  }

  __device__ KLAcc<C> pass1(int64_t r, KLAcc<C>* sh) const {
    const Factor<C> k = this->k;
    KLAcc<C> acc = kl_empty<C>();
    row_walk2<false>(xs(r), xt(r), (T*)nullptr, 0, a.student.cols,
                     [&](int64_t, auto& us, auto& ut) { kl_add<TW, Dir != kJS>(acc, us, ut, k); });
    return block_merge(acc, kl_empty<C>(), [k](const KLAcc<C>& p, const KLAcc<C>& q) {
      return kl_acc_merge<TW>(p, q, k);
    }, sh);
  }

  // The row's maxima and log sums and, for forward and reverse, its loss (one thread).
  __device__ KLRow finish(int64_t r, const KLAcc<C>& acc) const {
    KLRow w;
    w.ms = (double)acc.ms;
    w.mt = (double)acc.mt;
    w.log_ss = log(acc.ss);
    w.log_st = log(acc.st);
    w.ok = lse_defined(acc.ms, acc.ss) && lse_defined(acc.mt, acc.st);
    w.base = !w.ok ? (double)NAN
             : Dir != kJS ? kl_row_loss((KLDirection)Dir, (double)kz, acc.d, acc.ss, acc.st, w.log_ss, w.log_st)
                          : 0.0;
    if (Dir != kJS || !w.ok) put_loss(r, w.base);
    if (w.base < 0) w.base = 0;
    return w;
  }

  // Per element: log p, log q (centred on each row's max), p, q and the
  // Jensen-Shannon log-ratios (KLElem, lmxent/row_math.h).
  typedef KLElem<C, C> Elem;
  __device__ LogProb<C> log_probs(double m, double log_s) const { return {(C)m, kz, (C)log_s}; }

  // Jensen-Shannon: sum_j p log(p / m), sum_j q log(q / m) of the row.
  __device__ Sum2 js_sums(int64_t r, const KLRow& w, Sum2* sh) const {
    const LogProb<C> ss = log_probs(w.ms, w.log_ss), st = log_probs(w.mt, w.log_st);
    Sum2 acc{0.0, 0.0};
    row_walk2<false>(xs(r), xt(r), (T*)nullptr, 0, a.student.cols, [&](int64_t, auto& us, auto& ut) {
      C sp = 0, sq = 0;
      int i = 0;
      for (const C u : us) {
        const Elem e(u, ut[i++], ss, st, true);
        sp += weighted<C>(e.p, e.lpm);
        sq += weighted<C>(e.q, e.lqm);
      }
      acc.a += (double)sp;
      acc.b += (double)sq;
    });
    return block_merge(acc, Sum2{0.0, 0.0}, [](const Sum2& x, const Sum2& y) { return sum2_add(x, y); }, sh);
  }

  // The gradient row: forward p - q; reverse and JS p (c - base) with
  // c = log p - log q (reverse), log(p / m) / 2 (JS); times kz and the row's factor.
  __device__ void grad(int64_t r, const KLRow& w) const {
    T* gr = g(r);
    const int64_t V = a.student.cols;
    if (!w.ok) {
      row_fill(gr, 0, V, (C)NAN);
      return;
    }
    const LogProb<C> ss = log_probs(w.ms, w.log_ss), st = log_probs(w.mt, w.log_st);
    const C f = (C)((double)kz * a.grad_scale * (a.grad_rows ? (double)((const C*)a.grad_rows)[r] : 1.0));
    const C base = (C)w.base;
    row_walk2<true>(xs(r), xt(r), gr, 0, V, [&](int64_t, auto& us, auto& ut) {
      int i = 0;
      for (auto& u : us) u = Elem(u, ut[i++], ss, st, Dir == kJS).grad((KLDirection)Dir, base) * f;
    });
  }
};

template <class T, int Dir>
__global__ void __launch_bounds__(kMaxThreads, 2) kl_rows(KLK<T, Dir> k) {
  typedef typename Compute<T>::type C;
  __shared__ KLAcc<C> sh[kMaxWarps];
  __shared__ Sum2 sh2[kMaxWarps];
  __shared__ KLRow row;
  const int64_t V = k.a.student.cols;
  for (int64_t r = blockIdx.x; r < k.a.student.rows; r += gridDim.x) {
    if (k.a.row_mask && !k.a.row_mask[r]) {  // the same branch for the whole block
      if (threadIdx.x == 0) k.put_loss(r, 0.0);
      if (k.a.grad.data) row_fill(k.g(r), 0, V, (C)0);
      continue;
    }
    const KLAcc<C> acc = k.pass1(r, sh);
    if (threadIdx.x == 0) row = k.finish(r, acc);
    __syncthreads();
    KLRow w = row;
    if (Dir == kJS && w.ok) {
      const Sum2 js = k.js_sums(r, w, sh2);
      if (threadIdx.x == 0) {
        k.put_loss(r, 0.5 * (js.a + js.b));
        row.base = 0.5 * js.a;  // every thread read `row` before js_sums' barriers
      }
      __syncthreads();
      w.base = row.base;
    }
    if (k.a.grad.data) k.grad(r, w);
    __syncthreads();  // every thread has read `row` before the next row writes it
  }
}

template <class T, int Dir>
cudaError_t enqueue(const KLArgs& a, const Launch& l) {
  typedef typename Compute<T>::type C;
  // 0 multiprocessors: the plan never splits a row, only sizes the block.
  const Plan p = make_plan(a.student.rows, a.student.cols, (int)sizeof(T), 0);
  const C kz = (C)a.tr.scale;
  const KLK<T, Dir> k{a, kz, Factor<C>((double)kz * kLog2e)};
  kl_rows<T, Dir><<<p.grid_rows, p.threads, 0, (cudaStream_t)l.stream>>>(k);
  return cudaGetLastError();
}

}  // namespace

size_t scratch(const KLArgs&, int) { return 0; }  // one block per row: no parts to merge

int launch(const KLArgs& a, const Launch& l) {
  if (a.student.rows == 0 || a.student.cols == 0) return (int)cudaSuccess;
  cudaError_t e = cudaSuccess;
  with_dtype(a.student.dtype, [&](auto* tag) {
    typedef std::remove_pointer_t<decltype(tag)> T;
    switch (a.dir) {
      case KLDirection::Forward: e = enqueue<T, kForward>(a, l); break;
      case KLDirection::Reverse: e = enqueue<T, kReverse>(a, l); break;
      case KLDirection::JS: e = enqueue<T, kJS>(a, l); break;
    }
  });
  return (int)e;
}

}  // namespace cuda
}  // namespace lmxent
