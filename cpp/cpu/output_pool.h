// Memory for large NumPy outputs, kept across calls.
//
// A new array's pages cost the OS a fault and a zero-fill before the kernel
// can write them: for a 512 MB gradient that is one more pass over memory on
// top of the kernel's own read and write, and the largest part of the time of
// a call that allocates its output. The pool keeps the blocks of released
// outputs (up to a byte limit, oldest dropped first) and hands one back to the
// next output of about the same size, already faulted in, the way CuPy's and
// PyTorch's GPU allocators do. Blocks are 2 MiB aligned and advised for huge
// pages. Thread-safe.
#pragma once
#include <stddef.h>

namespace lmxent {
namespace cpu {

constexpr size_t kPoolAlign = 2 << 20;

// A block of at least `bytes` (rounded up to kPoolAlign; *got says how much),
// reused when an idle one fits, else new. nullptr when out of memory.
void* pool_take(size_t bytes, size_t* got);
// Returns a block from pool_take; kept if the idle blocks stay within the limit.
void pool_give(void* p, size_t bytes);

struct PoolInfo {
  size_t limit, idle_bytes, idle_blocks;
};
PoolInfo pool_info();
// Sets the limit on idle bytes, frees the oldest idle blocks above it, and
// returns the previous limit. 0 turns the pool off.
size_t pool_set_limit(size_t limit);

}  // namespace cpu
}  // namespace lmxent
