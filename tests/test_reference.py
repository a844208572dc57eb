"""Tests of lmxent.reference (the float64 oracle) against torch and finite differences."""
import itertools

import numpy as np
import pytest

from lmxent import reference as ref

from helpers import numeric_grad

B, T, V = 2, 3, 7


def make_case(kind, seed=0, ignore_index=-100):
    """Logits (B, T, V) and targets: class ids, class ids with ignored tokens, or probs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=2.0, size=(B, T, V))
    if kind == "prob":
        q = rng.random((B, T, V)) ** 3
        return x, q / q.sum(-1, keepdims=True)
    t = rng.integers(0, V, size=(B, T))
    if kind == "ignored":
        t[0, 1] = t[1, 2] = ignore_index
    elif kind == "all_ignored":
        t[...] = ignore_index
    return x, t


def class_weights(seed=1):
    return np.random.default_rng(seed).uniform(0.2, 2.0, size=V)


# ---------------------------------------------------------------- torch helpers

def torch_mods():
    torch = pytest.importorskip("torch")
    return torch, torch.nn.functional


def torch_ce(x, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None):
    """lmxent's cross_entropy built from torch ops (x: float64 tensor, requires_grad ok)."""
    torch, F = torch_mods()
    t = torch.from_numpy(np.asarray(t))
    w = None if weight is None else torch.from_numpy(np.asarray(weight, dtype=np.float64))
    z = logit_scale * x
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    prob = t.is_floating_point()
    per = F.cross_entropy(z.movedim(-1, 1), t.movedim(-1, 1) if prob else t, weight=w,
                          ignore_index=ignore_index, reduction="none",
                          label_smoothing=label_smoothing)
    lse = torch.logsumexp(z, -1)
    if prob:
        mask = torch.ones(per.shape, dtype=torch.float64)
        denom = float(mask.numel())
    else:
        mask = (t != ignore_index).double()
        denom = mask.sum() if w is None else (w[t.clamp(0, V - 1)] * mask).sum()
        denom = float(denom)
    per = per + z_loss * lse**2 * mask
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if normalizer is not None:
        denom = normalizer
    return per.sum() / denom if denom != 0 else per.sum() * 0.0


def torch_grad(x, t, grad_output=1.0, **opts):
    torch, _ = torch_mods()
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    loss = torch_ce(xt, t, **opts)
    loss.backward(torch.as_tensor(grad_output, dtype=torch.float64).expand_as(loss))
    return loss.detach().numpy(), xt.grad.numpy()


# ------------------------------------------------- cross_entropy vs F.cross_entropy

@pytest.mark.parametrize("kind", ["int", "ignored", "prob"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_matches_torch(kind, use_weight, label_smoothing, reduction,
                                     ignore_index):
    torch, F = torch_mods()
    x, t = make_case(kind, ignore_index=ignore_index)
    w = class_weights() if use_weight else None
    if kind == "prob" and ignore_index >= 0:  # torch refuses this, and so do we
        with pytest.raises(ValueError, match="ignore_index"):
            ref.cross_entropy(x, t, ignore_index=ignore_index)
        with pytest.raises(RuntimeError, match="ignore_index"):
            F.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), ignore_index=3)
        return
    expected = F.cross_entropy(
        torch.from_numpy(x).movedim(-1, 1),
        torch.from_numpy(t).movedim(-1, 1) if kind == "prob" else torch.from_numpy(t),
        weight=None if w is None else torch.from_numpy(w), ignore_index=ignore_index,
        reduction=reduction, label_smoothing=label_smoothing).numpy()
    got = ref.cross_entropy(x, t, weight=w, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=label_smoothing)
    assert isinstance(got, (np.ndarray, np.float64)) and got.dtype == np.float64
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_ignore_index_that_is_a_class_id():
    x, t = make_case("int")
    t[0, 0] = 3
    per = ref.cross_entropy(x, t, ignore_index=3, reduction="none")
    assert np.all(per[t == 3] == 0.0) and np.all(per[t != 3] > 0.0)


def test_int_target_dtypes_agree():
    x, t = make_case("ignored")
    a = ref.cross_entropy(x, t.astype(np.int64))
    for dt in (np.int32, np.int16, np.uint8):
        tt = np.where(t < 0, 255 if dt == np.uint8 else -100, t).astype(dt)
        ii = 255 if dt == np.uint8 else -100
        assert ref.cross_entropy(x, tt, ignore_index=ii) == a


