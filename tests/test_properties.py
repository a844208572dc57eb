"""Property tests (hypothesis) of every public function against lmxent.reference:
random shapes (one row, one column, odd sizes, V up to 5000 across the 2048-element
chunk boundary), every dtype, every memory layout the API accepts (strided rows,
negative strides, broadcast stride-0 rows, a view at an odd byte offset, big-endian),
options at their limits, and, for bad input, an exception naming the argument.

The number of examples comes from the profile (tests/_hypothesis_profiles.py,
HYPOTHESIS_PROFILE=ci|dev|long; ci is fixed and derandomized).

The contracts of issue 15 (limits of the options, KL offsets, overlapping outputs,
the same answer on every ISA, evaluation edges, settings and messages) have their
own properties at the end.
"""
import math
import re

import numpy as np
import pytest
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

import lmxent as lx
from lmxent import reference as R

import _hypothesis_profiles  # noqa: F401 -- registers and loads the profile
from helpers import (
    BF16,
    DTYPES,
    F16,
    F64,
    ISAS,
    assert_grad_close,
    assert_loss_close,
    assert_matches_reference,
    cpu_isa,
    dtype_id,
    grad_scale,
    loss_dtype,
    num_threads,
)

LAYOUTS = ["contiguous", "strided", "negative", "broadcast", "unaligned", "bigendian"]
SOFTMAX_FNS = ["logsumexp", "log_softmax", "softmax"]


# ------------------------------------------------------------------ strategies

@st.composite
def shapes(draw, max_lead=2):
    """(lead shape, V): V from 1, small odd sizes and sizes around the 2048-element
    chunk up to ~5000; at most ~40k elements."""
    V = draw(st.one_of(st.integers(1, 40), st.sampled_from([2047, 2048, 2049, 4999, 5000])))
    max_rows = 9 if V <= 40 else 4
    ndim = draw(st.integers(0, max_lead))
    lead = tuple(draw(st.lists(st.integers(1, max_rows), min_size=ndim, max_size=ndim)))
    assume(math.prod(lead) <= max_rows * (1 if V > 40 else 3))
    return lead, V


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


def lay_out(x, layout):
    """An array with x's values (except "broadcast": every row becomes x's first
    row) in the given memory layout. x: native dtype, at least 1-D."""
    if layout == "contiguous":
        return x
    if layout == "strided":  # rows further apart than V elements
        buf = np.zeros(x.shape[:-1] + (x.shape[-1] + 3,), x.dtype)
        buf[..., :x.shape[-1]] = x
        return buf[..., :x.shape[-1]]
    if layout == "negative":  # negative strides on every axis
        flip = (slice(None, None, -1),) * x.ndim
        return np.ascontiguousarray(x[flip])[flip]
    if layout == "broadcast":  # stride 0 on the leading axes
        return np.broadcast_to(x.reshape(-1, x.shape[-1])[0], x.shape)
    if layout == "unaligned":  # a view at an odd byte offset of a uint8 buffer
        buf = np.zeros(x.nbytes + x.itemsize, np.uint8)
        y = buf[1:1 + x.nbytes].view(x.dtype).reshape(x.shape)
        y[...] = x
        assert not y.flags.aligned or x.itemsize == 1
        return y
    if layout == "bigendian":
        return x.astype(x.dtype.newbyteorder(">"))
    raise AssertionError(layout)


@st.composite
def logits(draw, lead, V, *, dtype=None, specials=True, scale=None, center=False):
    """(array in a random layout, its values as float64, native dtype); center: each
    row's maximum is 0."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else np.dtype(dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 30.0])) if scale is None else scale
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=scale, size=lead + (V,))
    if specials and draw(st.booleans()):  # masked (-inf) entries, large values
        x[rng.random(x.shape) < 0.2] = -np.inf
        big = 6e4 if dtype == F16 else 1e4
        x[rng.random(x.shape) < 0.05] = big * rng.choice([-1, 1])
    if center:
        x -= x.max(axis=-1, keepdims=True)
    x = lay_out(x.astype(dtype), layout)
    note(f"layout={layout} dtype={dtype_id(dtype)} shape={x.shape} strides={x.strides}")
    event(f"layout {layout}, V {'> 2000' if V > 2000 else '<= 40'}")  # --hypothesis-show-statistics
    return x, x.astype(np.float64), native(dtype)


@st.composite
def class_ids(draw, lead, V, ignore_index=-100):
    """Class ids of shape lead: in range, with ignore_index sprinkled (sometimes
    everywhere), in a random integer dtype."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, size=lead)
    frac = draw(st.sampled_from([0.0, 0.3, 1.0]))
    t = np.where(rng.random(lead) < frac, ignore_index, t)
    dt = draw(st.sampled_from([np.int64, np.int32, np.int16] if ignore_index < 0 else
                              [np.int64, np.int32, np.uint32, np.uint64]))
    if np.iinfo(dt).max < V or not (np.iinfo(dt).min <= ignore_index <= np.iinfo(dt).max):
        dt = np.int64
    return np.asarray(t, dtype=dt)


def same(a, b):
    """Equal values, NaN equal to NaN (as float64: NumPy's NaN test misses bfloat16)."""
    np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


def unchanged(before, after):
    assert np.array_equal(np.asarray(before, np.float64), np.asarray(after, np.float64),
                          equal_nan=True), "an input was written"


# -------------------------------------------------------- logsumexp / softmax

