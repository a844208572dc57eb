"""Accuracy of the vectorised exp, tanh and log1p of cpp/cpu/simd.h (vexp_neg, vtanh,
vlog1p_unit) on
every CPU instruction set, through the test hook ``lmxent._cpu.math(in, out, fn)``
(``in``/``out``: (1, n) float32 or float64 arrays, fn 0 = exp of x <= 0, the only
arguments the kernels give it, 1 = tanh, 2 = log1p of 0 <= x <= 1, the softplus tail
of the Jensen-Shannon kernel).

The maximum error over a sweep of each input region is measured in ulps of the
result's dtype against NumPy: float64 for float32 results, long double for
float64 results (where long double is wider; its own rounding is negligible).
A sweep takes every k-th representable value of the region (all magnitudes,
subnormals included) plus an evenly spaced grid (all reduced arguments). The
measured maximum is recorded with ``record_property("max_ulp", ...)``.

exp regions: "bulk" (normal results in (0, 1], but for the lowest binade) and
"bottom" (results in the lowest normal binade). exp forms y = x log2(e) in
working precision (with log2(e) rounded too), which costs up to ~1.5 |x| ulps
of relative error (the kernels meet such x only for terms far below the row's
max): the bound is BOUND_ULPS + 1.5 |x|. tanh regions: the two
branches of vtanh, "small" (rational, |x| < 0.625) and "large" (through exp).
Specials: -inf, NaN, signed zeros, subnormals,
underflow to 0 (no subnormal results from exp), saturation of tanh at +-1,
odd symmetry, and the vector-tail lanes of short arrays.
"""
import math

import numpy as np
import pytest

from lmxent import _cpu

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
FNS = {"exp": 0, "tanh": 1, "log1p": 2}
LN2 = math.log(2.0)
WIDE = np.longdouble if np.finfo(np.longdouble).nmant > 52 else np.float64
SWEEP = {F32: 400_000, F64: 150_000}  # points per half of a sweep
BOUND_ULPS = {("exp", F32): 2.0, ("exp", F64): 4.0, ("tanh", F32): 4.0, ("tanh", F64): 4.0,
              ("log1p", F32): 3.0, ("log1p", F64): 3.0}
UINT = {F32: np.uint32, F64: np.uint64}


def vmath(x, fn):
    """lmxent's vector exp / tanh of a 1-D float32 or float64 array."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _cpu.math(x.reshape(1, -1), out.reshape(1, -1), FNS[fn])
    return out


def reference(x, fn):
    """exp, tanh or log1p of x in float64 (float32 x) or long double (float64 x)."""
    return getattr(np, fn)(x.astype(np.float64 if x.dtype == F32 else WIDE))


def ulp_error(y, x, fn):
    """|y - f(x)| in ulps of f(x) rounded to y's dtype (subnormal spacing near 0)."""
    ref = reference(x, fn)
    ulp = np.spacing(np.abs(ref).astype(y.dtype)).astype(ref.dtype)
    return (np.abs(y.astype(ref.dtype) - ref) / ulp).astype(np.float64)


def _key(v, dtype):
    """Order-preserving integer of a float (its position among the floats)."""
    sign = 1 << (8 * dtype.itemsize - 1)
    b = int(np.array(v, dtype).view(UINT[dtype]))
    return b if b < sign else sign - b


def _from_keys(k, dtype):
    sign = UINT[dtype](1 << (8 * dtype.itemsize - 1))
    bits = np.abs(k).astype(UINT[dtype])
    return np.where(k < 0, bits | sign, bits).view(dtype)


