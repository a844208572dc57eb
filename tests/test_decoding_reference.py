"""Tests of the decoding reference (lmxent.reference: process_logits, sample, top_k,
beam_search_step, beam_search) and of its generator (lmxent._philox): the theory
notebook's examples, the issue's semantics case by case, known-answer vectors, a
chi-square test of the sampler, and HF transformers' warpers where installed."""
import numpy as np
import pytest

from lmxent import _philox
from lmxent import reference as ref

MASK32 = 0xFFFFFFFF


def softmax(z):
    """The notebook's softmax (section 4), for its filters below."""
    z = np.asarray(z, dtype=float)
    e = np.exp(z - z.max())
    return e / e.sum()


# The notebook's filters (section 11), verbatim in behaviour: the oracle of the oracle.
def top_k_filter(probs, k):
    probs = np.asarray(probs, dtype=float)
    keep = np.argsort(probs)[-k:]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def top_p_filter(probs, p_cut):
    probs = np.asarray(probs, dtype=float)
    order = np.argsort(probs)[::-1]
    cumulative = np.cumsum(probs[order])
    keep_sorted = cumulative <= p_cut
    keep_sorted[0] = True
    if not keep_sorted.all():
        keep_sorted[np.argmax(cumulative > p_cut)] = True
    out = np.zeros_like(probs)
    keep = order[keep_sorted]
    out[keep] = probs[keep]
    return out / out.sum()


NOTEBOOK_LOGITS = np.array([4.0, 3.0, 2.2, 1.5, 0.5, -0.5])


# ------------------------------------------------------------------ the generator

# Random123's kat_vectors for philox4x32 with 10 rounds (counter, key -> output), as
# cut-and-pasted into DEShawResearch/fs123 core123/ut/ut_philox.cpp (test_kat_philox4x32).
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([MASK32] * 4, [MASK32] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
]


def test_philox_known_answers():
    for counter, key, expected in PHILOX_KAT:
        out = _philox.philox4x32_10(np.array(counter, np.uint32), np.array(key, np.uint32))
        assert out.dtype == np.uint32
        assert out.tolist() == expected
    # vectorised over rows: the same answers in one call
    c = np.array([k[0] for k in PHILOX_KAT], np.uint32)
    k = np.array([k[1] for k in PHILOX_KAT], np.uint32)
    assert _philox.philox4x32_10(c, k).tolist() == [k[2] for k in PHILOX_KAT]


def test_uniform_matches_aten_philox():
    # at::Philox4_32(seed, /*subsequence=*/0, offset): w0 = gen(), w1 = gen(), then
    # ((w1 << 32 | w0) >> 11) * 2**-53, computed by a C++ program against torch 2.13's
    # ATen/core/PhiloxRNGEngine.h (the same layout as cuRAND's curand_init(seed, 0, 4 * offset))
    seeds = np.array([0, 1, 2**64 - 1], np.uint64)
    offsets = np.array([0, 5, 2**40 + 3], np.uint64)
    expected = [0.88052019788861424, 0.29557739621034773, 0.24375139029628168]
    assert _philox.uniform(seeds, offsets).tolist() == expected


def test_uniform_is_53_bits_of_the_first_two_words():
    seed, offset = 0x123456789ABCDEF0, 0xFEDCBA9876543210
    key = np.array([seed & MASK32, seed >> 32], np.uint32)
    counter = np.array([offset & MASK32, offset >> 32, 0, 0], np.uint32)
    w = [int(v) for v in _philox.philox4x32_10(counter, key)]
    u = _philox.uniform(np.uint64(seed), np.uint64(offset))
    assert u == ((w[1] << 32 | w[0]) >> 11) / 2.0**53
    assert 0.0 <= u < 1.0


def test_uniforms_are_uniform():
    # 200 000 consecutive offsets in 100 equal bins: chi-square with 99 degrees of freedom
    stats = pytest.importorskip("scipy.stats")
    u = _philox.uniform(np.uint64(2024), np.arange(200_000, dtype=np.uint64))
    counts = np.bincount((u * 100).astype(int), minlength=100)
    chi2 = np.sum((counts - 2000.0) ** 2 / 2000.0)
    assert chi2 < stats.chi2.isf(1e-9, 99)


# ------------------------------------------------------------ the notebook's examples

def processed_probs(x, **opts):
    return softmax(ref.process_logits(x, **opts))


