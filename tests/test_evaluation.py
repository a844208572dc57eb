"""Sequence-level evaluation math (lmxent.evaluation, lmxent.plot): hand-checkable
examples (run on both the fast functions and the float64 reference), the fast
functions against lmxent.reference, edge cases, and one test per validation rule.
Every test runs with warnings as errors: no NaN/divide warnings for empty counts."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as ref

from helpers import DTYPE_IDS, DTYPES, assert_loss_close, lowp, torch

pytestmark = pytest.mark.filterwarnings("error")

IMPLS = [pytest.param(lx, id="lmxent"), pytest.param(ref, id="reference")]


def conditional_logits(tokens, probs, V):
    """(T, V) logits whose softmax at position t gives tokens[t + 1] the probability
    probs[t] (the rest spread evenly), i.e. the conditionals of a causal LM."""
    T = len(tokens)
    p = np.full((T, V), 0.0)
    for t, q in enumerate(probs):
        p[t] = (1.0 - q) / (V - 1)
        p[t, tokens[t + 1]] = q
    p[len(probs):] = 1.0 / V  # positions with nothing to predict
    return np.log(p)


def assert_scores_close(actual, expected, dtype):
    np.testing.assert_array_equal(actual.n_tokens, expected.n_tokens)
    assert actual.n_tokens.dtype == np.int64
    assert actual.logprob_sum.dtype == actual.mean_logprob.dtype == np.float64
    assert_loss_close(actual.logprob_sum, expected.logprob_sum, dtype, what="logprob_sum")
    assert_loss_close(actual.mean_logprob, expected.mean_logprob, dtype, what="mean_logprob")


# ------------------------------------------------------ hand-checkable examples

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chain_rule(impl, dtype):
    # The seed's toy LM: <BOS> the cat sat <EOS> with conditionals
    # p(the | <BOS>) = 0.90, p(cat | ...) = 0.75, p(sat | ...) = 0.55, p(<EOS> | ...) = 0.80.
    # Chain rule: P = 0.90 * 0.75 * 0.55 * 0.80 = 0.675 * 0.55 * 0.80 = 0.37125 * 0.8 = 0.297.
    tokens = np.array([[0, 1, 2, 3, 5]])  # vocab <BOS> the cat sat slept <EOS>
    probs = [0.90, 0.75, 0.55, 0.80]
    logits = conditional_logits(tokens[0], probs, V=6)[None].astype(dtype)
    sc = impl.sequence_scores(logits, tokens)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(sc.logprob_sum, [np.log(probs).sum()], rtol=tol)
    np.testing.assert_allclose(np.exp(sc.logprob_sum), [0.297], rtol=tol)
    np.testing.assert_array_equal(sc.n_tokens, [4])
    # mean log-prob = log of the geometric mean of the conditionals
    np.testing.assert_allclose(np.exp(sc.mean_logprob), [0.297 ** 0.25], rtol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_prompt_averaging_flips_the_winner(impl):
    # One prompt of 5 tokens (4 scored conditionals, log p = -0.1 each: -0.4 in all),
    # two candidate answers: A is 1 token with log p -1.0, B is 4 tokens at -0.5 each.
    #   answer only:  A = -1.0,                   B = -2.0 / 4 = -0.5   -> B wins
    #   whole text:   A = (-0.4 - 1.0) / 5 = -0.28, B = (-0.4 - 2.0) / 8 = -0.30 -> A wins
    V, T, P = 8, 9, 5
    prompt = [0, 1, 2, 3, 4]
    seqs = [prompt + [5], prompt + [6, 7, 6, 7]]
    logps = [[-0.1] * 4 + [-1.0], [-0.1] * 4 + [-0.5] * 4]
    logits = np.full((2, T, V), np.nan)  # padding rows must never be read
    tokens = np.zeros((2, T), dtype=np.int64)
    for b, (s, lp) in enumerate(zip(seqs, logps)):
        tokens[b, :len(s)] = s
        logits[b, :len(s)] = conditional_logits(s, np.exp(lp), V)
    lengths, prompts = np.array([6, 9]), np.array([P, P])

    whole = impl.sequence_scores(logits, tokens, mask=impl.answer_mask([0, 0], lengths, T))
    answer = impl.sequence_scores(logits, tokens, mask=impl.answer_mask(prompts, lengths, T))
    np.testing.assert_array_equal(whole.n_tokens, [5, 8])
    np.testing.assert_array_equal(answer.n_tokens, [1, 4])
    np.testing.assert_allclose(whole.mean_logprob, [-0.28, -0.30], rtol=1e-12)
    np.testing.assert_allclose(answer.mean_logprob, [-1.0, -0.5], rtol=1e-12)
    assert np.argmax(whole.mean_logprob) == 0 and np.argmax(answer.mean_logprob) == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_perplexity_depends_on_the_tokenizer_bits_per_byte_does_not(impl):
    # The seed's example: one 32-byte text, total NLL 12.0 nats under two tokenizers,
    # A with 6 tokens (2.0 nats each), B with 10 tokens (1.2 nats each).
    #   perplexity A = exp(12 / 6) = e^2 = 7.389, B = exp(12 / 10) = e^1.2 = 3.320
    #   bits per byte = 12 / ln 2 / 32 = 17.312 / 32 = 0.541 for both
    nll = []
    for n in (6, 10):
        tokens = np.arange(n)[None] % 4
        logits = np.log(np.full((1, n, 4), (1 - math.exp(-12.0 / n)) / 3))
        logits[0, np.arange(n), tokens[0]] = -12.0 / n
        sc = impl.sequence_scores(logits, tokens, shift=False)
        np.testing.assert_allclose(sc.logprob_sum, [-12.0], rtol=1e-12)
        nll.append((-sc.logprob_sum, sc.n_tokens))
    ppl = [impl.perplexity(s, n) for s, n in nll]
    bpb = [impl.bits_per_byte(s, 32) for s, _ in nll]
    np.testing.assert_allclose(np.ravel(ppl), [math.e ** 2, math.e ** 1.2], rtol=1e-12)
    np.testing.assert_allclose(np.ravel(bpb), [12.0 / math.log(2) / 32] * 2, rtol=1e-12)
    assert abs(float(np.ravel(bpb)[0]) - 0.541) < 5e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_seed_ece(impl):
    # The seed's calibration example with 5 bins (lo, hi]:
    #   (0.0, 0.2]  none
    #   (0.2, 0.4]  {0.30}: correct 0        acc 0,   conf 0.30, gap 0.30
    #   (0.4, 0.6]  {0.60, 0.55, 0.45}: 0 0 0 acc 0,   conf 0.5333, gap 0.5333 (= 8/15)
    #   (0.6, 0.8]  {0.80, 0.75, 0.70}: 1 0 1 acc 2/3, conf 0.75, gap 0.0833
    #   (0.8, 1.0]  {0.95, 0.90, 0.85}: 1 1 0 acc 2/3, conf 0.90, gap 0.2333
    # ECE = (1 * 0.30 + 3 * 0.5333 + 3 * 0.0833 + 3 * 0.2333) / 10
    #     = (0.30 + 1.60 + 0.25 + 0.70) / 10 = 0.285;  MCE = 8/15
    conf = np.array([0.95, 0.90, 0.85, 0.80, 0.75, 0.70, 0.60, 0.55, 0.45, 0.30])
    correct = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0])
    cal = impl.calibration(conf, correct, n_bins=5)
    np.testing.assert_allclose(cal.ece, 0.285, rtol=1e-12)
    np.testing.assert_allclose(cal.mce, 8 / 15, rtol=1e-12)
    np.testing.assert_allclose(cal.bin_edges, [0, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-15)
    np.testing.assert_array_equal(cal.counts, [0, 1, 3, 3, 3])
    np.testing.assert_allclose(cal.accuracy, [np.nan, 0, 0, 2 / 3, 2 / 3], rtol=1e-12)
    np.testing.assert_allclose(cal.confidence, [np.nan, 0.3, 1.6 / 3, 0.75, 0.9], rtol=1e-12)


# ------------------------------------------------------- sequence_scores vs ref

def random_case(rng, shape, V, dtype, *, masked=True, ignored=True, ignore_index=-100):
    """Logits (shape + (V,)) rounded to dtype (and their float64 values), token ids with
    ~1/5 ignore_index, a random mask with some all-masked sequences."""
    x, x64 = lowp(rng.normal(scale=3.0, size=shape + (V,)), dtype)
    tokens = rng.integers(0, V, size=shape)
    if ignored:
        tokens[rng.random(shape) < 0.2] = ignore_index
    mask = rng.random(shape) < 0.7 if masked else None
    if masked and len(shape) > 1:
        mask.reshape(-1, shape[-1])[::5] = False  # every 5th sequence scores nothing
    return x, x64, tokens, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shift", [True, False])
def test_many_sequences_against_reference(rng, dtype, shift):
    x, x64, tokens, mask = random_case(rng, (64, 24), 50, dtype)
    sc = lx.sequence_scores(x, tokens, shift=shift, mask=mask)
    expected = ref.sequence_scores(x64, tokens, shift=shift, mask=mask)
    assert_scores_close(sc, expected, dtype)
    assert (sc.n_tokens == 0).any() and (sc.n_tokens > 0).any()


def test_leading_axes_and_a_single_sequence(rng):
    x, x64, tokens, mask = random_case(rng, (2, 3, 10), 7, np.float32)
    sc = lx.sequence_scores(x, tokens, mask=mask)
    assert sc.logprob_sum.shape == (2, 3)
    assert_scores_close(sc, ref.sequence_scores(x64, tokens, mask=mask), np.float32)
    one = lx.sequence_scores(x[1, 2], tokens[1, 2], mask=mask[1, 2])  # (T, V): 0-d results
    assert one.logprob_sum.shape == one.n_tokens.shape == ()
    assert_scores_close(one, ref.sequence_scores(x64[1, 2], tokens[1, 2], mask=mask[1, 2]),
                        np.float32)


def test_reference_against_torch(rng):
    if torch is None:
        pytest.skip("torch is not installed")
    x, _, tokens, mask = random_case(rng, (5, 9), 11, np.float64, ignored=False)
    logp = torch.log_softmax(torch.from_numpy(x), -1)[:, :-1]
    picked = logp.gather(-1, torch.from_numpy(tokens[:, 1:])[..., None])[..., 0].numpy()
    keep = mask[:, 1:]
    expected = np.where(keep, picked, 0.0).sum(-1)
    sc = ref.sequence_scores(x, tokens, mask=mask)
    np.testing.assert_allclose(sc.logprob_sum, expected, rtol=1e-12)
    np.testing.assert_array_equal(sc.n_tokens, keep.sum(-1))


def test_shift_true_is_shift_false_on_shifted_arrays(rng):
    x, _, tokens, mask = random_case(rng, (6, 12), 9, np.float32)
    a = lx.sequence_scores(x, tokens, mask=mask)
    b = lx.sequence_scores(x[:, :-1], tokens[:, 1:], mask=mask[:, 1:], shift=False)
    for f in a._fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_shift_never_reads_the_last_logits_or_scores_token_zero(rng):
    x, _, tokens, _ = random_case(rng, (3, 6), 5, np.float32, masked=False, ignored=False)
    before = lx.sequence_scores(x, tokens)
    x[:, -1] = np.nan
    tokens[:, 0] = -7  # not a target: may be anything, even out of range
    after = lx.sequence_scores(x, tokens)
    for f in before._fields:
        np.testing.assert_array_equal(getattr(after, f), getattr(before, f))
    np.testing.assert_array_equal(after.n_tokens, [5, 5, 5])


def test_nan_in_a_target_row_propagates_to_its_sequence_only(rng):
    x, _, tokens, _ = random_case(rng, (3, 6), 5, np.float32, masked=False, ignored=False)
    x[1, 2, 0] = np.nan
    sc = lx.sequence_scores(x, tokens)
    np.testing.assert_array_equal(np.isnan(sc.logprob_sum), [False, True, False])


@pytest.mark.parametrize("impl", IMPLS)
def test_all_masked_sequences_score_zero(impl, rng):
    x, _, tokens, _ = random_case(rng, (3, 5), 6, np.float32, ignored=False)
    mask = np.zeros(tokens.shape, dtype=bool)
    sc = impl.sequence_scores(x, tokens, mask=mask)
    np.testing.assert_array_equal(sc.n_tokens, [0, 0, 0])
    np.testing.assert_array_equal(sc.logprob_sum, [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(sc.mean_logprob, [0.0, 0.0, 0.0])
    assert not np.signbit(sc.logprob_sum).any()
    np.testing.assert_array_equal(impl.perplexity(-sc.logprob_sum, sc.n_tokens), [1.0] * 3)
    np.testing.assert_array_equal(impl.bits_per_byte(-sc.logprob_sum, sc.n_tokens), [0.0] * 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_and_nothing_to_score(impl):
    x = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))  # (1, 2, 3)
    # shift=False, T=1: the one token (id 1) scored by its own row: log 0.25
    one = impl.sequence_scores(x[:, :1], np.array([[1]]), shift=False)
    np.testing.assert_allclose(one.logprob_sum, [math.log(0.25)], rtol=1e-12)
    np.testing.assert_array_equal(one.n_tokens, [1])
    # shift=True, T=2: one target (token 1 = id 2) scored by row 0: log 0.25
    two = impl.sequence_scores(x, np.array([[0, 2]]))
    np.testing.assert_allclose(two.mean_logprob, [math.log(0.25)], rtol=1e-12)
    np.testing.assert_array_equal(two.n_tokens, [1])
    # shift=True, T=1: nothing to predict
    none = impl.sequence_scores(x[:, :1], np.array([[1]]))
    np.testing.assert_array_equal(none.n_tokens, [0])
    np.testing.assert_array_equal(none.logprob_sum, [0.0])
    np.testing.assert_array_equal(none.mean_logprob, [0.0])


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_mask_and_ignore_index_together(rng, ignore_index):
    x, x64, tokens, mask = random_case(rng, (8, 10), 6, np.float64, ignore_index=ignore_index)
    sc = lx.sequence_scores(x, tokens, mask=mask, ignore_index=ignore_index)
    expected = ref.sequence_scores(x64, tokens, mask=mask, ignore_index=ignore_index)
    assert_scores_close(sc, expected, np.float64)
    scored = mask & (tokens != ignore_index)
    np.testing.assert_array_equal(sc.n_tokens, scored[:, 1:].sum(-1))
    # a mask of 0/1 integers is the same as booleans; masked positions may hold anything
    tokens[~scored] = -1 if ignore_index != -1 else -2
    again = lx.sequence_scores(x, tokens, mask=scored.astype(np.int8),
                               ignore_index=ignore_index)
    for f in sc._fields:
        np.testing.assert_array_equal(getattr(again, f), getattr(sc, f))


def test_unsigned_and_narrow_token_ids(rng):
    x, _, tokens, mask = random_case(rng, (4, 7), 200, np.float32, ignored=False)
    base = lx.sequence_scores(x, tokens, mask=mask)
    for dt in (np.uint8, np.int16, np.uint64):
        sc = lx.sequence_scores(x, tokens.astype(dt), mask=mask)
        np.testing.assert_array_equal(sc.logprob_sum, base.logprob_sum)


# ---------------------------------------------------------------- answer_mask

def test_answer_mask_example():
    # sequence 0: prompt 2, length 5 -> positions 2, 3, 4; sequence 1: prompt 0,
    # length 1 -> position 0; sequence 2: prompt 3 = length 3 -> nothing
    m = lx.answer_mask(np.array([2, 0, 3]), np.array([5, 1, 3]), 6)
    assert m.dtype == bool
    np.testing.assert_array_equal(m, [[0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0], [0] * 6])


def test_answer_mask_against_reference(rng):
    T = 12
    lengths = rng.integers(0, T + 1, size=(4, 5))
    prompts = rng.integers(0, lengths + 1)
    np.testing.assert_array_equal(lx.answer_mask(prompts, lengths, T),
                                  ref.answer_mask(prompts, lengths, T))
    assert lx.answer_mask(prompts, lengths, T).shape == (4, 5, T)
    empty = np.zeros(0, dtype=np.int64)
    assert lx.answer_mask(empty, empty, 0).shape == (0, 0)


# ---------------------------------------------------- perplexity, bits per byte

def test_per_count_metrics_against_reference(rng):
    nll = rng.uniform(0, 50, size=(3, 4))
    n = rng.integers(0, 20, size=(3, 4)).astype(float)
    n[0, :2] = 0
    for fn in ("perplexity", "bits_per_byte"):
        got, want = getattr(lx, fn)(nll, n), getattr(ref, fn)(nll, n)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-14)
        # broadcasting a scalar count
        np.testing.assert_allclose(getattr(lx, fn)(nll, 7), getattr(ref, fn)(nll, 7),
                                   rtol=1e-14)


def test_per_count_metrics_accept_lists_like_the_reference():
    for fn in ("perplexity", "bits_per_byte"):
        for args in (([1.0, 2.0], [1, 2]), ([3.0, 4.0], 2), (5.0, [1, 2, 4]),
                     ([[1.0], [2.0]], [1, 2])):
            got, want = getattr(lx, fn)(*args), getattr(ref, fn)(*args)
            assert isinstance(got, np.ndarray) and got.shape == np.shape(want)
            np.testing.assert_allclose(got, want, rtol=1e-14)


def test_per_count_metrics_return_types():
    assert type(lx.perplexity(12.0, 6)) is float
    assert type(lx.bits_per_byte(12, 32)) is float
    assert lx.perplexity(0, 0) == 1.0 and lx.bits_per_byte(5.0, 0) == 0.0
    p = lx.perplexity(np.float32(3.0), np.array(2))  # an array in: a 0-d array out
    assert isinstance(p, np.ndarray) and p.shape == () and p.dtype == np.float64
    np.testing.assert_allclose(p, math.exp(1.5), rtol=1e-14)
    b = lx.bits_per_byte(np.array([1.0, 2.0], np.float32), np.array([1, 0]))
    np.testing.assert_allclose(b, [1 / math.log(2), 0.0], rtol=1e-14)


def test_per_count_metrics_infinities_and_nan():
    assert lx.perplexity(1e6, 1) == math.inf  # overflow is inf, without a warning
    assert lx.perplexity(math.inf, 3) == math.inf
    assert math.isnan(lx.perplexity(math.nan, 3)) and math.isnan(lx.bits_per_byte(math.nan, 3))


# ---------------------------------------------------------------- calibration

@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 37])
def test_calibration_against_reference(rng, n_bins):
    conf = rng.random(500)
    # values exactly on bin edges, 0 and 1: the (lo, hi] convention at every edge
    conf[:n_bins + 1] = np.linspace(0.0, 1.0, n_bins + 1)
    conf[n_bins + 1:n_bins + 4] = [0.0, 1.0, 0.5]
    correct = rng.random(500) < conf
    got, want = lx.calibration(conf, correct, n_bins=n_bins), ref.calibration(
        conf, correct, n_bins=n_bins)
    np.testing.assert_array_equal(got.counts, want.counts)
    assert got.counts.dtype == np.int64 and got.counts.sum() == 500
    for f in ("ece", "mce", "bin_edges", "accuracy", "confidence"):
        np.testing.assert_allclose(getattr(got, f), getattr(want, f), rtol=1e-12, atol=1e-15,
                                   err_msg=f)


def test_calibration_edges_zero_and_one():
    # 0 joins the first bin (0, 0.5]; 0.5 is in (0, 0.5]; 1 is in (0.5, 1]
    cal = lx.calibration(np.array([0.0, 0.5, 1.0]), np.array([False, True, True]), n_bins=2)
    np.testing.assert_array_equal(cal.counts, [2, 1])
    np.testing.assert_allclose(cal.confidence, [0.25, 1.0])
    np.testing.assert_allclose(cal.accuracy, [0.5, 1.0])
    # single bin: ECE = MCE = |mean accuracy - mean confidence| = |2/3 - 1/2|
    one = lx.calibration(np.array([0.0, 0.5, 1.0]), [False, True, True], n_bins=1)
    np.testing.assert_allclose([one.ece, one.mce], [1 / 6, 1 / 6], rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_calibration_shapes_and_correct_dtypes(impl, rng):
    conf = rng.random((4, 25))
    correct = rng.random((4, 25)) < 0.5
    base = impl.calibration(conf.ravel(), correct.ravel())
    for c in (correct, correct.astype(np.int32), correct.astype(np.float32)):
        cal = impl.calibration(conf, c)
        np.testing.assert_allclose(cal.ece, base.ece, rtol=1e-14)
        np.testing.assert_array_equal(cal.counts, base.counts)


def test_calibration_without_samples():
    cal = lx.calibration(np.zeros(0), np.zeros(0, dtype=bool), n_bins=4)
    assert float(cal.ece) == 0.0 and float(cal.mce) == 0.0
    np.testing.assert_array_equal(cal.counts, [0, 0, 0, 0])
    assert np.isnan(cal.accuracy).all() and np.isnan(cal.confidence).all()


# ----------------------------------------------------------------------- plot

def test_reliability_diagram_writes_png(tmp_path, rng):
    pytest.importorskip("matplotlib")
    conf = rng.random(200)
    cal = lx.calibration(conf, rng.random(200) < conf ** 2, n_bins=10)
    path = tmp_path / "reliability.png"
    fig = lx.plot.reliability_diagram(cal, path=path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.axes[0].get_title() == "test"
    # into a given Axes: the figure drawn into is returned
    from matplotlib.figure import Figure
    other = Figure()
    ax = other.subplots()
    assert lx.plot.reliability_diagram(cal, ax=ax) is other
    with pytest.raises(TypeError, match="cal: expected the result of lmxent.calibration"):
        lx.plot.reliability_diagram((0.1, 0.2))


def test_reliability_diagram_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    cal = lx.calibration([0.5], [True], n_bins=2)
    with pytest.raises(ImportError, match="needs matplotlib"):
        lx.plot.reliability_diagram(cal)


def test_import_does_not_import_matplotlib():
    code = "import sys, lmxent; lmxent.plot; assert 'matplotlib' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------- validation

X = np.zeros((2, 4, 5), dtype=np.float32)
TOK = np.ones((2, 4), dtype=np.int64)


def bad_tokens(pos, value):
    t = TOK.copy()
    t[pos] = value
    return t


@pytest.mark.parametrize("args, kw, exc, match", [
    ((X[0, 0], TOK[0, :1]), {}, ValueError, "logits: expected shape (..., T, V)"),
    ((X[:, :, :0], TOK), {}, ValueError, "logits: the vocabulary axis is empty"),
    ((X.astype(np.int32), TOK), {}, TypeError, "logits: unsupported dtype"),
    ((X, TOK[:, :3]), {}, ValueError, "tokens: expected shape (2, 4)"),
    ((X, TOK.astype(np.float32)), {}, TypeError, "tokens: expected integers"),
    ((X, TOK.astype(bool)), {}, TypeError, "tokens: expected integers"),
    ((X, bad_tokens((1, 2), 5)), {}, ValueError,
     "tokens: value 5 at position (1, 2) is out of range [0, 5)"),
    ((X, bad_tokens((0, 3), -1)), {"shift": False}, ValueError,
     "tokens: value -1 at position (0, 3) is out of range"),
    ((X, TOK), {"mask": np.ones((2, 3), bool)}, ValueError, "mask: expected shape (2, 4)"),
    ((X, TOK), {"mask": np.full((2, 4), 2)}, ValueError, "mask: value 2 at position (0, 0)"),
    ((X, TOK), {"mask": np.full((2, 4), "y")}, TypeError, "mask: expected booleans"),
    ((X, TOK), {"ignore_index": 1.5}, TypeError, "ignore_index must be an integer"),
    ((X, TOK), {"ignore_index": 2 ** 63}, ValueError, "ignore_index must fit in int64"),
])
def test_sequence_scores_errors(args, kw, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        lx.sequence_scores(*args, **kw)


@pytest.mark.parametrize("args, exc, match", [
    (([1, 2], [3], 4), ValueError, "prompt_lengths and lengths must have the same shape"),
    (([1, -1], [3, 3], 4), ValueError, "prompt_lengths: value -1 at position (1,) is negative"),
    (([0, 0], [3, -2], 4), ValueError, "lengths: value -2 at position (1,) is negative"),
    (([0, 0], [3, 5], 4), ValueError, "lengths: value 5 at position (1,) exceeds T = 4 (T is "
                                      "too small)"),
    (([4, 0], [3, 3], 4), ValueError, "prompt_lengths: value 4 at position (0,) exceeds the "
                                      "sequence's length"),
    (([0], [1], -1), ValueError, "T must be >= 0"),
    (([0], [1], 2**63), ValueError, "T must be >= 0 and fit in int64, got 9223372036854775808"),
    (([0], [1], True), TypeError, "T must be an integer"),
    (([0], [1], 2.0), TypeError, "T must be an integer"),
    (([0.0], [1], 2), TypeError, "prompt_lengths: expected integers"),
    (([0], [True], 2), TypeError, "lengths: expected integers"),
])
def test_answer_mask_errors(args, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        lx.answer_mask(*args)


@pytest.mark.parametrize("fn, count_name", [("perplexity", "n_tokens"),
                                            ("bits_per_byte", "n_bytes")])
@pytest.mark.parametrize("args, exc, match", [
    ((1.0, -1), ValueError, "{n}: value -1.0 at position () is not a finite number >= 0"),
    ((1.0, [2, math.nan]), ValueError, "{n}: value nan at position (1,) is not a finite"),
    ((1.0, math.inf), ValueError, "{n}: value inf at position () is not a finite"),
    ((-0.5, 2), ValueError, "nll_sum: value -0.5 at position () is negative (expected a "
                            "negative log-likelihood: pass -logprob_sum)"),
    ((np.ones(3), np.ones(2)), ValueError, "nll_sum and {n}: shapes (3,) and (2,) do not "
                                           "broadcast"),
    ((True, 2), TypeError, "nll_sum: expected real numbers"),
    ((1.0, "3"), TypeError, "{n}: expected real numbers"),
])
def test_per_count_errors(fn, count_name, args, exc, match):
    with pytest.raises(exc, match=re.escape(match.format(n=count_name))):
        getattr(lx, fn)(*args)


C = np.array([0.2, 0.9])


@pytest.mark.parametrize("args, kw, exc, match", [
    ((C, [True, False]), {"n_bins": 0}, ValueError, "n_bins must be >= 1, got 0"),
    ((C, [True, False]), {"n_bins": 2.5}, TypeError, "n_bins must be an integer"),
    (([0.2, 1.5], [True, False]), {}, ValueError,
     "confidence: value 1.5 at position (1,) is not a number in [0, 1]"),
    (([-0.1, 0.5], [True, False]), {}, ValueError, "confidence: value -0.1 at position (0,)"),
    (([0.1, math.nan], [True, False]), {}, ValueError, "confidence: value nan at position (1,)"),
    (([True, False], [True, False]), {}, TypeError, "confidence: expected real numbers"),
    ((C, [True]), {}, ValueError, "correct: expected shape (2,), got (1,)"),
    ((C, [1, 2]), {}, ValueError, "correct: value 2 at position (1,) is not 0 or 1"),
    ((C, [0.5, 1.0]), {}, ValueError, "correct: value 0.5 at position (0,) is not 0 or 1"),
    ((C, ["a", "b"]), {}, TypeError, "correct: expected booleans"),
])
def test_calibration_errors(args, kw, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        lx.calibration(*args, **kw)
