"""lmxent.linear_cross_entropy / linear_target_logprobs (the LM head without
materialised logits) against the float64 reference (materialised logits) and, where
installed, torch autograd through `hidden @ weight.T + bias` and the cross-entropy.
The reference sees the SAME rounded inputs as lmxent; chunk sizes that do and do
not divide the token count; peak memory measured with tracemalloc."""
import re
import tracemalloc

import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as ref
from lmxent.linear_cross_entropy import MIN_CHUNK_ROWS, _Head

from helpers import (
    BF16,
    F16,
    F32,
    F64,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    grad_scale,
    lowp,
    torch,
    torch_ce_with_grad,
)

DTYPES = [F32, F64] + ([BF16] if BF16 is not None else [])
DTYPE_IDS = [dtype_id(d) for d in DTYPES]

N, D, V = 23, 16, 37  # 23 tokens: chunk sizes 5 and 7 do not divide it

OPTIONS = {
    "plain": {},
    "ignored": dict(ignore_index=-100),  # make_problem marks ~1/4 of the tokens ignored
    "class_weight": dict(class_weight=True),
    "label_smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=2.0),
    "logit_scale": dict(logit_scale=0.6),
    "normalizer": dict(normalizer=40.0),
    "sum": dict(reduction="sum"),
    "none": dict(reduction="none"),
    "everything": dict(class_weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                       logit_scale=1.5, ignore_index=3),
}


# ------------------------------------------------------------------- helpers