def test_unbatched_logits():
    torch, F = torch_mods()
    x, t = make_case("int")
    got = ref.cross_entropy(x[0, 0], t[0, 0], reduction="none")
    assert got.shape == ()
    np.testing.assert_allclose(
        got, F.cross_entropy(torch.from_numpy(x[0, 0]), torch.tensor(t[0, 0])).item(),
        rtol=1e-13)


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mean_over_zero_tokens_is_zero_not_nan(use_weight, label_smoothing):
    torch, F = torch_mods()
    x, t = make_case("all_ignored")
    w = class_weights() if use_weight else None
    opts = dict(weight=w, label_smoothing=label_smoothing, z_loss=0.1)
    loss, grad = ref.cross_entropy_with_grad(x, t, **opts)
    assert loss == 0.0 and np.all(grad == 0.0)
    assert np.all(ref.cross_entropy(x, t, reduction="none", **opts) == 0.0)
    assert ref.cross_entropy(x, t, reduction="sum", **opts) == 0.0
    # the deliberate difference: torch returns NaN here
    torch_mean = F.cross_entropy(torch.from_numpy(x).movedim(-1, 1), torch.from_numpy(t),
                                 weight=None if w is None else torch.from_numpy(w),
                                 label_smoothing=label_smoothing)
    assert torch.isnan(torch_mean)


def test_masked_vocabulary_is_finite_without_smoothing():
    torch, F = torch_mods()
    x, t = make_case("int")
    x[..., 0] = -np.inf
    t[t == 0] = 1
    loss, grad = ref.cross_entropy_with_grad(x, t)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)) and np.all(grad[..., 0] == 0)
    xt = torch.tensor(x, requires_grad=True)
    expected = F.cross_entropy(xt.movedim(-1, 1), torch.from_numpy(t))
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-13)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_nan_propagates_to_its_row_only():
    x, t = make_case("ignored")
    x[1, 0, 2] = np.nan
    per = ref.cross_entropy(x, t, reduction="none")
    assert np.isnan(per[1, 0]) and np.isfinite(np.delete(per.ravel(), T)).all()
    assert np.isnan(ref.cross_entropy(x, t))
    x[0, 1, 0] = np.nan  # an ignored row: its loss is 0 and its gradient 0
    _, g = ref.cross_entropy_with_grad(x, t, reduction="none")
    assert np.all(g[0, 1] == 0.0) and np.isnan(g[1, 0]).all()


# --------------------------------------------- extended options and gradients vs torch

GRAD_CASES = list(itertools.product(
    ["ignored", "prob"],                   # targets
    [False, True],                         # weight
    [0.0, 0.2],                            # label_smoothing
    [0.0, 0.1],                            # z_loss
    [None, 1.5],                           # softcap (small, so tanh bends)
    [1.0, 0.7],                            # logit_scale
))


