"""The CuPy path: lmxent's functions on CuPy arrays against lmxent.reference.

Every test runs with two array modules (the `xp` fixture):

- ``cupy``: real CuPy arrays on a GPU, through the CUDA kernels of lmxent._cuda
  (skipped when CuPy, a GPU or the CUDA build is missing);
- ``fakecupy``: a NumPy-backed stand-in with the part of CuPy's surface the
  Python layer may use. It refuses implicit conversion to NumPy like CuPy, its
  "kernels" are the CPU kernels behind a check that every array argument is a
  device array, and it emulates the CUDA kernels' out-of-range class-id record.
  It runs on any machine and checks the Python layer's device path: dispatch,
  denominators and grad_output factors computed on the device, validation, and
  the number of host round trips (device -> host reads) per call.

Also here: the error a CuPy array gets when the CUDA backend is missing.
"""
import inspect
import operator
import re
import sys
import types

import numpy as np
import pytest

import lmxent as lx
from lmxent import _arrays as A
from lmxent import _cpu
from lmxent import reference as ref

from helpers import (
    BF16,
    EXTREME_ROWS,
    F16,
    F32,
    F64,
    PLUS_INF_ROWS,
    assert_grad_close,
    assert_loss_close,
    assert_matches_reference,
    dtype_id,
    extreme_rows,
    grad_scale,
    loss_dtype,
)
from test_cross_entropy import OPTION_CASES, build_case, grad_output_for, make_ids, make_logits, make_probs
from test_linear_cross_entropy import assert_head_grads
from test_linear_cross_entropy import grad_output_for as head_grad_output
from test_linear_cross_entropy import make_problem as make_head_problem
from test_linear_cross_entropy import resolve as head_options

FNS = ["logsumexp", "log_softmax", "softmax"]
DTYPES = [F32, F64, F16] + ([BF16] if BF16 is not None else [])
DTYPE_IDS = [dtype_id(d) for d in DTYPES]


# ------------------------------------------------------------- the fake CuPy

class FakeArray:
    """A device array: NumPy storage, no implicit conversion, host reads counted."""

    reads = 0  # device -> host reads (get, int, float, bool, str) since the last reset

    def __init__(self, a):
        self._a = a

    shape = property(lambda s: s._a.shape)
    ndim = property(lambda s: s._a.ndim)
    dtype = property(lambda s: s._a.dtype)
    size = property(lambda s: s._a.size)
    itemsize = property(lambda s: s._a.itemsize)
    nbytes = property(lambda s: s._a.nbytes)
    strides = property(lambda s: s._a.strides)
    flags = property(lambda s: s._a.flags)
    data = property(lambda s: types.SimpleNamespace(ptr=s._a.__array_interface__["data"][0]))

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def _read(self):
        FakeArray.reads += 1
        return self._a

    def get(self):
        return self._read().copy()

    def __int__(self):
        return int(self._read())

    def __float__(self):
        return float(self._read())

    def __bool__(self):
        return bool(self._read())

    def item(self):
        return self._read().item()

    def __format__(self, spec):
        return format(self._read(), spec)

    def __len__(self):
        return len(self._a)

    def __getitem__(self, i):
        return _wrap(self._a[_unwrap(i)])

    def __setitem__(self, i, v):
        self._a[_unwrap(i)] = _unwrap(v)

    def reshape(self, *shape):
        return _wrap(self._a.reshape(*shape))

    T = property(lambda s: _wrap(s._a.T))

    def astype(self, dtype, copy=True):
        return _wrap(self._a.astype(dtype, copy=copy))

    def copy(self, order="C"):
        return _wrap(self._a.copy(order=order))

    def sum(self, axis=None, dtype=None):
        return _wrap(self._a.sum(axis=axis, dtype=dtype))

    def max(self, axis=None):
        return _wrap(self._a.max(axis=axis))

    def any(self):
        return _wrap(self._a.any())

    def all(self):
        return _wrap(self._a.all())


FakeArray.__module__ = "cupy"  # what lmxent._arrays._is_cupy looks at


def _scalar_like_cupy(a, o):
    """A Python int operand as CuPy casts it against an unsigned array: to the array's
    dtype, wrapping negative values (uint64 ids != -100 is False for 2**64 - 100)."""
    if isinstance(o, int) and not isinstance(o, bool) and a.dtype.kind == "u" and o < 0:
        return a.dtype.type(o % (1 << (8 * a.dtype.itemsize)))
    return _unwrap(o)


for _name, _op in [("eq", operator.eq), ("ne", operator.ne), ("lt", operator.lt),
                   ("le", operator.le), ("gt", operator.gt), ("ge", operator.ge),
                   ("and", operator.and_), ("or", operator.or_), ("add", operator.add),
                   ("sub", operator.sub), ("mul", operator.mul), ("truediv", operator.truediv)]:
    setattr(FakeArray, f"__{_name}__",
            lambda s, o, op=_op: _wrap(op(s._a, _scalar_like_cupy(s._a, o))))
    setattr(FakeArray, f"__r{_name}__",
            lambda s, o, op=_op: _wrap(op(_scalar_like_cupy(s._a, o), s._a)))
FakeArray.__invert__ = lambda s: _wrap(~s._a)
FakeArray.__neg__ = lambda s: _wrap(-s._a)


def _unwrap(v):
    """The NumPy storage of device arguments. Host arrays are refused, as CuPy 14
    refuses NumPy arrays in its ufuncs, indexing and assignment ("Unsupported
    type"): every host -> device copy must be explicit (cupy.asarray). NumPy and
    Python scalars pass, as they do in CuPy."""
    if isinstance(v, FakeArray):
        return v._a
    if isinstance(v, np.ndarray):
        raise TypeError(f"Unsupported type {type(v)}")
    if isinstance(v, (tuple, list)):
        return type(v)(_unwrap(e) for e in v)
    return v


def _wrap(v):
    return FakeArray(np.asarray(v)) if isinstance(v, (np.ndarray, np.generic)) else v


def _fake_fn(fn):
    return lambda *args, **kw: _wrap(fn(*_unwrap(args), **{k: _unwrap(v) for k, v in kw.items()}))


def _fake_asarray(a, dtype=None):
    if isinstance(a, FakeArray):
        return a if dtype is None else a.astype(dtype, copy=False)
    if type(a).__module__.split(".")[0] == "cupy":  # a real CuPy array: a bug in the test
        raise TypeError("real cupy array given to fakecupy")
    return FakeArray(np.array(a, dtype=dtype))  # a host -> device copy


