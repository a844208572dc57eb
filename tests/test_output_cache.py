"""The output cache: large NumPy outputs reuse the blocks of released ones.

A reused block holds the previous output's values, so every op that fills a
large output is run on a block poisoned with NaN and checked against the float64
reference (a kernel that skipped an element, such as the gradient row of an
ignored token, would show here, where fresh zeroed pages would hide it). Memory
still viewed by anything is never handed out again.
"""
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import lmxent as lx
from lmxent import _arrays as A
from lmxent import reference as R

from helpers import DTYPE_IDS, DTYPES, assert_grad_close, assert_matches_reference

N, V = 80, 32000  # 5.1 MB in float16: above the pool's 4 MiB floor for every dtype
assert N * V * 2 >= A.POOL_MIN_BYTES
MiB = 1 << 20


@pytest.fixture
def cache():
    """A fresh cache of 1 GiB for the test; the previous limit afterwards."""
    old = lx.set_output_cache(0)
    lx.set_output_cache(1 << 30)
    yield
    lx.set_output_cache(0)
    lx.set_output_cache(old)


def targets_with_ignored(rng, n, v):
    t = rng.integers(0, v, n)
    t[::3] = -100
    return t


def ce_grad(x, t):
    return lx.cross_entropy_with_grad(x, t, reduction="sum")[1]


def ce_grad_ref(x, t):
    return R.cross_entropy_with_grad(x, t, reduction="sum")[1]


def kl_grad(x, t):
    return lx.kl_divergence(x, t, return_grad=True)[1]


def kl_grad_ref(x, t):
    return R.kl_divergence(x, t, return_grad=True)[1]


