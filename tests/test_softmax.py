"""logsumexp / log_softmax / softmax against lmxent.reference (float64 oracle) and torch.

Covers every CPU instruction set, every accepted dtype (float16 / bfloat16 compared
with the reference on the same rounded inputs), temperature, any axis, keepdims,
``out=`` (in place, strided, a slice of a wider array), row-strided inputs (no copy),
few rows x huge vocabularies (rows split across threads), extreme values, empty
batches, float32 accuracy measured against torch's own float32 error, and
hypothesis properties. Without torch the reference checks still run and only the
torch comparisons skip; without ml_dtypes only the bfloat16 cases skip.
"""
import contextlib
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lmxent as lx
from lmxent import reference as R

from helpers import (
    BF16,
    DTYPES,
    EXTREME_ROWS,
    F16,
    F32,
    F64,
    INF,
    ISAS,
    PLUS_INF_ROWS,
    assert_matches_reference,
    assert_nan_inf_equal,
    cpu_isa,
    extreme_rows,
    num_threads,
    out_dtype,
    softmax_ref,
    softmax_tol,
    torch,
)
from helpers import dtype_id as _dtype_id

FNS = ["logsumexp", "log_softmax", "softmax"]
# bfloat16 as a parameter that skips (rather than vanishes) without ml_dtypes
BF16_P = pytest.param(BF16, id="bfloat16",
                      marks=pytest.mark.skipif(BF16 is None, reason="ml_dtypes is not installed"))
ALL_DTYPES = [F32, F64, F16, BF16_P]


def _is_bf16(dt):
    return _dtype_id(dt) == "bfloat16"  # not dt == BF16: np.dtype("f8") == None is True


# ------------------------------------------------------------------- helpers

@contextlib.contextmanager
def torch_threads(n):
    original = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(original)


def call(fn, x, **kw):
    return getattr(lx, fn)(x, **kw)


def skip_without_torch():
    """Called where a test's torch comparison starts; its reference checks ran before."""
    if torch is None:
        pytest.skip("torch is not installed (the reference checks before this point ran)")


def torch_fn(fn, x, axis=-1, temperature=1.0):
    t = torch.from_numpy(np.ascontiguousarray(x)) / temperature
    if fn == "logsumexp":
        return torch.logsumexp(t, axis).numpy()
    return getattr(torch, fn)(t, axis).numpy()


# --------------------------------------------------------- sizes x dtypes x ISAs

SIZES = [(1, 1), (3, 1), (1, 2), (5, 2), (1, 7), (9, 7), (1, 31), (33, 31),
         (3, 32000), (1, 50257), (3, 50257), (1, 128256), (1, 262144), (3, 262144)]


@pytest.mark.parametrize("dtype", [F32, F64], ids=_dtype_id)
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sizes_match_reference_and_torch(isa, shape, dtype, rng):
    x = (3.0 * rng.standard_normal(shape)).astype(dtype)
    ys = {fn: call(fn, x) for fn in FNS}
    for fn in FNS:
        assert_matches_reference(fn, ys[fn], x, dtype, what=f"{fn} {shape}")
    skip_without_torch()
    for fn in FNS:
        t = torch_fn(fn, x)
        rtol, atol = softmax_tol(fn, dtype, scale=max(1.0, float(np.abs(t).max())))
        np.testing.assert_allclose(np.asarray(ys[fn], np.float64), t, rtol=4 * rtol,
                                   atol=4 * atol, err_msg=f"{fn} vs torch {shape}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1, 7), (7, 33), (5, 2049), (3, 32000)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_dtypes(isa, dtype, shape, rng):
    """Outputs in the input dtype (lse float32, float64 for float64 input); compared with
    the reference on the same rounded inputs."""
    x = (4.0 * rng.standard_normal(shape)).astype(dtype)
    for fn in FNS:
        y = call(fn, x)
        assert y.dtype == out_dtype(fn, dtype), (fn, y.dtype)
        assert_matches_reference(fn, y, x, dtype, what=f"{fn} {_dtype_id(dtype)}")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_dtype_id)
