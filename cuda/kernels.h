// The CUDA kernel entry points, as the host sees them: plain C++ (no CUDA
// headers), so the pybind11 binding is compiled by the host compiler. Every
// launcher enqueues its kernels on the given stream and returns at once: no
// host synchronisation, a cudaError_t (0: success) for the launch itself.
#pragma once
#include <stddef.h>

#include "lmxent/contract.h"

namespace lmxent {
namespace cuda {

// Where and how to launch: the stream (a cudaStream_t), the device's
// multiprocessor count (it sizes row splits) and the scratch memory the
// *_scratch function asked for (nullptr when it asked for none).
struct Launch {
  void* stream = nullptr;
  int sm_count = 1;
  void* scratch = nullptr;
};

// Scratch bytes a call needs (0: none). A row is split across several blocks
// when there are few rows and they are long; the blocks' partial log-sum-exp
// states meet in scratch.
size_t softmax_scratch(const SoftmaxArgs& a, int sm_count);
size_t cross_entropy_scratch(const CEArgs& a, int sm_count);
size_t token_stats_scratch(const TokenStatsArgs& a, int sm_count);

int softmax(const SoftmaxArgs& a, const Launch& l);
int cross_entropy(const CEArgs& a, const Launch& l);
int token_stats(const TokenStatsArgs& a, const Launch& l);
int kl_divergence(const KLArgs& a, const Launch& l);  // one block per row: no scratch

// The cross-entropy kernels never read out of bounds: a class id outside
// [0, V) that is not ignore_index gives its row a NaN loss and gradient and is
// recorded in a per-device status word. take_status copies the record of the
// current device (count of such rows, smallest row index + 1, 0 if none) to
// host memory on `stream`, waits for it, and clears it.
int take_status(void* stream, unsigned long long* count, unsigned long long* first_row);
// The same for token_stats, whose kernels give such a row a NaN logprob and
// rank -1 and keep their own record.
int take_token_stats_status(void* stream, unsigned long long* count, unsigned long long* first_row);

}  // namespace cuda
}  // namespace lmxent
