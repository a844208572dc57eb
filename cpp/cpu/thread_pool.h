// lmxent's own thread pool for the CPU kernels (compiled once, not per ISA).
//
// Why not OpenMP: libgomp's worker threads do not survive fork(), and a child's
// first parallel region then waits for them forever (data-loader workers,
// multiprocessing with the fork start method); its thread count is a per-OS-
// thread setting, so set_num_threads in one Python thread did not reach the
// others. This pool is process-wide and fork-aware: a pthread_atfork child
// handler drops the (vanished) workers, and the child starts its own on its
// first parallel call, at full speed.
//
// A parallel call is n tasks, task t covering the t-th of n equal parts of the
// work; the caller runs tasks too. The split depends on n only, never on which
// thread runs a task, so results are bitwise the same however the tasks land:
// on the pool's workers or, when another call holds the pool (several Python
// threads: the GIL is released), all on the calling thread. Calls therefore
// never wait for each other, never deadlock, and use at most the pool's
// workers plus one thread per concurrent caller. Idle workers spin briefly
// (back-to-back calls find them awake) and then sleep on a condition variable,
// so they do not compete with other pools (BLAS, torch) between calls.
#pragma once

namespace lmxent {
namespace cpu {

constexpr int kMaxThreads = 512;  // the most threads set_num_threads accepts

// The process-wide thread count: LMXENT_NUM_THREADS, else OMP_NUM_THREADS
// (its first entry), else the CPUs this process may run on; capped at kMaxThreads.
int num_threads();
void set_num_threads(int n);  // 1 <= n <= kMaxThreads, checked by the caller

typedef void (*TaskFn)(void* ctx, int task, int ntasks);
// Runs fn(ctx, t, ntasks) for every t in [0, ntasks) and returns when all are done.
void run_tasks(int ntasks, TaskFn fn, void* ctx);

// f(task, ntasks) for every task, as run_tasks. One task runs inline.
template <class F>
inline void parallel_tasks(int ntasks, const F& f) {
  if (ntasks <= 1) {
    f(0, 1);
    return;
  }
  run_tasks(ntasks, [](void* c, int t, int n) { (*(const F*)c)(t, n); }, (void*)&f);
}

}  // namespace cpu
}  // namespace lmxent