def test_lowp_lse_accumulates_in_float32(dtype, rng):
    """A long bf16/f16 row: the lse would be far off if accumulated in the input dtype."""
    x = rng.standard_normal((2, 100_000)).astype(dtype)
    lse = lx.logsumexp(x)
    expected = R.logsumexp(x)
    np.testing.assert_allclose(lse, expected, rtol=1e-6 if dtype != F64 else 1e-13)


# ------------------------------------------------------------------ temperature

@pytest.mark.parametrize("dtype", [F32, F64, BF16_P], ids=_dtype_id)
@pytest.mark.parametrize("temperature", [0.25, 0.7, 2.0, 13.0])
def test_temperature(isa, temperature, dtype, rng):
    x = (3.0 * rng.standard_normal((11, 1001))).astype(dtype)
    ys = {fn: call(fn, x, temperature=temperature) for fn in FNS}
    for fn in FNS:
        assert_matches_reference(fn, ys[fn], x, dtype, what=f"{fn} T={temperature}",
                                 temperature=temperature)
    # temperature T equals dividing the logits by T (within rounding)
    np.testing.assert_allclose(ys["log_softmax"].astype(np.float64),
                               lx.log_softmax((x.astype(np.float64) / temperature)
                                              .astype(dtype)).astype(np.float64),
                               rtol=1e-2 if _is_bf16(dtype) else 1e-5,
                               atol=0.1 if _is_bf16(dtype) else 1e-4)
    if _is_bf16(dtype):  # torch has no ml_dtypes bfloat16
        return
    skip_without_torch()
    for fn in FNS:
        t = torch_fn(fn, x, temperature=temperature)
        rtol, atol = softmax_tol(fn, dtype, scale=max(1.0, float(np.abs(t).max())))
        np.testing.assert_allclose(np.asarray(ys[fn], np.float64), t, rtol=4 * rtol,
                                   atol=4 * atol)


# -------------------------------------------------------------- axis, keepdims

@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=_dtype_id)
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_any_axis_3d(isa, axis, dtype, rng):
    x = (2.0 * rng.standard_normal((5, 6, 7))).astype(dtype)
    for keepdims in (False, True):
        lse = lx.logsumexp(x, axis=axis, keepdims=keepdims)
        expected = R.logsumexp(x, axis, keepdims=keepdims)
        assert lse.shape == expected.shape == np.sum(x, axis=axis, keepdims=keepdims).shape
        assert_matches_reference("logsumexp", lse, x, dtype, axis=axis, keepdims=keepdims)
    for fn in ("log_softmax", "softmax"):
        y = call(fn, x, axis=axis)
        assert y.shape == x.shape
        assert_matches_reference(fn, y, x, dtype, what=f"{fn} axis={axis}", axis=axis)
    if dtype != F16:
        skip_without_torch()
        for fn in FNS:
            t = torch_fn(fn, x, axis=axis)
            np.testing.assert_allclose(np.asarray(call(fn, x, axis=axis), np.float64), t,
                                       rtol=1e-5, atol=1e-5)


def test_axis_out_of_range_raises():
    x = np.zeros((2, 3), np.float32)
    for fn in FNS:
        with pytest.raises(ValueError):
            call(fn, x, axis=2)
        with pytest.raises(ValueError):
            call(fn, x, axis=-3)


def test_1d_input(isa, rng):
    x = rng.standard_normal(37).astype(np.float32)
    lse = lx.logsumexp(x)
    assert lse.shape == () and lse.dtype == F32
    np.testing.assert_allclose(lse, R.logsumexp(x), rtol=1e-6)
    assert lx.logsumexp(x, keepdims=True).shape == (1,)
    for fn in ("log_softmax", "softmax"):
        assert_matches_reference(fn, call(fn, x), x, F32)


# --------------------------------------------------------------------------- out=

