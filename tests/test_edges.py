"""Edges of the kernels' numerics (issue 15): every scratch section aligned
(odd row lengths; the sanitizer build in CI turns a misaligned access into a
failure), the exp of a saved LSE far below the row's max (the same answer on
every instruction set), and options outside float32's range."""
import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as R

from conftest import (DTYPE_IDS, DTYPES, F64, assert_grad_close, assert_nan_inf_equal,
                      dtype_id, loss_dtype, lowp)


# ---------------------------------------------------------------- odd columns
# The kept-exps scratch holds cols + 2048 values of the compute type, then the
# chunk factors in double: with an odd number of floats the doubles started
# 4 bytes off their alignment. Every op family, every dtype, odd lengths.

ODD = [1, 3, 5, 7, 2049, 4099]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_odd_columns_every_family(isa, rng, dtype):
    for V in ODD:
        x, x64 = lowp(rng.standard_normal((3, V)) * 3, dtype)
        t = rng.integers(0, V, 3)
        for fn in ("softmax", "log_softmax", "logsumexp"):
            got = np.asarray(getattr(lx, fn)(x), np.float64)
            want = getattr(R, fn)(x64)
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2, err_msg=f"{fn} V={V}")
        loss, g = lx.cross_entropy_with_grad(x, t, label_smoothing=0.1)
        rl, rg = R.cross_entropy_with_grad(x64, t, label_smoothing=0.1)
        np.testing.assert_allclose(float(loss), rl, rtol=1e-5, atol=1e-6, err_msg=f"ce V={V}")
        assert_grad_close(g, rg, dtype, gscale=1.0, what=f"ce grad V={V}")
        st = lx.token_stats(x, t)
        np.testing.assert_allclose(st.lse, R.token_stats(x64, t).lse, rtol=1e-5, atol=1e-6)
        kl = lx.kl_divergence(x, x[::-1].copy())
        np.testing.assert_allclose(float(kl), R.kl_divergence(x64, x64[::-1]), rtol=1e-4,
                                   atol=1e-5)


# ------------------------------------------------- exp of a saved LSE too small
# exp(z - lse) with lse far below the row's max overflows: +inf, as float64
# math rounded to the output gives, on every instruction set (the vector exp
# built 2^n from exponent bits without an upper bound: finite garbage).

GAPS = {np.dtype(np.float32): [1.0, 80.0, 87.0, 88.3, 88.6, 88.75, 89.0, 100.0, 300.0, 1e30],
        np.dtype(np.float64): [1.0, 700.0, 709.5, 709.9, 710.0, 800.0, 1e300]}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
def test_backward_with_small_saved_lse(isa, rng, dtype):
    dtype = np.dtype(dtype)
    gaps = np.array(GAPS[dtype])
    V = 37
    x = rng.standard_normal((len(gaps), V)).astype(dtype)
    t = rng.integers(0, V, len(gaps))
    lse = (x.astype(np.float64).max(-1) - gaps).astype(dtype)
    got = lx.cross_entropy_backward(x, t, lse, 1.0, reduction="sum")
    with np.errstate(over="ignore"):
        want = R.cross_entropy_backward(x.astype(np.float64), t, lse.astype(np.float64), 1.0,
                                        reduction="sum")
        rounded = want.astype(dtype).astype(np.float64)
    assert_nan_inf_equal(got, rounded, "gradient")
    fin = np.isfinite(rounded)
    # the exp of an argument a costs up to ~1.5 |a| ulps (forming a in working precision)
    arg = np.abs(x.astype(np.float64) - lse.astype(np.float64)[:, None])
    tol = np.finfo(dtype).eps * (16 + 2 * arg) * np.abs(want) + 1e-6 * (arg < 20)
    bad = np.abs(got - want) > tol
    assert not (bad & fin).any(), (got[bad & fin], want[bad & fin])
