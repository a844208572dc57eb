"""Array plumbing shared by the public functions: which kernels serve an array,
dtype rules, the (..., V) -> 2-D row view, and argument validation. Everything
a kernel assumes is checked here, before any kernel runs."""
import math
import operator
import os

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
    against it: docs/design.md, principle 5)."""
    if _is_cupy(x):
        import cupy
        return cupy
    return np


# Large NumPy outputs come from the output pool (cpp/cpu/output_pool.h): memory
# released by an earlier output is reused, already faulted in, instead of new
# pages that the OS must zero first. Small ones are left to malloc, which
# already recycles them.
POOL_MIN_BYTES = 4 << 20
_POOL_ON = False


def _memory_available_to_us():
    """Physical memory, or a container's (cgroup v2 or v1) memory limit if lower."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):  # absent, or "max"
            pass
    return total


def set_output_cache(limit):
    """Keep up to `limit` bytes of released large NumPy outputs for reuse (0: none);
    returns the previous limit. Blocks above a lower limit are freed at once."""
    global _POOL_ON
    limit = integer(limit, "limit")
    if not 0 <= limit < 2**63:
        raise ValueError(f"limit must be a number of bytes >= 0 (below 2**63), got {limit}")
    old = _cpu.pool_set_limit(limit)
    _POOL_ON = limit >= POOL_MIN_BYTES  # a smaller cache could never keep a block
    return old


def output_cache_info():
    """The output cache: its limit, and the bytes and blocks it holds for reuse."""
    limit, idle, blocks = _cpu.pool_info()
    return {"limit": limit, "held_bytes": idle, "held_blocks": blocks}