class _FakeDevice:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_fake_cupy():
    m = types.ModuleType("cupy")
    m.ndarray = FakeArray
    m.asarray = _fake_asarray
    m.asnumpy = lambda a: a.get()
    for name in ("empty", "zeros", "full", "where", "stack", "count_nonzero", "clip",
                 "isfinite", "argmax", "moveaxis", "expand_dims", "broadcast_to",
                 "ascontiguousarray", "matmul", "add", "subtract", "sum", "exp", "abs",
                 "arange", "linspace", "searchsorted", "bincount"):
        setattr(m, name, _fake_fn(getattr(np, name)))
    m.may_share_memory = lambda a, b: np.may_share_memory(_unwrap(a), _unwrap(b))
    m.cuda = types.SimpleNamespace(
        Device=_FakeDevice, get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    return m


class FakeCuda:
    """lmxent._cuda over the CPU kernels: the ops of lmxent._cpu.ops, which has the
    same ops, parameter names and signatures as lmxent._cuda (one binding table
    builds both), called positionally or by keyword. Every array argument must be a
    device array. Out-of-range class ids are handled as the CUDA kernels do: never
    used, the row's loss and gradient (token_stats: logprob) NaN, its rank -1, the
    row recorded."""

    NAN_ON_BAD_ID = ("loss", "grad", "logprob")  # the outputs a bad id's row gets NaN in

    def __init__(self):
        self.bad = []

    def __getattr__(self, op):
        if op not in _cpu.ops:
            raise AttributeError(op)  # as lmxent._cuda without the op
        signature = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                       for p in _cpu.ops[op]])
        return lambda *args, **kw: self._run(op, signature.bind(*args, **kw).arguments)

    def _run(self, op, kw):
        for name, a in kw.items():
            assert not isinstance(a, np.ndarray), f"{op}: host array {name} sent to a kernel"
        kw = {name: a._a if isinstance(a, FakeArray) else a for name, a in kw.items()}
        bad = None
        if kw.get("targets") is not None:  # class ids
            t, ignore_index = kw["targets"], kw["ignore_index"]
            # with vocab_slice, -1 is a target in another slice, not a bad id
            lowest = -1 if kw.get("vocab_slice") else 0
            bad = (t != ignore_index) & ((t < lowest) | (t >= kw["logits"].shape[1]))
            self.bad += list(np.flatnonzero(bad))
            kw["targets"] = np.where(bad, ignore_index, t)  # ignored: rank -1
        getattr(_cpu, op)(**kw)
        for name in self.NAN_ON_BAD_ID if bad is not None else ():
            if kw.get(name) is not None:
                kw[name][bad] = np.nan

    def take_status(self, device, stream):
        count, first = len(self.bad), min(self.bad, default=None)
        self.bad = []
        return count, None if first is None else int(first)


# ------------------------------------------------------------------ fixtures

def _real_cupy():
    """(cupy, None) when CuPy, a GPU and lmxent._cuda are all here, else (None, why)."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "no GPU"
    except Exception as e:  # ImportError, or CUDARuntimeError without a driver
        return None, f"CuPy unusable: {e}"
    try:
        from lmxent import _cuda  # noqa: F401
    except ImportError:
        return None, "lmxent was built without the CUDA backend"
    return cupy, None


@pytest.fixture(params=["fakecupy", "cupy"])
def xp(request, monkeypatch):
    """The device array module; lmxent's CUDA backend is the matching one."""
    if request.param == "cupy":
        cupy, why = _real_cupy()
        if cupy is None:
            pytest.skip(why)
        yield cupy
        return
    fake = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(A, "_CUDA", A._CudaKernels(FakeCuda()))
    yield fake


# CuPy 14 handles bfloat16 arrays only with NumPy >= 2.1.2 (older NumPy lacks the
# dtype machinery it uses); the `cuda` extra requires it, but a user may have less.
CUPY_BF16 = np.lib.NumpyVersion(np.__version__) >= "2.1.2"


@pytest.fixture(autouse=True)
def _bf16_needs_numpy_2_1_2(request):
    params = getattr(request.node, "callspec", None)
    params = params.params if params else {}
    if (params.get("xp") == "cupy" and not CUPY_BF16 and BF16 is not None
            and any(v is BF16 for v in params.values())):
        pytest.skip(f"bfloat16 CuPy arrays need NumPy >= 2.1.2 (this is {np.__version__})")


@pytest.fixture
def deferred():
    previous = A.set_cuda_validation("deferred")
    try:
        yield
    finally:
        A.set_cuda_validation(previous)


def host(a):
    """A device result as a NumPy array (0-d arrays stay arrays)."""
    assert type(a).__module__.split(".")[0] == "cupy", f"expected a device array, got {type(a)}"
    return a.get()


# ------------------------------------------------------------ softmax family

# One block per row (more rows than any GPU has multiprocessors, or short rows),
# and few long rows split across blocks.
SOFTMAX_SHAPES = [(7, 5), (4, 3000), (300, 9001), (3, 70001), (2, 262144), (1, 1 << 20)]


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_softmax_family(xp, dtype, shape, rng):
    if shape[1] > 100000 and dtype_id(dtype) not in ("float32", "bfloat16"):
        pytest.skip("long rows: float32 and bfloat16 are enough")
    x = (3.0 * rng.standard_normal(shape)).astype(dtype)
    x[:, -1] = 20.0  # the last slice matters
    x[0, shape[1] // 2 + 1] = 21.0  # and one in the middle
    d = xp.asarray(x)
    for fn in FNS:
        y = getattr(lx, fn)(d, temperature=0.8)
        assert_matches_reference(fn, host(y), x, dtype, what=f"{fn} {shape}", temperature=0.8)


@pytest.mark.parametrize("V", [5, 3000, 70000])
@pytest.mark.parametrize("dtype", [F32, F64, BF16] if BF16 is not None else [F32, F64],
                         ids=dtype_id)
def test_softmax_extreme_values(xp, dtype, V, rng):
    """+-1e4, -inf, all -inf, NaN and +inf rows, element by element."""
    x = extreme_rows(EXTREME_ROWS + PLUS_INF_ROWS, V, dtype, rng)
    d = xp.asarray(x)
    for fn in FNS:
        assert_matches_reference(fn, host(getattr(lx, fn)(d)), x, dtype, what=f"{fn} extreme")


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_out_inplace_strided_and_axis(xp, fn, rng):
    x = rng.standard_normal((6, 1001)).astype(np.float32)
    expected = getattr(lx, fn)(x)
    # out= a column slice of a wider device array: rows strided, the rest untouched
    big = xp.asarray(np.full((6, 1100), 7.0, np.float32))
    out = big[:, 50:1051]
    assert getattr(lx, fn)(xp.asarray(x), out=out) is out
    assert_matches_reference(fn, host(out), x, F32)
    b = host(big)
    assert (b[:, :50] == 7.0).all() and (b[:, 1051:] == 7.0).all()
    # in place: out is x
    d = xp.asarray(x)
    assert getattr(lx, fn)(d, out=d) is d
    np.testing.assert_allclose(host(d), expected, rtol=1e-5, atol=1e-6)
    # another axis (moved last, copied)
    assert_matches_reference(fn, host(getattr(lx, fn)(xp.asarray(x), axis=0)), x, F32, axis=0)
    lse = lx.logsumexp(xp.asarray(x), axis=0, keepdims=True)
    assert lse.shape == (1, 1001)
    assert_matches_reference("logsumexp", host(lse), x, F32, axis=0, keepdims=True)


def test_softmax_out_must_be_a_device_array(xp):
    with pytest.raises(TypeError, match="out: expected a CuPy array, got ndarray"):
        lx.softmax(xp.asarray(np.zeros((2, 3), np.float32)), out=np.zeros((2, 3), np.float32))


def test_softmax_empty_batch(xp):
    for shape in ((0, 5), (2, 0, 7)):
        d = xp.asarray(np.zeros(shape, np.float32))
        assert lx.logsumexp(d).shape == shape[:-1]
        assert lx.softmax(d).shape == shape


# ------------------------------------------------------------- cross-entropy

def check_all(xp, x, t, *, grad_output=1.0, **opts):
    """Forward (with the LSE), loss only, fused loss + gradient, in place, and the
    backward from the LSE, all on device arrays, against the reference on the same
    rounded inputs. Host option arrays (weight, grad_output) are used as given."""
    dt = x.dtype
    x64 = x.astype(np.float64)
    r_loss, r_lse = ref.cross_entropy(x64, t, return_lse=True, **opts)
    r_grad = ref.cross_entropy_backward(x64, t, r_lse, grad_output, **opts)
    gs = grad_scale(x.shape, t, r_lse, grad_output, **opts)
    dx, dtg = xp.asarray(x), xp.asarray(t)

    loss, lse = lx.cross_entropy(dx, dtg, return_lse=True, **opts)
    assert loss.dtype == loss_dtype(dt) and lse.dtype == loss_dtype(dt)
    assert_loss_close(host(loss), r_loss, dt)
    assert_loss_close(host(lse), r_lse, dt, what="lse")
    np.testing.assert_array_equal(host(lx.cross_entropy(dx, dtg, **opts)), host(loss))

    loss2, grad = lx.cross_entropy_with_grad(dx, dtg, grad_output=grad_output, **opts)
    np.testing.assert_array_equal(host(loss2), host(loss))
    assert grad.dtype == dt and grad.shape == x.shape
    assert_grad_close(host(grad), r_grad, dt, gscale=gs, what="with_grad")
    np.testing.assert_array_equal(host(dx).astype(np.float64), x64)  # not in place

    gb = lx.cross_entropy_backward(dx, dtg, lse, grad_output, **opts)
    assert_grad_close(host(gb), r_grad, dt, gscale=gs, what="backward")

    di = xp.asarray(x)
    loss3, gi = lx.cross_entropy_with_grad(di, dtg, grad_output=grad_output, inplace=True, **opts)
    assert gi is di
    np.testing.assert_array_equal(host(loss3), host(loss))
    # compared as float64: NaN-aware for bfloat16 too
    np.testing.assert_array_equal(host(gi).astype(np.float64), host(grad).astype(np.float64))
    return host(loss), host(grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_ce_options(xp, rng, name, dtype):
    x, t, opts = build_case(rng, name, (3, 5), 301, dtype)
    check_all(xp, x, t, grad_output=grad_output_for(rng, opts.get("reduction", "mean"), t.shape),
              **opts)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "weight": "W"},
                                  {"z_loss": 1e-3, "softcap": 5.0, "normalizer": 3.0}],
                         ids=["plain", "smooth_weight", "zloss_softcap_normalizer"])
