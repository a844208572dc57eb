"""lmxent.cross_entropy / cross_entropy_with_grad / cross_entropy_backward (CPU
kernels) against the float64 reference (lmxent.reference) and, where installed,
torch. Every comparison feeds the reference the SAME already-rounded input values
the kernel sees."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmxent as lx
from lmxent import reference as ref

from helpers import (
    BF16,
    DTYPE_IDS,
    DTYPES,
    F16,
    F32,
    F64,
    assert_grad_close,
    assert_loss_close,
    dtype_id,
    grad_scale,
    loss_dtype,
    lowp,
    num_threads,
    numeric_grad,
    torch,
    torch_ce_with_grad,
)

CORE_DTYPES = [F32, F16] + ([BF16] if BF16 is not None else [])
CORE_IDS = [dtype_id(d) for d in CORE_DTYPES]


# ------------------------------------------------------------------- helpers

def make_logits(rng, shape, dtype, scale=3.0):
    return lowp(rng.normal(scale=scale, size=shape), dtype)


def make_ids(rng, lead, V, *, kind="ids", ignore_index=-100, dtype=np.int64):
    """Class ids; kind 'ignored' marks ~1/4 of the tokens ignore_index (at least one
    and, when there are >= 2 tokens, not all); 'ignored3' uses ignore_index=3 as a
    real class id that also appears as a target."""
    t = rng.integers(0, V, size=lead)
    if kind in ("ignored", "ignored3") and t.size:
        flat = t.reshape(-1)
        k = max(1, flat.size // 4) if flat.size >= 2 else 0
        idx = rng.choice(flat.size, size=k, replace=False)
        flat[idx] = ignore_index
    return t.astype(dtype)


def make_probs(rng, shape, zero_frac=0.0):
    q = rng.random(shape) ** 3
    if zero_frac:
        q[rng.random(shape) < zero_frac] = 0.0
        q[..., 0] += 1e-3  # no all-zero row
    return q / q.sum(-1, keepdims=True)


def grad_output_for(rng, reduction, lead):
    return rng.normal(size=lead) if reduction == "none" else 0.7


def check_all(x, t, *, grad_output=1.0, torch_check=True, **opts):
    """Forward (with and without lse), fused loss+grad and backward-from-lse, each
    against the reference on the same rounded inputs; also against torch (float64
    autograd) when installed. Returns (loss, grad) of cross_entropy_with_grad."""
    dt = x.dtype
    x64 = x.astype(np.float64)
    x_before = x.copy()
    reduction = opts.get("reduction", "mean")
    lead = x.shape[:-1]

    r_loss, r_lse = ref.cross_entropy(x64, t, return_lse=True, **opts)
    r_grad = ref.cross_entropy_backward(x64, t, r_lse, grad_output, **opts)

    loss, lse = lx.cross_entropy(x, t, return_lse=True, **opts)
    assert isinstance(loss, np.ndarray) and loss.dtype == loss_dtype(dt)
    assert loss.shape == (lead if reduction == "none" else ())
    assert lse.dtype == loss_dtype(dt) and lse.shape == lead
    assert_loss_close(loss, r_loss, dt)
    assert_loss_close(lse, r_lse, dt, what="lse")
    loss_only = lx.cross_entropy(x, t, **opts)
    np.testing.assert_array_equal(loss_only, loss)

    gs = grad_scale(x.shape, t, r_lse, grad_output, **opts)
    loss2, grad = lx.cross_entropy_with_grad(x, t, grad_output=grad_output, **opts)
    assert loss2.dtype == loss_dtype(dt)
    np.testing.assert_array_equal(loss2, loss)
    assert_grad_close(grad, r_grad, dt, gscale=gs, what="with_grad")

    grad_b = lx.cross_entropy_backward(x, t, lse, grad_output, **opts)
    assert_grad_close(grad_b, r_grad, dt, gscale=gs, what="backward")

    # not inplace: logits untouched (compared as float64: NaN-aware for bfloat16 too)
    assert np.array_equal(x.astype(np.float64), x_before.astype(np.float64), equal_nan=True)

    if torch_check and torch is not None:
        t_loss, t_grad = torch_ce_with_grad(x64, t, grad_output=grad_output, **opts)
        assert_loss_close(loss, t_loss, dt, what="loss vs torch")
        assert_grad_close(grad, t_grad, dt, gscale=gs, what="grad vs torch")
    return loss, grad


# ------------------------------------------------------------- option matrix

# (targets kind, options); "W" means: a random class-weight vector
OPTION_CASES = {
    "plain": ("ids", {}),
    "weight": ("ids", {"weight": "W"}),
    "ignore_default": ("ignored", {}),
    "ignore_3": ("ignored3", {"ignore_index": 3}),
    "none": ("ignored", {"reduction": "none"}),
    "sum": ("ignored", {"reduction": "sum"}),
    "smoothing": ("ids", {"label_smoothing": 0.1}),
    "smoothing_1": ("ids", {"label_smoothing": 1.0}),
    "smoothing_weight": ("ignored", {"label_smoothing": 0.2, "weight": "W"}),
    "weight_ignored_mean": ("ignored", {"weight": "W"}),
    "z_loss": ("ignored", {"z_loss": 1e-2}),
    "softcap": ("ids", {"softcap": 3.0}),
    "logit_scale": ("ids", {"logit_scale": 0.7}),
    "normalizer": ("ignored", {"normalizer": 1000.0}),
    "all_none": ("ignored3", {"ignore_index": 3, "weight": "W", "label_smoothing": 0.1,
                              "z_loss": 1e-3, "softcap": 4.0, "logit_scale": 1.3,
                              "reduction": "none"}),
    "all_mean_normalizer": ("ignored", {"weight": "W", "label_smoothing": 0.15,
                                        "z_loss": 1e-2, "softcap": 2.5, "logit_scale": 0.8,
                                        "normalizer": 37.5}),
    "all_sum": ("ignored", {"weight": "W", "label_smoothing": 0.05, "z_loss": 1e-4,
                            "softcap": 30.0, "reduction": "sum"}),
}


def build_case(rng, name, lead, V, dtype, scale=3.0):
    kind, opts = OPTION_CASES[name]
    opts = dict(opts)
    if opts.get("weight") == "W":
        opts["weight"] = rng.uniform(0.2, 2.0, size=V)
    x, _ = make_logits(rng, lead + (V,), dtype, scale)
    t = make_ids(rng, lead, V, kind=kind, ignore_index=opts.get("ignore_index", -100))
    if kind == "ignored3":
        assert (t == 3).any() or t.size < 2
    return x, t, opts


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_options_against_reference_and_torch(rng, name, dtype):
    x, t, opts = build_case(rng, name, (13,), 301, dtype)
    go = grad_output_for(rng, opts.get("reduction", "mean"), t.shape)
    check_all(x, t, grad_output=go, **opts)


@pytest.mark.parametrize("dtype", CORE_DTYPES, ids=CORE_IDS)
@pytest.mark.parametrize("name", ["plain", "ignore_default", "smoothing_weight", "all_none",
                                  "all_mean_normalizer"])
@pytest.mark.parametrize("V", [70, 1003])
def test_every_isa(isa, rng, name, dtype, V):
    x, t, opts = build_case(rng, name, (5,), V, dtype)
    go = grad_output_for(rng, opts.get("reduction", "mean"), t.shape)
    check_all(x, t, grad_output=go, torch_check=False, **opts)


@pytest.mark.parametrize("dtype", [F64], ids=["float64"])
def test_every_isa_float64(isa, rng, dtype):
    x, t, opts = build_case(rng, "all_none", (5,), 1003, dtype)
    check_all(x, t, grad_output=grad_output_for(rng, "none", t.shape), torch_check=False,
              **opts)


def test_isa_fixture_restores_the_original():
    # the fixture above must leave the process on the ISA chosen at load time
    assert lx.cpu_info()["isa"] == lx.cpu_info()["available"][0] or \
        lx.cpu_info()["isa"] in lx.cpu_info()["available"]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", ["ignore_default", "all_none", "all_mean_normalizer"])
def test_3d_logits(rng, name, dtype):
    x, t, opts = build_case(rng, name, (3, 5), 97, dtype)
    go = grad_output_for(rng, opts.get("reduction", "mean"), t.shape)
    loss, grad = check_all(x, t, grad_output=go, **opts)
    assert grad.shape == x.shape
    # the same as the flattened (15, 97) problem
    l2, g2 = lx.cross_entropy_with_grad(x.reshape(15, 97), t.reshape(15),
                                        grad_output=np.reshape(go, np.shape(go)[:0] + (-1,))
                                        if np.ndim(go) else go, **opts)
    np.testing.assert_array_equal(g2.reshape(x.shape), grad)
    np.testing.assert_array_equal(np.reshape(l2, loss.shape), loss)


def test_unbatched_1d_logits(rng):
    x, _ = make_logits(rng, (50,), F32)
    t = np.asarray(7)
    loss, grad = check_all(x, t, reduction="none")
    assert loss.shape == () and grad.shape == (50,)
    check_all(x, t)


# ------------------------------------------------------------------- targets

@pytest.mark.parametrize("tdtype", [np.int32, np.int64, np.int16])
def test_integer_target_dtypes_agree(rng, tdtype):
    x, t, opts = build_case(rng, "all_none", (9,), 64, F32)
    expected = lx.cross_entropy_with_grad(x, t, **opts)
    got = lx.cross_entropy_with_grad(x, t.astype(tdtype), **opts)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    check_all(x, t.astype(tdtype), **opts)


def test_int32_targets_default_ignore_index(rng):
    x, _ = make_logits(rng, (7, 40), F32)
    t = make_ids(rng, (7,), 40, kind="ignored", dtype=np.int32)
    assert (t == -100).any()
    check_all(x, t)


def test_ignore_index_real_class_is_ignored_only_as_target(rng):
    x, _ = make_logits(rng, (6, 10), F32)
    t = np.array([3, 1, 3, 0, 9, 3])
    per = lx.cross_entropy(x, t, ignore_index=3, reduction="none")
    assert np.all(per[t == 3] == 0) and np.all(per[t != 3] > 0)
    _, g = lx.cross_entropy_with_grad(x, t, ignore_index=3)
    assert np.all(g[t == 3] == 0) and np.all(g[t != 3][:, 3] > 0)  # column 3 still trains
    # the mean divides by the 3 counted tokens
    np.testing.assert_allclose(lx.cross_entropy(x, t, ignore_index=3),
                               per.sum(dtype=np.float64) / 3, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("use_weight,eps", [(False, 0.0), (True, 0.0), (False, 0.1),
                                            (True, 0.2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(rng, dtype, use_weight, eps, reduction):
    V = 131
    x, _ = make_logits(rng, (2, 5, V), dtype)
    q = make_probs(rng, x.shape, zero_frac=0.3)
    if dtype != F64:
        q = q.astype(np.float32)  # the kernel uses float32 targets here; feed them exactly
    opts = dict(label_smoothing=eps, reduction=reduction)
    if use_weight:
        opts["weight"] = rng.uniform(0.2, 2.0, size=V)
    check_all(x, q, grad_output=grad_output_for(rng, reduction, x.shape[:-1]), **opts)


def test_probability_targets_all_options(rng):
    V = 200
    x, _ = make_logits(rng, (7, V), F32, scale=4.0)
    q = make_probs(rng, x.shape).astype(np.float32)
    check_all(x, q, weight=rng.uniform(0.5, 1.5, V), label_smoothing=0.1, z_loss=1e-2,
              softcap=5.0, logit_scale=0.9, normalizer=3.0)


def test_probability_targets_low_precision_dtype(rng):
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    x, _ = make_logits(rng, (4, 50), F32)
    qb = make_probs(rng, x.shape).astype(BF16)
    loss = lx.cross_entropy(x, qb, reduction="none")
    assert_loss_close(loss, ref.cross_entropy(x.astype(np.float64),
                                              qb.astype(np.float64), reduction="none"), F32)


def test_one_hot_probabilities_equal_class_ids(rng):
    x, _ = make_logits(rng, (9, 77), F32)
    t = rng.integers(0, 77, size=9)
    q = np.eye(77, dtype=np.float32)[t]
    for opts in ({}, {"label_smoothing": 0.1}, {"z_loss": 1e-2, "softcap": 4.0}):
        l1, g1 = lx.cross_entropy_with_grad(x, t, reduction="none", **opts)
        l2, g2 = lx.cross_entropy_with_grad(x, q, reduction="none", **opts)
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)


def test_probability_targets_with_masked_vocabulary(rng):
    x, _ = make_logits(rng, (4, 30), F32)
    q = make_probs(rng, x.shape)
    x[:, 5:9] = -np.inf
    q[:, 5:9] = 0.0
    q /= q.sum(-1, keepdims=True)
    # torch forms 0 * -inf = NaN here; lmxent (and the reference) do not
    loss, grad = check_all(x, q, reduction="none", torch_check=False)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    assert np.all(grad[:, 5:9] == 0)


# ----------------------------------------------------------- lse, grad_output

@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_return_lse_is_lse_of_transformed_logits(rng, dtype):
    x, x64 = make_logits(rng, (2, 3, 90), dtype)
    t = make_ids(rng, (2, 3), 90, kind="ignored")
    loss, lse = lx.cross_entropy(x, t, softcap=2.0, logit_scale=0.5, return_lse=True)
    z = 2.0 * np.tanh(0.5 * x64 / 2.0)
    expected = np.log(np.exp(z).sum(-1))  # every row, ignored or not
    assert lse.shape == (2, 3)
    assert_loss_close(lse, expected, dtype, what="lse")
    assert loss == lx.cross_entropy(x, t, softcap=2.0, logit_scale=0.5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("go", [0.0, 1.0, -2.5, 1e3])
def test_scalar_grad_output(rng, reduction, go):
    x, t, opts = build_case(rng, "smoothing_weight", (11,), 53, F32)
    _, g = check_all(x, t, grad_output=go, reduction=reduction, **opts)
    if go == 0.0:
        assert np.all(g == 0)
    _, g1 = lx.cross_entropy_with_grad(x, t, reduction=reduction, **opts)
    g1 = go * g1.astype(np.float64)
    np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-6 * np.abs(g1).max() + 1e-30)


@pytest.mark.parametrize("dtype", [F32, F64] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: dtype_id(d))
@pytest.mark.parametrize("go_shape", ["full", "bcast_row", "bcast_col", "list"])
def test_per_token_grad_output(rng, dtype, go_shape):
    x, t, opts = build_case(rng, "all_none", (4, 6), 45, dtype)
    go = {"full": rng.normal(size=(4, 6)), "bcast_row": rng.normal(size=(6,)),
          "bcast_col": rng.normal(size=(4, 1)), "list": [1.0, -2.0, 0.5, 0.0, 3.0, 1.5]}[go_shape]
    _, g = check_all(x, t, grad_output=go, **opts)
    full = np.broadcast_to(np.asarray(go, dtype=np.float64), (4, 6))
    assert np.all(g[full == 0] == 0)


def test_backward_really_uses_the_given_lse(rng):
    x, t, opts = build_case(rng, "plain", (5,), 40, F64)
    _, lse = lx.cross_entropy(x, t, return_lse=True)
    g = lx.cross_entropy_backward(x, t, lse, 1.0)
    g2 = lx.cross_entropy_backward(x, t, lse + np.log(2.0), 1.0)
    expected = ref.cross_entropy_backward(x, t, lse + np.log(2.0), 1.0)
    np.testing.assert_allclose(g2, expected, rtol=1e-10, atol=1e-14)
    assert not np.allclose(g, g2)


@pytest.mark.parametrize("name", ["all_none", "all_mean_normalizer"])
def test_backward_with_probability_targets(rng, name):
    _, opts = OPTION_CASES[name]
    opts = {k: v for k, v in opts.items() if k != "ignore_index"}
    opts["weight"] = rng.uniform(0.2, 2.0, size=64)
    x, _ = make_logits(rng, (6, 64), F32)
    q = make_probs(rng, x.shape).astype(np.float32)
    check_all(x, q, grad_output=grad_output_for(rng, opts.get("reduction", "mean"), (6,)),
              **opts)


# ---------------------------------------------------------------- inplace

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["plain", "all_none", "all_mean_normalizer"])
def test_inplace_writes_gradient_into_logits(rng, dtype, name):
    x, t, opts = build_case(rng, name, (3, 7), 301, dtype)
    go = grad_output_for(rng, opts.get("reduction", "mean"), t.shape)
    loss_ref, grad_ref = lx.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    xi = x.copy()
    loss, g = lx.cross_entropy_with_grad(xi, t, grad_output=go, inplace=True, **opts)
    assert g is xi
    np.testing.assert_array_equal(loss, loss_ref)
    np.testing.assert_array_equal(xi, grad_ref)
    # and the not-inplace one is right (against the reference)
    x64 = x.astype(np.float64)
    assert_grad_close(xi, ref.cross_entropy_with_grad(x64, t, grad_output=go, **opts)[1],
                      dtype)


@pytest.mark.parametrize("dtype", [F32] + ([BF16] if BF16 is not None else []),
                         ids=lambda d: dtype_id(d))
def test_inplace_on_row_slice_writes_only_the_slice(rng, dtype):
    N, V, extra = 9, 257, 19
    big, _ = make_logits(rng, (N, V + extra), dtype)
    before = big.copy()
    x = big[:, :V]
    assert not x.flags.c_contiguous
    t = make_ids(rng, (N,), V, kind="ignored")
    opts = dict(label_smoothing=0.1, z_loss=1e-3)
    x64 = x.astype(np.float64)
    r_loss, r_grad = ref.cross_entropy_with_grad(x64, t, **opts)
    loss, g = lx.cross_entropy_with_grad(x, t, inplace=True, **opts)
    assert g is x
    assert np.shares_memory(g, big)
    assert_loss_close(loss, r_loss, dtype)
    assert_grad_close(big[:, :V], r_grad, dtype)
    np.testing.assert_array_equal(big[:, V:], before[:, V:])  # the rest untouched


def test_inplace_on_strided_rows_and_3d(rng):
    big, _ = make_logits(rng, (10, 64), F32)
    before = big.copy()
    x = big[::2]  # every other row
    t = make_ids(rng, (5,), 64)
    r = ref.cross_entropy_with_grad(x.astype(np.float64), t, reduction="sum")[1]
    _, g = lx.cross_entropy_with_grad(x, t, reduction="sum", inplace=True)
    assert g is x
    assert_grad_close(big[::2], r, F32)
    np.testing.assert_array_equal(big[1::2], before[1::2])

    x3, _ = make_logits(rng, (2, 3, 33), F32)
    t3 = make_ids(rng, (2, 3), 33, kind="ignored")
    r3 = ref.cross_entropy_with_grad(x3.astype(np.float64), t3)[1]
    _, g3 = lx.cross_entropy_with_grad(x3, t3, inplace=True)
    assert g3 is x3 and g3.shape == (2, 3, 33)
    assert_grad_close(x3, r3, F32)


def test_inplace_with_probability_targets(rng):
    x, _ = make_logits(rng, (5, 80), F32)
    q = make_probs(rng, x.shape).astype(np.float32)
    r = ref.cross_entropy_with_grad(x.astype(np.float64), q, label_smoothing=0.1)[1]
    _, g = lx.cross_entropy_with_grad(x, q, label_smoothing=0.1, inplace=True)
    assert g is x
    assert_grad_close(x, r, F32)


# ------------------------------------------------------------------- out=

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["plain", "all_none", "all_mean_normalizer"])
def test_grad_out_receives_the_gradient(rng, dtype, name):
    """out= (a reused buffer, here a slice of a wider array) gets exactly the
    gradient the call would return; the logits and the rest of the buffer are
    untouched; the backward from a saved LSE writes the same way."""
    x, t, opts = build_case(rng, name, (3, 7), 301, dtype)
    go = grad_output_for(rng, opts.get("reduction", "mean"), t.shape)
    x0 = x.copy()
    loss_new, g_new = lx.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    wide = np.full((3, 7, 320), 5, dtype)
    out = wide[..., :301]
    loss, g = lx.cross_entropy_with_grad(x, t, grad_output=go, out=out, **opts)
    assert g is out
    np.testing.assert_array_equal(loss, loss_new)
    np.testing.assert_array_equal(out, g_new)
    assert (wide[..., 301:] == 5).all()
    np.testing.assert_array_equal(x, x0)
    x64 = x.astype(np.float64)
    assert_grad_close(out, ref.cross_entropy_with_grad(x64, t, grad_output=go, **opts)[1], dtype)

    _, lse = lx.cross_entropy(x, t, return_lse=True, **opts)
    out2 = np.empty_like(x)
    assert lx.cross_entropy_backward(x, t, lse, go, out=out2, **opts) is out2
    np.testing.assert_array_equal(out2, lx.cross_entropy_backward(x, t, lse, go, **opts))


@pytest.mark.parametrize("dtype", CORE_DTYPES, ids=CORE_IDS)
def test_large_grad_out_at_every_alignment(isa, dtype, rng):
    """A gradient over 32 MiB is written with non-temporal stores where a row is
    16-byte aligned (whole vectors where it is vector-aligned; 16-bit gradients in
    16-byte pieces, except on the baseline ISA): V = 32001 puts the rows at every
    item-size offset modulo 64, and `out` starts one item into its buffer; the
    sentinel around it stays."""
    V = 32001
    n = 263 * 4 // dtype.itemsize  # 33.7 MB
    x, x64 = make_logits(rng, (n, V), dtype, scale=1.0)
    t = rng.integers(0, V, n)
    t[::5] = -100
    buf = np.full(n * V + 2, 7.0, dtype)
    out = buf[1:-1].reshape(n, V)
    _, g = lx.cross_entropy_with_grad(x, t, out=out)
    assert g is out and buf[0] == 7.0 and buf[-1] == 7.0
    assert_grad_close(out, ref.cross_entropy_with_grad(x64, t)[1], dtype)


def test_grad_out_for_logits_that_need_a_copy(rng):
    """Logits whose rows cannot be viewed (F order) are copied for the kernel; out=
    still receives the gradient directly."""
    x = np.asfortranarray(make_logits(rng, (6, 70), F32)[0])
    t = make_ids(rng, (6,), 70, kind="ignored")
    out = np.empty((6, 70), np.float32)
    _, g = lx.cross_entropy_with_grad(x, t, out=out)
    assert g is out
    assert_grad_close(out, ref.cross_entropy_with_grad(x.astype(np.float64), t)[1], F32)


def test_grad_out_sharing_memory_with_other_inputs(rng):
    """out= (or the logits, with inplace=True) over memory the kernel also reads --
    probability targets, class weights, the saved LSE, per-token grad_output -- gets
    the right gradient: it is computed into a buffer first."""
    n, V = 5, 64
    x, x64 = make_logits(rng, (n, V), F32)
    t = make_ids(rng, (n,), V, kind="ignored")
    # out= the probability targets
    q = make_probs(rng, (n, V)).astype(F32)
    want = ref.cross_entropy_with_grad(x64, q.astype(np.float64))[1]
    _, g = lx.cross_entropy_with_grad(x, q, out=q)
    assert g is q
    assert_grad_close(q, want, F32)
    # out= a buffer whose first row is the class weights
    buf = np.empty((n + 1) * V, F32)
    w = buf[:V]
    w[:] = rng.uniform(0.5, 2.0, V)
    want = ref.cross_entropy_with_grad(x64, t, weight=w.astype(np.float64))[1]
    out = buf[: n * V].reshape(n, V)
    lx.cross_entropy_with_grad(x, t, weight=w, out=out)
    assert_grad_close(out, want, F32)
    # backward into a buffer that holds the LSE and the per-token grad_output
    loss, lse = lx.cross_entropy(x, t, reduction="none", return_lse=True)
    go = rng.normal(size=n)
    want = ref.cross_entropy_backward(x64, t, lse.astype(np.float64), go, reduction="none")
    buf = np.empty(n * V, F32)
    buf[:n], buf[V:V + n] = lse, go
    lx.cross_entropy_backward(x, t, buf[:n], buf[V:V + n], reduction="none",
                              out=buf.reshape(n, V))
    assert_grad_close(buf.reshape(n, V), want, F32)
    # in place, the logits being the probability targets too
    p = make_probs(rng, (n, V)).astype(F32)
    want = ref.cross_entropy_with_grad(p.astype(np.float64), p.astype(np.float64))[1]
    _, g = lx.cross_entropy_with_grad(p, p, inplace=True)
    assert g is p
    assert_grad_close(p, want, F32)


def test_outputs_whose_elements_overlap_are_refused(rng):
    """A writable view whose elements alias each other (as_strided with a stride of
    0) cannot receive results: each element would be written from several rows."""
    n, V = 4, 33
    x, _ = make_logits(rng, (n, V), F32)
    t = make_ids(rng, (n,), V)
    aliased = np.lib.stride_tricks.as_strided(np.zeros(V, F32), (n, V), (0, 4))
    with pytest.raises(ValueError, match="out: its elements overlap each other"):
        lx.cross_entropy_with_grad(x, t, out=aliased)
    lse = lx.cross_entropy(x, t, reduction="none", return_lse=True)[1]
    with pytest.raises(ValueError, match="out: its elements overlap each other"):
        lx.cross_entropy_backward(x, t, lse, 1.0, out=aliased)
    for fn in (lx.softmax, lx.log_softmax):
        with pytest.raises(ValueError, match="out: its elements overlap each other"):
            fn(x, out=aliased)
    same = np.lib.stride_tricks.as_strided(x.copy(), (n, V), (0, 4))
    with pytest.raises(ValueError, match="logits: its elements overlap each other"):
        lx.cross_entropy_with_grad(same, t, inplace=True)
    with pytest.raises(ValueError, match="student_logits: its elements overlap each other"):
        lx.kl_divergence(same, x, return_grad=True, inplace=True)
    with pytest.raises(ValueError, match="out: its elements overlap each other"):
        lx.softmax(same, out=same)  # the same array as input and output
    # interleaved axes (stride 4 over 8 elements, then stride 8): overlapping too
    inter = np.lib.stride_tricks.as_strided(np.zeros(64, F32), (4, 8), (8, 4))
    with pytest.raises(ValueError, match="out: its elements overlap each other"):
        lx.softmax(np.zeros((4, 8), F32), out=inter)


# ----------------------------------------------------------- awkward sizes

SIZES = [(1, 5), (2, 5), (7, 5), (31, 3), (32000, 3), (50257, 3), (128256, 2),
         (262144, 2)]


@pytest.mark.parametrize("V,N", SIZES, ids=[f"V{v}" for v, _ in SIZES])
def test_vocab_sizes_float32(rng, V, N):
    x, _ = make_logits(rng, (N, V), F32)
    t = make_ids(rng, (N,), V)
    kw = {"torch_check": V <= 50257}
    check_all(x, t, reduction="none", grad_output=rng.normal(size=N), **kw)
    if V <= 50257:
        w = rng.uniform(0.5, 1.5, V)
        check_all(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, softcap=10.0, **kw)


@pytest.mark.parametrize("dtype", [F16] + ([BF16] if BF16 is not None else []) + [F64],
                         ids=lambda d: dtype_id(d))
@pytest.mark.parametrize("V", [1, 2, 7, 31, 32000])
def test_vocab_sizes_other_dtypes(rng, dtype, V):
    x, _ = make_logits(rng, (3, V), dtype)
    t = make_ids(rng, (3,), V)
    check_all(x, t, label_smoothing=0.1, reduction="none", torch_check=False)


def test_vocab_of_one_is_zero_loss_and_zero_gradient(rng):
    x, _ = make_logits(rng, (5, 1), F32)
    t = np.zeros(5, dtype=np.int64)
    for eps in (0.0, 0.3):
        loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", label_smoothing=eps)
        # lse == z_t exactly; with smoothing lse * eps - eps * z rounds in float32
        assert np.all(np.abs(loss) <= 1e-6 * (1 + np.abs(x[:, 0]))) and np.all(g == 0)


@pytest.mark.parametrize("N", [1, 3, 17])
def test_batch_sizes(rng, N):
    x, t, opts = build_case(rng, "all_mean_normalizer", (N,), 129, F32)
    check_all(x, t, **opts)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_strided_rows_without_copy(rng, dtype):
    big, _ = make_logits(rng, (8, 300), dtype)
    t = make_ids(rng, (8,), 250, kind="ignored")
    check_all(big[:, :250], t, label_smoothing=0.1)        # row stride 300
    check_all(big[:, 50:], t, reduction="none")             # offset rows
    t4 = make_ids(rng, (4,), 300)
    check_all(big[::2], t4, weight=rng.uniform(0.5, 2, 300))  # every other row
    check_all(big[::-1][:4], t4, reduction="sum")            # negative row stride


def test_non_viewable_layouts_are_copied_correctly(rng):
    big, _ = make_logits(rng, (6, 80), F32)
    t = make_ids(rng, (6,), 40)
    check_all(big[:, ::2], t)                      # non-contiguous last axis
    xt, _ = make_logits(rng, (40, 6), F32)
    check_all(xt.T, t, reduction="none")           # transposed
    big3, _ = make_logits(rng, (2, 3, 50), F32)
    check_all(big3[:, :, :40], t.reshape(2, 3))    # leading axes do not collapse


def unaligned(a):
    b = np.ndarray(a.shape, a.dtype, buffer=bytearray(a.nbytes + 1), offset=1)
    b[...] = a
    assert not b.flags.aligned
    return b


def test_unaligned_strided_logits_and_vectors(rng):
    x, _ = make_logits(rng, (6, 80), F32)
    t = make_ids(rng, (6,), 40)
    check_all(unaligned(x)[:, ::2], t)  # copied because of the stride
    check_all(x[:, :40], unaligned(t))
    go = unaligned(rng.normal(size=6).astype(np.float32))
    check_all(x[:, :40], t, weight=unaligned(rng.uniform(0.5, 2, 40).astype(np.float32)),
              reduction="none", grad_output=go)


@pytest.mark.parametrize("which", ["logits", "probs"])
def test_unaligned_contiguous_logits(rng, which):
    x, _ = make_logits(rng, (6, 40), F32)
    q = make_probs(rng, x.shape).astype(np.float32)
    if which == "logits":
        check_all(unaligned(x), make_ids(rng, (6,), 40), label_smoothing=0.2)
    else:
        check_all(x, unaligned(q))


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_byte_swapped_logits(rng, dtype):
    x, _ = make_logits(rng, (6, 40), np.dtype(dtype).newbyteorder("="))
    xs = x.astype(dtype)
    t = make_ids(rng, (6,), 40)
    loss, g = lx.cross_entropy_with_grad(xs, t, reduction="none")
    np.testing.assert_array_equal(loss, lx.cross_entropy(x, t, reduction="none"))
    np.testing.assert_array_equal(g, lx.cross_entropy_with_grad(x, t, reduction="none")[1])


def test_list_logits_are_accepted(rng):
    x = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    loss = lx.cross_entropy(x, [2, 0])
    np.testing.assert_allclose(loss, ref.cross_entropy(np.array(x), np.array([2, 0])),
                               rtol=1e-12)


# ----------------------------------------------- all ignored, empty batch

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opts", [{}, {"weight": "W", "label_smoothing": 0.1, "z_loss": 0.1},
                                  {"normalizer": 5.0}, {"ignore_index": 3}],
                         ids=["plain", "weighted", "normalizer", "ignore3"])
def test_all_targets_ignored(rng, dtype, opts):
    opts = dict(opts)
    V = 20
    if opts.get("weight") == "W":
        opts["weight"] = rng.uniform(0.5, 2.0, V)
    x, _ = make_logits(rng, (6, V), dtype)
    t = np.full(6, opts.get("ignore_index", -100))
    loss, g = lx.cross_entropy_with_grad(x, t, **opts)
    assert loss.dtype == loss_dtype(dtype) and loss.shape == ()
    assert loss == 0.0 and not np.isnan(loss)
    assert g.dtype == dtype and np.all(g.astype(np.float64) == 0.0)
    assert lx.cross_entropy(x, t, **opts) == 0.0
    s_opts = {k: v for k, v in opts.items() if k != "normalizer"}
    assert lx.cross_entropy(x, t, reduction="sum", **s_opts) == 0.0
    assert np.all(lx.cross_entropy(x, t, reduction="none", **s_opts) == 0.0)
    _, lse = lx.cross_entropy(x, t, return_lse=True, **opts)
    assert np.all(np.isfinite(lse))  # lse is still returned for ignored rows
    gb = lx.cross_entropy_backward(x, t, lse, 2.0, **opts)
    assert np.all(gb.astype(np.float64) == 0.0)
    check_all(x, t, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_forward(reduction):
    for shape in ((0, 11), (2, 0, 11)):
        x = np.zeros(shape, np.float32)
        t = np.zeros(shape[:-1], np.int64)
        loss, lse = lx.cross_entropy(x, t, reduction=reduction, return_lse=True)
        assert lse.shape == shape[:-1]
        if reduction == "none":
            assert loss.shape == shape[:-1] and loss.dtype == np.float32
        else:
            assert loss.shape == () and loss == 0.0


@pytest.mark.parametrize("shape", [(0, 11), (2, 0, 11)])
def test_empty_batch_gradient(shape):
    x = np.zeros(shape, np.float32)
    t = np.zeros(shape[:-1], np.int64)
    loss, g = lx.cross_entropy_with_grad(x, t)
    assert loss == 0.0 and g.shape == shape and g.dtype == np.float32
    _, lse = lx.cross_entropy(x, t, return_lse=True)
    gb = lx.cross_entropy_backward(x, t, lse, 1.0)
    assert gb.shape == shape


def test_empty_batch_gradient_inplace():
    x = np.zeros((0, 11), np.float32)
    loss, g = lx.cross_entropy_with_grad(x, np.zeros(0, np.int64), inplace=True)
    assert loss == 0.0 and g is x


# --------------------------------------------------------- extreme logits

def huge_logits(rng, dtype, mag=1e4, shape=(8, 301)):
    x64 = rng.normal(size=shape)
    mask = rng.random(shape) < 0.05
    x64[mask] = rng.choice([-mag, mag], size=mask.sum())
    x64[0, :] = mag
    x64[1, :] = -mag
    return lowp(x64, dtype)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4},
                                  {"softcap": 50.0}], ids=["plain", "smooth_z", "softcap"])
def test_huge_logits(rng, dtype, opts):
    """+-1e4 logits: finite, and right to within the float32 rounding of the lse
    (the kernel forms p = exp(z - lse) with lse in float32: up to ulp(lse)/2 relative
    error in p; test_huge_logits_gradient_as_accurate_as_torch asks for more)."""
    x = huge_logits(rng, dtype)
    t = make_ids(rng, (8,), 301)
    x64 = x.astype(np.float64)
    r_loss, r_lse = ref.cross_entropy(x64, t, reduction="none", return_lse=True, **opts)
    r_grad = ref.cross_entropy_backward(x64, t, r_lse, 1.0, reduction="none", **opts)
    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", **opts)
    assert np.isfinite(loss).all() and np.isfinite(g.astype(np.float64)).all()
    assert_loss_close(loss, r_loss, dtype)
    lse_err = 1.0 if dtype == F64 else 1 + 2.0**-23 * np.abs(r_lse)[:, None] / 1e-6
    gs = grad_scale(x.shape, t, r_lse, reduction="none", **opts) * lse_err
    assert_grad_close(g, r_grad, dtype, gscale=gs)
    _, lse = lx.cross_entropy(x, t, reduction="none", return_lse=True, **opts)
    assert_loss_close(lse, r_lse, dtype, what="lse")
    assert_grad_close(lx.cross_entropy_backward(x, t, lse, 1.0, reduction="none", **opts),
                      r_grad, dtype, gscale=gs)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("mag", [1e2, 1e4])
def test_huge_logits_gradient_as_accurate_as_torch(rng, mag):
    x = huge_logits(rng, F32, mag)
    t = make_ids(rng, (8,), 301)
    r_grad = ref.cross_entropy_with_grad(x.astype(np.float64), t, reduction="sum")[1]
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), reduction="sum").backward()
    t_err = np.abs(xt.grad.numpy() - r_grad).max()
    k_err = np.abs(lx.cross_entropy_with_grad(x, t, reduction="sum")[1] - r_grad).max()
    assert k_err <= 1.5 * t_err + 1e-9, (k_err, t_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_masked_vocabulary_minus_inf(rng, dtype):
    x, _ = make_logits(rng, (6, 203), dtype)
    t = make_ids(rng, (6,), 203, kind="ignored")
    x[:, 100:150] = -np.inf
    x[:, 202] = -np.inf  # in the row tail
    t[(t >= 100) & (t < 150)] = 7
    t[t == 202] = 8
    loss, g = check_all(x, t, reduction="none")
    assert np.isfinite(loss).all() and np.isfinite(g.astype(np.float64)).all()
    assert np.all(g[:, 100:150].astype(np.float64) == 0)
    # with smoothing the -inf classes get target mass: infinite loss (as in the
    # reference), but a finite gradient
    loss, g = check_all(x, t, reduction="none", label_smoothing=0.1, torch_check=False)
    assert np.all(np.isinf(loss[t != -100])) and np.isfinite(g.astype(np.float64)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("opts", [{}, {"softcap": 5.0}, {"label_smoothing": 0.0,
                                                          "weight": "W"}],
                         ids=["plain", "softcap", "weight"])
def test_row_of_minus_inf_except_target(rng, dtype, opts):
    V = 77
    opts = dict(opts)
    if opts.get("weight") == "W":
        opts["weight"] = rng.uniform(0.5, 2.0, V)
    x = np.full((3, V), -np.inf).astype(dtype)
    t = np.array([0, 40, V - 1])
    x[np.arange(3), t] = [0.0, 5.0, -3.0]
    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none", **opts)
    if "softcap" not in opts:
        assert np.all(loss == 0.0)
        assert np.all(g.astype(np.float64) == 0.0)
    assert np.isfinite(loss).all() and np.isfinite(g.astype(np.float64)).all()
    check_all(x, t, reduction="none", torch_check=False, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("where", ["target", "other", "tail"])
def test_nan_propagates_to_its_row_only(rng, dtype, where):
    V = 203
    x, _ = make_logits(rng, (5, V), dtype)
    t = make_ids(rng, (5,), V)
    t[3] = -100
    col = {"target": t[1], "other": (t[1] + 1) % V, "tail": V - 1}[where]
    x[1, col] = np.nan
    x[3, 0] = np.nan  # an ignored row: loss 0, gradient 0 (as in the reference)
    loss, g = check_all(x, t, reduction="none", torch_check=False, label_smoothing=0.1)
    g = g.astype(np.float64)
    assert np.isnan(loss[1]) and np.isnan(g[1]).all()
    assert loss[3] == 0 and np.all(g[3] == 0)
    keep = [0, 2, 4]
    assert np.isfinite(loss[keep]).all() and np.isfinite(g[keep]).all()
    assert np.isnan(lx.cross_entropy(x, t))
    assert np.isnan(lx.cross_entropy(x, t, reduction="sum"))


def test_nan_propagates_in_a_row_split_across_threads(rng):
    V = 131072
    x, _ = make_logits(rng, (1, V), F32)
    x[0, 100_000] = np.nan
    with num_threads(2):
        loss, g = lx.cross_entropy_with_grad(x, np.array([5]), reduction="none")
    assert np.isnan(loss).all() and np.isnan(g).all()


# ------------------------------------------ few rows, huge vocabulary (threads)

def test_two_rows_262144(rng):
    V = 262144
    x, _ = make_logits(rng, (2, V), F32, scale=4.0)
    t = make_ids(rng, (2,), V)
    check_all(x, t, reduction="none", grad_output=np.array([1.0, -0.5]), torch_check=False)
    check_all(x, t, label_smoothing=0.1, z_loss=1e-3, torch_check=False)


def test_one_row_1048576_split_across_threads(rng):
    V = 1 << 20
    x, _ = make_logits(rng, (2, V), F32, scale=4.0)
    t = np.array([123, V - 1])
    with num_threads(2):
        # one row: split across the 2 threads; two rows: one per thread
        for rows in (slice(0, 1), slice(0, 2)):
            xs, ts = x[rows], t[rows]
            x64 = xs.astype(np.float64)
            r_loss, r_grad = ref.cross_entropy_with_grad(x64, ts, reduction="none",
                                                         label_smoothing=0.05)
            loss, g = lx.cross_entropy_with_grad(xs, ts, reduction="none", label_smoothing=0.05)
            assert_loss_close(loss, r_loss, F32)
            assert_grad_close(g, r_grad, F32)
        # the same row, gradient written in place while split across threads
        xi = x[:1].copy()
        _, gi = lx.cross_entropy_with_grad(xi, t[:1], reduction="none",
                                           label_smoothing=0.05, inplace=True)
        np.testing.assert_array_equal(gi, g[:1])


def test_rows_split_across_more_threads_than_cores(rng):
    V = 131072
    x, _ = make_logits(rng, (3, V), F32)
    t = np.array([0, V // 2, V - 1])
    with num_threads(4):  # 3 rows < 4 threads: each row split in 4
        check_all(x, t, reduction="none", label_smoothing=0.1, weight=rng.uniform(0.5, 1.5, V),
                  torch_check=False)


@pytest.mark.parametrize("V", [65537, 262145])
def test_row_split_across_threads_odd_vocab(rng, V):
    x, _ = make_logits(rng, (1, V), F32)
    x[0, -1] = 30.0  # the dropped column dominates the softmax
    t = np.array([V - 1])
    with num_threads(2):
        check_all(x, t, reduction="none", torch_check=False)


# --------------------------------------------- accuracy against torch float32

@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("N,V,scale", [(64, 32000, 4.0), (8, 128256, 3.0), (4, 50257, 5.0)])
def test_float32_accuracy_no_worse_than_torch(rng, N, V, scale):
    x, x64 = make_logits(rng, (N, V), F32, scale=scale)
    t = make_ids(rng, (N,), V)
    r_loss, r_grad = ref.cross_entropy_with_grad(x64, t, reduction="none")

    xt = torch.tensor(x, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(xt, torch.from_numpy(t), reduction="none")
    tl.sum().backward()
    t_loss_err = np.abs(tl.detach().numpy().astype(np.float64) - r_loss).max()
    t_grad_err = np.abs(xt.grad.numpy().astype(np.float64) - r_grad).max()

    loss, g = lx.cross_entropy_with_grad(x, t, reduction="none")
    k_loss_err = np.abs(loss.astype(np.float64) - r_loss).max()
    k_grad_err = np.abs(g.astype(np.float64) - r_grad).max()
    assert k_loss_err <= 1.5 * t_loss_err + 1e-7, (k_loss_err, t_loss_err)
    assert k_grad_err <= 1.5 * t_grad_err + 1e-9, (k_grad_err, t_grad_err)
    f_loss = lx.cross_entropy(x, t, reduction="none")
    assert np.abs(f_loss.astype(np.float64) - r_loss).max() <= 1.5 * t_loss_err + 1e-7


# -------------------------------------------------------- property tests

PROP = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@st.composite
def ce_problem(draw, max_v=300):
    N = draw(st.integers(1, 6))
    V = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.floats(0.1, 20.0))
    x = rng.normal(scale=scale, size=(N, V))
    t = rng.integers(0, V, size=N)
    t[rng.random(N) < 0.2] = -100
    w = rng.uniform(0.1, 3.0, V) if draw(st.booleans()) else None
    return x, t, w, rng


@PROP
@given(ce_problem(), st.sampled_from([F32, F64]), st.floats(0.2, 3.0))
def test_property_gradient_rows_sum_to_zero(problem, dtype, logit_scale):
    x, t, w, _ = problem
    x, _ = lowp(x, dtype)
    _, g = lx.cross_entropy_with_grad(x, t, weight=w, reduction="sum", logit_scale=logit_scale)
    g = g.astype(np.float64)
    wt = np.where(t == -100, 0.0, 1.0 if w is None else np.take(w, np.maximum(t, 0)))
    eps = 1e-12 if dtype == F64 else 2e-5
    tol = eps * (np.abs(g).sum(-1) + wt * logit_scale) + 1e-30
    assert np.all(np.abs(g.sum(-1)) <= tol), (g.sum(-1), tol)
    assert np.all(g[t == -100] == 0)


@PROP
@given(ce_problem(), st.floats(0.0, 1.0), st.floats(0.2, 3.0))
def test_property_shift_invariance_float64(problem, eps, logit_scale):
    x, t, w, rng = problem
    c = rng.uniform(-50, 50, size=(x.shape[0], 1))
    xs = x + c
    x = xs - c  # the exact values that shift to xs (so only the kernel's rounding differs)
    opts = dict(weight=w, label_smoothing=eps, logit_scale=logit_scale, reduction="none")
    l0, g0 = lx.cross_entropy_with_grad(x, t, **opts)
    l1, g1 = lx.cross_entropy_with_grad(xs, t, **opts)
    mag = 1.0 + logit_scale * (np.abs(x).max() + 50)
    wmax = 1.0 if w is None else float(w.max())
    np.testing.assert_allclose(l1, l0, rtol=1e-11, atol=1e-13 * mag * (1 + wmax))
    np.testing.assert_allclose(g1, g0, rtol=1e-9, atol=1e-12 * mag)


@PROP
@given(st.integers(1, 3), st.integers(1, 8), st.integers(0, 2**32 - 1),
       st.floats(0.0, 1.0), st.floats(0.0, 0.5), st.floats(0.5, 10.0), st.floats(0.3, 3.0),
       st.sampled_from(["none", "mean", "sum"]), st.booleans(), st.booleans())
def test_property_finite_differences_float64(N, V, seed, eps, z_loss, softcap, logit_scale,
                                             reduction, use_weight, probs):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=2.0, size=(N, V))
    if probs:
        t = make_probs(rng, (N, V))
    else:
        t = rng.integers(0, V, size=N)
        if N > 1:
            t[0] = -100
    opts = dict(weight=rng.uniform(0.2, 2.0, V) if use_weight else None,
                label_smoothing=eps, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
                reduction=reduction, normalizer=7.0 if reduction == "mean" and seed % 2 else None)
    go = rng.normal(size=N) if reduction == "none" else 1.3

    def f(xx):
        return float(np.sum(go * lx.cross_entropy(xx, t, **opts)))

    _, g = lx.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    np.testing.assert_allclose(g, numeric_grad(f, x), rtol=1e-5, atol=1e-7)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(ce_problem(max_v=600), st.sampled_from(DTYPES), st.floats(0.0, 1.0),
       st.sampled_from([0.0, 1e-4, 0.1]), st.sampled_from([None, 1.0, 15.0]),
       st.sampled_from(["none", "mean", "sum"]))
def test_property_random_options_match_reference(problem, dtype, eps, z_loss, softcap,
                                                 reduction):
    x, t, w, rng = problem
    x, _ = lowp(x, dtype)
    go = rng.normal(size=t.shape) if reduction == "none" else 0.9
    check_all(x, t, grad_output=go, weight=w, label_smoothing=eps, z_loss=z_loss,
              softcap=softcap, reduction=reduction, torch_check=False)