@st.composite
def softmax_case(draw):
    lead, V = draw(shapes())
    x, x64, dt = draw(logits(lead, V))
    axis = draw(st.integers(-x.ndim, x.ndim - 1)) if draw(st.booleans()) else -1
    T = draw(st.sampled_from([1.0, 0.5, 2.0, 1e-3, 1e3]))
    return x, x64, dt, axis, T


@given(softmax_case(), st.sampled_from(SOFTMAX_FNS), st.booleans())
def test_softmax_family_matches_reference(case, fn, keepdims):
    x, x64, dt, axis, T = case
    before = x.copy()
    kw = dict(axis=axis, temperature=T)
    if fn == "logsumexp":
        kw["keepdims"] = keepdims
    got = getattr(lx, fn)(x, **kw)
    assert_matches_reference(fn, got, x64, dt, what=fn, **kw)
    unchanged(before, x)


@given(softmax_case(), st.sampled_from(["log_softmax", "softmax"]), st.booleans())
def test_softmax_out_and_in_place(case, fn, into_x):
    x, x64, dt, axis, T = case
    if into_x:  # out=x: rows rewritten in place (needs a writable, native array)
        out = x = np.array(x, dtype=dt)
    else:
        out = np.full(x.shape, np.nan, dt)
    got = getattr(lx, fn)(x, axis=axis, temperature=T, out=out)
    assert got is out
    assert_matches_reference(fn, got, x64, dt, what=fn + " out=", axis=axis, temperature=T)


# ---------------------------------------------------------------- cross-entropy

@st.composite
def ce_options(draw, V):
    opts = {}
    if draw(st.booleans()):
        w = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).uniform(0, 2, V)
        w[::3] = 0.0  # weights with zeros
        opts["weight"] = w
    opts["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]))
    opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0]))
    opts["z_loss"] = draw(st.sampled_from([0.0, 0.0, 1e-4, 1.0]))
    opts["softcap"] = draw(st.sampled_from([None, None, 1.0, 30.0]))
    opts["logit_scale"] = draw(st.sampled_from([1.0, 1.0, 0.5, 3.0]))
    if opts["reduction"] == "mean" and draw(st.booleans()):
        opts["normalizer"] = draw(st.sampled_from([1.0, 7.5, 1e4]))
    return opts


@st.composite
def ce_case(draw, probs=None):
    lead, V = draw(shapes())
    # -inf logits make 0 * inf terms of the gradient scale; covered by the softmax and
    # token-stats properties and the extreme-row tests of test_cross_entropy.py
    x, x64, dt = draw(logits(lead, V, specials=False))
    opts = draw(ce_options(V))
    if probs is None:
        probs = draw(st.booleans())
    if probs:
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        q = rng.random(lead + (V,)) ** 3
        q[..., 0] += 1e-3
        t = q / q.sum(-1, keepdims=True)
    else:
        ii = draw(st.sampled_from([-100, 0, V - 1]))
        opts["ignore_index"] = ii
        t = draw(class_ids(lead, V, ii))
    go = (np.random.default_rng(1).normal(size=lead) if opts["reduction"] == "none"
          else draw(st.sampled_from([1.0, -0.5, 0.0])))
    return x, x64, dt, t, opts, go


@given(ce_case())
def test_cross_entropy_family_matches_reference(case):
    x, x64, dt, t, opts, go = case
    before = x.copy()
    r_loss, r_lse = R.cross_entropy(x64, t, return_lse=True, **opts)
    r_grad = R.cross_entropy_backward(x64, t, r_lse, go, **opts)
    # p = exp(z - lse) with lse rounded to float32: up to ulp(lse)/2 relative error in p
    # (as in test_cross_entropy.py's test_huge_logits)
    lse_err = 1.0 if dt == F64 else 1 + 2.0**-23 * np.abs(r_lse)[..., None] / 1e-6
    gs = grad_scale(x.shape, t, r_lse, go, **opts) * lse_err

    loss, lse = lx.cross_entropy(x, t, return_lse=True, **opts)
    assert loss.dtype == lse.dtype == loss_dtype(dt)
    assert_loss_close(loss, r_loss, dt)
    assert_loss_close(lse, r_lse, dt, what="lse")

    loss2, grad = lx.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    np.testing.assert_array_equal(loss2, loss)
    assert_grad_close(grad, r_grad, dt, gscale=gs, what="with_grad")
    grad_b = lx.cross_entropy_backward(x, t, lse, go, **opts)
    assert_grad_close(grad_b, r_grad, dt, gscale=gs, what="backward")
    unchanged(before, x)

    out = np.full(x.shape, np.nan, dt)
    _, g_out = lx.cross_entropy_with_grad(x, t, grad_output=go, out=out, **opts)
    assert g_out is out
    same(out, grad)


@given(ce_case(probs=False))
def test_cross_entropy_inplace_gradient(case):
    x, x64, dt, t, opts, go = case
    x = np.array(x, dtype=dt, order="C")  # a copy for inplace=True: writable, aligned, native
    _, want = lx.cross_entropy_with_grad(x.copy(), t, grad_output=go, **opts)
    _, g = lx.cross_entropy_with_grad(x, t, grad_output=go, inplace=True, **opts)
    assert g is x
    same(g, want)


# ------------------------------------------------------------------- LM head