@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16_P], ids=_dtype_id)
def test_out_contiguous(isa, fn, dtype, rng):
    x = (2.0 * rng.standard_normal((6, 4, 333))).astype(dtype)
    out = np.full(x.shape, 123.0, dtype)
    res = call(fn, x, out=out)
    assert res is out
    assert_matches_reference(fn, out, x, dtype)
    np.testing.assert_array_equal(out.view(np.uint8), call(fn, x).view(np.uint8))


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=_dtype_id)
def test_out_is_x_in_place(isa, fn, axis, dtype, rng):
    x0 = (2.0 * rng.standard_normal((5, 3, 2500))).astype(dtype)
    expected = call(fn, x0, axis=axis)
    x = x0.copy()
    res = call(fn, x, axis=axis, out=x)
    assert res is x
    np.testing.assert_array_equal(x.astype(np.float64), expected.astype(np.float64))
    assert_matches_reference(fn, x, x0, dtype, axis=axis)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_out_in_place_huge_row_split_across_threads(isa, fn, rng):
    """out=x with one row split across threads: pass 2 must not start before every
    thread finished pass 1 (else it would read already-overwritten logits)."""
    x0 = (2.0 * rng.standard_normal((1, 1 << 20))).astype(np.float32)
    expected = softmax_ref(fn, x0)
    x = x0.copy()
    with num_threads(4):
        assert call(fn, x, out=x) is x
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5 if fn == "log_softmax" else 1e-9)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_out_strided_last_axis(isa, fn, axis, rng):
    """out whose last axis is not contiguous: the result still lands there, and the
    memory between its elements is untouched."""
    x = rng.standard_normal((4, 5, 301)).astype(np.float32)
    big = np.full((4, 5, 602), -7.0, np.float32)
    out = big[..., ::2]
    res = call(fn, x, axis=axis, out=out)
    assert res is out
    assert_matches_reference(fn, out, x, F32, axis=axis)
    assert (big[..., 1::2] == -7.0).all()


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_out_row_strided_slice(isa, fn, rng):
    """out is a column slice of a wider array (rows strided): written in place, nothing
    outside the slice changes."""
    x = rng.standard_normal((9, 1000)).astype(np.float32)
    big = np.full((9, 1100), 42.0, np.float32)
    out = big[:, 50:1050]
    res = call(fn, x, out=out)
    assert res is out
    assert_matches_reference(fn, out, x, F32)
    assert (big[:, :50] == 42.0).all() and (big[:, 1050:] == 42.0).all()


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", [F32, F64, F16] + ([BF16] if BF16 is not None else []), ids=_dtype_id)
def test_large_out_at_every_alignment(isa, fn, dtype, rng):
    """Outputs over 32 MiB are written with non-temporal stores: whole vectors where a
    row is vector-aligned, 16-byte pieces where it is 16-byte aligned (16-bit outputs
    always in pieces, except on the baseline ISA), plain stores otherwise. With
    V = 32001 the rows start at every item-size offset modulo 64, and `out` starts
    one item into its buffer; the sentinel around it stays."""
    V = 32001
    n = 263 * 4 // np.dtype(dtype).itemsize  # 33.7 MB
    x = rng.standard_normal((n, V)).astype(np.float32).astype(dtype)
    buf = np.full(n * V + 2, 7.0, dtype)
    out = buf[1:-1].reshape(n, V)
    assert call(fn, x, out=out) is out
    assert_matches_reference(fn, out, x, dtype)
    assert buf[0] == 7.0 and buf[-1] == 7.0


def test_out_wrong_shape_or_dtype_raises():
    x = np.zeros((3, 4), np.float32)
    for fn in ("log_softmax", "softmax"):
        with pytest.raises(ValueError):
            call(fn, x, out=np.zeros((3, 5), np.float32))
        with pytest.raises(ValueError):
            call(fn, x, out=np.zeros((3, 4), np.float64))
        ro = np.zeros((3, 4), np.float32)
        ro.flags.writeable = False
        with pytest.raises(ValueError):
            call(fn, x, out=ro)


# ---------------------------------------------------------- strided rows, no copy

def _peak_bytes(f):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        res = f()
        return res, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [F32, F64, BF16_P], ids=_dtype_id)
def test_strided_rows_are_not_copied(isa, dtype, rng):
    """x is a column slice of a wider array: its rows are read in place (NumPy reports
    its allocations to tracemalloc, so a copy of x would show up in the peak)."""
    wide = (2.0 * rng.standard_normal((32, 33000))).astype(dtype)
    x = wide[:, 100:32100]
    assert not x.flags.c_contiguous
    budget = x.nbytes // 8

    lse, peak = _peak_bytes(lambda: lx.logsumexp(x))
    assert peak < budget, f"logsumexp copied its input? peak {peak} bytes"
    assert_matches_reference("logsumexp", lse, x, dtype)

    for fn in ("log_softmax", "softmax"):
        big = np.full((32, 33000), 3.0, dtype)
        out = big[:, 7:32007]
        res, peak = _peak_bytes(lambda fn=fn, out=out: call(fn, x, out=out))
        assert res is out
        assert peak < budget, f"{fn} copied input or output? peak {peak} bytes"
        assert_matches_reference(fn, out, x, dtype)
        assert (big[:, :7] == 3.0).all() and (big[:, 32007:] == 3.0).all()
    np.testing.assert_array_equal(wide[:, 100:32100], x)  # input untouched


