"""Edges of the kernels' numerics (issue 15): every scratch section aligned
(odd row lengths; the sanitizer build in CI turns a misaligned access into a
failure), the exp of a saved LSE far below the row's max (the same answer on
every instruction set), and options outside float32's range."""
import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as R

from helpers import DTYPE_IDS, DTYPES, F64, assert_grad_close, assert_nan_inf_equal, loss_dtype, lowp

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


# ----------------------------------------------- options outside float32's range
# A temperature of 1e300 gives the uniform distribution, a tiny one the one-hot
# argmax (ties sharing equally), a huge logit_scale its limit, a huge softcap no
# cap: the options are doubles, and converting them to float32 gave 0 or inf and
# then NaN. Results: the reference's (float64, exact for any scale), rounded to the
# output dtype; never a NaN.

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

TEMPERATURES = [1e300, 1e39, 1e-30, 1e-38, 3e-39, 1e-40, 1e-45, 1e-100, 1e-300]


def edge_rows(rng, dtype, V=11):
    """Rows with ties at the max, a -inf entry, a large spread, and plain ones."""
    x = rng.standard_normal((5, V)) * 3
    x[0, [2, 7]] = x[0].max() + 1.0  # two maxima: they share
    x[1, 4] = -np.inf
    x[2] *= 1e3  # (float16 holds it)
    x[3, :] = 0.5  # all equal: uniform at any temperature
    return lowp(x, dtype)