def test_ce_probability_targets(xp, rng, dtype, opts):
    V = 257
    opts = dict(opts)
    if opts.get("weight") == "W":
        opts["weight"] = xp.asarray(rng.uniform(0.2, 2.0, V))  # a device weight
    x, _ = make_logits(rng, (2, 5, V), dtype)
    q = make_probs(rng, x.shape, zero_frac=0.3).astype(loss_dtype(dtype))
    host_opts = {k: host(v) if k == "weight" else v for k, v in opts.items()}
    x64 = x.astype(np.float64)
    r_loss, r_grad = ref.cross_entropy_with_grad(x64, q, **host_opts)
    loss, grad = lx.cross_entropy_with_grad(xp.asarray(x), xp.asarray(q), **opts)
    assert_loss_close(host(loss), r_loss, dtype)
    assert_grad_close(host(grad), r_grad, dtype)


@pytest.mark.parametrize("shape", [(2, 262144), (1, 1 << 20), (5, 70001), (300, 9001)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []), ids=dtype_id)
def test_ce_long_rows(xp, rng, dtype, shape):
    """Few long rows are split across blocks: partial states merged, the target's
    logit saved before the in-place gradient overwrites it, every slice written
    (targets at both ends and in the middle). Many rows: one block each."""
    n, V = shape
    x, _ = make_logits(rng, shape, dtype, scale=4.0)
    t = make_ids(rng, (n,), V)
    t[:3] = [0, V - 1, V // 2 + 1][:n]
    x[np.arange(n), t] = 12.0
    check_all(xp, x, t, reduction="none", grad_output=rng.normal(size=n))
    check_all(xp, x, t, label_smoothing=0.1, z_loss=1e-3, weight=rng.uniform(0.5, 1.5, V))


@pytest.mark.parametrize("V", [1, 2, 7, 31, 50257])
def test_ce_vocab_sizes(xp, rng, V):
    x, _ = make_logits(rng, (6, V), F32)
    check_all(xp, x, make_ids(rng, (6,), V), label_smoothing=0.1, reduction="none")


@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []), ids=dtype_id)
def test_ce_strided_unaligned_rows_without_copy(xp, rng, dtype):
    """Rows of a wider array starting 3 elements in (not on a 16-byte boundary: a
    scalar head before the vectors), gradient written in place."""
    big, _ = make_logits(rng, (8, 3000), dtype)
    dbig = xp.asarray(big)
    t = make_ids(rng, (8,), 2500, kind="ignored")
    x64 = big[:, 3:2503].astype(np.float64)
    r_loss, r_grad = ref.cross_entropy_with_grad(x64, t, label_smoothing=0.1)
    loss, g = lx.cross_entropy_with_grad(dbig[:, 3:2503], xp.asarray(t), inplace=True,
                                         label_smoothing=0.1)
    assert g.data.ptr == dbig.data.ptr + 3 * big.itemsize  # written into the wider array
    assert_loss_close(host(loss), r_loss, dtype)
    assert_grad_close(host(dbig)[:, 3:2503], r_grad, dtype)
    rest = np.r_[0:3, 2503:3000]
    np.testing.assert_array_equal(host(dbig)[:, rest].astype(np.float64),
                                  big[:, rest].astype(np.float64))


@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []), ids=dtype_id)
def test_ce_grad_out(xp, rng, dtype):
    """out= on the device: a slice of a wider device array receives the gradient of
    cross_entropy_with_grad and of the backward; a host out= is refused."""
    x, _ = make_logits(rng, (9, 3001), dtype)
    t = make_ids(rng, (9,), 3001, kind="ignored")
    r_loss, r_grad = ref.cross_entropy_with_grad(x.astype(np.float64), t)
    xd, td = xp.asarray(x), xp.asarray(t)
    wide = xp.zeros((9, 3100), dtype)
    out = wide[:, :3001]
    loss, g = lx.cross_entropy_with_grad(xd, td, out=out)
    assert g is out
    assert_loss_close(host(loss), r_loss, dtype)
    assert_grad_close(host(wide)[:, :3001], r_grad, dtype)
    assert (host(wide)[:, 3001:] == 0).all()
    _, lse = lx.cross_entropy(xd, td, return_lse=True)
    out2 = xp.zeros((9, 3001), dtype)
    assert lx.cross_entropy_backward(xd, td, lse, 1.0, out=out2) is out2
    assert_grad_close(host(out2), r_grad, dtype)
    with pytest.raises(TypeError, match="out: expected a CuPy array"):
        lx.cross_entropy_with_grad(xd, td, out=np.empty((9, 3001), dtype))


@pytest.mark.parametrize("opts", [{}, {"weight": "W"}, {"label_smoothing": 0.1, "z_loss": 0.1}],
                         ids=["plain", "weighted", "smooth_zloss"])
def test_ce_all_ignored_mean_is_zero(xp, rng, opts):
    """The "mean" denominator (counted on the device) is 0: loss 0, gradient 0."""
    V = 20
    opts = dict(opts)
    if opts.get("weight") == "W":
        opts["weight"] = rng.uniform(0.5, 2.0, V)
    x, _ = make_logits(rng, (6, V), F32)
    t = np.full(6, -100)
    loss, g = lx.cross_entropy_with_grad(xp.asarray(x), xp.asarray(t), **opts)
    assert loss.shape == () and float(host(loss)) == 0.0
    assert (host(g) == 0).all()


def test_ce_empty_batch(xp):
    x = xp.asarray(np.zeros((0, 11), np.float32))
    t = xp.asarray(np.zeros(0, np.int64))
    loss, g = lx.cross_entropy_with_grad(x, t)
    assert float(host(loss)) == 0.0 and g.shape == (0, 11)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ce_device_grad_output(xp, rng, reduction):
    """grad_output as a device array (0-d, or per token for 'none') stays on the device."""
    x, t, opts = build_case(rng, "smoothing_weight", (4, 6), 45, F32)
    go = np.asarray(0.7) if reduction != "none" else rng.normal(size=(4, 1))
    r = ref.cross_entropy_with_grad(x.astype(np.float64), t, grad_output=go,
                                    reduction=reduction, **opts)[1]
    _, g = lx.cross_entropy_with_grad(xp.asarray(x), xp.asarray(t), grad_output=xp.asarray(go),
                                      reduction=reduction, **opts)
    assert_grad_close(host(g), r, F32)