def test_notebook_top_k_and_top_p():
    probs = softmax(NOTEBOOK_LOGITS)
    np.testing.assert_allclose(processed_probs(NOTEBOOK_LOGITS, top_k=3),
                               top_k_filter(probs, 3), rtol=1e-14, atol=0)
    np.testing.assert_allclose(processed_probs(NOTEBOOK_LOGITS, top_p=0.82),
                               top_p_filter(probs, 0.82), rtol=1e-14, atol=0)
    # the notebook's printed numbers
    np.testing.assert_allclose(processed_probs(NOTEBOOK_LOGITS, top_k=3)[:3],
                               [0.652, 0.240, 0.108], atol=5e-4)
    np.testing.assert_allclose(processed_probs(NOTEBOOK_LOGITS, top_p=0.82)[:2],
                               [0.731, 0.269], atol=5e-4)


def test_top_p_agrees_with_the_notebook_on_random_rows(rng):
    for _ in range(200):
        x = rng.normal(scale=2.0, size=int(rng.integers(2, 40)))
        p = float(rng.uniform(0.05, 0.99))
        np.testing.assert_allclose(processed_probs(x, top_p=p), top_p_filter(softmax(x), p),
                                   rtol=1e-12, atol=1e-300)


def test_top_p_where_the_mass_equals_top_p_exactly():
    # The notebook keeps a token whose preceding mass is <= p_cut; the issue (and the
    # nucleus definition, and HF) keep it only when that mass is < top_p: the smallest
    # set with mass >= top_p. They differ only at exact equality.
    x = np.array([2.0, 1.0, 0.0])
    w = np.exp(x - x.max())
    p0 = (w / w.sum())[0]
    kept = np.isfinite(ref.process_logits(x, top_p=p0))
    assert kept.tolist() == [True, False, False]
    assert (top_p_filter(softmax(x), p0) > 0).tolist() == [True, True, False]


def test_notebook_logit_bias_ban():
    logits = np.array([2.0, 1.5, 1.2, 0.5])  # safe, maybe, banned, other
    bias = np.array([0.0, 0.0, -20.0, 0.0])
    after = softmax(logits + bias)
    for b in (bias, {2: -20.0}):
        np.testing.assert_allclose(processed_probs(logits, logit_bias=b), after, rtol=1e-14)
    rows = ref.softmax(ref.process_logits(np.tile(logits, (3, 1)), logit_bias=np.tile(bias, (3, 1))))
    np.testing.assert_allclose(rows, np.tile(after, (3, 1)), rtol=1e-14)
    assert after[2] < 1e-8
    banned = ref.process_logits(logits, logit_bias={2: -np.inf})
    assert banned[2] == -np.inf and np.isfinite(banned[[0, 1, 3]]).all()
    draws = ref.sample(np.tile(logits, (2000, 1)), logit_bias={2: -np.inf}, seed=7).tokens
    assert 2 not in draws and set(draws.tolist()) == {0, 1, 3}


# ----------------------------------------------------------------- process_logits

def test_order_bias_then_penalties_then_temperature():
    # bias first: 1 - 2 = -1 is negative, so the repetition penalty multiplies it
    y = ref.process_logits(np.array([1.0, 0.0]), logit_bias={0: -2.0}, repetition_penalty=2.0,
                           prev_tokens=np.array([0]), temperature=0.5)
    assert y.tolist() == [-4.0, 0.0]  # (-1 * 2) / 0.5
    # temperature before top-p: at T = 0.25 the head holds 0.9 of the mass on its own
    x = np.log(np.array([0.6, 0.3, 0.1]))
    assert np.isfinite(ref.process_logits(x, top_p=0.8)).tolist() == [True, True, False]
    assert np.isfinite(ref.process_logits(x, top_p=0.8, temperature=0.25)).tolist() == \
        [True, False, False]
    # top-k before top-p: top-p's mass is renormalised over the top-k survivors
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    assert np.isfinite(ref.process_logits(x, top_p=0.75)).tolist() == [True, True, True, False]
    assert np.isfinite(ref.process_logits(x, top_k=2, top_p=0.75)).tolist() == \
        [True, True, False, False]  # 0.4/0.7 = 0.57 < 0.75 keeps the second only