def assert_edge_close(got, want, dtype, what):
    """got (output dtype) against the float64 reference: NaN and inf where the rounded
    reference has them, else within a few float32 (or float64) ulps of the magnitude."""
    got = np.asarray(got)
    with np.errstate(over="ignore"):
        rounded = np.asarray(want, np.float64).astype(got.dtype).astype(np.float64)
    assert not np.isnan(got.astype(np.float64)).any() or np.isnan(rounded).any(), what
    assert_nan_inf_equal(got, rounded, what)
    fin = np.isfinite(rounded)
    eps = 2.0**-52 if np.dtype(dtype) == F64 else 2.0**-23
    if np.dtype(got.dtype) not in (np.dtype(np.float32), F64):
        eps = 2.0**-8  # one rounding to 16 bits
    scale = max(1.0, float(np.max(np.abs(rounded[fin]), initial=0.0)))
    # the exp of an argument a costs ~1.5 |a| ulps: float64 tiny terms (a of a few
    # hundred) times a huge z_loss factor
    rtol = 2e-12 if eps == 2.0**-52 else 16 * eps
    np.testing.assert_allclose(got.astype(np.float64)[fin], np.asarray(want)[fin],
                               rtol=rtol, atol=16 * eps * scale, err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_softmax_family_any_temperature(isa, rng, dtype, T):
    x, x64 = edge_rows(rng, dtype)
    for fn in ("softmax", "log_softmax", "logsumexp"):
        got = getattr(lx, fn)(x, temperature=T)
        want = getattr(R, fn)(x64, temperature=T)
        assert not np.isnan(np.asarray(got, np.float64)).any(), (fn, T)
        assert_edge_close(got, want, dtype, f"{fn} T={T}")
    # the limits themselves
    p = lx.softmax(x, temperature=T).astype(np.float64)
    if T >= 1e39:
        np.testing.assert_allclose(p[[0, 2, 3]], 1 / x.shape[1],
                                   rtol=1e-6 if x.itemsize >= 4 else 2.0**-8)
    if T <= 1e-45:
        np.testing.assert_array_equal(p[0], np.where(x64[0] == x64[0].max(), 0.5, 0.0))
        np.testing.assert_allclose(p[3], 1 / x.shape[1], rtol=1e-6 if x.itemsize >= 4 else 2.0**-8)


def test_temperature_limits_match_torch():
    """torch (float64, where it is exact) agrees: T = 1e300 is uniform."""
    if torch is None:
        pytest.skip("torch not installed")
    x = np.array([[1.0, 2.0], [-3.0, 5.0]], np.float32)
    for T in (1e300, 1e30):
        want = torch.softmax(torch.tensor(x, dtype=torch.float64) / T, -1).numpy()
        np.testing.assert_allclose(lx.softmax(x, temperature=T), want, rtol=1e-7)
        np.testing.assert_allclose(lx.log_softmax(x, temperature=T),
                                   torch.log_softmax(torch.tensor(x, dtype=torch.float64) / T,
                                                     -1).numpy(), rtol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T", TEMPERATURES)
def test_token_stats_any_temperature(isa, rng, dtype, T):
    x, x64 = edge_rows(rng, dtype)
    t = np.array([2, 4, 0, 5, 1])
    got, want = lx.token_stats(x, t, temperature=T), R.token_stats(x64, t, temperature=T)
    for name in ("logprob", "lse", "entropy", "top_prob"):
        g, w = getattr(got, name), getattr(want, name)
        assert not np.isnan(g).any(), (name, T)
        if name == "entropy":  # sum p log p: float32 error relative to log V
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.log(x.shape[1]),
                                       err_msg=name)
        else:
            assert_edge_close(g, w, loss_dtype(dtype), f"{name} T={T}")
    np.testing.assert_array_equal(got.rank, want.rank)


CE_OPTIONS = [dict(logit_scale=1e-46), dict(logit_scale=1e-300), dict(logit_scale=1e-40),
              dict(logit_scale=1e39), dict(logit_scale=1e300), dict(logit_scale=1e30),
              dict(softcap=1e300), dict(softcap=1e39), dict(softcap=1e-300), dict(softcap=1e-40),
              dict(z_loss=1e39), dict(label_smoothing=0.3, logit_scale=1e-300),
              dict(label_smoothing=0.3, logit_scale=1e20), dict(z_loss=1e300, logit_scale=1e-200),
              dict(softcap=1e39, logit_scale=1e30),
              dict(z_loss=1e-300, logit_scale=1e300), dict(z_loss=1e-290, logit_scale=1e300),
              # the spread loss t_sum * lse - kz * sum_j t_j u_j, formed relative to the max
              dict(label_smoothing=0.1, logit_scale=1e300), dict(label_smoothing=0.1, logit_scale=1e20),
              dict(label_smoothing=0.1, softcap=1e30, logit_scale=1e300)]


def _ce_ids(kw):
    return ",".join(f"{k}={v:g}" for k, v in kw.items())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kw", CE_OPTIONS, ids=_ce_ids)
def test_cross_entropy_any_option(isa, rng, dtype, kw):
    x, x64 = edge_rows(rng, dtype)
    x, x64 = x[[0, 2, 3, 4]], x64[[0, 2, 3, 4]]  # -inf entries: see the next test
    t = np.array([2, 0, 5, 1])
    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", **kw)
    with np.errstate(over="ignore", invalid="ignore"):
        rl, rg = R.cross_entropy_with_grad(x64, t, reduction="none", **kw)
    assert not np.isnan(loss).any() and not np.isnan(g.astype(np.float64)).any(), kw
    assert_edge_close(loss, rl, loss_dtype(dtype), f"loss {kw}")
    assert_edge_close(g, rg, dtype, f"grad {kw}")
    # the backward from the saved lse (rounded to its dtype, perhaps to inf): no NaN;
    # as the reference's from the same lse where that is well conditioned (exp(z - lse)
    # of huge z and lse is exact only to their rounding)
    _, lse = lx.cross_entropy(x, t, reduction="none", return_lse=True, **kw)
    gb = lx.cross_entropy_backward(x, t, lse, np.ones(4), reduction="none", **kw)
    assert not np.isnan(gb.astype(np.float64)).any(), kw
    if np.all(np.abs(lse) < 1e4):
        rb = R.cross_entropy_backward(x64, t, lse.astype(np.float64), np.ones(4),
                                      reduction="none", **kw)
        assert_edge_close(gb, rb, dtype, f"backward {kw}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [1e8, 1e20, 1e39, 1e300])
@pytest.mark.parametrize("cols", [7, 3000])  # one chunk; several, merged
def test_spread_loss_does_not_cancel(isa, rng, dtype, scale, cols):
    """Label smoothing and probability targets on rows whose scaled logits are huge:
    the loss sum_j t_j (lse - z_j) is formed relative to the row's max, not as the
    difference of two huge numbers. Equal logits: exactly log V times the target
    mass, at any scale."""
    x = np.full((2, cols), 0.75).astype(dtype)
    q = rng.random((2, cols))
    q /= q.sum(axis=1, keepdims=True)
    want = np.log(cols)
    lp = lx.cross_entropy(x, q, reduction="none", logit_scale=scale)
    ls = lx.cross_entropy(x, np.array([1, 4]), reduction="none", logit_scale=scale,
                          label_smoothing=0.1)
    rtol = 1e-12 if dtype == np.float64 else 1e-6 if dtype == np.float32 else 1e-2
    np.testing.assert_allclose(lp.astype(np.float64), want, rtol=rtol)
    np.testing.assert_allclose(ls.astype(np.float64), want, rtol=rtol)
    # one entry above the rest by a few ulps: the loss is scale * (gap), huge but exact
    y = np.full((1, cols), 1.0)
    y[0, 3] = 1.0 + 2.0**-20
    y = y.astype(dtype)
    got = lx.cross_entropy(y, q[:1], reduction="none", logit_scale=scale)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = R.cross_entropy(y.astype(np.float64), q[:1], reduction="none", logit_scale=scale)
    assert_edge_close(got, ref, loss_dtype(dtype), "one larger entry")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=str)
@pytest.mark.parametrize("scale", [1e-300, 1e300, 1e39])
def test_cross_entropy_masked_vocabulary_any_scale(isa, rng, dtype, scale):
    """-inf logits (a masked vocabulary) under extreme scales: probability 0,
    gradient 0 there, never (-inf - max) * 0."""
    x = rng.standard_normal((3, 9)).astype(dtype)
    x[:, 3] = -np.inf
    t = np.array([0, 1, 2])
    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", logit_scale=scale)
    rl, rg = R.cross_entropy_with_grad(x.astype(np.float64), t, reduction="none",
                                       logit_scale=scale)
    assert_edge_close(loss, rl, dtype, "loss")
    assert_edge_close(g, rg, dtype, "grad")
    assert (g[:, 3] == 0).all()
    p = lx.softmax(x, temperature=1 / scale)
    assert (p[:, 3] == 0).all() and not np.isnan(p).any()


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf, -np.inf])
def test_undefined_options_refused(bad):
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1])
    with pytest.raises(ValueError, match="temperature"):
        lx.softmax(x, temperature=bad)
    with pytest.raises(ValueError, match="logit_scale"):
        lx.cross_entropy(x, t, logit_scale=bad)
    with pytest.raises(ValueError, match="softcap"):
        lx.cross_entropy(x, t, softcap=bad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [1e300, 1e40, 2.0**70, 1e10, 1e-300])