OPS = {  # name: (op(x, aux), reference(x, aux), aux from (rng, x))
    "log_softmax": (lambda x, _: lx.log_softmax(x), None, None),
    "softmax": (lambda x, _: lx.softmax(x), None, None),
    "cross_entropy_with_grad": (ce_grad, ce_grad_ref, lambda rng, x: targets_with_ignored(rng, *x.shape)),
    "kl_divergence": (kl_grad, kl_grad_ref, lambda rng, x: rng.standard_normal(x.shape).astype(x.dtype)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", OPS)
def test_a_reused_block_gives_the_reference_result(cache, rng, name, dtype):
    op, ref, aux = OPS[name]
    x1 = rng.standard_normal((N, V)).astype(dtype)
    first = op(x1, aux(rng, x1) if aux else None)
    where = first.ctypes.data
    first.fill(np.nan)
    del first
    x2 = (rng.standard_normal((N, V)) * 4).astype(dtype)
    a2 = aux(rng, x2) if aux else None
    out = op(x2, a2)
    assert out.ctypes.data == where, "the released block was not reused"
    if ref is None:
        assert_matches_reference(name, out, x2, dtype)
    else:
        x64 = x2.astype(np.float64)
        assert_grad_close(out, ref(x64, a2 if a2 is None or a2.dtype.kind == "i"
                                   else a2.astype(np.float64)), dtype)


def test_linear_cross_entropy_gradients_from_reused_blocks(cache, rng):
    n, d, v = 160, 160, 8192  # d_weight 5.2 MB, logits buffer 4 MiB
    h = rng.standard_normal((n, d), np.float32)
    w = rng.standard_normal((v, d), np.float32) * 0.1
    t = targets_with_ignored(rng, n, v)
    _, (dh, dw, _) = lx.linear_cross_entropy(h, w, t, chunk_size=128)
    where = dw.ctypes.data
    dw.fill(np.nan)
    del dh, dw
    _, (dh, dw, _) = lx.linear_cross_entropy(h, w, t, chunk_size=128)
    assert dw.ctypes.data == where, "the released block was not reused"
    z = h.astype(np.float64) @ w.T.astype(np.float64)
    _, g = R.cross_entropy_with_grad(z, t)
    assert_grad_close(dh, (g @ w.astype(np.float64)).astype(np.float32), np.float32)
    assert_grad_close(dw, (g.T @ h.astype(np.float64)).astype(np.float32), np.float32)


def test_memory_in_use_is_never_handed_out(cache, rng):
    x = rng.standard_normal((N, V), np.float32)
    t = rng.integers(0, V, N)
    part = ce_grad(x, t)[5:7]  # only a view of the gradient stays alive
    saved = part.copy()
    again = [ce_grad(x * 2, t) for _ in range(3)]
    for g in again:
        assert not np.shares_memory(g, part)
    np.testing.assert_array_equal(part, saved)
    del part, again, g
    assert lx.output_cache_info()["held_blocks"] == 4


def test_outputs_are_ordinary_arrays(cache, rng):
    y = lx.log_softmax(rng.standard_normal((N, V), np.float32))
    assert y.shape == (N, V) and y.dtype == np.float32
    assert y.flags.c_contiguous and y.flags.writeable and y.flags.aligned
    assert y.ctypes.data % 64 == 0


def test_limit(rng):
    x = rng.standard_normal((N, V), np.float32)
    old = lx.set_output_cache(0)
    try:
        lx.log_softmax(x)
        assert lx.output_cache_info() == {"limit": 0, "held_bytes": 0, "held_blocks": 0}
        assert lx.set_output_cache(N * V * 4 // 2) == 0  # below one block: not kept
        lx.log_softmax(x)
        assert lx.output_cache_info()["held_blocks"] == 0
        lx.set_output_cache(1 << 30)
        a, b = lx.log_softmax(x), lx.log_softmax(x)  # two blocks in use at once
        older, newer = a.ctypes.data, b.ctypes.data
        del a, b  # released in that order: b is the newest
        info = lx.output_cache_info()
        assert info["held_blocks"] == 2 and info["held_bytes"] >= 2 * N * V * 4
        lx.set_output_cache(info["held_bytes"] // 2)  # the oldest block is freed
        assert lx.output_cache_info()["held_blocks"] == 1
        assert lx.log_softmax(x).ctypes.data == newer != older
    finally:
        lx.set_output_cache(0)
        lx.set_output_cache(old)


def test_tracemalloc_sees_outputs_in_use(cache, rng):
    x = rng.standard_normal((N, V), np.float32)
    lx.log_softmax(x)  # a held block: reused below, and still counted while in use
    started = not tracemalloc.is_tracing()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        y = lx.log_softmax(x)
        assert tracemalloc.get_traced_memory()[0] - base >= y.nbytes
        del y
        assert tracemalloc.get_traced_memory()[0] - base < 1 << 20
    finally:
        if started:
            tracemalloc.stop()


def test_the_smallest_fitting_block_is_reused(cache):
    """A block serves a request of up to a quarter less than its size."""
    big, small = A.empty(np, 16 * MiB, np.uint8), A.empty(np, 8 * MiB, np.uint8)
    at = {16: big.ctypes.data, 8: small.ctypes.data}
    del big, small
    six = A.empty(np, 6 * MiB, np.uint8)  # fits both: the 8 MiB block
    assert six.ctypes.data == at[8]
    ten = A.empty(np, 10 * MiB, np.uint8)  # 16 MiB is more than a third too large
    assert ten.ctypes.data != at[16]
    fourteen = A.empty(np, 14 * MiB, np.uint8)
    assert fourteen.ctypes.data == at[16]
    assert lx.output_cache_info()["held_blocks"] == 0


@pytest.mark.parametrize("limit, err", [(-1, ValueError), (2**64, ValueError), (1.5, TypeError),
                                        ("1G", TypeError)])
def test_bad_limit(limit, err):
    with pytest.raises(err, match="limit"):
        lx.set_output_cache(limit)


def test_environment_variable():
    code = "import lmxent as lx; print(lx.output_cache_info()['limit'])"
    env = dict(os.environ, LMXENT_OUTPUT_CACHE="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "12345", out.stderr
    env["LMXENT_OUTPUT_CACHE"] = "2GB"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "LMXENT_OUTPUT_CACHE must be a number of bytes" in out.stderr