def test_penalties():
    x = np.array([2.0, -1.0, 0.5, 3.0, -2.0])
    prev = np.array([0, 1, 1, 2, -1, 1, -1])  # -1: padding
    y = ref.process_logits(x, repetition_penalty=2.0, prev_tokens=prev)
    assert y.tolist() == [1.0, -2.0, 0.25, 3.0, -2.0]  # each distinct id once
    y = ref.process_logits(x, presence_penalty=0.5, frequency_penalty=0.25, prev_tokens=prev)
    assert y.tolist() == [2.0 - 0.75, -1.0 - 0.5 - 0.75, 0.5 - 0.75, 3.0, -2.0]
    # negative penalties encourage; an empty history changes nothing
    y = ref.process_logits(x, presence_penalty=-1.0, prev_tokens=prev)
    assert y.tolist() == [3.0, 0.0, 1.5, 3.0, -2.0]
    assert ref.process_logits(x, repetition_penalty=1.5, presence_penalty=1.0,
                              prev_tokens=np.zeros(0, np.int64)).tolist() == x.tolist()


def test_temperature_zero_is_greedy_first_argmax():
    x = np.array([[1.0, 3.0, 0.5, 3.0], [1.0, 3.0, 0.5, 3.0]])
    y = ref.process_logits(x, temperature=np.array([0.0, 1.0]))
    assert y[0].tolist() == [-np.inf, 3.0, -np.inf, -np.inf]
    assert y[1].tolist() == x[1].tolist()
    s = ref.sample(np.tile(x[0], (50, 1)), temperature=0, logprobs_of="processed")
    assert (s.tokens == 1).all() and (s.logprob == 0).all()
    s = ref.sample(np.tile(x[0], (50, 1)), temperature=0)  # raw: the argmax's log p
    np.testing.assert_allclose(s.logprob, ref.log_softmax(x[0])[1])


def test_ties_in_top_k_and_top_p():
    x = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert np.isfinite(ref.process_logits(x, top_k=2)).tolist() == \
        [False, True, True, False, True, False]  # every entry equal to the 2nd largest
    assert np.isfinite(ref.process_logits(x, top_k=4)).tolist() == \
        [False, True, True, True, True, False]
    # top-p crossing inside a tie group keeps the whole group
    x = np.log(np.array([0.4, 0.2, 0.2, 0.2]))
    assert np.isfinite(ref.process_logits(x, top_p=0.5)).all()
    assert np.isfinite(ref.process_logits(x, top_p=0.4)).tolist() == [True, False, False, False]
    # min-p keeps p >= min_p * max p, ties included
    x = np.log(np.array([0.5, 0.25, 0.25, 0.125 / 2]))
    assert np.isfinite(ref.process_logits(x, min_p=0.5)).tolist() == [True, True, True, False]


def test_nan_and_inf_rows():
    x = np.array([[1.0, np.nan, 0.0], [1.0, np.inf, 0.0], [-np.inf] * 3, [0.0, 1.0, 2.0]])
    y = ref.process_logits(x, top_k=2, top_p=0.9, temperature=0.7)
    assert np.isnan(y[0]).all() and np.isnan(y[1]).all()
    assert (y[2] == -np.inf).all()
    assert y[3].tolist() == ref.process_logits(x[3], top_k=2, top_p=0.9,
                                               temperature=0.7).tolist()
    s = ref.sample(x, num_logprobs=2)
    assert s.tokens[:3].tolist() == [-1, -1, -1] and s.tokens[3] >= 0
    assert np.isnan(s.logprob[:3]).all() and s.rank[:3].tolist() == [-1, -1, -1]
    assert (s.top_ids[:3] == -1).all() and np.isnan(s.top_logprobs[:3]).all()
    # logits that overflow to +inf on the way (temperature, penalties) leave no distribution
    y = ref.process_logits(np.array([[1e300, 0.0], [-1e300, 0.0]]), temperature=1e-10)
    assert np.isnan(y[0]).all() and y[1].tolist() == [-np.inf, 0.0]
    y = ref.process_logits(np.array([1e308, 0.0]), repetition_penalty=0.1,
                           prev_tokens=np.array([0]))
    assert np.isnan(y).all()
    # a -inf logit + finite bias stays -inf
    y = ref.process_logits(np.array([-np.inf, 0.0]), logit_bias={0: 5.0})
    assert y.tolist() == [-np.inf, 0.0]


def test_vocabulary_of_one():
    x = np.array([[0.3], [-2.0]])
    opts = dict(top_k=1, top_p=0.5, min_p=0.9, temperature=0.5)
    assert ref.process_logits(x, **opts).tolist() == [[0.6], [-4.0]]
    s = ref.sample(x, num_logprobs=3, **opts)
    assert s.tokens.tolist() == [0, 0] and s.logprob.tolist() == [0.0, 0.0]
    assert s.top_ids.tolist() == [[0, -1, -1]] * 2
    for bad in (np.zeros((2, 0)), np.float64(1.0)):
        with pytest.raises(ValueError, match="vocabulary axis"):
            ref.process_logits(bad)


