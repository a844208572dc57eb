"""Shared helpers of the kernel tests (the fixtures are in conftest.py).

- ``DTYPES`` / ``DTYPE_IDS``: float32, float64, float16 and, when ml_dtypes is
  installed, ml_dtypes.bfloat16 (``BF16`` is None otherwise).
- ``ISAS``, ``cpu_isa(name)``: the CPU instruction sets this processor offers
  (``lmxent.cpu_info()["available"]``); a context manager using one of them.
- ``num_threads(n)``: a context manager setting lmxent's thread count.
- ``lowp(x, dtype)``: round float64 data to ``dtype`` and return both the rounded
  array and its exact float64 values (the reference must see the SAME inputs).
- ``assert_loss_close`` / ``assert_grad_close``: per-dtype tolerances.
- ``torch_ce_with_grad``: lmxent's conventions built from torch ops (float64
  autograd), or None when torch is not installed.
"""
import contextlib

import numpy as np

import lmxent

try:  # optional: bfloat16 is tested only where ml_dtypes is installed
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    ml_dtypes = None
    BF16 = None

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

F32, F64, F16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)
DTYPES = [F32, F64, F16] + ([BF16] if BF16 is not None else [])
LOWP_DTYPES = [F32, F16] + ([BF16] if BF16 is not None else [])  # float32 compute


def dtype_id(dt):
    return "bfloat16" if BF16 is not None and dt == BF16 else np.dtype(dt).name


DTYPE_IDS = [dtype_id(d) for d in DTYPES]
LOWP_IDS = [dtype_id(d) for d in LOWP_DTYPES]

ISAS = list(lmxent.cpu_info()["available"])


@contextlib.contextmanager
def cpu_isa(name):
    """Use one CPU instruction set inside the block; restore the original after."""
    original = lmxent.cpu_info()["isa"]
    lmxent.set_cpu_isa(name)
    try:
        assert lmxent.cpu_info()["isa"] == name
        yield name
    finally:
        lmxent.set_cpu_isa(original)


@contextlib.contextmanager
def num_threads(n):
    original = lmxent.cpu_info()["threads"]
    lmxent.set_num_threads(n)
    try:
        yield
    finally:
        lmxent.set_num_threads(original)


def numeric_grad(f, x, h=1e-6):
    """Central finite differences of the scalar function f at float64 x."""
    num = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num[i] = (f(x + e) - f(x - e)) / (2 * h)
    return num


def lowp(x, dtype):
    """(x rounded to dtype, the rounded values as float64)."""
    xl = np.asarray(x, dtype=np.float64).astype(dtype)
    return xl, xl.astype(np.float64)


def loss_dtype(dtype):
    return F64 if np.dtype(dtype) == F64 else F32


# ----------------------------------------------------------------- tolerances
# Losses: float32 accumulation for every non-float64 input, so the same
# tolerance for float32 / float16 / bfloat16 (the inputs are exact in float32
# and the reference sees the same rounded values).
#
# Gradients: dL/dz_j = A p_j - b_j is a difference of O(scale) terms, so its
# float32 error is absolute, a few eps32 times the row's gradient scale
# |grad_output / denom| * logit_scale * (|A| + sum b) (see grad_scale()), not
# relative to the (possibly tiny) element. Then one rounding to the output
# dtype: 2^-9 relative for bf16 and 2^-12 for f16 with round-to-nearest (2^-8
# and 2^-11 allowed) plus an absolute floor for float16 subnormals.

_LOSS_TOL = {  # (rtol, atol)
    "float64": (1e-11, 1e-11),
    "lowp": (2e-6, 2e-6),
}
_GRAD_TOL = {  # (rtol, atol as a multiple of the gradient scale, absolute floor)
    "float64": (1e-10, 1e-13, 0.0),
    "float32": (1e-5, 1e-6, 0.0),
    "float16": (2.0**-11, 1e-6, 6e-8),  # f16 subnormal spacing 6e-8
    "bfloat16": (2.0**-8, 1e-6, 1e-38),
}


