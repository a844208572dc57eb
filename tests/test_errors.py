"""Bad input to the public API: one test per validation rule, asserting the
exception type and that the message names what is wrong; errors are raised
before any output is written (``out=`` and ``inplace=True`` logits stay as
they were); the binding's own guards reject what the Python layer would never
pass. Everything runs in-process, so a crash would abort the run.
"""
import re

import numpy as np
import pytest

import lmxent as lx
from lmxent import _cpu
from lmxent import reference as ref

from helpers import BF16

SOFTMAX_FNS = ["logsumexp", "log_softmax", "softmax"]
OUT_FNS = ["log_softmax", "softmax"]
CE_FNS = ["cross_entropy", "cross_entropy_with_grad", "cross_entropy_backward"]
GRAD_FNS = ["cross_entropy_with_grad", "cross_entropy_backward"]
ALL_FNS = SOFTMAX_FNS + CE_FNS

LEAD, V = (2, 3), 5


def logits(dtype=np.float32, shape=LEAD + (V,)):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def ids(lead=LEAD):
    return np.arange(int(np.prod(lead)), dtype=np.int64).reshape(lead) % V


def call(fn, x, targets=None, **kw):
    """Call a public function with otherwise valid arguments: class ids of the
    logits' leading shape unless given, a zero lse of that shape for the backward."""
    if fn in SOFTMAX_FNS:
        return getattr(lx, fn)(x, **kw)
    lead = getattr(x, "shape", np.shape(x))[:-1]  # np.shape would convert a fake CuPy array
    if targets is None:
        targets = ids(lead)
    if fn == "cross_entropy_backward":
        lse = kw.pop("lse", np.zeros(lead, np.float32))
        return lx.cross_entropy_backward(x, targets, lse, kw.pop("grad_output", 1.0), **kw)
    return getattr(lx, fn)(x, targets, **kw)


def as_list(result):
    """The arrays a public function returned, as a list."""
    return list(result) if isinstance(result, tuple) else [result]


def msg(text):
    """`match=` pattern for a literal piece of a message."""
    return re.escape(text)


# ------------------------------------------------------------ logits / x arrays

@pytest.mark.parametrize("fn", ALL_FNS)
def test_scalar_input_raises(fn):
    with pytest.raises(ValueError, match="at least 1 dimension"):
        call(fn, np.float32(1.0), np.int64(0))


@pytest.mark.parametrize("fn", ALL_FNS)
def test_empty_vocabulary_raises(fn):
    with pytest.raises(ValueError, match=msg("(V = 0)")):
        call(fn, np.ones((2, 0), np.float32), np.zeros(2, np.int64))


@pytest.mark.parametrize("fn", SOFTMAX_FNS)
def test_empty_reduced_axis_raises(fn):
    with pytest.raises(ValueError, match=msg("(V = 0)")):
        call(fn, np.ones((0, 4), np.float32), axis=0)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_, np.complex64, object,
                                   np.longdouble, np.str_])
def test_unsupported_array_dtype_raises(fn, dtype):
    x = np.ones(LEAD + (V,), dtype)
    with pytest.raises(TypeError, match=r"unsupported dtype .*expected float32"):
        call(fn, x)


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("value", [None, [["a", "b"], ["c", "d"]]], ids=["None", "strings"])
def test_non_numeric_input_raises(fn, value):
    with pytest.raises(TypeError, match="unsupported dtype"):
        call(fn, value, np.zeros(2, np.int64))


@pytest.mark.parametrize("fn", ALL_FNS)
@pytest.mark.parametrize("value", [[[1, 2, 3], [0, 5, 1]], [[True, False], [False, False]]],
                         ids=["ints", "bools"])
def test_integer_and_bool_lists_are_converted(fn, value):
    """Python lists (not ndarrays) of ints or bools are taken as float64 values."""
    got = as_list(call(fn, value, np.zeros(2, np.int64)))
    want = as_list(call(fn, np.asarray(value, np.float64), np.zeros(2, np.int64)))
    for g, w in zip(got, want):
        assert g.dtype == np.float64
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("fn", SOFTMAX_FNS)
@pytest.mark.parametrize("axis", [3, -4])
def test_axis_out_of_range_raises(fn, axis):
    with pytest.raises(ValueError, match=f"axis {axis} is out of bounds"):
        call(fn, logits(), axis=axis)