def test_off_values_change_nothing(rng):
    x = rng.normal(scale=3.0, size=(4, 50))
    x[0, :10] = -60.0  # probabilities far below top_p = 1's rounding
    for opts in (dict(top_k=0), dict(top_k=None), dict(top_k=50), dict(top_k=1000),
                 dict(top_p=1.0), dict(top_p=None), dict(min_p=0.0), dict(min_p=None),
                 dict(repetition_penalty=1.0, prev_tokens=np.zeros((4, 2), np.int64)),
                 dict(temperature=1.0), dict(logit_bias={})):
        assert ref.process_logits(x, **opts).tolist() == x.tolist(), opts


def test_all_masked_but_one(rng):
    x = rng.normal(size=(6, 20))
    keep = np.array([3, 0, 19, 7, 7, 11])
    bias = np.full((6, 20), -np.inf)
    bias[np.arange(6), keep] = 0.0
    s = ref.sample(x, logit_bias=bias, top_p=0.3, top_k=5, seed=np.arange(6),
                   logprobs_of="processed", num_logprobs=2)
    assert s.tokens.tolist() == keep.tolist()
    assert (s.logprob == 0).all()
    assert (s.top_ids[:, 1] == -1).all() and (s.top_logprobs[:, 1] == -np.inf).all()


def test_per_row_parameters_equal_separate_calls(rng):
    x = rng.normal(scale=2.0, size=(2, 3, 30))
    prev = rng.integers(-1, 30, size=(2, 3, 8))
    per_row = dict(temperature=rng.uniform(0.0, 2.0, (2, 3)).round(1),
                   top_k=rng.integers(0, 12, (2, 3)), top_p=rng.uniform(0.3, 1.0, (2, 3)),
                   min_p=rng.uniform(0.0, 0.2, (2, 3)),
                   repetition_penalty=rng.uniform(0.8, 1.5, (2, 3)),
                   presence_penalty=rng.uniform(-1, 1, (2, 3)),
                   frequency_penalty=rng.uniform(-1, 1, (2, 3)),
                   seed=rng.integers(0, 2**63, (2, 3)), offset=rng.integers(0, 2**40, (2, 3)))
    per_row["temperature"][0, 0] = 0.0
    bias = rng.normal(size=(2, 3, 30))
    y = ref.process_logits(x, logit_bias=bias, prev_tokens=prev,
                           **{k: v for k, v in per_row.items() if k not in ("seed", "offset")})
    s = ref.sample(x, logit_bias=bias, prev_tokens=prev, num_logprobs=4, **per_row)
    for i, j in np.ndindex(2, 3):
        one = {k: v[i, j] for k, v in per_row.items()}
        sj = ref.sample(x[i, j], logit_bias=bias[i, j], prev_tokens=prev[i, j],
                        num_logprobs=4, **one)
        del one["seed"], one["offset"]
        assert y[i, j].tolist() == ref.process_logits(x[i, j], logit_bias=bias[i, j],
                                                      prev_tokens=prev[i, j], **one).tolist()
        for a, b in zip(s, sj):
            assert np.asarray(a)[i, j].tolist() == np.asarray(b).tolist()


def test_batch_composition_and_repeat(rng):
    x = rng.normal(scale=2.0, size=(24, 100))
    opts = dict(temperature=0.9, top_k=40, top_p=0.95, seed=1234, num_logprobs=3)
    full = ref.sample(x, **opts)
    part = ref.sample(x[8:16], offset=8, **opts)
    for a, b in zip(full, part):
        assert a[8:16].tolist() == b.tolist()
    again = ref.sample(x, **opts)
    assert all(a.tolist() == b.tolist() for a, b in zip(full, again))
    # the flat row index runs over every leading axis
    full2 = ref.sample(x.reshape(4, 6, 100), **opts)
    assert full2.tokens.reshape(-1).tolist() == full.tokens.tolist()
    # a scalar offset counts on modulo 2**64
    wrapped = ref.sample(x[:4], **{**opts, "offset": 2**64 - 2})
    explicit = ref.sample(x[:4], **{**opts, "offset": np.array([2**64 - 2, 2**64 - 1, 0, 1],
                                                               np.uint64)})
    assert wrapped.tokens.tolist() == explicit.tokens.tolist()
    assert wrapped.tokens[2:].tolist() == ref.sample(x[2:4], **opts).tokens.tolist()
    # other seeds or offsets draw other tokens
    assert ref.sample(x, **{**opts, "seed": 99}).tokens.tolist() != full.tokens.tolist()
    assert ref.sample(x, offset=24, **opts).tokens.tolist() != full.tokens.tolist()


