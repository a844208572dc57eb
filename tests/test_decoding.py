"""Tests of the decoding kernels (lmxent.process_logits, sample, top_k, beam_search_step,
beam_search) against the float64 reference (lmxent.reference): every semantic test of
tests/test_decoding_reference.py run again on lmxent's functions, then the kernels'
own cases: every dtype and instruction set, every option and their combination,
per-row parameters, long rows (the candidate search and its fallbacks), row strides,
batch composition, and tokens equal to the reference's except where a uniform lies
within rounding of a cumulative-weight boundary (counted: none on these data)."""
import types

import numpy as np
import pytest
import test_decoding_reference as semantics

import lmxent as lx
from lmxent import reference as R

from helpers import BF16, DTYPES, dtype_id

# ------------------------------------------------- the reference's tests, on lmxent

LX = types.SimpleNamespace(process_logits=lx.process_logits, sample=lx.sample, top_k=lx.top_k,
                           beam_search_step=lx.beam_search_step, beam_search=lx.beam_search,
                           log_softmax=R.log_softmax, softmax=R.softmax)
# not the generator's tests, nor the one asking float64 log-probabilities (lmxent's are
# float32: assert_samples below compares them)
SEMANTIC = [name for name in dir(semantics) if name.startswith("test_")
            and "philox" not in name and "uniform" not in name and "docs" not in name
            and name != "test_sample_logprobs_raw_and_processed"]
for _name in SEMANTIC:
    globals()[_name + "_on_lmxent"] = getattr(semantics, _name)


@pytest.fixture(autouse=True)
def _semantic_tests_call_lmxent(request, monkeypatch):
    if request.node.originalname.endswith("_on_lmxent"):
        monkeypatch.setattr(semantics, "ref", LX)


# ---------------------------------------------------------------- comparisons

def near_boundary(y, u, t1, t2):
    """Whether u * total lies within float64 rounding of a cumulative weight between
    tokens t1 and t2 of the processed row y (where the two draws may differ)."""
    w = np.exp(y - np.max(y))
    cum = np.cumsum(w)
    lo, hi = sorted((t1, t2))
    return np.min(np.abs(cum[lo:hi + 1] - u * cum[-1])) <= 1e-12 * cum[-1]


def assert_processed(got, x, dtype, **opts):
    want64 = R.process_logits(x.astype(np.float64), **opts)
    assert got.dtype == x.dtype and got.shape == x.shape
    g = got.astype(np.float64)
    # float64 math rounded to the dtype (bfloat16/float16 via float32, as the kernels
    # do); a kept value beyond the dtype's range is -inf there too
    with np.errstate(over="ignore"):
        want = want64.astype(np.float32 if np.dtype(dtype).itemsize == 2 else dtype)
        want = want.astype(dtype).astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(want))
    assert np.array_equal(np.isneginf(g), np.isneginf(want)), "different tokens removed"
    fin = np.isfinite(want)
    np.testing.assert_allclose(g[fin], want[fin],
                               rtol=2 * np.finfo(np.float32).eps if dtype != np.float64 else 0)


def assert_samples(got, x, seed=0, offset=0, **opts):
    want = R.sample(x.astype(np.float64), seed=seed, offset=offset, **opts)
    differ = np.flatnonzero(got.tokens.ravel() != want.tokens.ravel())
    if differ.size:  # only at a rounding boundary of the inverse CDF
        y = R.process_logits(x.astype(np.float64), **{k: v for k, v in opts.items()
                                                        if k not in ("num_logprobs",
                                                                     "logprobs_of")})
        y = y.reshape(-1, x.shape[-1])
        u = lx._philox.uniform(*lx.decoding._row_offsets(seed, offset, x.shape[:-1]))
        for r in differ:
            assert near_boundary(y[r], u.ravel()[r], got.tokens.ravel()[r],
                                 want.tokens.ravel()[r]), f"row {r}"
        return differ.size
    assert got.tokens.dtype == np.int64 and got.logprob.dtype == np.float32
    np.testing.assert_array_equal(got.rank, want.rank)
    np.testing.assert_array_equal(got.top_ids, want.top_ids)
    for a, b in ((got.logprob, want.logprob), (got.top_logprobs, want.top_logprobs)):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-6, atol=1e-6)
    return 0