@given(st.data())
def test_linear_cross_entropy_matches_reference(data):
    from test_linear_cross_entropy import check_head

    lead, V = data.draw(shapes(max_lead=2))
    assume(V <= 2049)
    D = data.draw(st.integers(1, 17))
    dt = data.draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    h = (rng.normal(size=lead + (D,)) / math.sqrt(D)).astype(dt)
    w = rng.normal(scale=2.0, size=(V, D)).astype(dt)
    b = rng.normal(size=V).astype(dt) if data.draw(st.booleans()) else None
    opts = data.draw(ce_options(V))
    if "weight" in opts:
        opts["class_weight"] = opts.pop("weight")
    ii = data.draw(st.sampled_from([-100, 0]))
    t = data.draw(class_ids(lead, V, ii))
    go = rng.normal(size=lead) if opts["reduction"] == "none" else 0.7
    if data.draw(st.booleans()):
        opts["chunk_size"] = data.draw(st.integers(1, 5))
    f64 = tuple(None if a is None else a.astype(np.float64) for a in (h, w, b))
    check_head(h, w, b, t, f64, grad_output=go, torch_check=False, ignore_index=ii, **opts)

    lp, lse = lx.linear_target_logprobs(h, w, t, bias=b, ignore_index=ii,
                                        softcap=opts["softcap"],
                                        logit_scale=opts["logit_scale"])
    rlp, rlse = R.linear_target_logprobs(*f64[:2], t, bias=f64[2], ignore_index=ii,
                                         softcap=opts["softcap"],
                                         logit_scale=opts["logit_scale"])
    # the logits are a float32 product (the error of the matrix product dominates)
    z_scale = float(np.max(np.abs(rlse), initial=1.0))
    assert_loss_close(lp, rlp, dt, scale=z_scale * 4, what="logprob")
    assert_loss_close(lse, rlse, dt, scale=z_scale * 4, what="lse")


# ------------------------------------------------------------ token statistics

@given(st.data())
def test_token_stats_matches_reference(data):
    lead, V = data.draw(shapes())
    x, x64, dt = data.draw(logits(lead, V))
    ii = data.draw(st.sampled_from([-100, 0]))
    t = data.draw(class_ids(lead, V, ii))
    T = data.draw(st.sampled_from([1.0, 1.0, 0.7, 4.0]))
    got = lx.token_stats(x, t, ignore_index=ii, temperature=T)
    want = R.token_stats(x64, t, ignore_index=ii, temperature=T)
    for name in ("logprob", "lse", "entropy", "top_prob"):
        a = getattr(got, name)
        assert a.dtype == loss_dtype(dt) and a.shape == t.shape, name
        assert_loss_close(a, getattr(want, name), dt, what=name,
                          scale=1.0 if name == "top_prob" else None)
    assert got.rank.dtype == np.int64 and got.correct.dtype == np.bool_
    np.testing.assert_array_equal(got.correct, got.rank == 0)
    if T == 1.0 or dt == F64:
        # x / T may round distinct float32 logits onto a tie, which moves the rank
        np.testing.assert_array_equal(got.rank, want.rank)


# ---------------------------------------------------------------- KL divergence

@st.composite
def kl_case(draw):
    """Student and teacher rows with maximum 0: an offset between them is the
    business of test_kl_divergence_teacher_offset."""
    lead, V = draw(shapes())
    s, s64, dt = draw(logits(lead, V, specials=False, center=True))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    t = rng.normal(scale=draw(st.sampled_from([0.1, 3.0, 30.0])), size=lead + (V,))
    t -= t.max(axis=-1, keepdims=True)
    direction = draw(st.sampled_from(["forward", "reverse", "js"]))
    if direction != "reverse" and V > 1 and draw(st.booleans()):
        t[..., ::3] = -np.inf  # zero-probability teacher classes
    t = t.astype(dt)
    mask = rng.random(lead) < 0.7 if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["batchmean", "sum", "none"]))
    T = draw(st.sampled_from([1.0, 0.5, 2.5]))
    return s, s64, t, t.astype(np.float64), dt, dict(direction=direction, mask=mask,
                                                      reduction=reduction, temperature=T)


def check_kl(s, s64, t, t64, dt, kw, grad_output=1.0):
    loss, g = lx.kl_divergence(s, t, return_grad=True, grad_output=grad_output, **kw)
    rl, rg = R.kl_divergence(s64, t64, return_grad=True, grad_output=grad_output, **kw)
    assert loss.dtype == loss_dtype(dt) and g.dtype == dt and g.shape == s.shape
    assert_loss_close(loss, rl, dt, what="kl")
    assert (np.asarray(loss) >= 0).all()
    # |d kl / d s| <= 2 / T per row (times grad_output and the batchmean division);
    # reverse and js: p_j (log p_j - log q_j - kl) / T, whose float32 error is
    # relative to the log-probabilities' magnitudes
    T = kw["temperature"]
    count = s.size // s.shape[-1] if kw["mask"] is None else max(1, int(kw["mask"].sum()))
    div = count if kw["reduction"] == "batchmean" else 1
    scale = 2.0
    if kw["direction"] != "forward":
        ls, lt = R.log_softmax(s64, temperature=T), R.log_softmax(t64, temperature=T)
        with np.errstate(invalid="ignore"):
            lt = np.where(np.isfinite(lt), np.abs(lt), np.abs(ls) + 1)
            per_row = R.kl_divergence(s64, t64, temperature=T, direction=kw["direction"],
                                      reduction="none")
        scale = 2.0 + np.max(np.exp(ls) * (np.abs(ls) + lt), axis=-1, keepdims=True) + \
            np.abs(per_row)[..., None]
    assert_grad_close(g, rg, dt, gscale=scale / T * abs(grad_output) / div)