@pytest.mark.parametrize("fn", SOFTMAX_FNS)
@pytest.mark.parametrize("axis", [None, (0, 1), 1.0, True, np.True_, "1"],
                         ids=["None", "tuple", "float", "bool", "numpy_bool", "str"])
def test_axis_not_an_integer_names_axis(fn, axis):
    with pytest.raises(TypeError, match="axis must be an integer"):
        call(fn, logits(), axis=axis)


@pytest.mark.parametrize("fn", SOFTMAX_FNS)
def test_numpy_integer_axis_is_accepted(fn):
    x = logits()
    np.testing.assert_array_equal(call(fn, x, axis=np.int64(1)), call(fn, x, axis=1))


# ----------------------------------------------------------------------- options

@pytest.mark.parametrize("fn", SOFTMAX_FNS)
@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf])
def test_bad_temperature_raises(fn, value):
    with pytest.raises(ValueError, match="temperature must be a finite positive number"):
        call(fn, logits(), temperature=value)


BAD_OPTIONS = [  # (option, value, message)
    ("label_smoothing", np.nan, "label_smoothing must be a finite number in [0.0, 1.0]"),
    ("label_smoothing", np.inf, "label_smoothing must be a finite number in [0.0, 1.0]"),
    ("label_smoothing", -0.1, "label_smoothing must be a finite number in [0.0, 1.0]"),
    ("label_smoothing", 1.1, "label_smoothing must be a finite number in [0.0, 1.0]"),
    ("z_loss", np.nan, "z_loss must be a finite number >= 0.0"),
    ("z_loss", np.inf, "z_loss must be a finite number >= 0.0"),
    ("z_loss", -1e-4, "z_loss must be a finite number >= 0.0"),
    ("softcap", 0.0, "softcap must be a finite positive number"),
    ("softcap", -30.0, "softcap must be a finite positive number"),
    ("softcap", np.nan, "softcap must be a finite positive number"),
    ("logit_scale", 0.0, "logit_scale must be a finite positive number"),
    ("logit_scale", -1.0, "logit_scale must be a finite positive number"),
    ("logit_scale", np.nan, "logit_scale must be a finite positive number"),
    ("logit_scale", np.inf, "logit_scale must be a finite positive number"),
    ("normalizer", 0, "normalizer must be a finite positive number"),
    ("normalizer", -8, "normalizer must be a finite positive number"),
    ("normalizer", np.nan, "normalizer must be a finite positive number"),
    ("reduction", "avg", "reduction must be one of ('none', 'mean', 'sum')"),
    ("reduction", "Mean", "reduction must be one of ('none', 'mean', 'sum')"),
    ("reduction", None, "reduction must be one of ('none', 'mean', 'sum')"),
]


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("option,value,text", BAD_OPTIONS,
                         ids=[f"{o}={v}" for o, v, _ in BAD_OPTIONS])
def test_bad_option_raises(fn, option, value, text):
    with pytest.raises(ValueError, match=msg(text)):
        call(fn, logits(), **{option: value})


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_label_smoothing_bounds_accepted(fn, value):
    call(fn, logits(), label_smoothing=value)


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_normalizer_needs_mean_reduction(fn, reduction):
    with pytest.raises(ValueError, match=msg("normalizer is only allowed with reduction='mean'")):
        call(fn, logits(), reduction=reduction, normalizer=6.0)


NONE_OPTIONS = [  # (function, option): None is not a valid value
    ("cross_entropy", "label_smoothing"), ("cross_entropy", "z_loss"),
    ("cross_entropy", "logit_scale"), ("cross_entropy", "ignore_index"),
    ("cross_entropy_with_grad", "grad_output"), ("softmax", "temperature")]


@pytest.mark.parametrize("fn,option", NONE_OPTIONS, ids=[f"{f}-{o}" for f, o in NONE_OPTIONS])
def test_none_option_names_the_option(fn, option):
    with pytest.raises(TypeError, match=option):
        call(fn, logits(), **{option: None})


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("option", ["softcap", "normalizer"])
def test_none_is_the_default_of_optional_options(fn, option):
    call(fn, logits(), **{option: None})


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("value", [3.0, "3"], ids=["float", "str"])
def test_ignore_index_not_an_integer_raises(fn, value):
    with pytest.raises(TypeError, match="ignore_index must be an integer"):
        call(fn, logits(), ignore_index=value)


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("value", [2**63, -2**63 - 1, 2**70])
def test_ignore_index_outside_int64_raises(fn, value):
    with pytest.raises(ValueError, match=msg(f"ignore_index must fit in int64, got {value}")):
        call(fn, logits(), ignore_index=value)


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("value", [2**63 - 1, -2**63])
def test_ignore_index_at_int64_bounds_is_accepted(fn, value):
    call(fn, logits(), ignore_index=value)


