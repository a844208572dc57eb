"""Philox-4x32-10, the counter-based generator behind lmxent's sampling, in NumPy.

Philox (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC'11; the Random123 library) maps a 128-bit counter and a 64-bit key to 128 random
bits with ten rounds of 32x32 -> 64-bit multiplications and XORs. It has no state, so
every row draws from its own (seed, offset) independently of the rest of the batch,
the same way on any device. The round and constants are Random123's philox4x32 (also
cuRAND's Philox4_32_10 and ATen's at::Philox4_32); this module is the bit-exact
specification the C++ and CUDA kernels reproduce: only uint32 arithmetic, products in
uint64, vectorised over any number of rows.

Layout (the same as ATen's at::Philox4_32(seed, subsequence=0, offset) and cuRAND's
curand_init(seed, 0, 4 * offset) followed by curand4):
    key     = (seed mod 2**32, seed >> 32)          for a 64-bit seed
    counter = (offset mod 2**32, offset >> 32, 0, 0) for a 64-bit offset
    (w0, w1, w2, w3) = philox4x32_10(counter, key)
    u = ((w1 << 32 | w0) >> 11) * 2**-53            53 random bits, u in [0, 1)
"""
import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # round multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # key schedule (Weyl) increments
_SHIFT32 = np.uint64(32)


def philox4x32_10(counter, key):
    """Philox-4x32-10 of uint32 `counter` (..., 4) under uint32 `key` (..., 2)
    -> uint32 (..., 4). Each round: (c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0,
    lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)); the key grows by (W0, W1) between
    rounds (mod 2**32)."""
    counter = np.asarray(counter, dtype=np.uint32)
    key = np.asarray(key, dtype=np.uint32)
    c0, c1, c2, c3 = (counter[..., i].astype(np.uint64) for i in range(4))
    k0, k1 = (key[..., i].astype(np.uint64) for i in range(2))
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2  # exact: both factors < 2**32
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32)
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def uniform(seed, offset):
    """The uniform in [0, 1) of each (seed, offset) pair (uint64 arrays of one shape),
    from the 53 high bits of the first two Philox words (see the module docstring)."""
    seed = np.asarray(seed, dtype=np.uint64)
    offset = np.asarray(offset, dtype=np.uint64)
    zero = np.zeros_like(offset)
    counter = np.stack([offset & _MASK32, offset >> _SHIFT32, zero, zero], axis=-1)
    key = np.stack([seed & _MASK32, seed >> _SHIFT32], axis=-1)
    w = philox4x32_10(counter, key).astype(np.uint64)
    bits = ((w[..., 1] << _SHIFT32) | w[..., 0]) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0**-53  # exact: bits < 2**53
