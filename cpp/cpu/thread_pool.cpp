// The CPU kernels' thread pool; see thread_pool.h for what it guarantees.
//
// One job at a time owns the pool (busy). Its owner publishes the job, wakes
// the helpers it wants through each one's own generation counter and condition
// variable (so a 2-task job wakes one worker, not all of them), and claims
// tasks itself. When no task is left it closes the job and waits only for the
// helpers that joined it (their tasks may still run): a helper that wakes late,
// say on a busy machine, finds the job closed and touches nothing of it. So a
// descheduled worker never delays a call, and the job fields may change as
// soon as the joined helpers are done. Workers are started on first need and never exit: the pool
// and its workers are never freed, so nothing waits on them at process exit.
// After fork() the child gets a fresh, empty pool: the parent's workers do not
// exist there, and nothing of the old pool (whose locks or job may have been
// in use by a parent thread at the fork) is touched again.
#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace lmxent {
namespace cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Long enough to catch the next call of a loop of kernel calls (a few µs of
// Python in between), short enough that an idle worker leaves the core to
// other threads almost at once.
constexpr std::chrono::microseconds kSpin(50);

template <class Pred>
bool spin_until(Pred done) {
  const auto t0 = std::chrono::steady_clock::now();
  for (unsigned i = 1;; ++i) {
    if (done()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() - t0 > kSpin) return false;
  }
}

struct alignas(64) Worker {
  std::atomic<uint64_t> gen{0};  // the job this worker is asked to join
  std::mutex m;
  std::condition_variable cv;
};

struct Pool {
  std::atomic<bool> busy{false};  // a caller owns the fields below
  TaskFn fn = nullptr;
  void* ctx = nullptr;
  int ntasks = 0;
  uint64_t gen = 0;
  std::atomic<int> next{0};  // the next task to claim
  // The job's generation (high 32 bits), whether it is closed to new helpers
  // (kClosed) and how many helpers joined and have not finished (low bits).
  std::atomic<uint64_t> ctl{0};
  std::mutex done_m;
  std::condition_variable done_cv;
  int started = 0;  // workers[0, started) run worker_main
  Worker* workers[kMaxThreads] = {};
};

constexpr uint64_t kClosed = 1u << 31, kJoined = kClosed - 1;

Pool* g_pool = nullptr;  // replaced in a forked child; null only if that allocation failed
std::atomic<int> g_threads{1};
thread_local bool t_worker = false;  // a kernel run by a worker never re-enters the pool

void claim_tasks(Pool* p) {
  for (int t; (t = p->next.fetch_add(1, std::memory_order_relaxed)) < p->ntasks;) p->fn(p->ctx, t, p->ntasks);
}

void worker_main(Pool* p, Worker* w) {
  t_worker = true;
  uint64_t seen = 0;
  for (;;) {
    if (!spin_until([&] { return w->gen.load(std::memory_order_acquire) != seen; })) {
      std::unique_lock<std::mutex> l(w->m);
      w->cv.wait(l, [&] { return w->gen.load(std::memory_order_acquire) != seen; });
    }
    seen = w->gen.load(std::memory_order_acquire);
    uint64_t c = p->ctl.load(std::memory_order_acquire);
    bool joined = false;
    while ((c >> 32) == (uint32_t)seen && !(c & kClosed) && !joined)
      joined = p->ctl.compare_exchange_weak(c, c + 1, std::memory_order_acquire);
    if (!joined) continue;  // too late: the owner has done the work
    claim_tasks(p);
    c = p->ctl.fetch_sub(1, std::memory_order_acq_rel) - 1;
    if ((c & kClosed) && !(c & kJoined)) {
      { std::lock_guard<std::mutex> l(p->done_m); }  // the owner is waiting or will see 0
      p->done_cv.notify_one();
    }
  }
}

// Starts workers until `want` exist (or the system refuses a thread); returns
// how many there are. Workers block asynchronous signals: Python handles
// those on its main thread, and a worker must not be interrupted by them.
int ensure_workers(Pool* p, int want) {
  if (p->started >= want) return want;
  sigset_t block, old;
  sigfillset(&block);
  for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP}) sigdelset(&block, s);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  while (p->started < want) {
    Worker* w = new (std::nothrow) Worker;
    if (!w) break;
    try {
      std::thread t(worker_main, p, w);
#ifdef __linux__
      pthread_setname_np(t.native_handle(), "lmxent-worker");  // shown by top -H, gdb, /proc
#endif
      t.detach();
    } catch (const std::system_error&) {
      delete w;
      break;
    }
    p->workers[p->started++] = w;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return p->started < want ? p->started : want;
}

int env_threads(const char* name) {
  const char* s = getenv(name);
  if (!s || !*s) return 0;
  char* end;
  const long n = strtol(s, &end, 10);
  // OMP_NUM_THREADS may be a list ("4,2" for nested levels): its first entry counts.
  if (end == s || (*end && *end != ',') || n < 1 || n > kMaxThreads) return 0;
  return (int)n;
}

int default_threads() {
  int n = env_threads("LMXENT_NUM_THREADS");
  if (!n) n = env_threads("OMP_NUM_THREADS");
#ifdef __linux__
  cpu_set_t set;
  if (!n && sched_getaffinity(0, sizeof set, &set) == 0) n = CPU_COUNT(&set);
#endif
  if (!n) n = (int)std::thread::hardware_concurrency();
  return n < 1 ? 1 : n > kMaxThreads ? kMaxThreads : n;
}

void after_fork_child() { g_pool = new (std::nothrow) Pool; }

struct Init {
  Init() {
    g_threads.store(default_threads());
    g_pool = new Pool;
    pthread_atfork(nullptr, nullptr, after_fork_child);
  }
} init;

}  // namespace

int num_threads() { return g_threads.load(std::memory_order_relaxed); }
void set_num_threads(int n) { g_threads.store(n, std::memory_order_relaxed); }

void run_tasks(int ntasks, TaskFn fn, void* ctx) {
  Pool* p = g_pool;
  if (t_worker || !p || p->busy.exchange(true, std::memory_order_acquire)) {
    // The pool is taken (another Python thread's call): run every task here.
    // Same tasks, same split, so the same result as on the pool.
    for (int t = 0; t < ntasks; ++t) fn(ctx, t, ntasks);
    return;
  }
  const int helpers = ensure_workers(p, ntasks - 1 < kMaxThreads - 1 ? ntasks - 1 : kMaxThreads - 1);
  p->fn = fn;
  p->ctx = ctx;
  p->ntasks = ntasks;
  p->next.store(0, std::memory_order_relaxed);
  const uint64_t g = ++p->gen;
  p->ctl.store((uint64_t)(uint32_t)g << 32, std::memory_order_release);
  for (int i = 0; i < helpers; ++i) {
    Worker* w = p->workers[i];
    {
      std::lock_guard<std::mutex> l(w->m);  // no lost wake-up against a worker going to sleep
      w->gen.store(g, std::memory_order_release);
    }
    w->cv.notify_one();  // no system call when the worker is still spinning
  }
  claim_tasks(p);
  p->ctl.fetch_or(kClosed, std::memory_order_acq_rel);
  auto finished = [&] { return !(p->ctl.load(std::memory_order_acquire) & kJoined); };
  if (!spin_until(finished)) {
    std::unique_lock<std::mutex> l(p->done_m);
    p->done_cv.wait(l, finished);
  }
  p->busy.store(false, std::memory_order_release);
}

}  // namespace cpu
}  // namespace lmxent
