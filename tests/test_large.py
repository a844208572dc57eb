"""64-bit indexing on the CPU: inputs of more than 2^31 and 2^32 elements, and row
offsets past both, for logsumexp, log_softmax and cross-entropy (forward, fused
gradient in place, backward).

A huge zero array is backed by the shared zero page until written, so reading it
commits (almost) no memory. A few rows get random values -- the rows straddling and
following element 2^31 and 2^32 among them -- and are checked against the float64
reference on those rows alone; every all-zero row has loss log(V). A 32-bit offset
would wrap: read or write outside the array, or alias another checked row.
V = 2^20 + 1 makes rows straddle the boundaries (V = 2^20 exactly is covered by
test_softmax.py and test_cross_entropy.py). Tests skip where the address space
cannot be reserved or less than twice the memory they commit is available.
"""
import mmap

import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as R

from helpers import (
    F16,
    F32,
    assert_grad_close,
    assert_loss_close,
    assert_matches_reference,
    grad_scale,
    torch_ce_with_grad,
)

GiB = 1 << 30
V1 = (1 << 20) + 1
# 4097 rows of V1: 2^32 + 2^20 + 4097 elements. Row 2047 straddles element 2^31,
# row 4095 element 2^32; rows 2048, 4096 lie past them (4096 is the last row).
ROWS = 4097
RANDOM = [0, 2047, 2048, 4095, 4096]
CHECK = sorted(RANDOM + [1, 2046, 4094])  # compared with the reference
ZERO = np.setdiff1d(np.arange(ROWS), RANDOM)  # all-zero rows: loss log(V)


def need_memory(commit):
    """Skip unless twice the bytes the test commits are available."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pytest.skip("needs /proc/meminfo (MemAvailable) to check the memory it commits")
    if avail < 2 * commit:
        pytest.skip(f"commits {commit / GiB:.1f} GiB: needs twice that available, "
                    f"have {avail / GiB:.1f} GiB")


def lazy_zeros(shape, dtype, *, sparse_writes=False):
    """Zeros that commit memory only where written. sparse_writes: a private anonymous
    mapping without the huge-page advice NumPy gives big arrays, so that a short row
    written commits its 4 KiB pages, not a 2 MiB page each."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
        if sparse_writes:
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
            return np.frombuffer(buf, dtype).reshape(shape)
        return np.zeros(shape, dtype)
    except (MemoryError, OSError) as e:
        pytest.skip(f"cannot reserve {nbytes / GiB:.0f} GiB of address space: {e}")


def fill_random_rows(x, rows, rng):
    """Random rows (each different, its max in the last column: the row's tail
    matters) and class ids, the last row's being the array's last element."""
    V = x.shape[-1]
    for r in rows:
        x[r] = 3.0 * rng.standard_normal(V)
        x[r, -1] = 9.0 + r / x.shape[0]
    t = rng.integers(0, V, x.shape[0])
    t[rows[-1]] = V - 1
    return t


