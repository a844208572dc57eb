"""lmxent.token_stats against lmxent.reference (float64) and torch: every field,
every dtype and instruction set, awkward vocabulary sizes, ties, temperature,
ignored targets, -inf / +inf / NaN rows, rows split across threads, errors."""
import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as R

from helpers import DTYPE_IDS, DTYPES, F64, assert_loss_close, lowp, num_threads, torch

FLOATS = ("logprob", "lse", "entropy", "top_prob")


def check(x, t, **kw):
    """token_stats(x, t) against the reference on the same (rounded) values."""
    got = lx.token_stats(x, t, **kw)
    ref = R.token_stats(np.asarray(x, np.float64) if x.dtype != F64 else x, t, **kw)
    ct = np.float64 if x.dtype == F64 else np.float32
    for name in FLOATS:
        a = getattr(got, name)
        assert a.dtype == ct and a.shape == np.shape(t), name
        scale = None if name != "top_prob" else 1.0
        assert_loss_close(a, getattr(ref, name), x.dtype, scale=scale, what=name)
    assert got.rank.dtype == np.int64 and got.correct.dtype == np.bool_
    np.testing.assert_array_equal(got.rank, ref.rank)
    np.testing.assert_array_equal(got.correct, ref.correct)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("V", [1, 2, 7, 33, 2048, 2049, 5000, 70001])
def test_matches_reference(rng, isa, dtype, V):
    n = 9
    x, _ = lowp(rng.standard_normal((n, V)) * 4, dtype)
    t = rng.integers(0, V, n)
    t[2] = -100
    t[4] = V - 1
    st = check(x, t)
    assert st.logprob[2] == 0 and st.rank[2] == -1 and not st.correct[2]


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
def test_temperature_and_batch_shape(rng, temperature):
    x = rng.standard_normal((2, 3, 500)).astype(np.float32) * 3
    t = rng.integers(0, 500, (2, 3))
    check(x, t, temperature=temperature)


def test_rank_is_stable_sort_position_and_matches_argmax(rng, isa):
    # integer logits: many ties; rank 0 <=> numpy argmax (first index) == target
    x = rng.integers(-3, 4, (200, 3000)).astype(np.float32)
    t = rng.integers(0, 3000, 200)
    t[:20] = np.argmax(x[:20], axis=1)  # some correct
    st = check(x, t)
    np.testing.assert_array_equal(st.correct, np.argmax(x, axis=1) == t)
    order = np.argsort(-x, axis=1, kind="stable")
    np.testing.assert_array_equal(st.rank, np.argmax(order == t[:, None], axis=1))


def test_special_values(isa):
    V = 4100
    x = np.zeros((6, V), np.float32)
    x[0, :V // 2] = -np.inf         # half the classes impossible
    x[1, 7] = np.nan                # NaN row
    x[2, :] = -np.inf               # no finite logit: undefined softmax
    x[3, 5] = np.inf                # +inf: undefined softmax
    x[4, 3] = 50.0                  # one-hot: entropy 0
    x[5, ::2] = -np.inf
    t = np.array([1, 3, 3, 5, 3, 2])
    st = check(x, t)
    assert st.logprob[0] == -np.inf and st.rank[0] > 0
    assert st.rank[1] == -1 and not st.correct[1] and np.isnan(st.entropy[1])
    assert np.isnan(st.entropy[2]) and np.isnan(st.entropy[3])
    assert abs(st.entropy[4]) < 1e-15 + 1e-6 and st.correct[4]
    np.testing.assert_allclose(st.entropy[0], np.log(V - V // 2), rtol=1e-6)


def test_split_rows_across_threads(rng):
    # one long row is split across threads; the merged partial sums must agree
    V = (1 << 18) + 77
    x = (rng.standard_normal((1, V)) * 3).astype(np.float32)
    x[0, 100_000] = 20.0
    t = np.array([200_000])
    with num_threads(2):
        a = check(x, t)
    with num_threads(1):
        b = lx.token_stats(x, t)
    for name in FLOATS:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6)
    assert a.rank[0] == b.rank[0]


@pytest.mark.skipif(torch is None, reason="torch is not installed")
def test_against_torch(rng):
    x = (rng.standard_normal((64, 1000)) * 3).astype(np.float32)
    t = rng.integers(0, 1000, 64)
    st = lx.token_stats(x, t, temperature=0.5)
    z = torch.from_numpy(x).double() / 0.5
    lp = torch.log_softmax(z, -1)
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(st.logprob, lp.gather(1, tt[:, None])[:, 0].numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(st.entropy, -(lp.exp() * lp).sum(-1).numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(st.top_prob, lp.exp().max(-1).values.numpy(), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(st.correct, (z.argmax(-1) == tt).numpy())
    np.testing.assert_array_equal(st.rank, (z > z.gather(1, tt[:, None])).sum(-1).numpy())


def test_non_contiguous_and_all_ignored(rng):
    x = rng.standard_normal((5, 300))[:, ::1].astype(np.float32)
    wide = np.zeros((5, 400), np.float32)
    wide[:, :300] = x
    t = np.full(5, -100)
    st = check(wide[:, :300], t)
    assert (st.rank == -1).all() and (st.logprob == 0).all()
    check(np.zeros((0, 10), np.float32), np.zeros(0, np.int64))


@pytest.mark.parametrize("args, exc, msg", [
    (dict(targets=np.zeros(4, np.int64)), ValueError, "targets: class ids must have shape (3,)"),
    (dict(targets=np.zeros(3)), TypeError, "targets: expected integer class ids"),
    (dict(targets=np.array([0, 10, 1])), ValueError, "value 10 at position (1,) is out of range [0, 10)"),
    (dict(targets=np.array([0, -1, 1])), ValueError, "value -1 at position (1,)"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite positive number"),
    (dict(temperature=None), TypeError, "temperature must be a real number"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    (dict(ignore_index=2**64), ValueError, "ignore_index must fit in int64"),
    (dict(logits=np.zeros((3, 0), np.float32)), ValueError, "the vocabulary axis is empty"),
    (dict(logits=np.float32(1.0)), ValueError, "expected at least 1 dimension"),
    (dict(logits=np.zeros((3, 10), np.complex64)), TypeError, "logits: unsupported dtype"),
])
def test_errors(args, exc, msg):
    kw = dict(logits=np.zeros((3, 10), np.float32), targets=np.array([0, 1, 2]))
    kw.update(args)
    logits, targets = kw.pop("logits"), kw.pop("targets")
    with pytest.raises(exc) as e:
        lx.token_stats(logits, targets, **kw)
    assert msg in str(e.value)