def test_inverse_cdf_rule():
    # p = (0.25, 0.75): token 0 exactly when u < 0.25 (C_0 = 0.25 > u * 1)
    x = np.log(np.array([[1.0, 3.0]]).repeat(1000, 0))
    u = _philox.uniform(np.full(1000, 5, np.uint64), np.arange(1000, dtype=np.uint64))
    s = ref.sample(x, seed=5)
    assert s.tokens.tolist() == (u >= 0.25).astype(int).tolist()
    # zero-probability entries are never drawn, whatever u
    x = np.array([[-np.inf, 0.0, -np.inf, 0.0, -np.inf]]).repeat(500, 0)
    assert set(ref.sample(x, seed=3).tokens.tolist()) == {1, 3}


def test_sample_logprobs_raw_and_processed(rng):
    x = rng.normal(scale=2.0, size=(40, 16))
    opts = dict(temperature=0.5, top_k=5, seed=8, num_logprobs=6)
    raw = ref.sample(x, **opts)
    pro = ref.sample(x, logprobs_of="processed", **opts)
    assert raw.tokens.tolist() == pro.tokens.tolist()
    y = ref.process_logits(x, temperature=0.5, top_k=5)
    rows = np.arange(40)
    np.testing.assert_allclose(raw.logprob, ref.log_softmax(x)[rows, raw.tokens], rtol=1e-14)
    np.testing.assert_allclose(pro.logprob, ref.log_softmax(y)[rows, pro.tokens], rtol=1e-14)
    order = np.argsort(-x, axis=-1, kind="stable")
    assert raw.rank.tolist() == [int(np.nonzero(order[r] == raw.tokens[r])[0][0]) for r in rows]
    assert (pro.rank < 5).all()
    assert raw.top_ids.tolist() == order[:, :6].tolist()
    assert (pro.top_ids[:, :5] == order[:, :5]).all() and (pro.top_ids[:, 5] == -1).all()
    assert (pro.top_logprobs[:, 5] == -np.inf).all()
    assert (np.diff(raw.top_logprobs, axis=1) <= 0).all()


def test_sampled_frequencies_match_the_processed_distribution():
    # 40 000 draws of one row (one offset each) against the processed probabilities:
    # chi-square over the surviving tokens, false alarm 1e-9; removed tokens never drawn
    stats = pytest.importorskip("scipy.stats")
    x = np.log(np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01]))
    for opts in (dict(), dict(temperature=0.7, top_k=6, top_p=0.9),
                 dict(temperature=1.6, min_p=0.15)):
        p = processed_probs(x, **opts)
        n = 40_000
        tokens = ref.sample(np.tile(x, (n, 1)), seed=20261201, **opts).tokens
        counts = np.bincount(tokens, minlength=x.size)
        alive = p > 0
        assert (counts[~alive] == 0).all(), opts
        chi2 = np.sum((counts[alive] - n * p[alive]) ** 2 / (n * p[alive]))
        assert chi2 < stats.chi2.isf(1e-9, alive.sum() - 1), (opts, chi2)


# ------------------------------------------------------------------- top_k

def test_top_k_like_torch(rng):
    torch = pytest.importorskip("torch")
    x = rng.normal(size=(3, 5, 40))
    for axis in (-1, 0, 1):
        for k in (0, 1, 3, x.shape[axis]):
            v, i = ref.top_k(x, k, axis=axis)
            tv, ti = torch.topk(torch.from_numpy(x), k, dim=axis)
            assert v.tolist() == tv.numpy().tolist() and i.tolist() == ti.numpy().tolist()
    v, i = ref.top_k(np.array([1.0, np.nan, 3.0, 3.0, -np.inf, 3.0]), 5)
    assert i.tolist() == [1, 2, 3, 5, 0]  # NaN first (as torch), ties lower index first
    assert np.isnan(v[0]) and v[1:].tolist() == [3.0, 3.0, 3.0, 1.0]


def test_top_k_bad_k():
    for k in (-1, 4, 1.0, True, None):
        with pytest.raises(ValueError, match="k must be"):
            ref.top_k(np.zeros(3), k)


# ------------------------------------------------------------------- beam search

