"""logsumexp, log_softmax and softmax over one axis, with a temperature.

The last axis is the fast path (rows viewed in place, any row stride); another
axis is moved last, which copies. Outputs have the input's dtype; the
log-sum-exp is float32 (float64 for float64 input). NumPy arrays run on the CPU
kernels, CuPy arrays on the CUDA kernels (on CuPy's current stream, returning
CuPy arrays)."""
from . import _arrays as A

__all__ = ["logsumexp", "log_softmax", "softmax"]


def _rows_along(x, axis, temperature):
    """Validated (x, axis, 2-D rows of x with `axis` last, lead shape, 1/T, array module)."""
    x = A.as_float_array(x, "x")
    xp = A.array_module(x)
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension, got a scalar")
    axis = A.integer(axis, "axis")  # one axis: None or a tuple is not supported
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of {x.ndim} dimensions")
    axis %= x.ndim
    scale = 1.0 / A.positive(temperature, "temperature")
    x2, lead = A.rows(xp.moveaxis(x, axis, -1), "x")
    return x, axis, x2, lead, scale, xp


def logsumexp(x, axis=-1, *, keepdims=False, temperature=1.0):
    """log(sum(exp(x / temperature))) along `axis`."""
    x, axis, x2, lead, scale, xp = _rows_along(x, axis, temperature)
    lse = xp.empty(x2.shape[0], A.compute_dtype(x.dtype))
    A.kernels(x).softmax(x2, None, lse, scale, False)
    lse = lse.reshape(lead)
    return xp.expand_dims(lse, axis) if keepdims else lse


def _softmax(x, axis, temperature, out, log):
    x, axis, x2, lead, scale, xp = _rows_along(x, axis, temperature)
    if out is not None:
        A.check_out(out, x.shape, x.dtype, xp=xp)
    res = A.direct_out(out, x2, xp) if out is not None and axis == x.ndim - 1 else None
    direct = res is not None
    if not direct:
        res = A.empty(xp, x2.shape, x.dtype)
    A.kernels(x).softmax(x2, res, None, scale, log)
    y = xp.moveaxis(res.reshape(lead + (x.shape[axis],)), -1, axis)
    if out is None:
        return y
    if not direct:
        out[...] = y
    return out


def log_softmax(x, axis=-1, *, temperature=1.0, out=None):
    """log(softmax(x / temperature)) along `axis`, in the dtype of x."""
    return _softmax(x, axis, temperature, out, True)


def softmax(x, axis=-1, *, temperature=1.0, out=None):
    """softmax(x / temperature) along `axis`, in the dtype of x."""
    return _softmax(x, axis, temperature, out, False)