def loss_tol(dtype):
    return _LOSS_TOL["float64" if np.dtype(dtype) == F64 else "lowp"]


def assert_loss_close(actual, expected, dtype, *, scale=None, what="loss"):
    """Loss (scalar or per token) against the float64 reference. `scale` is the
    magnitude the absolute error is measured against (defaults to max |expected|, >= 1)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    rtol, atol = loss_tol(dtype)
    fin = np.isfinite(expected)
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(expected[fin]), initial=0.0)))
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=what + " NaN")
    inf = np.isinf(expected)
    np.testing.assert_array_equal(actual[inf], expected[inf], err_msg=what + " inf")
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol * scale,
                               err_msg=what)


def grad_scale(x_shape, targets, lse, grad_output=1.0, *, weight=None, ignore_index=-100,
               reduction="mean", z_loss=0.0, logit_scale=1.0, normalizer=None, **_):
    """Per-row bound on |grad_output factor| * max|dz/dx| * (|A| + sum_j b_j), shaped
    (..., 1): the magnitude the float32 gradient error is proportional to."""
    lead = tuple(x_shape[:-1])
    t = np.asarray(targets)
    prob = t.dtype.kind == "f" or (BF16 is not None and t.dtype == BF16)
    w = None if weight is None else np.abs(np.asarray(weight, dtype=np.float64))
    wmax = 1.0 if w is None else float(w.max(initial=0.0))
    if reduction == "none":
        f = np.abs(np.broadcast_to(np.asarray(grad_output, dtype=np.float64), lead))
    else:
        f = abs(float(grad_output))
        if reduction == "mean":
            if normalizer is not None:
                d = normalizer
            elif prob:
                d = float(np.prod(lead))
            else:
                mask = t != ignore_index
                d = float(mask.sum()) if w is None else float(w[t[mask]].sum())
            f = f / d if d else 0.0
    lse = np.abs(np.nan_to_num(np.asarray(lse, dtype=np.float64), nan=0.0, posinf=0.0,
                               neginf=0.0))
    return np.asarray(f * abs(logit_scale) * (2 * wmax + 2 * z_loss * lse))[..., None]


def assert_grad_close(actual, expected, dtype, *, gscale=None, what="grad"):
    """Gradient against the float64 reference (same shape and dtype; NaN exactly where
    the reference has NaN). `gscale`: the gradient scale (see grad_scale), broadcastable
    to the gradient; by default max |expected| (>= 1e-30)."""
    dtype = np.dtype(dtype)
    assert actual.dtype == dtype, (what, actual.dtype, dtype)
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    rtol, arel, floor = _GRAD_TOL[dtype_id(dtype)]
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=what + " NaN")
    fin = np.isfinite(expected)
    if gscale is None:
        gscale = float(np.max(np.abs(expected[fin]), initial=0.0))
    atol = np.broadcast_to(arel * np.asarray(gscale, dtype=np.float64) + floor,
                           expected.shape)[fin]
    err = np.abs(actual[fin] - expected[fin])
    bad = ~(err <= atol + rtol * np.abs(expected[fin]))
    if bad.any():
        i = np.flatnonzero(bad)[:5]
        raise AssertionError(
            f"{what}: {bad.sum()} / {bad.size} elements out of tolerance (rtol={rtol}); "
            f"first: actual {actual[fin][i]}, expected {expected[fin][i]}, "
            f"|err| {err[i]}, atol {atol[i]}")


# ----------------------------------------------------------------------- torch

def torch_ce_with_grad(x, t, *, grad_output=1.0, weight=None, ignore_index=-100,
                       reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                       logit_scale=1.0, normalizer=None, dtype=np.float64):
    """(loss, grad) with lmxent's conventions, built from torch ops and autograd in
    `dtype` (float64 by default). None when torch is missing."""
    if torch is None:
        return None
    tdt = torch.float64 if np.dtype(dtype) == F64 else torch.float32
    xt = torch.tensor(np.asarray(x, dtype=np.float64), dtype=tdt, requires_grad=True)
    t = np.asarray(t)
    prob = t.dtype.kind == "f"
    tt = torch.tensor(t.astype(np.float64), dtype=tdt) if prob else torch.from_numpy(
        t.astype(np.int64))
    w = None if weight is None else torch.tensor(np.asarray(weight, np.float64), dtype=tdt)
    V = x.shape[-1]
    z = logit_scale * xt
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z2 = z.reshape(-1, V)
    per = torch.nn.functional.cross_entropy(
        z2, tt.reshape(-1, V) if prob else tt.reshape(-1), weight=w,
        ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(z2, -1)
    if prob:
        mask = torch.ones_like(per)
        denom = float(per.numel())
    else:
        tf = tt.reshape(-1)
        mask = (tf != ignore_index).to(tdt)
        if w is None:
            denom = float(mask.sum())
        else:
            denom = float((w[tf.clamp(0, V - 1)] * mask).sum())
    per = per + z_loss * lse**2 * mask
    lead = x.shape[:-1]
    if reduction == "none":
        loss = per.reshape(lead)
        go = torch.broadcast_to(torch.as_tensor(np.asarray(grad_output, np.float64),
                                                dtype=tdt), loss.shape)
        loss.backward(go)
    else:
        loss = per.sum()
        if reduction == "mean":
            d = normalizer if normalizer is not None else denom
            loss = loss / d if d != 0 else loss * 0.0
        loss.backward(torch.as_tensor(float(grad_output), dtype=tdt))
    return loss.detach().numpy().astype(np.float64), xt.grad.numpy().astype(np.float64)


# ------------------------------------------------ softmax family (also test_cuda)
# Helpers shared by test_softmax.py and test_cuda.py.

def out_dtype(fn, dtype):
    """lse is float32 (float64 for float64 input); softmax outputs keep x's dtype."""
    if fn == "logsumexp":
        return F64 if dtype == F64 else F32
    return np.dtype(dtype)