@pytest.mark.parametrize("kind,use_weight,eps,z_loss,softcap,scale", GRAD_CASES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_loss_and_grad_match_torch_autograd(kind, use_weight, eps, z_loss, softcap, scale,
                                            reduction):
    x, t = make_case(kind, seed=2)
    opts = dict(weight=class_weights() if use_weight else None, label_smoothing=eps,
                z_loss=z_loss, softcap=softcap, logit_scale=scale, reduction=reduction)
    go = np.random.default_rng(3).normal(size=(B, T)) if reduction == "none" else 0.8
    expected_loss, expected_grad = torch_grad(x, t, go, **opts)
    loss, grad = ref.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ref.cross_entropy(x, t, **opts), loss, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ignored", "prob"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_normalizer(kind, use_weight):
    x, t = make_case(kind, seed=4)
    opts = dict(weight=class_weights() if use_weight else None, label_smoothing=0.1,
                z_loss=0.05, softcap=3.0)
    n = 11.0
    expected_loss, expected_grad = torch_grad(x, t, 1.3, normalizer=n, **opts)
    loss, grad = ref.cross_entropy_with_grad(x, t, normalizer=n, grad_output=1.3, **opts)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(loss, ref.cross_entropy(x, t, reduction="sum", **opts) / n,
                               rtol=1e-14)
    # all ignored with a normalizer: the sum is 0, so the loss is 0
    x0, t0 = make_case("all_ignored")
    assert ref.cross_entropy(x0, t0, normalizer=n, **opts) == 0.0


def test_return_lse_matches_torch_logsumexp_of_transformed_logits():
    torch, _ = torch_mods()
    x, t = make_case("ignored")
    loss, lse = ref.cross_entropy(x, t, softcap=2.0, logit_scale=0.5, return_lse=True)
    z = 2.0 * torch.tanh(0.5 * torch.from_numpy(x) / 2.0)
    assert lse.shape == (B, T)
    np.testing.assert_allclose(lse, torch.logsumexp(z, -1).numpy(), rtol=1e-14)
    assert loss == ref.cross_entropy(x, t, softcap=2.0, logit_scale=0.5)


@pytest.mark.parametrize("kind", ["ignored", "prob"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_backward_from_lse_equals_with_grad(kind, reduction):
    x, t = make_case(kind, seed=5)
    opts = dict(weight=class_weights(), label_smoothing=0.1, z_loss=0.02, softcap=4.0,
                logit_scale=1.3, reduction=reduction)
    go = np.linspace(-1, 2, B * T).reshape(B, T) if reduction == "none" else 2.5
    loss, grad = ref.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    _, lse = ref.cross_entropy(x, t, return_lse=True, **opts)
    np.testing.assert_array_equal(ref.cross_entropy_backward(x, t, lse, go, **opts), grad)
    # it really uses the lse it is given: p = exp(z - lse)
    shifted = ref.cross_entropy_backward(x, t, lse + np.log(2.0), go, **opts)
    assert not np.allclose(shifted, grad)


# ---------------------------------------------- finite differences (no torch needed)

@pytest.mark.parametrize("kind", ["ignored", "prob"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_grad_matches_finite_differences(kind, reduction):
    x, t = make_case(kind, seed=6)
    opts = dict(weight=class_weights(), label_smoothing=0.2, z_loss=0.1, softcap=2.5,
                logit_scale=0.8, reduction=reduction)
    go = np.random.default_rng(7).normal(size=(B, T)) if reduction == "none" else 1.7

    def f(xx):
        return np.sum(go * ref.cross_entropy(xx, t, **opts))

    _, grad = ref.cross_entropy_with_grad(x, t, grad_output=go, **opts)
    np.testing.assert_allclose(grad, numeric_grad(f, x), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------- logsumexp and (log_)softmax

@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_softmax_family_matches_torch(axis, temperature):
    torch, _ = torch_mods()
    x = np.random.default_rng(8).normal(scale=5.0, size=(3, 4, 5))
    xs = torch.from_numpy(x) / temperature
    np.testing.assert_allclose(ref.logsumexp(x, axis, temperature=temperature),
                               torch.logsumexp(xs, axis).numpy(), rtol=1e-14)
    np.testing.assert_allclose(
        ref.logsumexp(x, axis, keepdims=True, temperature=temperature),
        torch.logsumexp(xs, axis, keepdim=True).numpy(), rtol=1e-14)
    np.testing.assert_allclose(ref.log_softmax(x, axis, temperature=temperature),
                               torch.log_softmax(xs, axis).numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(ref.softmax(x, axis, temperature=temperature),
                               torch.softmax(xs, axis).numpy(), rtol=1e-13, atol=1e-300)


def test_logsumexp_special_values():
    torch, _ = torch_mods()
    x = np.array([[-np.inf, -np.inf, -np.inf],
                  [1.0, np.nan, 2.0],
                  [1.0, np.inf, -np.inf],
                  [1000.0, 1000.0, -np.inf]])
    got = ref.logsumexp(x)
    np.testing.assert_array_equal(got, torch.logsumexp(torch.from_numpy(x), -1).numpy())
    np.testing.assert_allclose(got[3], 1000.0 + np.log(2.0), rtol=1e-15)


def test_low_precision_inputs_convert_to_float64():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x, t = make_case("ignored")
    for dt in (np.float16, ml_dtypes.bfloat16, np.float32):
        xl = x.astype(dt)
        exact = xl.astype(np.float64)
        assert ref.cross_entropy(xl, t) == ref.cross_entropy(exact, t)
        assert ref.softmax(xl).dtype == np.float64
        q = make_case("prob")[1].astype(dt)
        assert ref.cross_entropy(xl, q) == ref.cross_entropy(exact, q.astype(np.float64))


# ------------------------------------------------------------------- validation

def test_validation_errors():
    x, t = make_case("int")
    with pytest.raises(ValueError, match="reduction"):
        ref.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="shape"):
        ref.cross_entropy(x, t[:, :2])
    with pytest.raises(ValueError, match="shape"):
        ref.cross_entropy(x, np.ones((B, T, V + 1)) / (V + 1))
    with pytest.raises(ValueError, match="weight"):
        ref.cross_entropy(x, t, weight=np.ones(V + 1))
    for reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="normalizer"):
            ref.cross_entropy(x, t, reduction=reduction, normalizer=4.0)
    with pytest.raises(ValueError, match="normalizer"):
        ref.cross_entropy(x, t, normalizer=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        ref.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ref.softmax(x, temperature=0.0)
    with pytest.raises(ValueError, match="grad_output"):
        ref.cross_entropy_with_grad(x, t, grad_output=np.ones((B, T)))
    with pytest.raises(ValueError, match="lse"):
        ref.cross_entropy_backward(x, t, np.zeros(B), 1.0)
    bad = t.copy()
    bad[1, 2] = V
    with pytest.raises(ValueError, match=r"position \(1, 2\)"):
        ref.cross_entropy(x, bad)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match=r"position \(1, 2\)"):
        ref.cross_entropy(x, bad)