@given(kl_case())
def test_kl_divergence_matches_reference(case):
    s, s64, t, t64, dt, kw = case
    before = (s.copy(), t.copy())
    check_kl(s, s64, t, t64, dt, kw, grad_output=0.5 if kw["reduction"] != "none" else 1.0)
    unchanged(before[0], s)
    unchanged(before[1], t)


@given(kl_case(), st.sampled_from([20.0, -50.0, 1e4, -1e5, 1e6, 1e7]))
def test_kl_divergence_teacher_offset(case, c):
    """A teacher shifted by c is the same distribution: the KL of the rounded shifted
    teacher matches the reference on the same values (float64 data: the answer does
    not move). The error may grow with the logits' own magnitude, not with c."""
    s, s64, t, t64, dt, kw = case
    assume(dt in (np.float32, F64) and np.isfinite(t64).all())
    ts = (t64 + c).astype(dt)
    check_kl(s, s64, ts, ts.astype(np.float64), dt, kw)


def test_kl_divergence_huge_teacher_logits():
    s = np.array([[0.5, 0.1, -0.2]], np.float32)
    for t, want in [([[1e8, 0, 0]], None), ([[3e38, 3e38, 0]], None)]:
        t = np.array(t, np.float32)
        got = lx.kl_divergence(s, t)
        # q puts all its mass on the classes at the max: KL = sum_j q_j (log q_j - log p_j)
        q = np.where(t[0] == t[0].max(), 1.0, 0.0)
        q /= q.sum()
        lp = s[0].astype(np.float64) - R.logsumexp(s[0].astype(np.float64))
        want = float(np.sum(np.where(q > 0, q * (np.log(np.where(q > 0, q, 1)) - lp), 0)))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(R.kl_divergence(s, t), want, rtol=1e-12)


# ------------------------------------------------------------------- evaluation

@given(st.data())
def test_sequence_scores_matches_reference(data):
    lead, V = data.draw(shapes(max_lead=1))
    Tn = data.draw(st.integers(1, 6))
    assume(math.prod(lead) * Tn * V <= 40000)
    x, x64, dt = data.draw(logits(lead + (Tn,), V))
    ii = data.draw(st.sampled_from([-100, 0]))
    tok = data.draw(class_ids(lead + (Tn,), V, ii))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    mask = rng.random(tok.shape) < 0.8 if data.draw(st.booleans()) else None
    shift = data.draw(st.booleans())
    got = lx.sequence_scores(x, tok, shift=shift, mask=mask, ignore_index=ii)
    want = R.sequence_scores(x64, tok, shift=shift, mask=mask, ignore_index=ii)
    np.testing.assert_array_equal(got.n_tokens, want.n_tokens)
    scale = float(np.max(np.abs(x64[np.isfinite(x64)]), initial=1.0)) * Tn
    for name in ("logprob_sum", "mean_logprob"):
        assert getattr(got, name).dtype == F64
        assert_loss_close(getattr(got, name), getattr(want, name), np.float32, scale=scale,
                          what=name)


def test_sequence_scores_plus_inf_logit():
    x = np.array([[[0.0, 1.0, 2.0], [np.inf, 0.0, 1.0], [0.0, 0.0, 0.0]]], np.float32)
    tok = np.array([[0, 1, 2]])
    got = lx.sequence_scores(x, tok)
    want = R.sequence_scores(x.astype(np.float64), tok)
    np.testing.assert_array_equal(got.logprob_sum, want.logprob_sum)  # -inf, not NaN


@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=0, max_size=6),
       st.integers(0, 14))
def test_answer_mask_matches_reference(pairs, T):
    p = np.array([min(a, b) for a, b in pairs], np.int64)
    n = np.array([max(a, b) for a, b in pairs], np.int64)
    if (n > T).any():
        with pytest.raises(ValueError, match="lengths"):
            lx.answer_mask(p, n, T)
        return
    got = lx.answer_mask(p, n, T)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, R.answer_mask(p, n, T))


@pytest.mark.parametrize("T", [2**63, 2**64 + 5])
def test_answer_mask_huge_T(T):
    with pytest.raises((ValueError, OverflowError), match="T"):
        lx.answer_mask([0], [1], T)


@st.composite
def counts_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=2)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nll = rng.exponential(draw(st.sampled_from([1.0, 100.0])), size=shape)
    cnt = rng.integers(0, 4, size=shape).astype(draw(st.sampled_from([np.int64, np.float64])))
    return nll, cnt


@given(counts_case(), st.sampled_from(["perplexity", "bits_per_byte"]))
def test_perplexity_bits_per_byte_match_reference(case, fn):
    nll, cnt = case
    got = getattr(lx, fn)(nll, cnt)
    want = getattr(R, fn)(nll, cnt)
    assert np.asarray(got).dtype == F64
    np.testing.assert_allclose(got, want, rtol=1e-13)
    # Python numbers give a Python float
    assert isinstance(getattr(lx, fn)(float(nll.flat[0]), int(cnt.flat[0])), float)


@given(counts_case(), st.sampled_from(["perplexity", "bits_per_byte"]))
def test_perplexity_bits_per_byte_accept_lists(case, fn):
    nll, cnt = case
    got = getattr(lx, fn)(nll.tolist(), cnt.tolist())
    np.testing.assert_allclose(got, getattr(R, fn)(nll.tolist(), cnt.tolist()), rtol=1e-13)