def softmax_ref(fn, x, **kw):
    """The float64 reference of a softmax-family function on x's values."""
    return getattr(lmxent.reference, fn)(np.asarray(x, dtype=np.float64), **kw)


def assert_nan_inf_equal(actual, expected, what=""):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, (what, a.shape, e.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN positions")
    inf = np.isinf(e)
    np.testing.assert_array_equal(np.isinf(a), inf, err_msg=f"{what}: inf positions")
    np.testing.assert_array_equal(a[inf], e[inf], err_msg=f"{what}: inf signs")


def softmax_tol(fn, dtype, scale=1.0):
    """(rtol, atol) against the float64 reference for a float32/float64 result whose
    magnitude is `scale`: a few units in the last place of the compute type."""
    eps = 2.0**-52 if dtype == F64 else 2.0**-23
    if fn == "softmax":  # probabilities <= 1; error ~ ulp(lse) relative
        return 8 * eps * max(1.0, scale), 8 * eps * max(1.0, scale)
    return 8 * eps, 8 * eps * max(1.0, scale)


def assert_matches_reference(fn, actual, x, dtype, *, what="", **kw):
    """Compare one function's output with the reference on x's (rounded) values."""
    expected = softmax_ref(fn, x, **kw)
    assert actual.dtype == out_dtype(fn, dtype), (what, actual.dtype)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a64 = np.asarray(actual, dtype=np.float64)
    # NaN/inf positions of the reference as the output dtype holds it (float16
    # overflows to inf where float64 does not)
    expected_rounded = expected.astype(actual.dtype).astype(np.float64)
    assert_nan_inf_equal(a64, expected_rounded, what)
    fin = np.isfinite(expected_rounded)
    expected = np.where(fin, expected, expected_rounded)
    if not fin.any():
        return
    # the error of log_softmax / softmax scales with |lse| (z - lse is formed in C)
    lse = softmax_ref("logsumexp", x, **{k: v for k, v in kw.items() if k != "keepdims"})
    lse_scale = float(np.max(np.abs(lse), initial=1.0, where=np.isfinite(lse)))
    if dtype_id(dtype) in ("float16", "bfloat16") and fn != "logsumexp":
        # one rounding to the output dtype after float32 math whose absolute error
        # is a few float32 ulps of |lse| (log_softmax near 0 cancels)
        assert_lowp_close(actual, expected, what, extra_atol=4 * 2.0**-24 * lse_scale)
        return
    scale = max(float(np.max(np.abs(expected[fin]))), lse_scale)
    rtol, atol = softmax_tol(fn, np.dtype(dtype) if dtype == F64 else F32, scale)
    np.testing.assert_allclose(a64[fin], expected[fin], rtol=rtol, atol=atol, err_msg=what)


_MANT = {F16: 10, BF16: 7}
# Absolute floor: float16's subnormal spacing; for bfloat16 the smallest normal float32,
# because the float32 exp flushes results below it to zero by design (no denormals).
_TINY = {F16: 2.0**-24, BF16: 2.0**-126}


def assert_lowp_close(actual, expected, what="", extra_atol=0.0):
    """float16 / bfloat16 output within one unit in the last place of the exact value
    (float32 math, then one round-to-nearest), plus `extra_atol` for the float32 math."""
    dt = np.dtype(actual.dtype)
    a = np.asarray(actual, dtype=np.float64)
    fin = np.isfinite(expected)
    e = expected[fin]
    with np.errstate(divide="ignore"):
        ulp = np.where(e == 0, _TINY[dt], 2.0 ** (np.floor(np.log2(np.abs(e))) - _MANT[dt]))
    ulp = np.maximum(ulp, _TINY[dt]) + extra_atol
    err = np.abs(a[fin] - e)
    bad = err > ulp
    assert not bad.any(), (f"{what}: {bad.sum()} values off by more than 1 ulp of "
                           f"{dtype_id(dt)}; worst {np.max(err / ulp):.2f} ulp")


INF, NAN = np.inf, np.nan
EXTREME_ROWS = [
    [1e4, -1e4, 0.0, 3.0, -2.5],            # huge spread
    [-1e4, -1e4 + 1, -1e4 + 2, -1e4, -1e4],  # everything very negative
    [1e4, 1e4, 1e4 - 1, 1e4, 1e4],           # everything very large
    [-INF, 1.0, 2.0, -INF, 0.5],             # masked entries
    [-INF, -INF, -INF, 3.0, -INF],           # one live entry
    [-INF, -INF, -INF, -INF, -INF],          # all masked: lse -inf, softmax NaN
    [NAN, 1.0, 2.0, 3.0, 4.0],               # NaN -> whole row NaN
    [1.0, 2.0, 3.0, 4.0, NAN],
    [NAN, -INF, 2.0, INF, 4.0],              # NaN beside +inf is still NaN
    [0.5, -0.25, 1.0, 2.0, -3.0],            # ordinary row between the others
]
MASKED_ROWS = [3, 4, 5]  # rows whose filler entries are -inf


def extreme_rows(rows, V, dtype, rng):
    """Rows of length V holding the 5 given values at spread-out columns (different
    chunks of 2048; at V=70000 different threads too), ordinary values elsewhere."""
    rows = np.array(rows, np.float64)
    if dtype == F16:
        rows = np.where(np.abs(rows) == 1e4, np.sign(rows) * 6e4, rows)  # f16 max 65504
    if V == rows.shape[1]:
        return rows.astype(dtype)
    x = rng.standard_normal((len(rows), V))
    x[[r for r in MASKED_ROWS if r < len(rows)]] = -INF
    x[:, [0, V // 3, V // 2 + 1, V - 2050, V - 1]] = rows
    return x.astype(dtype)


PLUS_INF_ROWS = [
    [INF, 1.0, 2.0, 3.0, 4.0],
    [INF, -INF, 0.0, 1.0, 2.0],
    [1.0, INF, INF, -1.0, 0.0],
]