def test_lm_head_any_scale(rng, dtype, scale):
    """The LM head with a logit_scale far beyond float32's range: the gradient of the
    scaled logits overflowed float32 and the products turned inf - inf into NaN.
    d_hidden, d_weight, d_bias (and the loss, the log-probabilities) are the float64
    reference rounded to their dtype: no NaN, +-inf only where it overflows, exact
    zeros where a row's one-hot softmax already hits its target."""
    h, h64 = lowp(rng.standard_normal((7, 3)), dtype)
    w, w64 = lowp(rng.standard_normal((5, 3)), dtype)
    b, b64 = lowp(rng.standard_normal(5), dtype)
    t = np.array([0, 1, 2, 3, 4, -100, 2])
    go = rng.standard_normal(7)
    for kw in (dict(), dict(reduction="none", grad_output=go)):
        loss, grads = lx.linear_cross_entropy(h, w, t, bias=b, logit_scale=scale, chunk_size=3,
                                              **kw)
        with np.errstate(over="ignore", invalid="ignore"):
            rl, rg = R.linear_cross_entropy(h64, w64, t, bias=b64, logit_scale=scale, **kw)
        assert_edge_close(loss, rl, loss_dtype(dtype), f"loss {kw}")
        for name, g, r in zip(("d_hidden", "d_weight", "d_bias"), grads, rg):
            assert not np.isnan(g.astype(np.float64)).any(), (name, kw)
            assert_edge_close(g, r, dtype, f"{name} {kw}")
    lp, lse = lx.linear_target_logprobs(h, w, t, bias=b, logit_scale=scale, chunk_size=3)
    rlp, rlse = R.linear_target_logprobs(h64, w64, t, bias=b64, logit_scale=scale)
    assert_edge_close(lp, rlp, loss_dtype(dtype), "logprob")
    assert_edge_close(lse, rlse, loss_dtype(dtype), "lse")