@given(st.integers(0, 300), st.integers(1, 30), st.integers(0, 2**32 - 1))
def test_calibration_matches_reference(n, n_bins, seed):
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    conf[rng.random(n) < 0.1] = rng.choice([0.0, 1.0, 0.5])  # bin edges
    ok = rng.random(n) < conf
    got = lx.calibration(conf, ok, n_bins=n_bins)
    want = R.calibration(conf, ok, n_bins=n_bins)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------- decoding

@st.composite
def decode_options(draw, lead, V):
    """process_logits / sample options: each a scalar, or an array of the leading shape."""
    def per_row(values):
        if lead and draw(st.booleans()):
            return np.asarray(draw(st.lists(st.sampled_from(values), min_size=math.prod(lead),
                                            max_size=math.prod(lead)))).reshape(lead)
        return draw(st.sampled_from(values))
    opts = dict(temperature=per_row([0.0, 0.5, 1.0, 2.0]), top_k=per_row([0, 1, 3, V + 1]),
                top_p=per_row([0.3, 0.9, 1.0]), min_p=per_row([0.0, 0.05, 0.5]))
    if draw(st.booleans()):
        opts["logit_bias"] = {draw(st.integers(0, V - 1)): draw(st.sampled_from([-np.inf, 5.0]))}
    if draw(st.booleans()):
        opts["prev_tokens"] = np.random.default_rng(V).integers(-1, V, lead + (4,))
        opts["repetition_penalty"] = per_row([1.0, 1.3])
        opts["frequency_penalty"] = per_row([0.0, 0.5])
    return opts


@given(st.data())
def test_process_logits_and_sample_match_reference(data):
    from test_decoding import assert_processed, assert_samples

    lead, V = data.draw(shapes())
    x, x64, dt = data.draw(logits(lead, V))
    opts = data.draw(decode_options(lead, V))
    before = x.copy()
    assert_processed(lx.process_logits(x, **opts), x.astype(dt), dt, **opts)
    n = data.draw(st.integers(0, 6))
    of = data.draw(st.sampled_from(["raw", "processed"]))
    seed, offset = data.draw(st.integers(0, 2**64 - 1)), data.draw(st.integers(0, 2**32))
    got = lx.sample(x, seed=seed, offset=offset, num_logprobs=n, logprobs_of=of, **opts)
    event(f"tokens differ at a rounding boundary: "
          f"{assert_samples(got, x, seed, offset, num_logprobs=n, logprobs_of=of, **opts)}")
    unchanged(before, x)


@given(st.data())
def test_top_k_matches_reference(data):
    lead, V = data.draw(shapes())
    x, x64, dt = data.draw(logits(lead, V))
    k = data.draw(st.integers(0, V))
    values, ids = lx.top_k(x, k)
    want_values, want_ids = R.top_k(x64, k)
    np.testing.assert_array_equal(ids, want_ids)
    same(values, want_values)
    assert values.dtype == dt and ids.dtype == np.int64


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 30), st.integers(0, 2**32 - 1),
       st.booleans())
def test_beam_search_step_matches_reference(batch, W, V, seed, with_eos):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(batch, W))
    logprobs = R.log_softmax(rng.normal(size=(batch, W, V)))
    kw = dict(finished=rng.random((batch, W)) < 0.3, eos_id=0) if with_eos else {}
    for got, want in zip(lx.beam_search_step(scores, logprobs, W, **kw),
                         R.beam_search_step(scores, logprobs, W, **kw)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("opt, bad", [("temperature", -1.0), ("temperature", math.nan),
                                      ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
                                      ("min_p", -0.1), ("repetition_penalty", 0.0)])
@pytest.mark.parametrize("fn", ["process_logits", "sample"])
def test_bad_decoding_options_name_the_option(fn, opt, bad):
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError) as e:
        getattr(lx, fn)(x, **{opt: bad})
    names(e, opt)


# ------------------------------------------------- settings and small functions

@given(st.sampled_from(ISAS), st.integers(1, 4), softmax_case())
def test_isa_and_threads_do_not_change_results(isa, n, case):
    x, x64, dt, axis, T = case
    want = lx.log_softmax(x, axis=axis, temperature=T)
    with cpu_isa(isa), num_threads(n):
        assert lx.cpu_info()["isa"] == isa and lx.cpu_info()["threads"] == n
        got = lx.log_softmax(x, axis=axis, temperature=T)
    assert_matches_reference("log_softmax", got, x64, dt, axis=axis, temperature=T)
    if isa == lx.cpu_info()["isa"]:
        same(got, want)


@given(st.integers(0, 2**40))
def test_output_cache_limit_round_trip(limit):
    old = lx.set_output_cache(limit)
    try:
        assert lx.output_cache_info()["limit"] == limit
        info = lx.output_cache_info()
        assert 0 <= info["held_bytes"] <= max(limit, 0) and info["held_blocks"] >= 0
    finally:
        assert lx.set_output_cache(old) == limit


def test_small_public_objects():
    assert lx.bfloat16_dtype() == BF16
    assert lx.TokenStats._fields == ("logprob", "lse", "entropy", "correct", "top_prob",
                                     "rank")
    assert lx.set_cuda_validation(lx.set_cuda_validation("deferred")) == "deferred"
    assert lx.set_cuda_validation("eager") == "eager"
    # every public name is covered by a property in this file or is a module
    assert set(lx.__all__) - {"reference", "plot"} <= set(COVERED)