# ----------------------------------------------------------------------- targets

@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("shape", [(3, 2), (6,), (2, 3, 1), (2, 3, V), ()], ids=str)
def test_class_id_shape_mismatch_raises(fn, shape):
    with pytest.raises(ValueError, match=msg(f"class ids must have shape {LEAD}")):
        call(fn, logits(), np.zeros(shape, np.int64))


PROB_DTYPES = [np.float32, np.float64, np.float16] + ([BF16] if BF16 is not None else [])


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("dtype", PROB_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [LEAD, (2, 3, V + 1), (3, 2, V)], ids=str)
def test_probability_target_shape_mismatch_raises(fn, dtype, shape):
    with pytest.raises(ValueError, match=msg(f"must have the logits' shape {LEAD + (V,)}")):
        call(fn, logits(), np.full(shape, 1.0 / V, dtype))


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, object, np.str_])
def test_unsupported_target_dtype_raises(fn, dtype):
    with pytest.raises(TypeError, match="expected integer class ids or float probabilities"):
        call(fn, logits(), np.zeros(LEAD, dtype))


OUT_OF_RANGE = [  # (logits shape, {position: value}, first bad position)
    ((V,), {(): V}, ()),
    ((4, V), {(2,): -1}, (2,)),
    ((2, 3, V), {(1, 2): 7, (1, 0): -7}, (1, 0)),
    ((2, 3, 4, V), {(1, 1, 2): V, (1, 2, 3): -3}, (1, 1, 2)),
]


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("shape,bad,first", OUT_OF_RANGE, ids=["1d", "2d", "3d", "4d"])
def test_out_of_range_target_names_first_position(fn, shape, bad, first):
    t = np.zeros(shape[:-1], np.int64)
    for pos, value in bad.items():
        t[pos] = value
    text = (f"value {bad[first]} at position {first} is out of range [0, {V}) "
            "and is not ignore_index (-100)")
    with pytest.raises(ValueError, match=msg(text)):
        call(fn, logits(shape=shape), t)


@pytest.mark.parametrize("fn", CE_FNS)
def test_negative_target_other_than_ignore_index_raises(fn):
    t = ids()
    t[0, 1] = -100
    t[1, 2] = -1
    with pytest.raises(ValueError, match=msg("value -1 at position (1, 2)")):
        call(fn, logits(), t)
    t[0, 1] = 0
    call(fn, logits(), t, ignore_index=-1)  # -1 as a custom ignore_index is accepted


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("value", [2**64 - 100, 2**64 - 1, 2**63])
def test_uint64_target_beyond_int64_raises(fn, value):
    """Checked before the cast to int64, which would wrap 2**64 - 100 to -100 ==
    ignore_index; the message shows the value as given."""
    t = ids().astype(np.uint64)
    t[1, 1] = value
    text = (f"value {value} at position (1, 1) is out of range [0, {V}) "
            "and is not ignore_index (-100)")
    with pytest.raises(ValueError, match=msg(text)):
        call(fn, logits(), t)


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("dtype", [np.uint64, np.uint8, np.int8, np.int32])
def test_other_integer_target_dtypes_match_int64(fn, dtype):
    x, t = logits(np.float64), ids()
    for g, w in zip(as_list(call(fn, x, t.astype(dtype))), as_list(call(fn, x, t))):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("ignore_index", [0, 3, V])
def test_probability_targets_reject_ignore_index(fn, ignore_index):
    with pytest.raises(ValueError, match="ignore_index is not supported for probability"):
        call(fn, logits(), np.full(LEAD + (V,), 1.0 / V), ignore_index=ignore_index)


# ------------------------------------------------------------------ class weight