def notebook_step_fn(vocab):
    """The notebook's transitions (section 12) as a step function over token ids;
    prompts are [BOS]."""
    transitions = {(): {"A": 0.55, "B": 0.45}, ("A",): {"x": 0.52, "y": 0.48},
                   ("B",): {"x": 0.90, "y": 0.10}}
    ids = {t: i for i, t in enumerate(vocab)}

    def step_fn(tokens):
        out = np.full((tokens.shape[0], len(vocab)), -np.inf)
        for r, seq in enumerate(tokens):
            prefix = tuple(vocab[t] for t in seq[1:])  # without BOS
            for tok, prob in transitions.get(prefix, {"<EOS>": 1.0}).items():
                out[r, ids[tok]] = np.log(prob)
        return out
    return step_fn


def test_notebook_beam_search():
    vocab = ["<BOS>", "A", "B", "x", "y", "<EOS>"]
    step_fn = notebook_step_fn(vocab)
    prompts = np.array([[0]])
    greedy = ref.beam_search(step_fn, prompts, beam_width=1, max_len=5, eos_id=5)
    assert [vocab[t] for t in greedy.sequences[0, 0]] == ["<BOS>", "A", "x", "<EOS>"]
    assert greedy.lengths.tolist() == [[3]]
    np.testing.assert_allclose(np.exp(greedy.scores[0, 0] * 3), 0.55 * 0.52, rtol=1e-12)
    beams = ref.beam_search(step_fn, prompts, beam_width=2, max_len=5, eos_id=5)
    assert [vocab[t] for t in beams.sequences[0, 0]] == ["<BOS>", "B", "x", "<EOS>"]
    assert [vocab[t] for t in beams.sequences[0, 1]] == ["<BOS>", "A", "x", "<EOS>"]
    np.testing.assert_allclose(np.exp(beams.scores[0] * 3), [0.405, 0.286], rtol=1e-12)
    # length_penalty 0: the plain sum; the ranking is the same here
    beams0 = ref.beam_search(step_fn, prompts, beam_width=2, max_len=5, eos_id=5,
                             length_penalty=0.0)
    np.testing.assert_allclose(np.exp(beams0.scores[0]), [0.405, 0.286], rtol=1e-12)
    # greedy sampling (temperature 0) through the same model also takes A then x
    seq = prompts
    for _ in range(3):
        seq = np.concatenate([seq, ref.sample(step_fn(seq), temperature=0).tokens[:, None]], 1)
    assert [vocab[t] for t in seq[0]] == ["<BOS>", "A", "x", "<EOS>"]


def test_beam_search_step_finished_beam_keeps_slot_and_score():
    lp = np.log(np.array([[[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]]]))
    scores = np.array([[-1.0, -0.2, -3.0]])
    finished = np.array([[False, True, False]])
    s, parent, tok = ref.beam_search_step(scores, lp, 3, finished=finished, eos_id=2)
    assert parent.tolist() == [[1, 0, 0]] and tok.tolist() == [[2, 0, 1]]
    np.testing.assert_allclose(s, [[-0.2, -1.0 + np.log(0.5), -1.0 + np.log(0.3)]])
    # ties go to the lower beam, then the lower token
    s, parent, tok = ref.beam_search_step(np.zeros((1, 2)), np.zeros((1, 2, 3)), 4)
    assert parent.tolist() == [[0, 0, 0, 1]] and tok.tolist() == [[0, 1, 2, 0]]


def test_beam_search_length_penalty_and_reorder():
    # ids: 0 BOS, 1 a, 2 b, 3 EOS. EOS at once (p = 0.4, L = 1) or a, b, EOS
    # (p = 0.6 * 0.9 * 1 = 0.54, L = 3): the sum and the mean both prefer a, b
    table = {(): {3: 0.4, 1: 0.6}, (1,): {2: 0.9, 3: 0.1}}

    cache = []  # a stand-in KV cache: row r holds the prefix it has seen

    def step_fn(tokens):
        if cache:  # each row's new prefix extends the cached row that reorder moved there
            assert cache == [tuple(seq[:-1]) for seq in tokens]
        cache[:] = [tuple(seq) for seq in tokens]
        out = np.full((tokens.shape[0], 4), -np.inf)
        for r, seq in enumerate(tokens):
            for tok, prob in table.get(tuple(seq[1:]), {3: 1.0}).items():
                out[r, tok] = np.log(prob)
        return out

    def reorder(rows):
        calls.append(rows.copy())
        cache[:] = [cache[r] for r in rows]

    calls = []
    b = ref.beam_search(step_fn, np.array([[0], [0]]), beam_width=2, max_len=6, eos_id=3,
                        reorder=reorder)
    assert b.sequences[0].tolist() == [[0, 1, 2, 3], [0, 3, 3, 3]]
    assert b.lengths.tolist() == [[3, 1], [3, 1]]
    np.testing.assert_allclose(b.scores[0], [np.log(0.54) / 3, np.log(0.4)])
    # reorder got the flat parent rows of every step (step_fn checked the cache with them)
    assert len(calls) == 3 and all(c.shape == (4,) for c in calls)
    assert calls[0].tolist() == [0, 0, 2, 2]  # both beams of a prompt come from its first
    cache.clear()
    b2 = ref.beam_search(step_fn, np.array([[0], [0]]), beam_width=2, max_len=6, eos_id=3,
                         length_penalty=-2.0, reorder=reorder)  # favours short sequences
    assert b2.sequences[0, 0].tolist() == [0, 3, 3, 3]
    np.testing.assert_allclose(b2.scores[0], [np.log(0.4), np.log(0.54) * 9])


