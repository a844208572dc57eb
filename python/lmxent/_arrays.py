"""Array plumbing shared by the public functions: which kernels serve an array,
dtype rules, the (..., V) -> 2-D row view, and argument validation. Everything
a kernel assumes is checked here, before any kernel runs."""
import math
import operator

import numpy as np

from . import _cpu

_BF16 = None


def bfloat16_dtype():
    """np.dtype of ml_dtypes.bfloat16 when ml_dtypes is installed, else None."""
    global _BF16
    if _BF16 is None:
        try:
            import ml_dtypes
            _BF16 = np.dtype(ml_dtypes.bfloat16)
        except ImportError:
            _BF16 = False
    return _BF16 or None


def is_float(dtype):
    dtype = np.dtype(dtype).newbyteorder("=")  # byte order is converted, not refused
    return dtype in (np.float32, np.float64, np.float16) or dtype == bfloat16_dtype()


def compute_dtype(dtype):
    """Accumulation dtype (and dtype of losses and LSE): float64 for float64 input."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _is_cupy(x):
    # Duck-typed by module name: no CuPy import needed.
    return type(x).__module__.split(".")[0] == "cupy"


def array_module(x):
    """numpy or cupy: the array library of x (Python-level code is written once
    against it, DESIGN principle 5)."""
    if _is_cupy(x):
        import cupy
        return cupy
    return np


def kernels(x):
    """The kernel module for an array: lmxent._cpu for NumPy arrays."""
    if isinstance(x, np.ndarray):
        return _cpu
    if _is_cupy(x):
        raise TypeError("CuPy arrays need the CUDA backend (lmxent._cuda), which this "
                        "build does not include")
    raise TypeError(f"expected a NumPy array, got {type(x).__name__}")


def as_float_array(x, name, *, inplace=False):
    """x as a native-byte-order float array; inplace=True (results written over x)
    refuses what would have to be converted or cannot be written."""
    if _is_cupy(x):
        kernels(x)  # before np.asarray, which CuPy refuses with an error of its own
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            x = x.astype(np.float64)
    kernels(x)
    if not is_float(x.dtype):
        raise TypeError(f"{name}: unsupported dtype {x.dtype} (expected float32, float64, "
                        "float16 or ml_dtypes.bfloat16)")
    if inplace and not x.flags.writeable:
        raise ValueError(f"{name}: inplace=True needs a writable array")
    if not x.dtype.isnative:
        # A converted copy would receive the results and the caller's array would not.
        if inplace:
            raise ValueError(f"{name}: inplace=True needs native byte order, got dtype "
                             f"{x.dtype.str}")
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def real_array(a, name):
    """np.asarray(a), refusing dtypes that np.require would turn into a float
    silently or wrongly (bool, complex, object: None becomes NaN, str)."""
    a = np.asarray(a)
    if a.dtype.kind not in "fiu" and a.dtype != bfloat16_dtype():
        raise TypeError(f"{name}: unsupported dtype {a.dtype} (expected real numbers)")
    return a


def rows(x, name, *, need_view=False):
    """(..., V) -> 2-D (rows, V) with a contiguous last axis, without a copy when
    the leading axes collapse (any row stride is fine). Returns (x2, lead_shape)."""
    if x.ndim < 1:
        raise ValueError(f"{name}: expected at least 1 dimension (the vocabulary), got a scalar")
    V = x.shape[-1]
    if V == 0:
        raise ValueError(f"{name}: the vocabulary axis is empty (V = 0)")
    x2 = x.reshape(-1, V)
    viewed = x2.size == 0 or np.shares_memory(x2, x)
    if (V > 1 and x2.strides[1] != x2.itemsize) or not x2.flags.aligned:
        x2, viewed = np.require(x2, requirements=["C", "A"]), False
    if need_view and not viewed:
        raise ValueError(f"{name}: inplace=True needs logits whose rows can be viewed without "
                         "a copy (a contiguous last axis and collapsible leading axes)")
    return x2, x.shape[:-1]


def class_ids(targets, lead, V, ignore_index, name="targets"):
    """Validated class ids shaped `lead` -> (flat contiguous int64 ids, mask of the
    non-ignored ones). Every id is in [0, V) or equal to ignore_index; the error
    names the first bad position."""
    t = targets if isinstance(targets, np.ndarray) else np.asarray(targets)
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class ids, got dtype {t.dtype}")
    if t.shape != tuple(lead):
        raise ValueError(f"{name}: class ids must have shape {tuple(lead)} (the logits' "
                         f"shape without the vocabulary axis), got {t.shape}")
    # Checked in the ids' own dtype: the cast to int64 would wrap uint64 ids
    # >= 2**63 to negative values (even onto ignore_index).
    flat = t.reshape(-1)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= V))
    if bad.any():
        i = int(np.argmax(bad))
        pos = tuple(int(k) for k in np.unravel_index(i, lead)) if lead else ()
        raise ValueError(f"{name}: value {flat[i]} at position {pos} is out of range "
                         f"[0, {V}) and is not ignore_index ({ignore_index})")
    return np.require(flat, np.int64, "CA"), valid


def real(value, name):
    """float(value), with an error naming the option (float(None) does not)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def integer(value, name):
    """value as a Python int; floats are refused rather than truncated."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def positive(value, name, *, allow_none=False):
    if value is None and allow_none:
        return None
    v = real(value, name)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return v


def finite(value, name, lo=None, hi=None):
    v = real(value, name)
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise ValueError(f"{name} must be a finite number{rng}, got {value!r}")
    return v


def check_out(out, shape, dtype, name="out"):
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name}: expected shape {tuple(shape)} and dtype {dtype}, "
                         f"got {out.shape} and {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: array is read-only")