def make_problem(rng, lead=(N,), d=D, v=V, dtype=F32, *, bias=True, ignored=True,
                 ignore_index=-100):
    """(hidden, weight, bias, targets) rounded to dtype, and the same values as float64.
    Logits of order 3 (weight ~ 1/sqrt(d)); ~1/4 of the tokens ignored."""
    h, h64 = lowp(rng.normal(size=lead + (d,)), dtype)
    w, w64 = lowp(rng.normal(scale=3.0 / np.sqrt(d), size=(v, d)), dtype)
    b, b64 = lowp(rng.normal(size=v), dtype) if bias else (None, None)
    t = rng.integers(0, v, size=lead)
    if ignored and t.size >= 2:
        flat = t.reshape(-1)
        flat[rng.choice(flat.size, size=max(1, flat.size // 4), replace=False)] = ignore_index
    return (h, w, b, t), (h64, w64, b64)


def resolve(rng, opts, v=V):
    """The option dict with class_weight=True replaced by random weights."""
    opts = dict(opts)
    if opts.get("class_weight") is True:
        opts["class_weight"] = rng.uniform(0.2, 2.0, size=v)
    return opts


def grad_output_for(rng, reduction, lead):
    return rng.normal(size=lead) if reduction == "none" else 0.7


def head_bounds(h64, w64, t, g64, loss_lse, grad_output, opts):
    """Elementwise error scales of d_hidden, d_weight and d_bias: the products of the
    absolute values that make them, with each logit gradient counted at least at its
    float32 error scale (helpers.grad_scale), as rounding errors in g propagate."""
    V_, D_ = w64.shape
    ce = {("weight" if k == "class_weight" else k): v for k, v in opts.items()}
    s = grad_scale(g64.shape, t, loss_lse, grad_output, **ce)
    a = (np.abs(g64) + s).reshape(-1, V_)
    h2 = np.abs(h64).reshape(-1, D_)
    return ((a @ np.abs(w64)).reshape(h64.shape), a.T @ h2, a.sum(axis=0))


def assert_head_grads(got, want, f64, t, grad_output, opts, dt, what=""):
    """(d_hidden, d_weight, d_bias) against `want` at the error scales of head_bounds
    (d_bias skipped when None)."""
    h64, w64, b64 = f64
    z64 = h64 @ w64.T + (0.0 if b64 is None else b64)
    ce = {("weight" if k == "class_weight" else k): v for k, v in opts.items()}
    _, lse = ref.cross_entropy(z64, t, return_lse=True, **ce)
    g64 = ref.cross_entropy_with_grad(z64, t, grad_output=grad_output, **ce)[1]
    scales = head_bounds(h64, w64, t, g64, lse, grad_output, opts)
    for name, g, r, s in zip(("d_hidden", "d_weight", "d_bias"), got, want, scales):
        if g is not None:
            assert_grad_close(g, r, dt, gscale=10 * s, what=name + what)


def check_head(h, w, b, t, f64, *, grad_output=1.0, torch_check=True, **opts):
    """lx.linear_cross_entropy against the reference on the same rounded inputs, and
    against torch (float64 autograd through hidden @ weight.T + bias and the
    cross-entropy) when installed. Returns lmxent's (loss, grads)."""
    h64, w64, b64 = f64
    dt = h.dtype
    before = [a.copy() for a in (h, w, b, t) if a is not None]
    loss, (dh, dw, db) = lx.linear_cross_entropy(h, w, t, bias=b, grad_output=grad_output,
                                                 **opts)
    for a, c in zip([a for a in (h, w, b, t) if a is not None], before):
        np.testing.assert_array_equal(a, c)  # inputs are never written
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_size", "memory_budget")}
    rloss, (rdh, rdw, rdb) = ref.linear_cross_entropy(h64, w64, t, bias=b64,
                                                      grad_output=grad_output, **ref_opts)
    assert_loss_close(loss, rloss, dt)
    assert loss.dtype == (F64 if dt == F64 else F32)
    assert (dh.shape, dw.shape) == (h.shape, w.shape)
    assert (db is None) == (b is None)

    assert_head_grads((dh, dw, db), (rdh, rdw, rdb), f64, t, grad_output, ref_opts, dt)

    if torch_check and torch is not None:
        ce = {("weight" if k == "class_weight" else k): v for k, v in ref_opts.items()}
        tl, tgrads = torch_head(h64, w64, b64, t, grad_output=grad_output, **ce)
        assert_loss_close(loss, tl, dt, what="loss vs torch")
        assert_head_grads((dh, dw, db), tgrads, f64, t, grad_output, ref_opts, dt,
                          what=" vs torch")
    return loss, (dh, dw, db)


def torch_head(h64, w64, b64, t, *, grad_output=1.0, **ce):
    """Torch float64 autograd: logits = hidden @ weight.T + bias, the cross-entropy
    (with every lmxent option) from helpers.torch_ce_with_grad, and the chain rule
    through the logits by torch's own backward."""
    ht = torch.tensor(h64, requires_grad=True)
    wt = torch.tensor(w64, requires_grad=True)
    bt = None if b64 is None else torch.tensor(b64, requires_grad=True)
    z = ht @ wt.T + (0.0 if bt is None else bt)
    loss, g = torch_ce_with_grad(z.detach().numpy(), t, grad_output=grad_output, **ce)
    z.backward(torch.from_numpy(g))
    return loss, (ht.grad.numpy(), wt.grad.numpy(), None if bt is None else bt.grad.numpy())


# ------------------------------------------------------------ every option

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_against_reference_and_torch(rng, name, dtype, bias):
    opts = resolve(rng, OPTIONS[name])
    (h, w, b, t), f64 = make_problem(rng, dtype=dtype, bias=bias,
                                     ignore_index=opts.get("ignore_index", -100))
    go = grad_output_for(rng, opts.get("reduction", "mean"), t.shape)
    check_head(h, w, b, t, f64, grad_output=go, chunk_size=5, **opts)


def test_float16(rng):
    (h, w, b, t), f64 = make_problem(rng, dtype=F16)
    check_head(h, w, b, t, f64, chunk_size=7, label_smoothing=0.1)


@pytest.mark.parametrize("chunk", [1, 5, 7, N - 1, N, N + 10, None])
def test_chunk_sizes(rng, chunk):
    (h, w, b, t), f64 = make_problem(rng)
    check_head(h, w, b, t, f64, chunk_size=chunk, torch_check=False)


@pytest.mark.parametrize("rows", [1, 4, N])
def test_memory_budget_in_bytes_of_logits(rng, rows):
    (h, w, b, t), f64 = make_problem(rng)
    check_head(h, w, b, t, f64, memory_budget=rows * V * 4 + 3, torch_check=False)
    assert _Head(h, w, t, b, memory_budget=rows * V * 4 + 3).rows == rows
    assert _Head(h.astype(F64), w.astype(F64), t, memory_budget=rows * V * 8).rows == rows


def test_chunking_does_not_change_the_result_beyond_rounding(rng):
    (h, w, b, t), _ = make_problem(rng, dtype=F64)
    one = lx.linear_cross_entropy(h, w, t, bias=b, chunk_size=1)
    whole = lx.linear_cross_entropy(h, w, t, bias=b, chunk_size=N)
    np.testing.assert_allclose(one[0], whole[0], rtol=1e-14)
    for a, c in zip(one[1], whole[1]):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-15)


def test_default_chunk_is_hidden_sized_with_a_row_floor(rng):
    def rows(n, d, v, dtype=F32):
        h = np.zeros((n, d), dtype)
        return _Head(h, np.zeros((v, d), dtype), np.zeros(n, np.int64)).rows
    assert rows(10, 512, 8) == 10                      # fewer tokens than the floor: one chunk
    assert rows(4096, 512, 128256) == MIN_CHUNK_ROWS   # hidden-sized would be 16 rows
    assert rows(1024, 256, 32000) == 192               # the floor is at most 3/4 of D
    assert rows(8192, 2048, 32000) == 8192 * 2048 // 32000   # 524 rows = hidden's bytes
    assert rows(4096, 512, 1024, F64) == 2048          # float64 hidden, float64 buffer
    assert rows(4096, 512, 1024, F16) == 1024  # 16-bit hidden, float32 buffer


# ------------------------------------------------------------ shapes and edge cases

def test_one_token(rng):
    (h, w, b, t), f64 = make_problem(rng, lead=(1,), ignored=False)
    check_head(h, w, b, t, f64, z_loss=1e-3)


def test_3d_hidden(rng):
    (h, w, b, t), f64 = make_problem(rng, lead=(2, 3, 5))
    check_head(h, w, b, t, f64, chunk_size=4, label_smoothing=0.1)
    go = rng.normal(size=(2, 3, 5))
    loss, _ = check_head(h, w, b, t, f64, chunk_size=4, reduction="none", grad_output=go)
    assert loss.shape == (2, 3, 5)


def test_1d_hidden_is_one_unbatched_token(rng):
    (h, w, b, t), f64 = make_problem(rng, lead=(), ignored=False)
    loss, (dh, _, _) = check_head(h, w, b, t, f64, reduction="none")
    assert loss.shape == () and dh.shape == (D,)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [{}, dict(z_loss=1e-2, label_smoothing=0.1)])
def test_all_tokens_ignored(rng, reduction, opts):
    (h, w, b, _), f64 = make_problem(rng)
    t = np.full(N, -100)
    loss, (dh, dw, db) = check_head(h, w, b, t, f64, reduction=reduction, chunk_size=5, **opts)
    assert np.all(loss == 0)  # a mean over zero tokens is 0, not NaN
    assert not dh.any() and not dw.any() and not db.any()


def test_zero_class_weight_sum_is_zero_loss_and_gradient(rng):
    (h, w, b, t), f64 = make_problem(rng, ignored=False)
    cw = np.ones(V)
    cw[t] = 0.0  # every target's class has weight 0: the "mean" denominator is 0
    loss, (dh, dw, db) = check_head(h, w, b, t, f64, class_weight=cw, z_loss=1e-2)
    assert loss == 0 and not dh.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("go_shape", [(N,), (1,), ()])
def test_per_token_grad_output(rng, go_shape):
    (h, w, b, t), f64 = make_problem(rng)
    check_head(h, w, b, t, f64, reduction="none", grad_output=rng.normal(size=go_shape),
               chunk_size=7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("go", [0.0, -2.5])
def test_scalar_grad_output(rng, reduction, go):
    (h, w, b, t), f64 = make_problem(rng)
    check_head(h, w, b, t, f64, reduction=reduction, grad_output=go, chunk_size=7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_return_grads_false_returns_the_loss_only(rng, reduction, dtype):
    (h, w, b, t), (h64, w64, b64) = make_problem(rng, dtype=dtype)
    loss = lx.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=5,
                                   return_grads=False, z_loss=1e-3)
    assert isinstance(loss, np.ndarray)
    want = ref.linear_cross_entropy(h64, w64, t, bias=b64, reduction=reduction,
                                    return_grads=False, z_loss=1e-3)
    assert_loss_close(loss, want, dtype)
    with_grads = lx.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, chunk_size=5,
                                         z_loss=1e-3)[0]
    np.testing.assert_array_equal(loss, with_grads)


def test_non_contiguous_inputs(rng):
    (h, w, b, t), f64 = make_problem(rng, lead=(2 * N,), d=2 * D, ignored=False)
    h64, w64, b64 = f64
    # every other token and feature; the weight as a transposed (D, V) array's .T and
    # with a strided feature axis; a strided bias
    hs, ws, wf = h[::2, ::2], w[:, ::2], np.asfortranarray(w[:, ::2])
    bs = np.repeat(b[:V], 2)[::2]
    for wx in (ws, wf):
        check_head(hs, wx, bs, t[::2], (h64[::2, ::2], w64[:, ::2], np.repeat(b64, 2)[::2]),
                   chunk_size=5, torch_check=False)


def test_weight_tied_with_the_input_embedding(rng):
    """A 'model' whose hidden states are the embeddings of its input tokens, with the
    LM head tied to that embedding: the embedding's full gradient is d_weight plus
    d_hidden scattered to the input rows. Against torch autograd through E[ids] @ E.T."""
    (_, emb, _, t), (_, emb64, _) = make_problem(rng, dtype=F64, bias=False)
    ids = rng.integers(0, V, size=N)
    h = emb[ids]
    loss, (dh, dw, db) = lx.linear_cross_entropy(h, emb, t, chunk_size=5)
    assert db is None
    d_emb = dw.copy()
    np.add.at(d_emb, ids, dh)
    if torch is None:
        pytest.skip("torch is not installed")
    et = torch.tensor(emb64, requires_grad=True)
    z = et[torch.from_numpy(ids)] @ et.T
    tl = torch.nn.functional.cross_entropy(z, torch.from_numpy(t))
    tl.backward()
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-12)
    np.testing.assert_allclose(d_emb, et.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_hidden_sharing_memory_with_the_weight(rng):
    (_, w, b, t), (_, w64, b64) = make_problem(rng, lead=(V,))
    h = w[::-1]  # a view of the weight itself (memory overlaps; nothing is written)
    check_head(h, w, b, t, (w64[::-1], w64, b64), chunk_size=6, torch_check=False)


def test_targets_any_integer_dtype(rng):
    (h, w, b, t), f64 = make_problem(rng, ignored=False)
    for dt in (np.int32, np.uint16, np.uint64):
        check_head(h, w, b, t.astype(dt), f64, torch_check=False)


def test_nan_in_hidden_propagates_to_its_token(rng):
    (h, w, b, t), _ = make_problem(rng, ignored=False)
    h[4, 2] = np.nan
    loss, (dh, dw, db) = lx.linear_cross_entropy(h, w, t, bias=b, reduction="none",
                                                 chunk_size=5)
    assert np.isnan(loss[4]) and np.isfinite(np.delete(loss, 4)).all()
    assert np.isnan(dh[4]).all() and np.isfinite(np.delete(dh, 4, axis=0)).all()
    assert np.isnan(dw).all() and np.isnan(db).all()  # every class saw the NaN row


# ------------------------------------------------------------ evaluation scoring

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opts", [{}, dict(softcap=3.0, logit_scale=0.5),
                                  dict(ignore_index=5)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_linear_target_logprobs(rng, dtype, opts, bias):
    (h, w, b, t), (h64, w64, b64) = make_problem(
        rng, lead=(3, 7), dtype=dtype, bias=bias, ignore_index=opts.get("ignore_index", -100))
    logprob, lse = lx.linear_target_logprobs(h, w, t, bias=b, chunk_size=4, **opts)
    rlp, rlse = ref.linear_target_logprobs(h64, w64, t, bias=b64, **opts)
    assert logprob.shape == lse.shape == t.shape
    assert logprob.dtype == lse.dtype == (F64 if dtype == F64 else F32)
    assert_loss_close(logprob, rlp, dtype, what="logprob")
    assert_loss_close(lse, rlse, dtype, what="lse")
    ignored = t == opts.get("ignore_index", -100)
    assert ignored.any()
    assert np.all(logprob[ignored] == 0) and not np.signbit(logprob[ignored]).any()
    # the same numbers from materialised logits: log_softmax gathered at the targets
    z = h64 @ w64.T + (0.0 if b64 is None else b64)
    z = opts.get("logit_scale", 1.0) * z
    if "softcap" in opts:
        z = opts["softcap"] * np.tanh(z / opts["softcap"])
    lsm = ref.log_softmax(z)
    keep = ~ignored
    want = np.take_along_axis(lsm, np.where(keep, t, 0)[..., None], -1)[..., 0]
    assert_loss_close(logprob[keep], want[keep], dtype, what="logprob vs log_softmax")
    assert_loss_close(lse, ref.logsumexp(z), dtype, what="lse vs logsumexp")


def test_logprobs_are_minus_the_per_token_loss(rng):
    (h, w, b, t), _ = make_problem(rng)
    logprob, _ = lx.linear_target_logprobs(h, w, t, bias=b, chunk_size=3)
    loss = lx.linear_cross_entropy(h, w, t, bias=b, reduction="none", return_grads=False,
                                   chunk_size=3)  # the same products, so the same bits
    np.testing.assert_array_equal(logprob, 0.0 - loss)


# ------------------------------------------------------------ memory

def traced_peak(fn):
    """(result, peak bytes allocated during fn() beyond what was allocated before)."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: dtype_id(d))
def test_peak_memory_stays_within_the_budget(rng, dtype):
    """Peak allocation beyond the outputs <= the logits buffer (the budget) + the block
    temporary of the d_weight product (no larger than the buffer) + O(N + rows x D)
    vectors; for 16-bit inputs also the float32 copy of the weight and the float32
    d_weight accumulator (documented). Materialising the logits would take 16x the
    buffer here, so the check can fail."""
    n, d, v, rows = 1024, 32, 8192, 64
    (h, w, b, t), _ = make_problem(rng, lead=(n,), d=d, v=v, dtype=dtype)
    budget = rows * v * 4
    (_, grads), peak = traced_peak(lambda: lx.linear_cross_entropy(
        h, w, t, bias=b, memory_budget=budget))
    outputs = sum(g.nbytes for g in grads)
    allowed = 2 * budget + 64 * n + 8 * rows * d + (1 << 16)
    if dtype != F32:
        allowed += 2 * v * d * 4 + v * 4  # float32 weight copy, d_weight and d_bias
    assert peak - outputs <= allowed, (peak - outputs, allowed)
    assert peak - outputs >= budget  # the buffer is really allocated (the test measures)
    _, full = traced_peak(lambda: lx.linear_cross_entropy(h, w, t, bias=b, chunk_size=n))
    assert full - outputs >= n * v * 4  # one chunk: the whole logits


def test_logprobs_peak_memory_stays_within_the_budget(rng):
    n, d, v, rows = 1024, 32, 8192, 64
    (h, w, b, t), _ = make_problem(rng, lead=(n,), d=d, v=v)
    (lp, lse), peak = traced_peak(lambda: lx.linear_target_logprobs(
        h, w, t, bias=b, memory_budget=rows * v * 4))
    assert rows * v * 4 <= peak - lp.nbytes - lse.nbytes <= rows * v * 4 + 64 * n + (1 << 16)


# ------------------------------------------------------------ errors

def msg(text):
    return re.escape(text)


def args(dtype=F32, n=6, d=4, v=5):
    h = np.ones((n, d), dtype)
    return h, np.ones((v, d), dtype), np.arange(n) % v


FNS = ["linear_cross_entropy", "linear_target_logprobs"]


def call(fn, h, w, t, **kw):
    return getattr(lx, fn)(h, w, t, **kw)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("case", [
    # (how to change the valid arguments, exception, message)
    (lambda h, w, t: (np.float32(1), w, t), ValueError, "hidden: expected shape (..., D)"),
    (lambda h, w, t: (h[:, :0], w[:, :0], t), ValueError, "hidden: the feature axis is empty"),
    (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "hidden: no tokens (shape (0, 4))"),
    (lambda h, w, t: (h.astype(np.int32), w, t), TypeError, "hidden: unsupported dtype int32"),
    (lambda h, w, t: (h.astype(np.complex64), w, t), TypeError, "hidden: unsupported dtype"),
    (lambda h, w, t: (h, w[0], t), ValueError, "weight: expected shape (V, 4)"),
    (lambda h, w, t: (h, w[:, :3], t), ValueError, "weight: expected shape (V, 4) (the "
     "vocabulary by hidden's last axis), got (5, 3)"),
    (lambda h, w, t: (h, w[:0], t), ValueError, "weight: the vocabulary is empty (V = 0)"),
    (lambda h, w, t: (h, w.astype(np.float64), t), TypeError,
     "weight: dtype float64 differs from hidden's dtype float32"),
    (lambda h, w, t: (h, w, t.astype(np.float32)), TypeError,
     "targets: expected integer class ids, got dtype float32"),
    (lambda h, w, t: (h, w, t[:5]), ValueError, "targets: expected shape (6,) (hidden's shape"),
    (lambda h, w, t: (h, w, np.where(np.arange(6) == 4, 5, t)), ValueError,
     "targets: value 5 at position (4,) is out of range [0, 5) and is not ignore_index (-100)"),
    (lambda h, w, t: (h.reshape(2, 3, 4), w, np.where(np.arange(6) == 4, -1, t).reshape(2, 3)),
     ValueError, "targets: value -1 at position (1, 1) is out of range"),
])
def test_array_errors(fn, case):
    change, exc, text = case
    with pytest.raises(exc, match=msg(text)):
        call(fn, *change(*args()))


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("kw, exc, text", [
    (dict(bias=np.ones(4, np.float32)), ValueError, "bias: expected shape (5,), got (4,)"),
    (dict(bias=np.ones(5, np.float64)), TypeError, "bias: dtype float64 differs from hidden's"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an integer"),
    (dict(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite positive number"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale must be a finite positive number"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive number of rows, got 0"),
    (dict(chunk_size=2.5), TypeError, "chunk_size must be an integer"),
    (dict(memory_budget=19), ValueError,
     "memory_budget: 19 bytes is less than one row of logits (5 x 4 bytes)"),
    (dict(memory_budget=0), ValueError, "memory_budget must be a positive number of bytes, got 0"),
    (dict(memory_budget=1e6), TypeError, "memory_budget must be an integer"),
    (dict(chunk_size=2, memory_budget=100), ValueError,
     "give chunk_size or memory_budget, not both"),
])
def test_option_errors_shared(fn, kw, exc, text):
    with pytest.raises(exc, match=msg(text)):
        call(fn, *args(), **kw)


@pytest.mark.parametrize("kw, exc, text", [
    (dict(reduction="avg"), ValueError, "reduction must be one of ('none', 'mean', 'sum')"),
    (dict(reduction="sum", normalizer=4.0), ValueError,
     "normalizer is only allowed with reduction='mean'"),
    (dict(normalizer=0.0), ValueError, "normalizer must be a finite positive number"),
    (dict(class_weight=np.ones(4)), ValueError, "class_weight: expected shape (5,), got (4,)"),
    (dict(class_weight=np.array([1, 1, np.inf, 1, 1])), ValueError,
     "class_weight: contains a non-finite value"),
    (dict(class_weight=np.ones(5, bool)), TypeError, "class_weight: unsupported dtype bool"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing must be a finite number in [0.0, 1.0]"),
    (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite number >= 0.0"),
    (dict(grad_output=np.ones(6)), ValueError, "grad_output must be a scalar for reduction='mean'"),
    (dict(reduction="none", grad_output=np.ones(4)), ValueError,
     "grad_output: shape (4,) does not broadcast to the per-token loss shape (6,)"),
    (dict(grad_output="x"), TypeError, "grad_output: unsupported dtype <U1"),
])
def test_loss_option_errors(kw, exc, text):
    with pytest.raises(exc, match=msg(text)):
        lx.linear_cross_entropy(*args(), **kw)


def test_grad_output_is_validated_without_grads_too():
    with pytest.raises(ValueError, match="grad_output must be a scalar"):
        lx.linear_cross_entropy(*args(), grad_output=np.ones(6), return_grads=False)