def test_beam_search_stops_at_max_len():
    def step_fn(tokens):
        return np.tile(np.log([0.5, 0.3, 0.2]), (tokens.shape[0], 1))
    b = ref.beam_search(step_fn, np.array([[1, 1]]), beam_width=3, max_len=4, eos_id=2)
    assert b.sequences.shape == (1, 3, 6) and (b.lengths <= 4).all()


# ------------------------------------------------------------------- validation

@pytest.mark.parametrize("opts, match", [
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=2.5), "top_k must be integers"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=np.nan), r"top_p must be in \(0, 1\]"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=np.nan), "temperature must be >= 0"),
    (dict(temperature=np.inf), "temperature must be >= 0"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0, prev_tokens=np.zeros((2, 1), int)), "repetition_penalty"),
    (dict(presence_penalty=np.inf, prev_tokens=np.zeros((2, 1), int)), "presence_penalty"),
    (dict(logit_bias={5: 1.0}), r"logit_bias ids must be integers in \[0, 5\)"),
    (dict(logit_bias={-1: 1.0}), "logit_bias ids"),
    (dict(logit_bias={1: np.nan}), "logit_bias values"),
    (dict(logit_bias={1: np.inf}), "logit_bias values"),
    (dict(logit_bias=np.zeros(4)), "dense logit_bias must have shape"),
    (dict(repetition_penalty=1.2), "need prev_tokens"),
    (dict(frequency_penalty=0.5), "need prev_tokens"),
    (dict(presence_penalty=0.5, prev_tokens=np.zeros((3, 2), int)), "prev_tokens must have shape"),
    (dict(presence_penalty=0.5, prev_tokens=np.zeros(2, int)), "prev_tokens must have shape"),
    (dict(presence_penalty=0.5, prev_tokens=np.full((2, 2), 5)), "not a token id"),
    (dict(presence_penalty=0.5, prev_tokens=np.full((2, 2), -2)), "not a token id"),
    (dict(presence_penalty=0.5, prev_tokens=np.zeros((2, 2))), "prev_tokens must be an integer"),
    (dict(top_k=np.array([1, 2, 3])), "top_k must be a scalar or have the rows' shape"),
])
def test_bad_processing_options(opts, match):
    x = np.zeros((2, 5))
    with pytest.raises((ValueError, TypeError), match=match):
        ref.process_logits(x, **opts)
    with pytest.raises((ValueError, TypeError), match=match):
        ref.sample(x, **opts)


def test_bad_temperature_names_the_row():
    with pytest.raises(ValueError, match=r"got -1.0 \(row 2\)"):
        ref.process_logits(np.zeros((3, 4)), temperature=np.array([1.0, 0.0, -1.0]))