def test_strided_rows_3d_view(isa, rng):
    """(B, T, V) view with padded rows (both leading axes strided, collapsible)."""
    base = rng.standard_normal((3, 4, 520)).astype(np.float32)
    x = base[:, :, :500]
    for fn in FNS:
        assert_matches_reference(fn, call(fn, x), x, F32)


# ------------------------------------------------- few rows x huge V (thread split)

@pytest.mark.parametrize("threads", [None, 4])
@pytest.mark.parametrize("shape", [(2, 262144), (1, 1 << 20), (3, 1 << 17)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_few_rows_huge_vocab(isa, shape, threads, rng):
    """Few long rows: each row is split across threads and the partial LSE states are
    merged. With 4 threads even 2 and 3 rows are split."""
    x = (3.0 * rng.standard_normal(shape)).astype(np.float32)
    x[:, -1] = 25.0  # the last chunk matters
    x[0, shape[1] // 2 + 3] = 26.0  # so does the middle (thread boundary area)
    ctx = num_threads(threads) if threads else contextlib.nullcontext()
    with ctx:
        ys = {fn: call(fn, x) for fn in FNS}
    for fn in FNS:
        assert_matches_reference(fn, ys[fn], x, F32, what=f"{fn} {shape}")


@pytest.mark.parametrize("threads,shape", [(2, (1, 65537)), (2, (1, 1048577)),
                                           (4, (3, 131075))],
                         ids=["2thr-1x65537", "2thr-1x1048577", "4thr-3x131075"])
def test_row_split_keeps_tail_columns(isa, threads, shape, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    x[:, -1] = 30.0  # dominates the row: lse ~ 30, softmax[-1] ~ 1
    with num_threads(threads):
        lse = lx.logsumexp(x)
        sm = lx.softmax(x)
    np.testing.assert_allclose(lse, R.logsumexp(x), rtol=1e-6)
    np.testing.assert_allclose(sm[:, -1], R.softmax(x)[:, -1], rtol=1e-5)


# -------------------------------------------------------------- extreme inputs

@pytest.mark.parametrize("V", [5, 3000, 70000])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=_dtype_id)
def test_extreme_inputs(isa, dtype, V, rng):
    """±1e4, -inf, an all -inf row, NaN against the reference (same rounded inputs),
    element by element; also against torch for float32/float64."""
    x = extreme_rows(EXTREME_ROWS, V, dtype, rng)
    for fn in FNS:
        y = call(fn, x)
        assert_matches_reference(fn, y, x, dtype, what=f"{fn} extreme")
    lse = np.asarray(lx.logsumexp(x), np.float64)
    assert lse[5] == -INF
    assert np.isnan(lse[6:9]).all()
    assert np.isfinite(np.delete(lse, [5, 6, 7, 8])).all()
    if dtype in (F32, F64):
        skip_without_torch()
        for fn in FNS:
            assert_nan_inf_equal(call(fn, x), torch_fn(fn, x), f"{fn} vs torch")


@pytest.mark.parametrize("fn", ["logsumexp", "log_softmax",
                                "softmax"])
@pytest.mark.parametrize("V", [5, 3000])
@pytest.mark.parametrize("dtype", [F32, F64, BF16_P], ids=_dtype_id)
def test_plus_inf_rows(isa, dtype, V, fn, rng):
    """+inf: lse = +inf (as torch); log_softmax = NaN at the +inf entries, -inf
    elsewhere; softmax = NaN at the +inf entries, 0 elsewhere (the reference)."""
    x = extreme_rows(PLUS_INF_ROWS, V, dtype, rng)
    y = call(fn, x)
    assert_matches_reference(fn, y, x, dtype, what=f"{fn} +inf")
    if fn == "logsumexp":
        assert (y == INF).all()
        if not _is_bf16(dtype):
            skip_without_torch()
            assert_nan_inf_equal(y, torch_fn(fn, x), "lse vs torch")


@pytest.mark.parametrize("dtype", [F32, F64, BF16_P], ids=_dtype_id)
def test_nan_propagates_to_its_row_only(isa, dtype, rng):
    x = rng.standard_normal((7, 4099)).astype(dtype)
    clean = {fn: call(fn, x) for fn in FNS}
    x[3, 2222] = np.nan
    for fn in FNS:
        y = call(fn, x)
        assert np.isnan(np.asarray(y[3], np.float64)).all(), fn
        others = [0, 1, 2, 4, 5, 6]
        np.testing.assert_array_equal(np.asarray(y[others], np.float64),
                                      np.asarray(clean[fn][others], np.float64))


def test_nan_in_one_thread_part_of_a_split_row(isa, rng):
    x = rng.standard_normal((1, 1 << 20)).astype(np.float32)
    x[0, 1000] = np.nan
    with num_threads(4):
        for fn in FNS:
            assert np.isnan(call(fn, x)).all(), fn
    x[0, 1000] = -np.inf
    x[0, 1 << 19] = np.inf
    with num_threads(4):
        assert lx.logsumexp(x)[0] == np.inf


def test_all_masked_row_matches_torch(isa):
    x = np.full((2, 9000), -np.inf, np.float32)
    x[1, 5] = 0.0
    lse = lx.logsumexp(x)
    assert lse[0] == -np.inf and lse[1] == 0.0
    sm = lx.softmax(x)
    assert np.isnan(sm[0]).all()
    np.testing.assert_array_equal(sm[1], np.eye(1, 9000, 5, dtype=np.float32)[0])
    skip_without_torch()
    assert torch.logsumexp(torch.from_numpy(x), -1).numpy()[0] == -np.inf
    assert np.isnan(torch.softmax(torch.from_numpy(x), -1).numpy()[0]).all()


# ------------------------------------------------------------------ empty batch

@pytest.mark.parametrize("shape", [(0, 1), (0, 5), (0, 32000), (2, 0, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_batch_logsumexp(isa, shape):
    for dtype in DTYPES:  # bfloat16 where ml_dtypes is installed
        lse = lx.logsumexp(np.zeros(shape, dtype))
        assert lse.shape == shape[:-1] and lse.dtype == out_dtype("logsumexp", dtype)
        assert lx.logsumexp(np.zeros(shape, dtype), keepdims=True).shape == shape[:-1] + (1,)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_empty_batch_single_class(isa, fn):
    y = call(fn, np.zeros((0, 1), np.float32))
    assert y.shape == (0, 1) and y.dtype == F32


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 32000), (2, 0, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_batch_softmax(isa, fn, shape):
    y = call(fn, np.zeros(shape, np.float32))
    assert y.shape == shape and y.dtype == F32


# ------------------------------------------------- float32 accuracy against torch

# name: (shape, offset, scale) of x = offset + scale * N(0, 1), float32
ACC_CASES = {
    "normal1-64x32000": ((64, 32000), 0.0, 1.0),
    "normal4-8x50257": ((8, 50257), 0.0, 4.0),
    "llama3-4x128256": ((4, 128256), 0.0, 3.0),
    "wide2-2x262144": ((2, 262144), 0.0, 2.0),
    "smallV-512x31": ((512, 31), 0.0, 2.0),
    "peaked-512x31": ((512, 31), 0.0, 10.0),
    "offset1e4-64x2000": ((64, 2000), 1e4, 1.0),
}
ACC_PARAMS = [pytest.param(c, f, id=f"{c}-{f}") for c in ACC_CASES for f in FNS]


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("case,fn", ACC_PARAMS)
def test_float32_accuracy_vs_torch(isa, case, fn, record_property):
    """max |lmxent - ref64| <= 1.5 * max |torch_f32 - ref64| + half an ulp of the
    largest output, on the same float32 inputs."""
    shape, offset, scale = ACC_CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
    expected = softmax_ref(fn, x)
    with torch_threads(1):  # deterministic reduction order
        t = torch_fn(fn, x)
    err_torch = float(np.max(np.abs(t - expected)))
    err = float(np.max(np.abs(call(fn, x).astype(np.float64) - expected)))
    floor = 2.0**-24 * max(1.0, float(np.max(np.abs(expected))))
    record_property("err_lmxent", err)
    record_property("err_torch", err_torch)
    print(f"{case} {fn} [{isa}]: lmxent {err:.3e}  torch {err_torch:.3e}")
    assert err <= 1.5 * err_torch + floor, (err, err_torch, floor)


# ---------------------------------------------------------- hypothesis properties

_settings = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


def _rows(dtype, lo=-50.0, hi=50.0, max_v=300):
    return hnp.arrays(
        dtype=dtype,
        shape=st.tuples(st.integers(1, 4), st.integers(1, max_v)),
        elements=st.floats(lo, hi, width=32 if dtype == F32 else 64,
                           allow_nan=False, allow_infinity=False),
    )


@_settings
@given(data=st.data(), dtype=st.sampled_from([F32, F64]), isa=st.sampled_from(ISAS))
def test_property_softmax_rows_sum_to_one(data, dtype, isa):
    x = data.draw(_rows(dtype))
    with cpu_isa(isa):
        p = lx.softmax(x)
    assert (p >= 0).all() and (p <= 1).all()
    s = p.astype(np.float64).sum(axis=-1)
    # per-element error ~ (|lse| + |z - lse|) * eps, summed over probabilities
    eps = 2.0**-52 if dtype == F64 else 2.0**-23
    bound = eps * (8 + 2 * (np.abs(x).max() + np.log(x.shape[-1]) + 8))
    np.testing.assert_allclose(s, 1.0, rtol=0, atol=bound)


@_settings
@given(data=st.data(), dtype=st.sampled_from([F32, F64]), isa=st.sampled_from(ISAS),
       c=st.integers(-200, 200))
def test_property_log_softmax_shift_invariance(data, dtype, isa, c):
    # values on a 1/64 grid: x + c is exact in float32, so only kernel error remains
    k = data.draw(hnp.arrays(np.int32, st.tuples(st.integers(1, 3), st.integers(1, 200)),
                             elements=st.integers(-64 * 40, 64 * 40)))
    x = (k / 64.0).astype(dtype)
    xs = (x.astype(np.float64) + c).astype(dtype)
    np.testing.assert_array_equal(xs.astype(np.float64) - c, x.astype(np.float64))
    with cpu_isa(isa):
        a = lx.log_softmax(x).astype(np.float64)
        b = lx.log_softmax(xs).astype(np.float64)
    eps = 2.0**-52 if dtype == F64 else 2.0**-23
    big = 40 + abs(c) + np.log(x.shape[-1]) + 80  # bound on |lse| and |log p|
    np.testing.assert_allclose(a, b, rtol=0, atol=4 * eps * big)


@_settings
@given(data=st.data(), dtype=st.sampled_from([F32, F64]), isa=st.sampled_from(ISAS))
def test_property_log_softmax_is_log_of_softmax(data, dtype, isa):
    x = data.draw(_rows(dtype, -30.0, 30.0))
    with cpu_isa(isa):
        ls = lx.log_softmax(x).astype(np.float64)
        p = lx.softmax(x).astype(np.float64)
    ok = p > 1e-6  # not tiny: log(p) is well conditioned there
    eps = 2.0**-52 if dtype == F64 else 2.0**-23
    np.testing.assert_allclose(np.log(p[ok]), ls[ok], rtol=0, atol=8 * eps * 16)
    assert (ls <= 0).all()


@_settings
@given(data=st.data(), dtype=st.sampled_from([F32, F64]), isa=st.sampled_from(ISAS))
def test_property_lse_at_least_max(data, dtype, isa):
    x = data.draw(_rows(dtype, -1e4, 1e4, max_v=3000))
    with cpu_isa(isa):
        lse = lx.logsumexp(x)
    m = x.max(axis=-1)
    assert (lse >= m).all()  # exact: lse = m + log(s), s >= 1, rounding is monotone
    eps = 2.0**-52 if dtype == F64 else 2.0**-23
    assert (lse.astype(np.float64) <= m + np.log(x.shape[-1]) * (1 + 4 * eps)
            + 4 * eps * np.abs(m) + 1e-12).all()