@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("shape", [(V - 1,), (V + 1,), (1, V), (V, 1), ()], ids=str)
def test_weight_of_wrong_shape_raises(fn, shape):
    with pytest.raises(ValueError, match=msg(f"weight: expected shape ({V},), got {shape}")):
        call(fn, logits(), weight=np.ones(shape))


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, object, np.str_])
def test_weight_of_unsupported_dtype_raises(fn, dtype):
    with pytest.raises(TypeError, match="weight: unsupported dtype"):
        call(fn, logits(), weight=np.ones(V, dtype))


@pytest.mark.parametrize("fn", CE_FNS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_raises(fn, value):
    w = np.ones(V)
    w[2] = value
    with pytest.raises(ValueError, match="weight: contains a non-finite value"):
        call(fn, logits(), weight=w)


def test_negative_weight_is_accepted_like_torch():
    """torch does not reject negative class weights; neither does lmxent."""
    x, t, w = logits(np.float64), ids(), np.array([1.0, -0.5, 2.0, 0.0, -1.0])
    for reduction in ("none", "sum", "mean"):
        np.testing.assert_allclose(lx.cross_entropy(x, t, weight=w, reduction=reduction),
                                   ref.cross_entropy(x, t, weight=w, reduction=reduction),
                                   rtol=1e-11, atol=1e-11)


# --------------------------------------------------------- lse and grad_output

@pytest.mark.parametrize("shape", [(6,), (3, 2), (2, 3, 1), ()], ids=str)
def test_backward_lse_of_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match=msg(f"lse: expected shape {LEAD}, got {shape}")):
        call("cross_entropy_backward", logits(), lse=np.zeros(shape, np.float32))


@pytest.mark.parametrize("lse", [np.full(LEAD, None, dtype=object), np.zeros(LEAD, np.complex64),
                                 np.zeros(LEAD, np.bool_), np.full(LEAD, "1.0")],
                         ids=["object", "complex", "bool", "str"])
def test_backward_lse_of_unsupported_dtype_raises(lse):
    """An object array of None would otherwise become NaN: an all-NaN gradient."""
    with pytest.raises(TypeError, match="lse: unsupported dtype"):
        call("cross_entropy_backward", logits(), lse=lse)


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.float64])
def test_backward_lse_of_real_dtype_is_converted(dtype):
    x, lse = logits(), np.full(LEAD, 2, dtype)
    np.testing.assert_array_equal(call("cross_entropy_backward", x, lse=lse),
                                  call("cross_entropy_backward", x,
                                       lse=lse.astype(np.float32)))


@pytest.mark.parametrize("fn", GRAD_FNS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_token_grad_output_needs_reduction_none(fn, reduction):
    with pytest.raises(ValueError, match=msg(f"grad_output must be a scalar for "
                                             f"reduction={reduction!r}")):
        call(fn, logits(), reduction=reduction, grad_output=np.ones(LEAD))


@pytest.mark.parametrize("fn", GRAD_FNS)
@pytest.mark.parametrize("shape", [(3, 2), (6,), (2, 3, 1)], ids=str)
def test_grad_output_of_wrong_shape_raises(fn, shape):
    text = f"grad_output: shape {shape} does not broadcast to the per-token loss shape {LEAD}"
    with pytest.raises(ValueError, match=msg(text)):
        call(fn, logits(), reduction="none", grad_output=np.ones(shape))


# ----------------------------------------------------------------- inplace=True

def test_inplace_on_read_only_logits_raises():
    x = logits()
    x.flags.writeable = False
    with pytest.raises(ValueError, match="inplace=True needs a writable array"):
        lx.cross_entropy_with_grad(x, ids(), inplace=True)


def _unaligned(x):
    buf = np.zeros(x.nbytes + 1, np.uint8)[1:].view(x.dtype).reshape(x.shape)
    buf[...] = x
    return buf


NON_VIEWABLE = {
    "strided_vocab": lambda x: np.repeat(x, 2, axis=-1)[..., ::2],
    "transposed_lead": lambda x: np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1),
    "unaligned": _unaligned,
}


@pytest.mark.parametrize("layout", NON_VIEWABLE)
def test_inplace_on_non_viewable_layout_raises(layout):
    x = NON_VIEWABLE[layout](logits())
    x0 = x.copy()
    with pytest.raises(ValueError, match="inplace=True needs logits whose rows can be viewed"):
        lx.cross_entropy_with_grad(x, ids(), inplace=True)
    np.testing.assert_array_equal(x, x0)