@pytest.mark.parametrize("opts, match", [
    (dict(seed=-1), "seed must be integers"),
    (dict(seed=2**64), "seed must be integers"),
    (dict(seed=0.5), "seed must be integers"),
    (dict(seed=True), "seed must be integers"),
    (dict(seed=[2**64, 1]), "seed must be integers"),
    (dict(offset=np.array([-1, 2])), "offset must be integers"),
    (dict(offset=np.array([1, 2, 3])), "offset must be a scalar or have the rows' shape"),
    (dict(num_logprobs=-1), "num_logprobs"),
    (dict(logprobs_of="final"), "logprobs_of"),
])
def test_bad_sampling_options(opts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ref.sample(np.zeros((2, 5)), **opts)


def test_bad_beam_arguments():
    lp = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="beam_width"):
        ref.beam_search_step(np.zeros((1, 2)), lp, 7)
    with pytest.raises(ValueError, match="need scores"):
        ref.beam_search_step(np.zeros((1, 3)), lp, 2)
    with pytest.raises(ValueError, match="eos_id"):
        ref.beam_search_step(np.zeros((1, 2)), lp, 2, finished=np.array([[True, False]]))
    with pytest.raises(ValueError, match="finished must have shape"):
        ref.beam_search_step(np.zeros((1, 2)), lp, 2, finished=np.array([True, False]))
    step = lambda t: np.zeros((t.shape[0], 3))  # noqa: E731
    with pytest.raises(ValueError, match="eos_id"):
        ref.beam_search(step, np.zeros((1, 1), int), beam_width=2, max_len=2, eos_id=3)
    with pytest.raises(ValueError, match="max_len"):
        ref.beam_search(step, np.zeros((1, 1), int), beam_width=2, max_len=0, eos_id=1)
    with pytest.raises(ValueError, match="prompts"):
        ref.beam_search(step, np.zeros(3, int), beam_width=2, max_len=2, eos_id=1)
    with pytest.raises(ValueError, match="step_fn must return"):
        ref.beam_search(lambda t: np.zeros((1, 3)), np.zeros((1, 1), int), beam_width=2,
                        max_len=2, eos_id=1)


# ------------------------------------------------------ HF transformers' warpers

def hf():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    return torch, lp


def hf_apply(processors, x, prev=None):
    torch, _ = hf()
    ids = torch.zeros((x.shape[0], 0), dtype=torch.long) if prev is None else torch.from_numpy(prev)
    scores = torch.from_numpy(x.copy())
    for p in processors:
        scores = p(ids, scores)
    return scores.numpy()


def random_logits(rng, rows=16, V=64):
    return rng.normal(scale=2.5, size=(rows, V))  # continuous: no ties


def test_hf_single_warpers(rng):
    _, lp = hf()
    x = random_logits(rng)
    cases = [(lp.TemperatureLogitsWarper(0.7), dict(temperature=0.7)),
             (lp.TopKLogitsWarper(5), dict(top_k=5)),
             (lp.TopPLogitsWarper(0.8), dict(top_p=0.8)),
             (lp.TopPLogitsWarper(0.3), dict(top_p=0.3)),
             (lp.MinPLogitsWarper(0.1), dict(min_p=0.1))]
    for proc, opts in cases:
        np.testing.assert_array_equal(ref.process_logits(x, **opts), hf_apply([proc], x),
                                      err_msg=str(opts))


def test_hf_repetition_penalty(rng):
    _, lp = hf()
    x = random_logits(rng)
    prev = rng.integers(0, 64, size=(16, 12))  # HF has no padding id: a full history
    np.testing.assert_array_equal(
        ref.process_logits(x, repetition_penalty=1.3, prev_tokens=prev),
        hf_apply([lp.RepetitionPenaltyLogitsProcessor(1.3)], x, prev))


def test_hf_pipeline_in_order(rng):
    _, lp = hf()
    x = random_logits(rng, rows=32, V=200)
    prev = rng.integers(0, 200, size=(32, 20))
    procs = [lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.8),
             lp.TopKLogitsWarper(50), lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)]
    ours = ref.process_logits(x, repetition_penalty=1.2, prev_tokens=prev, temperature=0.8,
                              top_k=50, top_p=0.9, min_p=0.05)
    np.testing.assert_array_equal(ours, hf_apply(procs, x, prev))


def test_hf_top_p_differs_at_ties():
    # HF removes tokens by their position in a sort, so of tied tokens straddling the
    # threshold it keeps only some (which ones depends on the sort); lmxent keeps the group
    _, lp = hf()
    x = np.log(np.array([[0.4, 0.3, 0.3]]))
    ours = np.isfinite(ref.process_logits(x, top_p=0.5))
    theirs = np.isfinite(hf_apply([lp.TopPLogitsWarper(0.5)], x))
    assert ours.tolist() == [[True, True, True]]
    assert theirs.sum() == 2


def test_docs_generation_loop_runs(capsys):
    # docs/decoding.md's generation loop, as written there
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "decoding.md").read_text()
    loop = doc.split("## A generation loop")[1].split("```python\n")[1].split("```")[0]
    exec(compile(loop, "docs/decoding.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 * 4 and all(line.startswith("step ") for line in lines)
