// The CUDA kernel entry points, as the host sees them: plain C++ (no CUDA
// headers), so the pybind11 binding is compiled by the host compiler. Every
// op's launch(const Args&, const Launch&) and scratch(const Args&, int)
// overloads are declared by LMXENT_OP in lmxent/contract.h and defined in the
// op's .cu file. A launcher enqueues its kernels on the given stream and
// returns at once: no host synchronisation, a cudaError_t (0: success) for
// the launch itself.
#pragma once
#include <stddef.h>

#include "lmxent/contract.h"

namespace lmxent {
namespace cuda {

// Where and how to launch: the stream (a cudaStream_t), the device's
// multiprocessor count (it sizes row splits) and the scratch memory
// scratch() asked for (nullptr when it asked for none).
struct Launch {
  void* stream = nullptr;
  int sm_count = 1;
  void* scratch = nullptr;
};

// scratch(): the bytes a call needs (0: none). A row is split across several
// blocks when there are few rows and they are long; the blocks' partial
// log-sum-exp states meet in scratch.

// launch() of any op as a value (an overload set is not one), for code that
// passes the launcher on.
struct Launcher {
  template <class Args>
  int operator()(const Args& a, const Launch& l) const { return launch(a, l); }
};

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