def test_inplace_on_byte_swapped_logits_raises():
    """A native copy would receive the gradient and `logits` would stay unchanged."""
    x = logits().astype(logits().dtype.newbyteorder())
    x0 = x.copy()
    with pytest.raises(ValueError, match="inplace=True needs native byte order"):
        lx.cross_entropy_with_grad(x, ids(), inplace=True)
    np.testing.assert_array_equal(x, x0)
    lx.cross_entropy_with_grad(x, ids())  # converted when not in place


BAD_CALLS = {  # keyword arguments that make cross_entropy_with_grad raise ValueError
    "target_out_of_range": dict(targets=np.full(LEAD, V)),
    "target_negative": dict(targets=np.full(LEAD, -2)),
    "target_shape": dict(targets=np.zeros((3, 2), np.int64)),
    "prob_target_shape": dict(targets=np.full(LEAD + (V + 1,), 0.1)),
    "label_smoothing": dict(label_smoothing=2.0),
    "weight_shape": dict(weight=np.ones(V + 1)),
    "grad_output_shape": dict(reduction="none", grad_output=np.ones((3, 2))),
    "grad_output_per_token": dict(grad_output=np.ones(LEAD)),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_inplace_logits_unchanged_on_error(case):
    x = logits()
    x0 = x.copy()
    kw = dict(BAD_CALLS[case])
    with pytest.raises(ValueError):
        lx.cross_entropy_with_grad(x, kw.pop("targets", ids()), inplace=True, **kw)
    np.testing.assert_array_equal(x, x0)


# ------------------------------------------------------------------------- out=

@pytest.mark.parametrize("fn", OUT_FNS + GRAD_FNS)
@pytest.mark.parametrize("shape,dtype", [((2, 3, 4), np.float32), ((3, 2, V), np.float32),
                                         ((2, 3, V), np.float64), ((2, 3, V), np.float16)],
                         ids=["vocab", "lead", "float64", "float16"])
def test_out_of_wrong_shape_or_dtype_raises(fn, shape, dtype):
    out = np.full(shape, 7, dtype)
    text = (f"out: expected shape {LEAD + (V,)} and dtype float32, "
            f"got {shape} and {np.dtype(dtype)}")
    with pytest.raises(ValueError, match=msg(text)):
        call(fn, logits(), out=out)
    assert (out == 7).all()


@pytest.mark.parametrize("fn", OUT_FNS + GRAD_FNS)
def test_read_only_out_raises(fn):
    out = np.full(LEAD + (V,), 7, np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: array is read-only"):
        call(fn, logits(), out=out)


@pytest.mark.parametrize("fn", OUT_FNS + GRAD_FNS)
def test_out_not_an_ndarray_raises(fn):
    with pytest.raises(TypeError, match="out: expected a NumPy array, got list"):
        call(fn, logits(), out=logits().tolist())


OUT_BAD_CALLS = {  # (x, keyword arguments, exception) with a valid float32 out
    "temperature": (logits(), dict(temperature=0.0), ValueError),
    "axis": (logits(), dict(axis=3), ValueError),
    "x_dtype": (logits(np.int32), {}, TypeError),
    "x_empty_axis": (logits(shape=(2, 3, 0)), dict(axis=-1), ValueError),
}


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("case", OUT_BAD_CALLS)
def test_out_unchanged_on_error(fn, case):
    x, kw, exc = OUT_BAD_CALLS[case]
    out = np.full(LEAD + (V,), 7, np.float32)
    with pytest.raises(exc):
        call(fn, x, out=out, **kw)
    assert (out == 7).all()


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_aliasing_x_exactly_is_correct(fn):
    x = logits()
    want = call(fn, x)
    assert call(fn, x, out=x) is x
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn", OUT_FNS)
def test_out_same_view_of_x_is_in_place(fn):
    """out a different view object of x's exact memory: rows computed in place."""
    x = logits()
    want = call(fn, x)
    out = x.view()
    assert call(fn, x, out=out) is out
    np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7)


OVERLAPS = {  # (x, out) as (offset, shape, strides in elements) in one buffer of 8 * V
    "out_one_row_ahead": ((0, (6, V), (V, 1)), (V, (6, V), (V, 1))),
    "out_one_row_behind": ((V, (6, V), (V, 1)), (0, (6, V), (V, 1))),
    "out_half_a_row_ahead": ((0, (6, V), (V, 1)), (2, (6, V), (V, 1))),
    "out_rows_reversed": ((0, (6, V), (V, 1)), (5 * V, (6, V), (-V, 1))),
    "axis_0": ((0, (6, V), (V, 1)), (V, (6, V), (V, 1))),
}


@pytest.mark.parametrize("fn", OUT_FNS)
@pytest.mark.parametrize("case", OVERLAPS)
def test_out_partially_overlapping_x(fn, case):
    """NumPy semantics: as if out did not overlap x (the kernel would otherwise
    read rows it has already overwritten)."""
    buf = np.random.default_rng(1).standard_normal(8 * V).astype(np.float32)
    x, out = (np.lib.stride_tricks.as_strided(buf[off:], shape, [s * buf.itemsize
                                                                  for s in strides])
              for off, shape, strides in OVERLAPS[case])
    axis = 0 if case == "axis_0" else -1
    want = call(fn, x.copy(), axis=axis)
    assert call(fn, x, out=out, axis=axis) is out
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------- out= of the gradient

def grad_call(fn, x, **kw):
    """The gradient array a GRAD_FNS function returned."""
    res = call(fn, x, **kw)
    return res[1] if fn == "cross_entropy_with_grad" else res


def test_grad_out_with_inplace_raises():
    x, out = logits(), np.full(LEAD + (V,), 7, np.float32)
    x0 = x.copy()
    with pytest.raises(ValueError, match=r"give out= or inplace=True, not both"):
        lx.cross_entropy_with_grad(x, ids(), inplace=True, out=out)
    np.testing.assert_array_equal(x, x0)
    assert (out == 7).all()


@pytest.mark.parametrize("fn", GRAD_FNS)
def test_grad_out_unchanged_on_error(fn):
    out = np.full(LEAD + (V,), 7, np.float32)
    bad = ids()
    bad[1, 2] = V
    with pytest.raises(ValueError, match="out of range"):
        call(fn, logits(), bad, out=out)
    assert (out == 7).all()


@pytest.mark.parametrize("fn", GRAD_FNS)
@pytest.mark.parametrize("same_object", [True, False], ids=["x", "view_of_x"])
def test_grad_out_aliasing_x_exactly_is_in_place(fn, same_object):
    x = logits()
    want = grad_call(fn, x.copy())
    out = x if same_object else x.view()
    assert grad_call(fn, x, out=out) is out
    np.testing.assert_array_equal(x, want)


@pytest.mark.parametrize("fn", GRAD_FNS)
@pytest.mark.parametrize("case", [c for c in OVERLAPS if c != "axis_0"])
def test_grad_out_partially_overlapping_x(fn, case):
    """As if out did not overlap the logits (through a buffer)."""
    buf = np.random.default_rng(1).standard_normal(8 * V).astype(np.float32)
    x, out = (np.lib.stride_tricks.as_strided(buf[off:], shape, [s * buf.itemsize
                                                                  for s in strides])
              for off, shape, strides in OVERLAPS[case])
    want = grad_call(fn, x.copy())
    assert grad_call(fn, x, out=out) is out
    np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- binding guards

def _ce_args(**changes):
    """Valid arguments of the raw binding lmxent._cpu.cross_entropy, with changes."""
    x = logits(shape=(4, V))
    args = dict(logits=x, targets=np.zeros(4, np.int64), probs=None, class_weight=None,
                ignore_index=-100, scale=1.0, softcap=0.0, smoothing=0.0, z_loss=0.0,
                loss=np.empty(4, np.float32), lse=None, lse_given=False, grad=None,
                grad_scale=1.0, grad_rows=None, vocab_slice=False, grad_coef=None)
    args.update(changes)
    return args


BINDING_CASES = {  # (binding, keyword arguments, message)
    "softmax_1d": (_cpu.softmax, dict(x=np.zeros(V, np.float32), out=None, lse=None,
                                      scale=1.0, log=False), "x: expected a 2-D array"),
    "softmax_out_shape": (_cpu.softmax, dict(x=logits(shape=(4, V)),
                                             out=np.empty((4, V + 1), np.float32),
                                             lse=None, scale=1.0, log=False),
                          "out: must have the shape and dtype of x"),
    "softmax_lse_length": (_cpu.softmax, dict(x=logits(shape=(4, V)), out=None,
                                              lse=np.empty(3, np.float32), scale=1.0,
                                              log=False), "lse: expected shape (4,)"),
    "targets_int32": (_cpu.cross_entropy, _ce_args(targets=np.zeros(4, np.int32)),
                      "targets: expected contiguous int64 of shape (4,)"),
    "targets_length": (_cpu.cross_entropy, _ce_args(targets=np.zeros(3, np.int64)),
                       "targets: expected contiguous int64 of shape (4,)"),
    "no_targets": (_cpu.cross_entropy, _ce_args(targets=None),
                   "targets: give exactly one of class ids or probabilities"),
    "probs_dtype": (_cpu.cross_entropy, _ce_args(targets=None,
                                                 probs=np.zeros((4, V), np.float64)),
                    "targets: probabilities must match"),
    "loss_length": (_cpu.cross_entropy, _ce_args(loss=np.empty(5, np.float32)),
                    "loss: expected shape (4,)"),
    "lse_missing": (_cpu.cross_entropy, _ce_args(lse_given=True), "lse: required"),
    "grad_read_only": (_cpu.cross_entropy,
                       _ce_args(grad=np.lib.stride_tricks.as_strided(
                           np.zeros((4, V), np.float32), writeable=False)),
                       "grad: array is read-only"),
}


@pytest.mark.parametrize("case", BINDING_CASES)
def test_binding_rejects_invalid_buffers(case):
    fn, kw, text = BINDING_CASES[case]
    with pytest.raises(ValueError, match=msg(text)):
        fn(**kw)


# ---------------------------------------------------------- integers, lists, memory

@pytest.mark.parametrize("kw, name", [(dict(ignore_index=True), "ignore_index"),
                                      (dict(ignore_index=False), "ignore_index")])
def test_integer_options_refuse_bools(kw, name):
    with pytest.raises(TypeError, match=f"{name} must be an integer"):
        lx.cross_entropy(logits(), ids(), **kw)
    with pytest.raises(TypeError, match="chunk_size must be an integer"):
        lx.linear_cross_entropy(np.ones((3, 4), np.float32), np.ones((5, 4), np.float32),
                                np.zeros(3, np.int64), chunk_size=True)
    with pytest.raises(TypeError, match="n_bins must be an integer"):
        lx.calibration([0.5], [True], n_bins=True)


def test_integer_options_accept_numpy_integers_and_0d_arrays():
    x = logits()
    want = lx.cross_entropy(x, ids(), ignore_index=-100)
    for v in (np.int64(-100), np.int16(-100), np.array(-100)):
        np.testing.assert_array_equal(lx.cross_entropy(x, ids(), ignore_index=v), want)


def test_inplace_refuses_a_list_it_could_not_write_back():
    x = logits().tolist()
    with pytest.raises(TypeError, match="logits: inplace=True needs a NumPy or CuPy array, "
                                        "got list"):
        lx.cross_entropy_with_grad(x, ids(), inplace=True)
    with pytest.raises(TypeError, match="student_logits: inplace=True needs a NumPy or CuPy "
                                        "array, got list"):
        lx.kl_divergence(x, logits(), return_grad=True, inplace=True)
    lx.cross_entropy_with_grad(x, ids())  # without inplace, a list is fine


def test_output_allocation_failure_says_the_size():
    """An output the output cache cannot map raises MemoryError naming its size (a
    stride-0 view makes 64 TiB of logits from one row)."""
    if lx.output_cache_info()["limit"] < (4 << 20):
        pytest.skip("the output cache is off in this process")
    row = np.zeros(1 << 20, np.float32)
    x = np.lib.stride_tricks.as_strided(row, (1 << 24, 1 << 20), (0, 4))
    with pytest.raises(MemoryError, match=r"Unable to allocate 64 TiB \(70368744177664 bytes\)"):
        lx.cross_entropy_with_grad(x, np.zeros(1 << 24, np.int64))


def test_check_cuda_errors_without_cupy_has_nothing_to_check(monkeypatch):
    import sys

    from lmxent import _arrays as A
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy fails
    monkeypatch.setattr(A, "_CUDA", None)
    assert lx.check_cuda_errors() is None