OPTION_SETS = {
    "off": {},
    "temperature": dict(temperature=0.7),
    "greedy": dict(temperature=0.0),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.05),
    "bias sparse": dict(logit_bias={0: -np.inf, 3: 2.5}),
    "penalties": dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
    "all": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.02, logit_bias={1: 1.0},
                repetition_penalty=1.2, presence_penalty=0.1, frequency_penalty=0.2),
}


def history(rng, lead, V, L=12):
    t = rng.integers(-1, V, size=lead + (L,))
    return t


def options(name, rng, lead, V):
    o = dict(OPTION_SETS[name])
    if "repetition_penalty" in o:
        o["prev_tokens"] = history(rng, lead, V)
    return o


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("opts", list(OPTION_SETS))
def test_matches_reference(isa, dtype, opts, rng):
    x = (3 * rng.standard_normal((2, 3, 301))).astype(dtype)
    o = options(opts, rng, x.shape[:-1], x.shape[-1])
    assert_processed(lx.process_logits(x, **o), x, dtype, **o)
    for of in ("raw", "processed"):
        assert assert_samples(lx.sample(x, seed=5, num_logprobs=4, logprobs_of=of, **o), x,
                              seed=5, num_logprobs=4, logprobs_of=of, **o) == 0


def test_per_row_parameters_and_dense_bias(isa, rng):
    lead, V = (6,), 200
    x = 2 * rng.standard_normal(lead + (V,))
    o = dict(temperature=np.array([0.0, 0.5, 1.0, 2.0, 1.0, 0.9]),
             top_k=np.array([0, 1, 3, 0, 250, 7]),
             top_p=np.array([1.0, 0.5, 0.95, 0.3, 1.0, 0.7]),
             min_p=np.array([0.0, 0.0, 0.1, 0.0, 0.5, 0.01]),
             repetition_penalty=np.array([1.0, 1.5, 1.0, 0.8, 1.0, 2.0]),
             presence_penalty=np.linspace(-1, 1, 6), frequency_penalty=np.linspace(0, 1, 6),
             prev_tokens=history(rng, lead, V), logit_bias=rng.standard_normal(lead + (V,)))
    assert_processed(lx.process_logits(x, **o), x, np.float64, **o)
    seeds = np.arange(6, dtype=np.uint64) * 977
    assert assert_samples(lx.sample(x, seed=seeds, offset=np.arange(6) + 3, num_logprobs=3,
                                    **o), x, seed=seeds, offset=np.arange(6) + 3,
                          num_logprobs=3, **o) == 0