COVERED = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad",
           "cross_entropy_backward", "linear_cross_entropy", "linear_target_logprobs",
           "cpu_info", "set_cpu_isa", "set_num_threads", "bfloat16_dtype",
           "sequence_scores", "answer_mask", "perplexity", "bits_per_byte", "calibration",
           "token_stats", "TokenStats", "kl_divergence", "set_cuda_validation",
           "check_cuda_errors", "set_output_cache", "output_cache_info", "get_num_threads",
           "process_logits", "sample", "Samples", "top_k", "beam_search_step",
           "beam_search", "Beams"]  # beam_search: its steps are beam_search_step's


# ------------------------------------------------------------------ bad input

def names(exc_info, arg):
    assert re.search(rf"\b{re.escape(arg)}\b", str(exc_info.value)), (arg, exc_info.value)


FLOAT_FNS = {  # function(x, **options) for each public function taking float logits
    "logsumexp": lambda x, **k: lx.logsumexp(x, **k),
    "log_softmax": lambda x, **k: lx.log_softmax(x, **k),
    "softmax": lambda x, **k: lx.softmax(x, **k),
    "cross_entropy": lambda x, **k: lx.cross_entropy(x, np.zeros(x.shape[:-1], int), **k),
    "cross_entropy_with_grad": lambda x, **k: lx.cross_entropy_with_grad(
        x, np.zeros(x.shape[:-1], int), **k),
    "cross_entropy_backward": lambda x, **k: lx.cross_entropy_backward(
        x, np.zeros(x.shape[:-1], int), np.zeros(x.shape[:-1], np.float32), 1.0, **k),
    "token_stats": lambda x, **k: lx.token_stats(x, np.zeros(x.shape[:-1], int), **k),
    "kl_divergence": lambda x, **k: lx.kl_divergence(x, np.zeros(x.shape, x.dtype), **k),
    "sequence_scores": lambda x, **k: lx.sequence_scores(x, np.zeros(x.shape[:-1], int), **k),
}
FIRST_ARG = {"logsumexp": "x", "log_softmax": "x", "softmax": "x",
             "kl_divergence": "student_logits"}
TEMPERATURE_FNS = ["logsumexp", "log_softmax", "softmax", "token_stats", "kl_divergence"]
CE_FNS = ["cross_entropy", "cross_entropy_with_grad", "cross_entropy_backward"]


@given(st.sampled_from(sorted(FLOAT_FNS)),
       st.sampled_from([np.int64, np.int8, np.bool_, np.complex64, np.uint16, "U3", object]))
def test_bad_logits_dtype_names_the_argument(fn, dtype):
    x = np.zeros((2, 3, 4), dtype=dtype)
    with pytest.raises(TypeError) as e:
        FLOAT_FNS[fn](x)
    names(e, FIRST_ARG.get(fn, "logits"))


@given(st.sampled_from(TEMPERATURE_FNS + CE_FNS), st.data())
def test_bad_float_options_name_the_option(fn, data):
    if fn in TEMPERATURE_FNS:
        option = "temperature"
        value = data.draw(st.sampled_from([0.0, -1.0, math.nan, math.inf, -math.inf]))
    else:
        option = data.draw(st.sampled_from(["label_smoothing", "z_loss", "softcap",
                                            "logit_scale", "normalizer"]))
        bad = {"label_smoothing": [-0.1, 1.5, math.nan, math.inf],
               "z_loss": [-1e-3, math.nan, math.inf], "softcap": [0.0, -2.0, math.nan],
               "logit_scale": [0.0, -1.0, math.nan, math.inf],
               "normalizer": [0.0, -3.0, math.nan]}[option]
        value = data.draw(st.sampled_from(bad))
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError) as e:
        FLOAT_FNS[fn](x, **{option: value})
    names(e, option)


@given(st.sampled_from(CE_FNS + ["token_stats"]), shapes(), st.data())
def test_out_of_range_ids_name_targets_and_position(fn, shape, data):
    lead, V = shape
    assume(lead)
    ii = data.draw(st.sampled_from([-100, 0]))
    t = data.draw(class_ids(lead, V, ii))
    pos = tuple(data.draw(st.integers(0, n - 1)) for n in lead)
    bad = data.draw(st.sampled_from([V, V + 7, -1, -101, 2**40]))
    assume(bad != ii)
    t = t.astype(np.int64)
    t[pos] = bad
    x = np.zeros(lead + (V,), np.float32)
    call = {"token_stats": lambda: lx.token_stats(x, t, ignore_index=ii),
            "cross_entropy": lambda: lx.cross_entropy(x, t, ignore_index=ii),
            "cross_entropy_with_grad": lambda: lx.cross_entropy_with_grad(x, t,
                                                                          ignore_index=ii),
            "cross_entropy_backward": lambda: lx.cross_entropy_backward(
                x, t, np.zeros(lead, np.float32), 1.0, ignore_index=ii)}[fn]
    first = tuple(int(k) for k in np.argwhere((t != ii) & ((t < 0) | (t >= V)))[0])
    with pytest.raises(ValueError) as e:
        call()
    names(e, "targets")
    assert str(first) in str(e.value)


@given(st.sampled_from(CE_FNS + ["token_stats", "sequence_scores"]), shapes(max_lead=2),
       st.integers(-1, 1))