def sweep(lo, hi, dtype):
    """Every k-th float of dtype in [lo, hi] and an even grid over it, as dtype."""
    n = SWEEP[dtype]
    k0, k1 = _key(lo, dtype), _key(hi, dtype)
    x = np.concatenate([_from_keys(np.arange(k0, k1 + 1, max(1, (k1 - k0) // n)), dtype),
                        np.linspace(lo, hi, n).astype(dtype)])
    x64 = x.astype(np.float64)  # compare in float64: lo and hi need not be floats of dtype
    return x[(x64 >= lo) & (x64 <= hi)]


def exp_region(region, dtype):
    """x <= 0 whose exp is in the lowest normal binade, or above it up to 1."""
    fi = np.finfo(dtype)
    bulk_lo = (fi.minexp + 1) * LN2
    return {"bottom": (math.log(fi.smallest_normal), bulk_lo), "bulk": (bulk_lo, 0.0)}[region]


def tanh_saturation(dtype):
    """|x| beyond which tanh(x) rounds to +-1 in dtype (with a margin)."""
    return 0.5 * math.log(4.0 / np.finfo(dtype).eps) + 1.0


def tanh_region(region, dtype):
    """The two branches of vtanh: rational below |x| = 0.625, through exp above."""
    return {"small": (0.0, np.nextafter(0.625, 0.0)),
            "large": (0.625, tanh_saturation(dtype))}[region]


CASES = [("exp", F32, "bulk"), ("exp", F32, "bottom"), ("exp", F64, "bulk"),
         ("exp", F64, "bottom"), ("tanh", F32, "small"), ("tanh", F32, "large"),
         ("tanh", F64, "small"), ("tanh", F64, "large"), ("log1p", F32, "unit"),
         ("log1p", F64, "unit")]


@pytest.mark.parametrize("fn,dtype,region", CASES,
                         ids=lambda v: v.name if isinstance(v, np.dtype) else str(v))
def test_max_error(isa, fn, dtype, region, record_property):
    lo, hi = {"exp": exp_region, "tanh": tanh_region,
              "log1p": lambda region, dtype: (0.0, 1.0)}[fn](region, dtype)
    x = sweep(lo, hi, dtype)
    if fn == "tanh":
        x = np.concatenate([x, -x])
    err = ulp_error(vmath(x, fn), x, fn)
    if fn == "exp":  # the argument reduction's share (see the module docstring)
        err = err - 1.5 * np.abs(x.astype(np.float64))
    worst = int(np.argmax(err))
    record_property("max_ulp", float(err[worst]))
    record_property("worst_x", float(x[worst]))
    print(f"{isa} {fn} {dtype} {region}: max {err[worst]:.3f} ulp at x = {x[worst]!r}")
    assert err[worst] <= BOUND_ULPS[fn, dtype], (
        f"{fn}({x[worst]!r}) = {vmath(x[worst:worst + 1], fn)[0]!r}: {err[worst]:.3g} ulps, "
        f"reference {reference(x[worst:worst + 1], fn)[0]!r}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_exp_specials(isa, dtype):
    fi = np.finfo(dtype)
    tiny = fi.smallest_subnormal
    x = np.array([-np.inf, np.nan, -np.nan, 0.0, -0.0, -tiny, -fi.max], dtype)
    want = np.array([0.0, np.nan, np.nan, 1.0, 1.0, 1.0, 0.0], dtype)
    np.testing.assert_array_equal(vmath(x, "exp"), want)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_exp_underflows_to_zero_or_tiny(isa, dtype):
    """Below the smallest normal result: 0 or a value no larger than that, never
    garbage; exactly 0 where even the smallest subnormal is out of reach."""
    fi = np.finfo(dtype)
    ln_min, ln_sub = math.log(fi.smallest_normal), math.log(fi.smallest_subnormal)
    x = sweep(2.0 * ln_sub, float(np.nextafter(dtype.type(ln_min), dtype.type(-np.inf))), dtype)
    y = vmath(x, "exp")
    assert ((y >= 0) & (y <= fi.smallest_normal)).all()
    assert (y[x < ln_sub - 1.0] == 0).all()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_tanh_specials(isa, dtype):
    fi = np.finfo(dtype)
    sub = fi.smallest_subnormal
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, sub, -sub, fi.max, -fi.max], dtype)
    want = np.array([1.0, -1.0, np.nan, 0.0, -0.0, sub, -sub, 1.0, -1.0], dtype)
    y = vmath(x, "tanh")
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(np.signbit(y[3:5]), [False, True])


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_log1p_specials(isa, dtype):
    """0 gives exactly 0 and tiny arguments keep their relative accuracy (the
    softplus tail meets exp(-|d|) down to the smallest normal)."""
    fi = np.finfo(dtype)
    x = np.array([0.0, fi.smallest_normal, 1e-30, fi.eps, 1.0], dtype)
    y = vmath(x, "log1p")
    assert y[0] == 0
    assert ulp_error(y[1:], x[1:], "log1p").max() <= BOUND_ULPS["log1p", dtype]


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_tanh_saturates_to_exactly_one(isa, dtype):
    x = sweep(tanh_saturation(dtype), float(np.finfo(dtype).max), dtype)
    np.testing.assert_array_equal(vmath(np.concatenate([x, -x]), "tanh"),
                                  np.repeat(dtype.type([1.0, -1.0]), x.size))


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_tanh_is_odd(isa, dtype):
    x = sweep(0.0, tanh_saturation(dtype), dtype)
    np.testing.assert_array_equal(vmath(-x, "tanh"), -vmath(x, "tanh"))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_tail_lanes_match_full_vectors(isa, fn, dtype):
    """Short arrays (partial vectors, every length up to 33 > two AVX-512 float
    vectors) give bit-identical results to the same values inside a long array."""
    x = np.random.default_rng(7).uniform(-20.0, 20.0, 64).astype(dtype)
    full = vmath(x, fn)
    for n in range(1, 34):
        for start in (0, 1, 64 - n):
            np.testing.assert_array_equal(vmath(x[start:start + n], fn),
                                          full[start:start + n], err_msg=f"n={n}, start={start}")