@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []), ids=dtype_id)
@pytest.mark.parametrize("where", ["target", "other", "tail"])
def test_ce_nan_stays_in_its_row(xp, rng, dtype, where):
    V = 203
    x, _ = make_logits(rng, (5, V), dtype)
    t = make_ids(rng, (5,), V)
    t[3] = -100
    x[1, {"target": t[1], "other": (t[1] + 1) % V, "tail": V - 1}[where]] = np.nan
    loss, g = check_all(xp, x, t, reduction="none", label_smoothing=0.1)
    assert np.isnan(loss[1]) and np.isnan(g[1].astype(np.float64)).all()
    assert np.isfinite(np.delete(loss, 1)).all()


def test_ce_masked_vocabulary(xp, rng):
    x, _ = make_logits(rng, (6, 203), F32)
    t = make_ids(rng, (6,), 100)
    x[:, 100:150] = -np.inf
    loss, g = check_all(xp, x, t, reduction="none")
    assert np.isfinite(loss).all() and (g[:, 100:150] == 0).all()


def test_ce_host_arguments_are_copied_to_the_device(xp, rng):
    x, t, opts = build_case(rng, "all_none", (2, 3), 40, F32)
    expected = lx.cross_entropy_with_grad(x, t, **opts)
    loss, g = lx.cross_entropy_with_grad(xp.asarray(x), t.tolist(), **opts)  # list, NumPy weight
    assert_loss_close(host(loss), expected[0], F32)
    assert_grad_close(host(g), expected[1], F32)
    with pytest.raises(TypeError, match="targets: a CuPy array, but the logits are a NumPy array"):
        lx.cross_entropy(x, xp.asarray(t))


# ----------------------------------------------------- class-id validation

@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_with_grad"])
def test_ce_bad_target_raises_before_any_write(xp, rng, fn):
    x, _ = make_logits(rng, (2, 3, 10), F32)
    t = make_ids(rng, (2, 3), 10)
    t[1, 2] = 10
    d = xp.asarray(x)
    kw = {"inplace": True} if fn == "cross_entropy_with_grad" else {}
    with pytest.raises(ValueError, match=r"value 10 at position \(1, 2\) is out of range"):
        getattr(lx, fn)(d, xp.asarray(t), **kw)
    np.testing.assert_array_equal(host(d), x)  # the in-place logits are untouched
    w = rng.uniform(0.5, 1.5, 10)
    w[3] = np.inf
    with pytest.raises(ValueError, match="weight: contains a non-finite value"):
        lx.cross_entropy(d, xp.asarray(make_ids(rng, (2, 3), 10)), weight=xp.asarray(w))


@pytest.mark.parametrize("tdtype", [np.int64, np.uint64])
def test_ce_deferred_validation(xp, rng, deferred, tdtype):
    """Deferred: no check before the launch; the bad row's loss and gradient are NaN
    (no out-of-bounds read), the other rows right, and check_cuda_errors raises once."""
    V = 50
    x, _ = make_logits(rng, (4, V), F32)
    t = make_ids(rng, (4,), V).astype(tdtype)
    t[2] = 2**63 + 5 if tdtype == np.uint64 else V + 7
    A.check_cuda_errors()  # a clean record
    loss, g = lx.cross_entropy_with_grad(xp.asarray(x), xp.asarray(t), reduction="none")
    loss, g = host(loss), host(g)
    assert np.isnan(loss[2]) and np.isnan(g[2]).all()
    ok = [0, 1, 3]
    r_loss, r_grad = ref.cross_entropy_with_grad(x[ok].astype(np.float64), t[ok].astype(np.int64),
                                                 reduction="none")
    assert_loss_close(loss[ok], r_loss, F32)
    assert_grad_close(g[ok], r_grad, F32)
    with pytest.raises(ValueError, match=r"1 class id\(s\) out of range .* at row 2 "):
        A.check_cuda_errors()
    A.check_cuda_errors()  # cleared


# ----------------------------------------------------------- token statistics

TS_FLOATS = ("logprob", "lse", "entropy", "top_prob")


def check_token_stats(xp, x, t, **kw):
    """token_stats on device arrays against the reference on the same rounded values;
    rank and correct exactly. Returns the host statistics (a dict)."""
    got = lx.token_stats(xp.asarray(x), xp.asarray(t), **kw)
    r = ref.token_stats(x.astype(np.float64), t, **kw)
    out = {}
    for name in TS_FLOATS:
        a = out[name] = host(getattr(got, name))
        assert a.dtype == loss_dtype(x.dtype) and a.shape == t.shape, name
        assert_loss_close(a, getattr(r, name), x.dtype, scale=1.0 if name == "top_prob" else None,
                          what=name)
    for name in ("rank", "correct"):
        a = out[name] = host(getattr(got, name))
        assert a.dtype == (np.int64 if name == "rank" else np.bool_), name
        np.testing.assert_array_equal(a, getattr(r, name), err_msg=name)
    return out


