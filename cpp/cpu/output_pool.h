// Memory for large NumPy outputs, kept across calls.
//
// A new array's pages cost the OS a fault and a zero-fill before the kernel
// can write them: for a 512 MB gradient that is one more pass over memory on
// top of the kernel's own read and write (a 4096x32000 float32 fused gradient
// takes 80-100 ms into fresh pages, 50-57 ms into reused ones). The pool keeps
// the blocks of released outputs (up to a byte limit, oldest dropped first) and
// hands one back to the
// next output of about the same size, already faulted in, the way CuPy's and
// PyTorch's GPU allocators do. Blocks are 2 MiB aligned and advised for huge
// pages. Thread-safe. POSIX (mmap).
#pragma once
#include <stddef.h>

namespace lmxent {
namespace cpu {

constexpr size_t kPoolAlign = 2 << 20;

struct PoolBlock {
  void* p;
  size_t n;  // bytes
};
// A block of at least `bytes` (n rounded up to kPoolAlign), reused when an idle
// one fits, else newly mapped. p is nullptr when out of memory (or for 0 bytes).
PoolBlock pool_take(size_t bytes);
// Returns a block from pool_take; kept if the idle blocks stay within the
// limit, else unmapped. Never throws (it runs in a destructor).
void pool_give(PoolBlock b) noexcept;

struct PoolInfo {
  size_t limit, idle_bytes, idle_blocks;
};
PoolInfo pool_info();
// Sets the limit on idle bytes, frees the oldest idle blocks above it, and
// returns the previous limit. 0 turns the pool off.
size_t pool_set_limit(size_t limit);

}  // namespace cpu
}  // namespace lmxent