def test_wrong_target_shape_names_targets(fn, shape, delta):
    lead, V = shape
    assume(delta != 0 or lead)
    bad = lead[:-1] + (lead[-1] + delta,) if lead and delta else lead[:-1] + (1, 1)
    assume(bad != lead and all(n >= 0 for n in bad))
    x = np.zeros(lead + (V,), np.float32)
    if fn == "sequence_scores":
        assume(len(lead) >= 1)
        with pytest.raises(ValueError) as e:
            lx.sequence_scores(x, np.zeros(bad, int))
        names(e, "tokens")
        return
    with pytest.raises(ValueError) as e:
        if fn == "token_stats":
            lx.token_stats(x, np.zeros(bad, int))
        elif fn == "cross_entropy_backward":
            lx.cross_entropy_backward(x, np.zeros(bad, int), np.zeros(lead, np.float32), 1.0)
        else:
            getattr(lx, fn)(x, np.zeros(bad, int))
    names(e, "targets")


@given(st.sampled_from(["mask", "teacher_logits"]), shapes(), st.data())
def test_kl_wrong_shapes_name_the_argument(arg, shape, data):
    lead, V = shape
    s = np.zeros(lead + (V,), np.float32)
    kw = {"teacher_logits": np.zeros(lead + (V + 1,), np.float32)}
    if arg == "mask":
        kw = {"teacher_logits": s, "mask": np.ones(lead + (2,), bool)}
    with pytest.raises(ValueError) as e:
        lx.kl_divergence(s, **kw)
    names(e, arg)


@given(st.sampled_from(["prompt_lengths", "lengths"]), st.integers(-5, -1))
def test_answer_mask_negative_lengths(arg, v):
    kw = {"prompt_lengths": np.array([0, 1]), "lengths": np.array([2, 3])}
    kw[arg] = np.array([v, 1]) if arg == "prompt_lengths" else np.array([v, 3])
    with pytest.raises(ValueError) as e:
        lx.answer_mask(kw["prompt_lengths"], kw["lengths"], 4)
    names(e, arg)


@given(st.sampled_from([-0.5, 1.5, math.nan, math.inf]))
def test_calibration_bad_confidence(v):
    with pytest.raises(ValueError) as e:
        lx.calibration(np.array([0.5, v]), np.array([True, False]))
    names(e, "confidence")


@given(st.sampled_from(["n_tokens", "nll_sum"]), st.sampled_from([-1.0, math.nan]))
def test_perplexity_bad_counts(arg, v):
    nll, cnt = np.array([1.0, 2.0]), np.array([1.0, 2.0])
    if arg == "n_tokens":
        cnt[1] = v
    else:
        assume(not math.isnan(v))  # NaN in nll_sum propagates by design
        nll[1] = v
    with pytest.raises(ValueError) as e:
        lx.perplexity(nll, cnt)
    names(e, arg)


@given(st.integers(-2**62, -1))
def test_output_cache_negative_limit(limit):
    with pytest.raises(ValueError) as e:
        lx.set_output_cache(limit)
    names(e, "limit")


@given(st.sampled_from(["", "avx", "AVX2", "avx512 ", "sse4", "neon", "é"]))
def test_unknown_isa_is_refused(name):
    with pytest.raises(ValueError) as e:
        lx.set_cpu_isa(name)
    names(e, "isa")
    assert lx.cpu_info()["isa"] in ISAS


@pytest.mark.parametrize("name", [ISAS[-1] + "\x00", ISAS[-1] + "\x00junk"])
def test_isa_name_with_a_nul_is_refused(name):
    with pytest.raises(ValueError) as e:
        lx.set_cpu_isa(name)
    names(e, "isa")


# ----------------------------------------------------- contracts of issue 15

HUGE = [1e39, 1e100, 1e300]
TINY = [1e-39, 1e-46, 1e-100, 1e-300]


def finite_rows(data, dt):
    lead, V = data.draw(shapes(max_lead=1))
    assume(V >= 2)
    x, x64, dt = data.draw(logits(lead, V, dtype=dt, specials=False, scale=3.0))
    # a unique maximum per row, so that the one-hot limit is defined
    top = np.sort(x64, axis=-1)
    assume((top[..., -1] > top[..., -2]).all())
    return x, x64, dt


@given(st.sampled_from(HUGE + TINY), st.sampled_from([np.float32, F16]), st.data())
def test_softmax_temperature_limits(T, dt, data):
    """Huge temperature: the uniform distribution; tiny: the one-hot argmax. Never NaN."""
    x, x64, dt = finite_rows(data, dt)
    V = x.shape[-1]
    p = lx.softmax(x, temperature=T).astype(np.float64)
    lp = lx.log_softmax(x, temperature=T).astype(np.float64)
    lse = lx.logsumexp(x, temperature=T)
    assert not (np.isnan(p).any() or np.isnan(lp).any() or np.isnan(lse).any())
    if T > 1:
        np.testing.assert_allclose(p, 1.0 / V, rtol=1e-3)
        np.testing.assert_allclose(lp, -math.log(V), rtol=1e-3)
    else:
        onehot = (x64 == x64.max(-1, keepdims=True)).astype(np.float64)
        np.testing.assert_array_equal(p, onehot)


@given(st.sampled_from(["logit_scale_tiny", "softcap_huge", "z_loss_huge"]),
       st.sampled_from(CE_FNS[1:2]), st.data())