def _ts_targets(rng, n, V):
    """Class ids with an ignored one and the first, last and middle columns."""
    t = rng.integers(0, V, n)
    t[: min(n, 4)] = [0, V - 1, -100, V // 2 + 1][: min(n, 4)]
    return t


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_token_stats_matches_reference(xp, dtype, shape, rng):
    """One block per row and (few long rows) split across blocks, whose partial
    entropy sums and rank counts are merged."""
    if shape[1] > 100000 and dtype_id(dtype) not in ("float32", "bfloat16"):
        pytest.skip("long rows: float32 and bfloat16 are enough")
    n, V = shape
    x = (3.0 * rng.standard_normal(shape)).astype(dtype)
    x[0, V // 2] = 20.0  # the max in another slice than the target's
    st = check_token_stats(xp, x, _ts_targets(rng, n, V), temperature=0.8)
    if n > 2:
        assert st["rank"][2] == -1 and st["logprob"][2] == 0 and not st["correct"][2]


@pytest.mark.parametrize("shape", [(200, 3000), (3, 70001), (1, 1 << 20)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_token_stats_rank_ties(xp, shape, rng):
    """Integer logits (ties everywhere): the rank counts equal values before the
    target only, also across the slices of a split row; rank 0 <=> numpy's argmax."""
    n, V = shape
    x = rng.integers(-3, 4, shape).astype(np.float32)
    t = rng.integers(0, V, n)
    t[: n // 4] = np.argmax(x[: n // 4], axis=1)  # some correct
    if n < 4:
        x[0, t[0]] = 3.0  # a tie with the maxima on both sides of the target
    st = check_token_stats(xp, x, t)
    np.testing.assert_array_equal(st["correct"], np.argmax(x, axis=1) == t)


@pytest.mark.parametrize("V", [5, 3000, 70000])
@pytest.mark.parametrize("dtype", [F32, F64, BF16] if BF16 is not None else [F32, F64],
                         ids=dtype_id)
def test_token_stats_extreme_values(xp, dtype, V, rng):
    """+-1e4, -inf, all -inf, NaN and +inf rows (entropy and top_prob NaN where the
    softmax is undefined, rank -1 for NaN rows), targets on the special columns."""
    x = extreme_rows(EXTREME_ROWS + PLUS_INF_ROWS, V, dtype, rng)
    cols = [0, V // 3, V // 2 + 1, V - 2050, V - 1] if V > 5 else list(range(5))
    t = np.array([cols[i % 5] for i in range(len(x))])
    t[-1] = -100
    check_token_stats(xp, x, t)


def test_token_stats_batch_shape_and_host_targets(xp, rng):
    x = (2.0 * rng.standard_normal((2, 3, 500))).astype(np.float32)
    t = rng.integers(0, 500, (2, 3))
    got = lx.token_stats(xp.asarray(x), t.tolist(), temperature=2.0)  # host ids: copied
    r = ref.token_stats(x.astype(np.float64), t, temperature=2.0)
    assert got.rank.shape == (2, 3)
    np.testing.assert_array_equal(host(got.rank), r.rank)
    assert_loss_close(host(got.entropy), r.entropy, F32)
    with pytest.raises(TypeError, match="targets: a CuPy array, but the logits are a NumPy array"):
        lx.token_stats(x, xp.asarray(t))


def test_token_stats_empty_batch(xp):
    st = lx.token_stats(xp.asarray(np.zeros((0, 11), np.float32)),
                        xp.asarray(np.zeros(0, np.int64)))
    assert st.lse.shape == (0,) and st.rank.shape == (0,)


def test_token_stats_bad_target_raises(xp, rng):
    x = xp.asarray(rng.standard_normal((2, 3, 10)).astype(np.float32))
    t = rng.integers(0, 10, (2, 3))
    t[1, 2] = -1
    with pytest.raises(ValueError, match=r"targets: value -1 at position \(1, 2\) is out of range"):
        lx.token_stats(x, xp.asarray(t))
    t = t.astype(np.uint64)
    t[1, 2] = 2**64 - 100  # -100 (ignore_index) if cast to int64 before the check
    with pytest.raises(ValueError, match=r"value 18446744073709551516 at position \(1, 2\)"):
        lx.token_stats(x, xp.asarray(t))


@pytest.mark.parametrize("tdtype", [np.int64, np.uint64])
def test_token_stats_deferred_validation(xp, rng, deferred, tdtype):
    """Deferred: the bad row gets a NaN logprob and rank -1 (its logit never read),
    the rest is right, check_cuda_errors raises once."""
    V = 50
    x = rng.standard_normal((4, V)).astype(np.float32)
    t = rng.integers(0, V, 4).astype(tdtype)
    t[1] = 2**64 - 100 if tdtype == np.uint64 else V  # uint64: int64 -100 if cast blindly
    A.check_cuda_errors()  # a clean record
    st = lx.token_stats(xp.asarray(x), xp.asarray(t))
    lp, rank, lse = host(st.logprob), host(st.rank), host(st.lse)
    assert np.isnan(lp[1]) and rank[1] == -1
    ok = [0, 2, 3]
    r = ref.token_stats(x[ok].astype(np.float64), t[ok].astype(np.int64))
    assert_loss_close(lp[ok], r.logprob, F32)
    assert_loss_close(lse, ref.token_stats(x.astype(np.float64), np.zeros(4, np.int64)).lse, F32)
    np.testing.assert_array_equal(rank[ok], r.rank)
    with pytest.raises(ValueError, match=r"1 class id\(s\) out of range .* at row 1 "):
        A.check_cuda_errors()
    A.check_cuda_errors()  # cleared


# -------------------------------------------------------------- KL divergence

KL_DIRECTIONS = ["forward", "reverse", "js"]
KL_GSCALE = 2.0  # the gradient's float32 error is absolute, relative to <= 2 / T


def _kl_pair(rng, shape, dtype, zero_teacher=False):
    s = (3.0 * rng.standard_normal(shape)).astype(dtype)
    t = (3.0 * rng.standard_normal(shape)).astype(dtype)
    if zero_teacher:  # a third of the teacher's classes impossible: the KL stays finite
        t[..., ::3] = -np.inf
    return s, t


def check_kl(xp, s, t, *, direction, grad_output=1.0, mask=None, **kw):
    """Loss and gradient on device arrays (also in place) against the reference on
    the same rounded values; the device mask and grad_output are used as given."""
    hmask = None if mask is None else host(mask) if A._is_cupy(mask) else mask
    hgo = host(grad_output) if A._is_cupy(grad_output) else grad_output
    rl, rg = ref.kl_divergence(s.astype(np.float64), t.astype(np.float64), direction=direction,
                               mask=hmask, grad_output=hgo, return_grad=True, **kw)
    ds, dt = xp.asarray(s), xp.asarray(t)
    loss, g = lx.kl_divergence(ds, dt, direction=direction, mask=mask, grad_output=grad_output,
                               return_grad=True, **kw)
    assert loss.dtype == loss_dtype(s.dtype) and g.dtype == s.dtype and g.shape == s.shape
    assert_loss_close(host(loss), rl, s.dtype, what=f"kl {direction}")
    assert (host(loss) >= 0).all()
    go = np.abs(np.asarray(hgo, np.float64))
    assert_grad_close(host(g), rg, s.dtype, gscale=KL_GSCALE * go.max(initial=1.0))
    np.testing.assert_array_equal(host(ds).astype(np.float64), s.astype(np.float64))
    np.testing.assert_array_equal(
        host(lx.kl_divergence(ds, dt, direction=direction, mask=mask, **kw)), host(loss))
    di = xp.asarray(s)
    loss2, gi = lx.kl_divergence(di, dt, direction=direction, mask=mask, grad_output=grad_output,
                                 return_grad=True, inplace=True, **kw)
    assert gi is di
    np.testing.assert_array_equal(host(loss2), host(loss))
    np.testing.assert_array_equal(host(gi).astype(np.float64), host(g).astype(np.float64))
    return host(loss), host(g)


@pytest.mark.parametrize("V", [1, 7, 2049, 40000])
@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kl_matches_reference(xp, rng, dtype, direction, V):
    s, t = _kl_pair(rng, (6, V), dtype, zero_teacher=direction != "reverse" and V > 1)
    check_kl(xp, s, t, direction=direction, reduction="none", temperature=1.5)


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []), ids=dtype_id)
def test_kl_long_rows(xp, rng, dtype, direction):
    """Few long rows: one block walks each whole row (no split)."""
    s, t = _kl_pair(rng, (2, 262144), dtype)
    s[0, 200000] = 15.0
    check_kl(xp, s, t, direction=direction, reduction="sum")


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_kl_device_mask_and_grad_output(xp, rng, direction, reduction):
    """A device mask (counted on the device for batchmean) and a device grad_output
    (0-d, or per row for 'none') become per-row factors on the device."""
    s, t = _kl_pair(rng, (3, 4, 300), np.float32)
    mask = rng.random((3, 4)) < 0.6
    go = rng.standard_normal((3, 4)) if reduction == "none" else np.asarray(0.7)
    _, g = check_kl(xp, s, t, direction=direction, reduction=reduction, temperature=0.8,
                    mask=xp.asarray(mask), grad_output=xp.asarray(go))
    assert (g[~mask] == 0).all()
    check_kl(xp, s, t, direction=direction, reduction=reduction, mask=mask,  # host mask
             grad_output=go if reduction == "none" else 0.7)


def test_kl_all_masked_is_zero(xp, rng):
    s, t = _kl_pair(rng, (4, 50), np.float32)
    loss, g = lx.kl_divergence(xp.asarray(s), xp.asarray(t), mask=xp.asarray(np.zeros(4, bool)),
                               return_grad=True)
    assert float(host(loss)) == 0.0 and not host(g).any()


@pytest.mark.parametrize("offsets", [(3, 3), (3, 0), (0, 5)], ids=["same", "student", "teacher"])
@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_kl_strided_unaligned_rows_in_place(xp, rng, direction, offsets):
    """Rows of wider arrays starting off a 16-byte boundary, the student and teacher
    at the same offset (a scalar head, then vectors) or not (element by element);
    the gradient written in place into the wider student array."""
    (os_, ot), V = offsets, 2500
    big_s, big_t = _kl_pair(rng, (8, 3000), np.float32)
    s, t = big_s[:, os_:os_ + V], big_t[:, ot:ot + V]
    rl, rg = ref.kl_divergence(s.astype(np.float64), t.astype(np.float64), direction=direction,
                               return_grad=True)
    dbig = xp.asarray(big_s)
    loss, g = lx.kl_divergence(dbig[:, os_:os_ + V], xp.asarray(big_t)[:, ot:ot + V],
                               direction=direction, return_grad=True, inplace=True)
    assert g.data.ptr == dbig.data.ptr + os_ * big_s.itemsize
    assert_loss_close(host(loss), rl, F32)
    assert_grad_close(host(dbig)[:, os_:os_ + V], rg, F32, gscale=KL_GSCALE)
    rest = np.r_[0:os_, os_ + V:3000]
    np.testing.assert_array_equal(host(dbig)[:, rest], big_s[:, rest])


@pytest.mark.parametrize("direction", KL_DIRECTIONS)
def test_kl_undefined_rows_as_on_the_cpu(xp, rng, direction):
    """A row where either softmax is undefined (NaN, +inf, all -inf) has a NaN loss
    and gradient, as the CPU kernel gives; a masked one is 0; the rest is unaffected."""
    s, t = _kl_pair(rng, (6, 3000), np.float32)
    s[0, 2000] = np.nan
    t[1, 5] = np.inf
    t[2] = -np.inf
    s[3] = -np.inf
    s[4, 7] = np.nan  # masked
    mask = np.array([True, True, True, True, False, True])
    kw = dict(direction=direction, reduction="none", return_grad=True, mask=mask)
    cl, cg = lx.kl_divergence(s, t, **kw)
    dl, dg = lx.kl_divergence(xp.asarray(s), xp.asarray(t), **kw)
    dl, dg = host(dl), host(dg)
    assert np.isnan(dl[:4]).all() and np.isnan(dg[:4]).all()
    assert dl[4] == 0 and (dg[4] == 0).all()
    assert_loss_close(dl, cl, F32)
    assert_grad_close(dg, cg, F32, gscale=KL_GSCALE)


def test_kl_zero_probability_classes(xp):
    """The hand example of test_kl_divergence: infinite forward and reverse KL,
    finite Jensen-Shannon below ln 2, a 0 term where both sides are -inf."""
    s = xp.asarray(np.array([[0.0, 1.0, -np.inf]]))
    t = xp.asarray(np.array([[-np.inf, 0.0, 0.0]]))
    assert float(host(lx.kl_divergence(s, t))) == np.inf
    assert float(host(lx.kl_divergence(s, t, direction="reverse"))) == np.inf
    js = float(host(lx.kl_divergence(s, t, direction="js")))
    assert 0 < js < np.log(2)
    s2 = xp.asarray(np.array([[-np.inf, 1.0, 2.0]]))
    assert np.isfinite(float(host(lx.kl_divergence(s2, t))))


def test_kl_host_arguments_and_errors(xp, rng):
    s, t = _kl_pair(rng, (3, 10), np.float32)
    ds = xp.asarray(s)
    loss = lx.kl_divergence(ds, t, mask=[True, False, True])  # host teacher and mask: copied
    assert_loss_close(host(loss), ref.kl_divergence(s.astype(np.float64), t.astype(np.float64),
                                                    mask=[True, False, True]), F32)
    with pytest.raises(TypeError, match="teacher_logits: a CuPy array, but the logits are a NumPy"):
        lx.kl_divergence(s, xp.asarray(t))
    with pytest.raises(TypeError, match="mask: a CuPy array, but the logits are a NumPy"):
        lx.kl_divergence(s, t, mask=xp.asarray(np.ones(3, bool)))
    with pytest.raises(ValueError, match=r"mask: expected shape \(3,\)"):
        lx.kl_divergence(ds, t, mask=xp.asarray(np.ones(4, bool)))
    with pytest.raises(ValueError, match="teacher_logits: expected the student's shape"):
        lx.kl_divergence(ds, xp.asarray(t[:, :9]))
    with pytest.raises(ValueError, match="shares memory"):
        lx.kl_divergence(ds, ds, return_grad=True, inplace=True)


def test_kl_empty_batch(xp):
    z = xp.asarray(np.zeros((0, 11), np.float32))
    loss, g = lx.kl_divergence(z, z, return_grad=True)
    assert float(host(loss)) == 0.0 and g.shape == (0, 11)


# ----------------------------------------------------- host round trips

def test_host_round_trips(monkeypatch, rng):
    """The device path reads nothing back, except one read per cross-entropy or
    token_stats call for the eager class-id (and weight) checks (none when deferred);
    kl_divergence never reads back, with a device mask and "batchmean" included."""
    monkeypatch.setitem(sys.modules, "cupy", make_fake_cupy())
    monkeypatch.setattr(A, "_CUDA", A._CudaKernels(FakeCuda()))
    x, t, opts = build_case(rng, "smoothing_weight", (3, 4), 50, F32)
    dx, dt, w = _fake_asarray(x), _fake_asarray(t), _fake_asarray(opts.pop("weight"))

    def reads(f):
        FakeArray.reads = 0
        f()
        return FakeArray.reads

    for fn in FNS:
        assert reads(lambda fn=fn: getattr(lx, fn)(dx)) == 0, fn
    mask = _fake_asarray(rng.random(dx.shape[:-1]) < 0.5)
    for d in ("forward", "js"):
        assert reads(lambda d=d: lx.kl_divergence(dx, dx * 0.5, direction=d, mask=mask,
                                              return_grad=True)) == 0, d
        assert reads(lambda d=d: lx.kl_divergence(dx, dx * 0.5, direction=d, return_grad=True,
                                              grad_output=_fake_asarray(np.asarray(2.0)))) == 0
    calls = {
        "cross_entropy": lambda: lx.cross_entropy(dx, dt, weight=w, **opts),
        "with_grad": lambda: lx.cross_entropy_with_grad(dx, dt, weight=w, **opts),
        "backward": lambda: lx.cross_entropy_backward(
            dx, dt, lx.cross_entropy(dx, dt, weight=w, reduction="none", return_lse=True,
                                     **opts)[1], 1.0, weight=w, **opts),
        "token_stats": lambda: lx.token_stats(dx, dt),
    }
    for name, f in calls.items():
        assert reads(f) == (2 if name == "backward" else 1), name
    previous = A.set_cuda_validation("deferred")
    try:
        for name, f in calls.items():
            assert reads(f) == 0, name
    finally:
        A.set_cuda_validation(previous)


# ----------------------------------------------------- GPU only

def test_cuda_stream_and_bfloat16(rng):
    """On a non-default CuPy stream, in bfloat16 (CuPy >= 14): the result is right
    without any synchronisation by the caller before reading on that stream."""
    cupy, why = _real_cupy()
    if cupy is None:
        pytest.skip(why)
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    x, _ = make_logits(rng, (64, 32000), BF16)
    t = make_ids(rng, (64,), 32000, kind="ignored")
    r_loss, r_grad = ref.cross_entropy_with_grad(x.astype(np.float64), t)
    with cupy.cuda.Stream(non_blocking=True):
        loss, g = lx.cross_entropy_with_grad(cupy.asarray(x), cupy.asarray(t))
        loss, g = loss.get(), g.get()
    assert_loss_close(loss, r_loss, BF16)
    assert_grad_close(g, r_grad, BF16)


def test_failed_call_restores_the_current_device_and_clears_the_error(rng):
    """A call that fails inside lmxent._cuda (here: cudaSetDevice of a device that does
    not exist) leaves CuPy's current device as it was and no error behind for the next
    call to report as its own."""
    cupy, why = _real_cupy()
    if cupy is None:
        pytest.skip(why)
    from lmxent import _cuda
    x = cupy.asarray(rng.standard_normal((4, 100)).astype(np.float32))

    class OnAnotherDevice:  # x's memory, claiming a device that does not exist
        __cuda_array_interface__ = x.__cuda_array_interface__
        dtype = x.dtype
        device = types.SimpleNamespace(id=cupy.cuda.runtime.getDeviceCount() + 7)

    before = cupy.cuda.runtime.getDevice()
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        _cuda.softmax(OnAnotherDevice(), None, cupy.empty(4, np.float32), 1.0, False)
    assert cupy.cuda.runtime.getDevice() == before
    y = lx.softmax(x)  # the next valid call does not inherit the error
    np.testing.assert_allclose(y.get(), ref.softmax(x.get().astype(np.float64)), rtol=1e-5)


def test_call_on_another_device_leaves_the_current_device(rng):
    """With two GPUs: arrays on device 1 while device 0 is current. lmxent runs on
    the arrays' device (outputs are allocated by the caller on device 1) and device 0
    is current again afterwards, also after a call that fails (an output on device 0)."""
    cupy, why = _real_cupy()
    if cupy is None:
        pytest.skip(why)
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    from lmxent import _cuda
    x = rng.standard_normal((4, 100)).astype(np.float32)
    with cupy.cuda.Device(1):
        d = cupy.asarray(x)
        lse1 = cupy.empty(4, np.float32)
    with cupy.cuda.Device(0):
        _cuda.softmax(d, None, lse1, 1.0, False)
        assert cupy.cuda.runtime.getDevice() == 0
        with pytest.raises(ValueError, match="lse: is on device 0"):
            _cuda.softmax(d, None, cupy.empty(4, np.float32), 1.0, False)
        assert cupy.cuda.runtime.getDevice() == 0
    np.testing.assert_allclose(lse1.get(), ref.logsumexp(x.astype(np.float64)), rtol=1e-5)


# ------------------------------------------------------------------ LM head

@pytest.mark.parametrize("dtype", [F32, F64] + ([BF16] if BF16 is not None else []),
                         ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(reduction="mean"), dict(reduction="sum"),
                                  dict(reduction="none", label_smoothing=0.1, z_loss=1e-3),
                                  dict(reduction="mean", class_weight=True, softcap=5.0)],
                         ids=["mean", "sum", "none", "weighted"])
def test_linear_cross_entropy_on_device(xp, rng, dtype, opts):
    """The LM head on device arrays (hidden, weight, bias, targets, class weights and a
    per-token grad_output all on the device) against the float64 reference, in chunks
    that do not divide the token count."""
    (h, w, b, t), (h64, w64, b64) = make_head_problem(rng, lead=(3, 7), dtype=dtype)
    opts = head_options(rng, opts)
    go = head_grad_output(rng, opts["reduction"], t.shape)
    dev = {k: xp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in opts.items()}
    loss, (dh, dw, db) = lx.linear_cross_entropy(
        xp.asarray(h), xp.asarray(w), xp.asarray(t), bias=xp.asarray(b), chunk_size=4,
        grad_output=xp.asarray(go) if isinstance(go, np.ndarray) else go, **dev)
    loss, dh, dw, db = host(loss), host(dh), host(dw), host(db)
    rloss, (rdh, rdw, rdb) = ref.linear_cross_entropy(h64, w64, t, bias=b64, grad_output=go,
                                                      **opts)
    assert (dh.dtype, dw.dtype, db.dtype) == (dtype,) * 3
    assert_loss_close(loss, rloss, dtype)
    assert_head_grads((dh, dw, db), (rdh, rdw, rdb), (h64, w64, b64), t, go, opts, dtype)


def test_linear_target_logprobs_on_device(xp, rng):
    (h, w, b, t), (h64, w64, b64) = make_head_problem(rng, lead=(3, 7), dtype=F32)
    logprob, lse = lx.linear_target_logprobs(xp.asarray(h), xp.asarray(w), xp.asarray(t),
                                             bias=xp.asarray(b), chunk_size=5)
    rlp, rlse = ref.linear_target_logprobs(h64, w64, t, bias=b64)
    assert_loss_close(host(logprob), rlp, F32, what="logprob")
    assert_loss_close(host(lse), rlse, F32, what="lse")


# ------------------------------------------------------------ evaluation

def test_evaluation_on_device_with_host_arguments(xp, rng):
    """Device logits with host tokens, masks, counts and Python numbers (what the
    core accepts), against the reference."""
    x = rng.normal(scale=3.0, size=(3, 6, 40)).astype(np.float32)
    tokens = rng.integers(0, 40, size=(3, 6))
    tokens[0, 3] = -100
    mask = rng.random((3, 6)) < 0.8
    want = ref.sequence_scores(x.astype(np.float64), tokens, mask=mask)
    for tk, mk in [(tokens, mask), (xp.asarray(tokens), mask), (tokens, xp.asarray(mask)),
                   (tokens.tolist(), mask.astype(np.int8))]:
        sc = lx.sequence_scores(xp.asarray(x), tk, mask=mk)
        np.testing.assert_allclose(host(sc.logprob_sum), want.logprob_sum, rtol=1e-5)
        np.testing.assert_array_equal(host(sc.n_tokens), want.n_tokens)
    nll = rng.uniform(0, 50, size=4)
    for fn in ("perplexity", "bits_per_byte"):
        want = getattr(ref, fn)(nll, 3)
        for a, b in [(xp.asarray(nll), 3), (xp.asarray(nll), np.int64(3)),
                     (xp.asarray(nll), np.full(4, 3.0)), (nll, xp.asarray(np.full(4, 3))),
                     (nll.tolist(), xp.asarray(np.asarray(3)))]:
            np.testing.assert_allclose(host(getattr(lx, fn)(a, b)), want, rtol=1e-14)
    conf, ok = rng.random(50), rng.random(50) < 0.5
    want = ref.calibration(conf, ok, n_bins=5)
    for c, k in [(xp.asarray(conf), ok), (conf, xp.asarray(ok))]:
        got = lx.calibration(c, k, n_bins=5)
        np.testing.assert_allclose(float(host(got.ece)), want.ece, rtol=1e-12)
        np.testing.assert_array_equal(host(got.counts), want.counts)
    m = lx.answer_mask(xp.asarray(np.array([1, 0])), np.array([3, 2]), 4)
    np.testing.assert_array_equal(host(m), ref.answer_mask([1, 0], [3, 2], 4))


@pytest.mark.parametrize("where", ["device", "host"])
def test_sequence_scores_uint64_ids_past_int64_are_out_of_range(xp, rng, where):
    """2**64 - 100 is -100 as an int64: it must be refused as out of range, not taken
    for ignore_index."""
    x = xp.asarray(rng.normal(size=(1, 4, 10)).astype(np.float32))
    tokens = np.array([[1, 2, 2**64 - 100, 3]], dtype=np.uint64)
    tokens = xp.asarray(tokens) if where == "device" else tokens
    with pytest.raises(ValueError, match=r"tokens: value 18446744073709551516 at position "
                                         r"\(0, 2\) is out of range \[0, 10\)"):
        lx.sequence_scores(x, tokens)


def test_fake_cupy_refuses_host_arrays_like_cupy():
    """The stand-in must refuse what CuPy 14 refuses, or it would hide host/device
    mixing: NumPy arrays (0-d included) in ufuncs, indexing and assignment."""
    fake = make_fake_cupy()
    d = fake.asarray(np.arange(4.0))
    for f in (lambda: d + np.ones(4), lambda: d < np.asarray(2.0), lambda: fake.where(
            np.ones(4, bool), d, 0.0), lambda: d[np.array([0, 1])],
            lambda: d.__setitem__(slice(None), np.zeros(4))):
        with pytest.raises(TypeError, match="Unsupported type"):
            f()
    # NumPy scalars pass, as in CuPy
    np.testing.assert_array_equal((d + np.float64(1.0)).get(), np.arange(4.0) + 1)


def _doc_params(fn):
    """The parameter names in the signature line pybind11 puts atop a docstring."""
    line = fn.__doc__.split("\n", 1)[0]
    return tuple(re.findall(r"(\w+):", line[line.index("("):]))


def test_bindings_share_one_signature_per_op():
    """lmxent._cpu and lmxent._cuda (importable without a GPU when built) bind the same
    ops with the same keyword names and a docstring each; `ops` lists those names,
    which FakeCuda forwards."""
    modules = [_cpu]
    try:
        from lmxent import _cuda
        modules.append(_cuda)
    except ImportError:
        pass
    for m in modules:
        assert m.ops == _cpu.ops
        assert set(m.ops) >= {"softmax", "cross_entropy", "token_stats", "kl_divergence"}
        for op, params in m.ops.items():
            assert _doc_params(getattr(m, op)) == params, (m.__name__, op)
            assert getattr(m, op).__doc__.split("\n", 1)[1].strip(), (m.__name__, op)


def test_bindings_refuse_foreign_and_unaligned_arrays():
    """One set of checks for both modules: an object of the other library (or none at
    all) is a ValueError naming the argument (lmxent._cpu crashed on a list), and so
    is an unaligned per-row vector."""
    x = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="out: expected a NumPy array, got list"):
        _cpu.softmax(x, [1, 2], None, 1.0, False)
    unaligned = np.zeros(4 * 4 + 1, np.uint8)[1:].view(np.float32)
    with pytest.raises(ValueError, match="lse: array is not aligned"):
        _cpu.softmax(x, None, unaligned, 1.0, False)
    try:
        from lmxent import _cuda
    except ImportError:
        return
    with pytest.raises(ValueError, match="x: expected a CuPy array"):  # before any CUDA call
        _cuda.softmax(x, None, None, 1.0, False)


def test_fake_cuda_forwards_any_call_form(rng):
    """Positional and keyword arguments, checked against the binding's parameters;
    host arrays and ops lmxent._cuda lacks refused."""
    fake, x = FakeCuda(), rng.normal(size=(3, 7)).astype(np.float32)
    dx = _fake_asarray(x)
    lse = [_fake_asarray(np.empty(3, np.float32)) for _ in range(2)]
    fake.softmax(dx, None, lse[0], 1.0, False)
    fake.softmax(scale=1.0, log=False, lse=lse[1], out=None, x=dx)
    for got in lse:
        np.testing.assert_allclose(got.get(), ref.logsumexp(x), rtol=1e-6)
    with pytest.raises(TypeError, match="multiple values"):
        fake.softmax(dx, None, lse[0], 1.0, False, x=dx)
    with pytest.raises(AssertionError, match="host array lse"):
        fake.softmax(dx, None, np.empty(3, np.float32), 1.0, False)
    with pytest.raises(AttributeError):
        fake.math  # noqa: B018 (a CPU test hook, not a kernel op)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_lm_head_host_round_trips(monkeypatch, rng, reduction, weighted):
    """The LM head validates ids and class weights once per call (one host read; none
    when deferred), however many chunks it runs."""
    fake = make_fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(A, "_CUDA", A._CudaKernels(FakeCuda()))
    (h, w, b, t), _ = make_head_problem(rng, lead=(4, 7), dtype=F32)
    dh, dw, db, dt = (_fake_asarray(a) for a in (h, w, b, t))
    cw = _fake_asarray(rng.uniform(0.5, 2.0, w.shape[0])) if weighted else None
    go = _fake_asarray(rng.normal(size=t.shape)) if reduction == "none" else 0.5

    def reads(f):
        FakeArray.reads = 0
        f()
        return FakeArray.reads

    calls = [lambda: lx.linear_cross_entropy(dh, dw, dt, bias=db, class_weight=cw,
                                             reduction=reduction, grad_output=go, chunk_size=3),
             lambda: lx.linear_cross_entropy(dh, dw, dt, class_weight=cw, reduction=reduction,
                                             chunk_size=5, return_grads=False)]
    if not weighted and reduction == "none":
        calls.append(lambda: lx.linear_target_logprobs(dh, dw, dt, bias=db, chunk_size=4))
    for f in calls:
        assert reads(f) == 1
    previous = A.set_cuda_validation("deferred")
    try:
        for f in calls:
            assert reads(f) == 0
    finally:
        A.set_cuda_validation(previous)


# ------------------------------------------------------------------ decoding

# a block per row on the GPU (cuda/decoding_block.h): short and long rows, every
# option; the results equal the CPU kernel's (the same float64 steps on each entry; sums
# in another order, so log-probabilities within 1e-6)
@pytest.mark.parametrize("dtype", [F32, BF16] if BF16 is not None else [F32], ids=dtype_id)
@pytest.mark.parametrize("V", [7, 5000, 128256])
def test_decoding_matches_cpu(xp, dtype, V, rng):
    x = (2 * rng.standard_normal((4, V))).astype(dtype)
    x[3] = -np.inf
    x[3, 1] = 0.5
    opts = dict(temperature=np.array([0.0, 0.7, 1.0, 1.2]), top_k=[0, 50, 3, 0], top_p=0.9,
                min_p=0.01, logit_bias={0: -np.inf}, repetition_penalty=1.2,
                prev_tokens=rng.integers(-1, V, size=(4, 6)))
    d = xp.asarray(x)
    y = lx.process_logits(d, **opts)
    np.testing.assert_array_equal(host(y), lx.process_logits(x, **opts))
    for of in ("raw", "processed"):
        got = lx.sample(d, seed=3, num_logprobs=5, logprobs_of=of, **opts)
        want = lx.sample(x, seed=3, num_logprobs=5, logprobs_of=of, **opts)
        for g, w in zip(got, want):
            np.testing.assert_allclose(host(g), w, rtol=1e-6)
    v, i = lx.top_k(d, min(V, 9))
    rv, ri = lx.top_k(x, min(V, 9))
    np.testing.assert_array_equal(host(v), rv)
    np.testing.assert_array_equal(host(i), ri)


# ----------------------------------------------------- without the backend

def test_missing_cuda_backend_is_a_clear_error(monkeypatch):
    """A CuPy array without lmxent._cuda (or without CuPy) is a TypeError saying so."""

    class CupyLike:
        __module__ = "cupy"
        shape = (2, 5)

    monkeypatch.setattr(A, "_CUDA", None)
    monkeypatch.setitem(sys.modules, "lmxent._cuda", None)  # import fails
    monkeypatch.delattr(lx, "_cuda", raising=False)  # (else `from . import _cuda` finds it)
    for fn in FNS:
        with pytest.raises(TypeError, match=r"CuPy arrays need the CUDA backend \(lmxent._cuda\)"):
            getattr(lx, fn)(CupyLike())
    with pytest.raises(TypeError, match="CuPy arrays need the CUDA backend"):
        lx.cross_entropy(CupyLike(), np.zeros(2, np.int64))
    monkeypatch.setattr(A, "_CUDA", None)
    monkeypatch.setitem(sys.modules, "lmxent._cuda", types.ModuleType("lmxent._cuda"))
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(TypeError, match="CuPy arrays need the CUDA backend, which needs CuPy"):
        lx.softmax(CupyLike())


def test_op_without_cuda_kernel_is_a_clear_error():
    k = A._CudaKernels(types.ModuleType("lmxent._cuda"))  # a module without the op
    with pytest.raises(TypeError, match="token_stats has no CUDA kernel yet"):
        k.token_stats  # noqa: B018 (the lookup raises)