def _default_output_cache():
    env = os.environ.get("LMXENT_OUTPUT_CACHE")
    if env is None:
        return min(2 << 30, _memory_available_to_us() // 8)
    try:
        return int(env)
    except ValueError:
        raise ValueError(f"LMXENT_OUTPUT_CACHE must be a number of bytes, got {env!r}") from None


def empty(xp, shape, dtype):
    """xp.empty(shape, dtype), from the output pool for a large NumPy array."""
    dtype = np.dtype(dtype)
    if xp is np and _POOL_ON:
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes >= POOL_MIN_BYTES:
            return _cpu.pooled_empty(nbytes).view(dtype).reshape(shape)
    return xp.empty(shape, dtype)


class _CudaKernels:
    """lmxent._cuda, with a TypeError naming an op that has no CUDA kernel yet."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, op):
        try:
            return getattr(self._module, op)
        except AttributeError:
            raise TypeError(f"{op} has no CUDA kernel yet: pass NumPy arrays "
                            "(cupy.asnumpy)") from None


_CUDA = None  # _CudaKernels once lmxent._cuda and cupy import, else the ImportError


def _cuda_kernels():
    global _CUDA
    if _CUDA is None:
        try:
            from . import _cuda
        except ImportError as e:
            _CUDA = ImportError("CuPy arrays need the CUDA backend (lmxent._cuda), which this "
                                f"build does not include (built without nvcc?): {e}")
        else:
            try:
                import cupy  # noqa: F401 -- outputs are allocated with it
                _CUDA = _CudaKernels(_cuda)
            except ImportError as e:
                _CUDA = ImportError(f"CuPy arrays need the CUDA backend, which needs CuPy: {e}")
    if isinstance(_CUDA, ImportError):
        raise TypeError(str(_CUDA))
    return _CUDA


def kernels(x):
    """The kernels for an array: lmxent._cpu for NumPy arrays, lmxent._cuda for
    CuPy arrays (a TypeError saying why when the CUDA backend is missing)."""
    if isinstance(x, np.ndarray):
        return _cpu
    if _is_cupy(x):
        k = _cuda_kernels()
        import cupy
        if not isinstance(x, cupy.ndarray):
            raise TypeError(f"expected a NumPy array or a cupy.ndarray, got {type(x).__name__}")
        return k
    raise TypeError(f"expected a NumPy array, got {type(x).__name__}")


def as_float_array(x, name, *, inplace=False):
    """x as a native-byte-order float array; inplace=True (results written over x)
    refuses what would have to be converted or cannot be written. CuPy arrays
    (always native and writable) are returned as they are."""
    cupy_x = _is_cupy(x)
    if cupy_x:
        kernels(x)  # before np.asarray, which CuPy refuses with an error of its own
    elif not isinstance(x, np.ndarray):
        if inplace:  # the results would go to a converted copy, not to the caller's x
            raise TypeError(f"{name}: inplace=True needs a NumPy or CuPy array, got "
                            f"{type(x).__name__}")
        x = np.asarray(x)
        if x.dtype.kind in "iub":
            x = x.astype(np.float64)
    kernels(x)
    if not is_float(x.dtype):
        raise TypeError(f"{name}: unsupported dtype {x.dtype} (expected float32, float64, "
                        "float16 or ml_dtypes.bfloat16)")
    if cupy_x:
        return x
    if inplace and not x.flags.writeable:
        raise ValueError(f"{name}: inplace=True needs a writable array")
    if not x.dtype.isnative:
        # A converted copy would receive the results and the caller's array would not.
        if inplace:
            raise ValueError(f"{name}: inplace=True needs native byte order, got dtype "
                             f"{x.dtype.str}")
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def asarray(a, name, xp=np):
    """a as an array of xp (numpy or cupy, the logits' library): a CuPy array
    stays on its device; anything else goes through np.asarray (and is copied to
    the device for CuPy)."""
    if _is_cupy(a):
        if xp is np:
            raise TypeError(f"{name}: a CuPy array, but the logits are a NumPy array")
        return a
    a = a if isinstance(a, np.ndarray) else np.asarray(a)
    return a if xp is np else xp.asarray(a)


def real_array(a, name, xp=np):
    """asarray(a), refusing dtypes that np.require would turn into a float
    silently or wrongly (bool, complex, object: None becomes NaN, str)."""
    a = asarray(a, name, xp)
    if a.dtype.kind not in "fiu" and a.dtype != bfloat16_dtype():
        raise TypeError(f"{name}: unsupported dtype {a.dtype} (expected real numbers)")
    return a


def require(a, dtype):
    """np.require(a, dtype, "CA") for NumPy or CuPy arrays: C-contiguous, aligned,
    of `dtype`, copied only when needed."""
    if isinstance(a, np.ndarray):
        return np.require(a, dtype, "CA")
    a = a.astype(dtype, copy=False)
    if not a.flags.c_contiguous or a.data.ptr % a.itemsize:
        a = a.copy()
    return a


def data_ptr(a):
    """Address of a's first element (NumPy or CuPy)."""
    return a.data.ptr if _is_cupy(a) else a.__array_interface__["data"][0]


# ------------------------------------------------------- CUDA validation mode
# Eager (the default): class ids (and class weights) of CuPy calls are checked
# on the device before the kernel runs, with one host round trip per call, and
# raise like the CPU path. Deferred: no round trip; the kernels give a bad id's
# row a NaN loss and gradient (never reading out of bounds) and record it on
# the device, and check_cuda_errors() raises for it later.
_CUDA_EAGER = True


def set_cuda_validation(mode):
    """'eager' (default) or 'deferred' validation of CuPy calls' class ids and
    class weights; returns the previous mode."""
    global _CUDA_EAGER
    if mode not in ("eager", "deferred"):
        raise ValueError(f"mode must be 'eager' or 'deferred', got {mode!r}")
    previous = "eager" if _CUDA_EAGER else "deferred"
    _CUDA_EAGER = mode == "eager"
    return previous


def cuda_eager(xp):
    """Whether values of an xp call are validated before its kernel runs."""
    return xp is np or _CUDA_EAGER


def check_cuda_errors(device=None):
    """Raise ValueError if a CUDA cross-entropy call on `device` (default: CuPy's
    current device) met a class id out of range since the last check (possible
    under set_cuda_validation('deferred')), and clear the record. Waits for the
    work queued on CuPy's current stream. Without CuPy or the CUDA backend no CUDA
    call can have run: there is nothing to check, and it returns at once."""
    try:
        import cupy
        k = _cuda_kernels()
    except (ImportError, TypeError):  # no CuPy, or lmxent built without CUDA
        return
    with cupy.cuda.Device(device) as dev:
        count, first = k.take_status(dev.id, cupy.cuda.get_current_stream().ptr)
    if count:
        raise ValueError(f"targets: {count} class id(s) out of range and not ignore_index "
                         f"reached a CUDA cross-entropy or token_stats call since the last "
                         f"check (the first at row {first} of the flattened targets of its "
                         "call); their rows are NaN")


def rows(x, name, *, need_view=False):
    """(..., V) -> 2-D (rows, V) with a contiguous last axis, without a copy when
    the leading axes collapse (any row stride is fine). Returns (x2, lead_shape)."""
    if x.ndim < 1:
        raise ValueError(f"{name}: expected at least 1 dimension (the vocabulary), got a scalar")
    V = x.shape[-1]
    if V == 0:
        raise ValueError(f"{name}: the vocabulary axis is empty (V = 0)")
    x2 = x.reshape(-1, V)
    if _is_cupy(x):  # a reshape that cannot view copies to new memory
        viewed = x2.size == 0 or x2.data.ptr == x.data.ptr
        if (V > 1 and x2.strides[1] != x2.itemsize) or x2.data.ptr % x2.itemsize:
            x2, viewed = x2.copy(), False
    else:
        viewed = x2.size == 0 or np.shares_memory(x2, x)
        if (V > 1 and x2.strides[1] != x2.itemsize) or not x2.flags.aligned:
            x2, viewed = np.require(x2, requirements=["C", "A"]), False
    if need_view and not viewed:
        raise ValueError(f"{name}: inplace=True needs logits whose rows can be viewed without "
                         "a copy (a contiguous last axis and collapsible leading axes)")
    return x2, x.shape[:-1]


def int64_ids(flat, V, ignore_index, xp=np):
    """(int64 ids, mask of the non-ignored) of flat integer class ids. uint64 ids
    >= 2**63, which the cast to int64 would wrap to negative values (even onto
    ignore_index), become an out-of-range id that is not ignore_index."""
    ids = flat
    if flat.dtype == np.uint64:
        wrap = flat > np.uint64(np.iinfo(np.int64).max)
        ids = xp.where(wrap, np.uint64(V if ignore_index != V else V + 1), flat)
    ids = ids.astype(np.int64, copy=False)
    return ids, ids != ignore_index


def bad_ids(flat, ids, valid, V, lead, ignore_index, name="targets", xp=np):
    """(whether any non-ignored id is outside [0, V) -- a device boolean on CuPy --,
    a function making the ValueError that names the first one and its position)."""
    bad = valid & ((ids < 0) | (ids >= V))

    def error():
        i = int(xp.argmax(bad))
        pos = tuple(int(k) for k in np.unravel_index(i, lead)) if lead else ()
        return ValueError(f"{name}: value {int(flat[i])} at position {pos} is out of range "
                          f"[0, {V}) and is not ignore_index ({ignore_index})")
    return bad.any(), error


def class_ids(targets, lead, V, ignore_index, name="targets", xp=np):
    """Validated class ids shaped `lead` -> (flat contiguous int64 ids, mask of the
    non-ignored ones), arrays of xp (the logits' library: host ids are copied to
    the device). Every id is in [0, V) or equal to ignore_index; the error names
    the first bad position. On CuPy the check runs on the device and costs one
    host round trip; under set_cuda_validation('deferred') it is skipped and the
    kernels handle (and record) a bad id."""
    t = asarray(targets, name, xp)
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integer class ids, got dtype {t.dtype}")
    if t.shape != tuple(lead):
        raise ValueError(f"{name}: class ids must have shape {tuple(lead)} (the logits' "
                         f"shape without the vocabulary axis), got {t.shape}")
    flat = t.reshape(-1)
    ids, valid = int64_ids(flat, V, ignore_index, xp)
    if cuda_eager(xp):
        failed, error = bad_ids(flat, ids, valid, V, tuple(lead), ignore_index, name, xp)
        if failed:
            raise error()
    return require(ids, np.int64), valid


def real(value, name):
    """float(value) of a Python or NumPy number or a 0-d real array, with an error
    naming the option; strings and bools are refused (float("1.0") would pass)."""
    if isinstance(value, (str, bytes, bool, np.bool_)) or (
            isinstance(value, np.ndarray) and value.dtype.kind not in "iuf"):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None


def integer(value, name):
    """value as a Python int (Python and NumPy integers, 0-d integer arrays); floats
    are refused rather than truncated, and so are bools (axis=True is a mistake)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def ignore_index(value):
    """ignore_index as a Python int that fits the kernels' int64."""
    v = integer(value, "ignore_index")
    if not -2**63 <= v < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {v}")
    return v


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


def check_no_self_overlap(a, name):
    """Refuse an array that is written to when its elements overlap each other (a
    stride of 0, or an as_strided view whose axes interleave): each element would
    be written several times, from different inputs. Axes sorted by stride must
    each step over the whole extent of the smaller ones (conservative, as torch's
    internal-overlap check). An empty array has nothing to overlap."""
    if a.size == 0:
        return
    span = a.itemsize
    for n, st in sorted(((n, abs(st)) for n, st in zip(a.shape, a.strides) if n > 1),
                        key=lambda d: d[1]):
        if st < span:
            raise ValueError(f"{name}: its elements overlap each other in memory (a stride "
                             "of 0 or a self-overlapping view): results cannot be written "
                             "into it")
        span += (n - 1) * st


def shares_memory(a, b):
    """Whether a and b (arrays of one library, or None) may share memory."""
    if a is None or b is None:
        return False
    return (np.may_share_memory if isinstance(a, np.ndarray) else array_module(a).may_share_memory)(a, b)


def check_out(out, shape, dtype, name="out", xp=np):
    if not isinstance(out, xp.ndarray):
        lib = "NumPy" if xp is np else "CuPy"
        raise TypeError(f"{name}: expected a {lib} array, got {type(out).__name__}")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name}: expected shape {tuple(shape)} and dtype {dtype}, "
                         f"got {out.shape} and {out.dtype}")
    if xp is np and not out.flags.writeable:  # CuPy arrays are always writable
        raise ValueError(f"{name}: array is read-only")
    check_no_self_overlap(out, name)


def direct_out(out, x2, xp, others=()):
    """Rows of `out` a kernel can write into directly, or None (use a buffer):
    out's rows must be a view, and either not overlap the rows read (x2) or be
    exactly them (row by row in place); a partial overlap would let the kernel
    read rows it has already overwritten. Nor may they overlap any other array the
    kernel reads (`others`: class weights, probability targets, the LSE, per-row
    factors), which it reads while writing."""
    try:
        res, _ = rows(out, "out", need_view=True)
    except ValueError:
        return None
    if xp.may_share_memory(res, x2) and not (
            data_ptr(res) == data_ptr(x2)
            and res.strides == x2.strides):  # shapes and dtypes match already
        return None
    if any(shares_memory(res, o) for o in others):
        return None
    return res


set_output_cache(_default_output_cache())