def test_cross_entropy_option_limits(which, fn, data):
    """No NaN for finite logits and any finite valid option, and the answer: a tiny
    logit_scale gives uniform logits, a huge softcap is no cap, a huge z_loss a loss
    that is inf where it passes the float32 range."""
    x, x64, dt = finite_rows(data, np.float32)
    t = np.zeros(x.shape[:-1], np.int64)
    opts = {"logit_scale_tiny": dict(logit_scale=data.draw(st.sampled_from(TINY))),
            "softcap_huge": dict(softcap=data.draw(st.sampled_from(HUGE))),
            "z_loss_huge": dict(z_loss=data.draw(st.sampled_from(HUGE)))}[which]
    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", **opts)
    assert not np.isnan(loss).any() and not np.isnan(g).any()
    r_loss, r_g = R.cross_entropy_with_grad(x64, t, reduction="none", **opts)
    with np.errstate(over="ignore"):  # a z-loss past the float32 range is inf
        assert_loss_close(loss, r_loss.astype(np.float32), dt)
    if which != "z_loss_huge":
        assert_grad_close(g, r_g, dt, gscale=2.0)


@given(st.sampled_from(["weight", "probs", "internal"]), st.data())
def test_out_overlapping_an_input_is_refused_or_correct(kind, data):
    lead, V = data.draw(shapes(max_lead=1))
    n = max(1, math.prod(lead))
    assume(n >= 2)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.normal(size=(n, V)).astype(np.float32)
    buf = np.empty((n, V), np.float32)
    if kind == "weight":
        buf[0] = rng.uniform(0.5, 2.0, V)
        t, kw = rng.integers(0, V, n), {"weight": buf[0]}
    elif kind == "probs":
        buf[:] = rng.dirichlet(np.ones(V), n)
        t, kw = buf, {}
    else:  # every row of out is the same memory
        out = np.lib.stride_tricks.as_strided(buf, (n, V), (0, 4), writeable=True)
        with pytest.raises(ValueError) as e:
            lx.softmax(x, out=out)
        names(e, "out")
        with pytest.raises(ValueError) as e:
            lx.cross_entropy_with_grad(x, rng.integers(0, V, n), out=out)
        names(e, "out")
        return
    want = R.cross_entropy_with_grad(x.astype(np.float64), np.array(t, copy=True),
                                     **{k: np.array(v, copy=True) for k, v in kw.items()})
    try:
        loss, g = lx.cross_entropy_with_grad(x, t, out=buf, **kw)
    except ValueError as e:
        assert "out" in str(e)
        return
    assert_loss_close(loss, want[0], np.float32)
    assert_grad_close(g, want[1], np.float32, gscale=2.0 / n)


@pytest.mark.skipif(len(ISAS) < 2, reason="one instruction set on this processor")
@given(st.floats(89.0, 1000.0), st.data())
def test_backward_with_low_lse_is_the_same_on_every_isa(d, data):
    lead, V = data.draw(shapes(max_lead=1))
    x, x64, dt = data.draw(logits(lead, V, dtype=np.float32, specials=False))
    t = np.zeros(lead, np.int64)
    lse = (R.logsumexp(x64) - d).astype(np.float32)
    results = []
    for isa in ISAS:
        with cpu_isa(isa):
            results.append(lx.cross_entropy_backward(x, t, lse, 1.0, reduction="sum"))
    # the same answer: inf where exp overflows, finite values equal up to rounding
    # (the ISAs differ in FMA contraction), never garbage
    for isa, r in zip(ISAS[1:], results[1:]):
        np.testing.assert_array_equal(np.isinf(r), np.isinf(results[0]), err_msg=isa)
        np.testing.assert_allclose(r, results[0], rtol=1e-6, err_msg=f"{isa} vs {ISAS[0]}")


@given(st.sampled_from([("threads", 1.7), ("threads", "3"), ("threads", 2**31),
                        ("threads", 2**70), ("threads", True), ("isa", None), ("isa", 3)]))
def test_settings_refuse_bad_values_by_name(case):
    what, value = case
    fn, arg = (lx.set_num_threads, "n") if what == "threads" else (lx.set_cpu_isa, "name")
    before, threads = lx.cpu_info(), lx.get_num_threads()
    with pytest.raises((TypeError, ValueError)) as e:
        fn(value)
    names(e, arg)
    assert "incompatible function arguments" not in str(e.value)
    assert lx.cpu_info() == before and lx.get_num_threads() == threads


def test_check_cuda_errors_without_cupy_has_nothing_to_check():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed")
    except ImportError:
        pass
    assert lx.check_cuda_errors() is None  # no CUDA call can have run


@given(st.sampled_from([("temperature", "1.0"), ("axis", True), ("z_loss", "0"),
                        ("logit_scale", b"1"), ("ignore_index", False)]))
def test_options_refuse_strings_and_bools(case):
    option, value = case
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(TypeError) as e:
        if option in ("temperature", "axis"):
            lx.softmax(x, **{option: value})
        else:
            lx.cross_entropy(x, np.zeros(2, int), **{option: value})
    names(e, option)


@given(st.sampled_from([np.float32(0.5), np.float64(2.0), np.array(1.5), 3, np.int32(2)]),
       st.sampled_from([np.int64(-1), np.array(-1), -1, np.int8(0)]))
def test_numpy_scalars_and_0d_arrays_are_accepted_as_options(t, axis):
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    got = lx.softmax(x, temperature=t, axis=axis)
    assert_matches_reference("softmax", got, x.astype(np.float64), np.dtype(np.float32),
                             temperature=float(t), axis=int(axis))