@pytest.mark.parametrize("dtype", [np.float32, BF16] if BF16 is not None else [np.float32],
                         ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(top_k=50), dict(top_k=3000), dict(top_k=128000),
                                  dict(top_p=0.9), dict(top_p=0.999), dict(min_p=0.3),
                                  dict(temperature=0.7, top_k=50, top_p=0.9)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_long_rows(dtype, opts, rng):
    """V = 128256: the sampled top-k threshold, its fallback (k near V), the top-p
    candidate window widening (a flat row)."""
    x = (2 * rng.standard_normal((3, 128256))).astype(dtype)
    x[2] = 0.0  # flat: every token ties
    assert_processed(lx.process_logits(x, **opts), x, dtype, **opts)
    assert assert_samples(lx.sample(x, seed=1, num_logprobs=5, **opts), x, seed=1,
                          num_logprobs=5, **opts) == 0


def fast_path_rows(rng, dtype, V=5000, k=50):
    """Rows for the CPU kernel's fast path (16/32-bit logits; top-k, top-p, min-p,
    greedy, with penalties and a sparse bias as exceptions) and each of its ways
    back to the general path."""
    x = 3 * rng.standard_normal((10, V))
    samples = np.arange(1024) * V // 1024  # the entries its threshold is read from
    x[1] += 1e4  # large logits: log-probabilities relative to the max, not to the LSE
    x[2, 1] = np.nan  # NaN, +inf off the sample: found by the pass
    x[3, 1] = np.inf
    x[4, samples[:2 * k * 1024 // V + 8]] = 40 + np.arange(2 * k * 1024 // V + 8)
    x[5, :] = -np.inf  # a threshold of -inf
    x[5, rng.choice(V, 60, replace=False)] = rng.standard_normal(60)
    x[6] = 1.0  # every entry ties (top-p, min-p: too many candidates)
    x[7] *= 10  # most terms below the threshold underflow
    x[8] = np.sort(x[8])  # ascending: every candidate in the last part of the row
    x[9] = -20.0  # top-p's mass: over 4% of it 9 below the max (a wider level)
    x[9, rng.choice(V, 301, replace=False)] = [10.0] + [1.0] * 300
    return x.astype(dtype)


def fast_path_history(x, rng, L=64):
    """prev_tokens hitting each row's largest entries (the max among them: the
    processed max is then another entry), repeats and padding."""
    order = np.argsort(-x.astype(np.float64), axis=-1, kind="stable")
    t = np.concatenate([order[:, :8], order[:, :3], rng.integers(0, x.shape[-1],
                                                                 (x.shape[0], L - 11))], -1)
    t[:, -5:] = -1
    return rng.permuted(t, axis=-1)


FAST_PATH_OPTIONS = [
    dict(top_k=50), dict(top_k=50, temperature=0.7, top_p=0.9, min_p=0.01), dict(top_k=3),
    dict(top_k=50, temperature=1e-30), dict(top_k=50, temperature=1e30),
    dict(top_k=4999, top_p=0.5),
    # top-p / min-p without top-k: the candidates by mass, their widening, fallbacks
    dict(top_p=0.9), dict(temperature=0.7, top_p=0.9, min_p=0.01), dict(top_p=0.999),
    dict(temperature=2.0, top_p=0.5), dict(min_p=0.05), dict(min_p=1e-30),
    dict(top_p=0.9, temperature=1e-30),
    # greedy
    dict(temperature=0.0), dict(temperature=0.0, top_k=5, top_p=0.5),
    # exceptions: penalties, a sparse bias (a ban, a push from far below), both
    dict(top_k=50, repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.1),
    dict(top_p=0.9, temperature=0.7, repetition_penalty=1.5),
    dict(min_p=0.1, repetition_penalty=0.8, frequency_penalty=0.5),
    dict(temperature=0.0, repetition_penalty=1.3),
    dict(top_k=20, logit_bias="ban+push"), dict(top_p=0.8, logit_bias="ban+push"),
    dict(temperature=0.0, logit_bias="ban+push"),
    dict(top_k=50, top_p=0.9, logit_bias="ban+push", repetition_penalty=1.2,
         presence_penalty=0.5),
    # the general path: a per-row bias, a (V,) bias with too many nonzero entries
    dict(top_k=50, logit_bias="rows"), dict(top_p=0.9, logit_bias="dense"),
]


def fast_path_options(o, x, rng):
    o = dict(o)
    V = x.shape[-1]
    if "repetition_penalty" in o:
        o["prev_tokens"] = fast_path_history(x, rng)
    bias = o.get("logit_bias")
    if bias == "ban+push":  # ban row 0's max, push a low entry above every row's max
        o["logit_bias"] = {int(np.argmax(x[0].astype(np.float64))): -np.inf,
                           int(np.argmin(x[0].astype(np.float64))): 60.0, 17: 0.5}
    elif bias in ("rows", "dense"):  # multiples of 1/16: x + bias is exact in float32
        o["logit_bias"] = rng.integers(-16, 16, (x.shape[0], V) if bias == "rows" else V) / 16
    return o


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != np.float64], ids=dtype_id)
@pytest.mark.parametrize("opts", FAST_PATH_OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_and_its_fallbacks(isa, dtype, opts, rng):
    x = fast_path_rows(rng, dtype)
    o = fast_path_options(opts, x, rng)
    if not 0 < o.get("temperature", 1) < 1e-3:  # else values beyond float16's range
        assert_processed(lx.process_logits(x, **o), x, dtype, **o)
    for n, of in ((5, "raw"), (20, "raw"), (5, "processed")):
        assert assert_samples(lx.sample(x, seed=2, num_logprobs=n, logprobs_of=of, **o),
                              x, seed=2, num_logprobs=n, logprobs_of=of, **o) == 0


@pytest.mark.parametrize("V", [1, 2, 7, 2048])
def test_extreme_rows(isa, V, rng):
    """NaN, +inf, all -inf, all masked but one, ties, huge values; k >= V, top_p = 1."""
    x = rng.standard_normal((8, V))
    x[0, 0] = np.nan
    x[1, -1] = np.inf
    x[2] = -np.inf
    x[3] = -np.inf
    x[3, V // 2] = 1.0
    x[4] = 1.0
    x[5] = 1e300
    x[6, :] = -1e300
    for o in ({}, dict(top_k=V + 3, top_p=1.0), dict(top_k=1, top_p=0.5, min_p=0.9),
              dict(temperature=0.0), dict(temperature=1e-300)):
        assert_processed(lx.process_logits(x, **o), x, np.float64, **o)
        assert assert_samples(lx.sample(x, num_logprobs=3, **o), x, num_logprobs=3, **o) == 0


def test_strided_rows_and_out(rng):
    big = rng.standard_normal((5, 4, 300)).astype(np.float32)
    x = big[:, 1, :250]  # row stride 1200 elements
    o = dict(top_k=20, top_p=0.9, temperature=0.8)
    assert_processed(lx.process_logits(x, **o), x, np.float32, **o)
    assert assert_samples(lx.sample(x, seed=3, **o), x, seed=3, **o) == 0
    out = np.empty_like(x)
    assert lx.process_logits(x, out=out, **o) is out
    np.testing.assert_array_equal(out, lx.process_logits(x, **o))
    y = x.copy()
    lx.process_logits(y, out=y, **o)  # in place
    np.testing.assert_array_equal(y, out)


def test_batch_composition_and_repeat(rng):
    x = rng.standard_normal((32, 1000)).astype(np.float32)
    o = dict(temperature=1.3, top_p=0.95, seed=11)
    full = lx.sample(x, **o).tokens
    np.testing.assert_array_equal(lx.sample(x[8:16], offset=8, **o).tokens, full[8:16])
    np.testing.assert_array_equal(lx.sample(x, **o).tokens, full)
    assert len(set(full.tolist())) > 20  # not one token for every row


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_top_k(isa, dtype, rng):
    x = rng.standard_normal((3, 4, 5000)).astype(dtype)
    x[0, 0, 7] = np.nan
    x[1, :, :100] = 3.0  # ties: lower index first
    for k, axis in ((0, -1), (1, -1), (17, -1), (5000, -1), (3, 1), (2, 0)):
        v, i = lx.top_k(x, k, axis=axis)
        rv, ri = R.top_k(x.astype(np.float64), k, axis=axis)
        assert v.dtype == x.dtype and i.dtype == np.int64
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_array_equal(v.astype(np.float64), rv)


def test_top_k_like_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((16, 3000)).astype(np.float32)
    v, i = lx.top_k(x, 40)
    tv, ti = torch.topk(torch.from_numpy(x), 40)
    np.testing.assert_array_equal(v, tv.numpy())
    np.testing.assert_array_equal(i, ti.numpy())


def test_beam_search_matches_reference(rng):
    V, W = 50, 3
    table = rng.standard_normal((V, V)) * 2

    def step_fn(tokens):
        return table[tokens[:, -1]]

    for lp in (0.0, 1.0):
        got = lx.beam_search(step_fn, np.array([[1], [7]]), beam_width=W, max_len=6,
                             eos_id=0, length_penalty=lp)
        want = R.beam_search(step_fn, np.array([[1], [7]]), beam_width=W, max_len=6,
                             eos_id=0, length_penalty=lp)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(temperature=np.nan),
                                                            "temperature"),
    (dict(logit_bias={99: 1.0}), "logit_bias"), (dict(prev_tokens=np.zeros((3, 2), int)),
                                                 "prev_tokens"),
    (dict(repetition_penalty=1.1), "prev_tokens"), (dict(seed=-1), "seed"),
    (dict(num_logprobs=-1), "num_logprobs"), (dict(logprobs_of="x"), "logprobs_of"),
])
def test_bad_input_names_the_argument(bad, match):
    x = np.zeros((2, 10), np.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        lx.sample(x, **bad)
    if "seed" not in bad and "num_logprobs" not in bad and "logprobs_of" not in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            lx.process_logits(x, **bad)
    with pytest.raises(ValueError, match="k must"):
        lx.top_k(x, 11)