def test_forward_past_2_32_elements(rng):
    need_memory(GiB // 2)
    x = lazy_zeros((ROWS, V1), F32)
    t = fill_random_rows(x, RANDOM, rng)
    lse = lx.logsumexp(x)
    loss, lse2 = lx.cross_entropy(x, t, reduction="none", return_lse=True)

    xc = x[CHECK].astype(np.float64)
    r_loss, r_lse = R.cross_entropy(xc, t[CHECK], reduction="none", return_lse=True)
    assert_matches_reference("logsumexp", lse[CHECK], xc, F32)
    assert_loss_close(loss[CHECK], r_loss, F32)
    assert_loss_close(lse2[CHECK], r_lse, F32, what="lse")
    log_v = np.full(ZERO.size, np.log(V1))
    assert_loss_close(lse[ZERO], log_v, F32, what="lse of zero rows")
    assert_loss_close(lse2[ZERO], log_v, F32, what="lse of zero rows")
    assert_loss_close(loss[ZERO], log_v, F32, what="loss of zero rows")
    torch_result = torch_ce_with_grad(xc, t[CHECK], reduction="none")
    if torch_result is not None:
        assert_loss_close(loss[CHECK], torch_result[0], F32, what="loss vs torch")


def test_probability_targets_past_2_32_elements(rng):
    """The targets' rows are offset past 2^32 elements too."""
    need_memory(GiB // 2)
    x = lazy_zeros((ROWS, V1), F32)
    q = lazy_zeros((ROWS, V1), F32)
    fill_random_rows(x, RANDOM, rng)
    for r in RANDOM:
        p = rng.random(V1)
        q[r] = p / p.sum()
    loss = lx.cross_entropy(x, q, reduction="none", label_smoothing=0.1)
    r_loss = R.cross_entropy(x[CHECK].astype(np.float64), q[CHECK].astype(np.float64),
                             reduction="none", label_smoothing=0.1)
    assert_loss_close(loss[CHECK], r_loss, F32)
    # zero targets and logits: only the smoothing's mass 0.1 remains, times lse = log(V)
    assert_loss_close(loss[ZERO], np.full(ZERO.size, 0.1 * np.log(V1)), F32,
                      what="loss of zero rows")


def test_fused_grad_in_place_past_2_31_elements(rng):
    """float16 in place: the gradient is written over 2^31 + 2^20 + 2049 elements
    (4 GiB committed); rows past element 2^31 are written where they belong."""
    rows = 2049  # row 2047 straddles element 2^31, row 2048 (the last) follows it
    random, check = [0, 2047, 2048], [0, 1, 1024, 2046, 2047, 2048]
    need_memory(rows * V1 * 2 + GiB // 2)
    x = lazy_zeros((rows, V1), F16)
    t = fill_random_rows(x, random, rng)
    xc = x[check].astype(np.float64)
    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", label_smoothing=0.1,
                                         inplace=True)
    assert g is x

    r_loss, r_lse = R.cross_entropy(xc, t[check], reduction="none", label_smoothing=0.1,
                                    return_lse=True)
    _, r_grad = R.cross_entropy_with_grad(xc, t[check], reduction="none", label_smoothing=0.1)
    assert_loss_close(loss[check], r_loss, F16)
    zero = np.setdiff1d(np.arange(rows), random)
    assert_loss_close(loss[zero], np.full(zero.size, np.log(V1)), F16, what="loss of zero rows")
    assert_grad_close(g[check], r_grad, F16,
                      gscale=grad_scale(xc.shape, t[check], r_lse, reduction="none"))


@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_row_strided_views_past_2_32_elements(dtype, rng):
    """Short rows of a wide array (row stride 2^20): row 4096 starts at element 2^32.
    Inputs, log_softmax's out= and the in-place gradient are all such views."""
    W, V = 1 << 20, 5001
    need_memory(GiB // 2)
    base = lazy_zeros((ROWS, W), dtype, sparse_writes=True)
    x = base[:, :V]
    t = fill_random_rows(x, RANDOM, rng)
    xc = x[CHECK].astype(np.float64)
    r_loss, r_lse = R.cross_entropy(xc, t[CHECK], reduction="none", return_lse=True)
    r_grad = R.cross_entropy_backward(xc, t[CHECK], r_lse, 1.0, reduction="none")
    gscale = grad_scale(xc.shape, t[CHECK], r_lse, reduction="none")
    log_v = np.full(ZERO.size, np.log(V))

    lse = lx.logsumexp(x)
    assert_matches_reference("logsumexp", lse[CHECK], xc, dtype)
    assert_loss_close(lse[ZERO], log_v, dtype, what="lse of zero rows")

    out_base = lazy_zeros((ROWS, W), dtype, sparse_writes=True)
    out = out_base[:, 7:7 + V]
    assert lx.log_softmax(x, out=out) is out
    assert_matches_reference("log_softmax", out[CHECK], xc, dtype)
    zero_rows = out[ZERO]  # identical rows, all -log(V)
    assert (zero_rows == zero_rows[0, 0]).all()
    assert_matches_reference("log_softmax", zero_rows[:1], np.zeros((1, V)), dtype)
    assert not out_base[CHECK, :7].any() and not out_base[CHECK, 7 + V:7 + V + 64].any()

    loss, lse2 = lx.cross_entropy(x, t, reduction="none", return_lse=True)
    assert_loss_close(loss[CHECK], r_loss, dtype)
    assert_loss_close(loss[ZERO], log_v, dtype, what="loss of zero rows")
    g = lx.cross_entropy_backward(x, t, lse2, 1.0, reduction="none")
    assert_grad_close(g[CHECK], r_grad, dtype, gscale=gscale)

    loss_i, gi = lx.cross_entropy_with_grad(x, t, reduction="none", inplace=True)
    assert gi is x
    assert_loss_close(loss_i[CHECK], r_loss, dtype)
    assert_loss_close(loss_i[ZERO], log_v, dtype, what="loss of zero rows")
    assert_grad_close(gi[CHECK], r_grad, dtype, gscale=gscale)
    assert not base[CHECK, V:V + 64].any()  # nothing written past a row


@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_with_grad",
                                "cross_entropy_backward"])
def test_out_of_range_target_in_last_row_names_its_position(fn):
    need_memory(GiB // 4)
    x = lazy_zeros((17, 241, V1), F32)  # 17 * 241 = ROWS rows
    t = np.zeros((17, 241), np.int64)
    t[16, 240] = V1
    args = (np.zeros((17, 241), np.float32), 1.0) if fn == "cross_entropy_backward" else ()
    text = (f"targets: value {V1} at position (16, 240) is out of range [0, {V1}) "
            "and is not ignore_index (-100)")
    with pytest.raises(ValueError) as e:
        getattr(lx, fn)(x, t, *args)
    assert str(e.value) == text
