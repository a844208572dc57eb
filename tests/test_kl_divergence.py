"""lmxent.kl_divergence (forward, reverse, Jensen-Shannon; loss and fused student
gradient) against lmxent.reference (float64), torch's F.kl_div with autograd, and
float64 finite differences; zero-probability teacher classes, masks, reductions,
temperature, in-place gradients, errors."""
import numpy as np
import pytest

import lmxent as lx
from lmxent import reference as R

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
    lowp,
    num_threads,
    numeric_grad,
    torch,
)

DIRECTIONS = ["forward", "reverse", "js"]
# gradient tolerance: float32 error is absolute, relative to the row's gradient scale (<= 2 / T)
GSCALE = 2.0


def pair(rng, shape, dtype, zero_teacher=False):
    s, s64 = lowp(rng.standard_normal(shape) * 3, dtype)
    t, t64 = lowp(rng.standard_normal(shape) * 3, dtype)
    if zero_teacher:  # a third of the teacher's classes impossible
        t[..., ::3] = -np.inf
        t64[..., ::3] = -np.inf
    return s, s64, t, t64


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("V", [1, 7, 2049, 40000])
def test_matches_reference(rng, isa, dtype, direction, V):
    s, s64, t, t64 = pair(rng, (6, V), dtype, zero_teacher=direction != "reverse" and V > 1)
    loss, g = lx.kl_divergence(s, t, direction=direction, reduction="none", return_grad=True,
                               temperature=1.5)
    rl, rg = R.kl_divergence(s64, t64, direction=direction, reduction="none", return_grad=True,
                             temperature=1.5)
    assert loss.dtype == (np.float64 if dtype == F64 else np.float32)
    assert_loss_close(loss, rl, dtype, what="kl")
    assert (loss >= 0).all()
    assert_grad_close(g, rg, dtype, gscale=GSCALE)


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_long_rows_split_across_threads(rng, isa, dtype, direction):
    """Fewer rows than threads, long rows: each row is split across the tasks and the
    parts' KL sums merged (kl_merge_sum); the same result as one thread and the
    reference, masked rows zero."""
    s, s64, t, t64 = pair(rng, (1, 3, 100_003), dtype, zero_teacher=direction != "reverse")
    mask = np.array([[True, False, True]])
    runs = []
    for n in (1, 2, 4):
        with num_threads(n):
            runs.append(lx.kl_divergence(s, t, direction=direction, reduction="none",
                                         return_grad=True, mask=mask, temperature=0.8))
    rl, rg = R.kl_divergence(s64, t64, direction=direction, reduction="none", return_grad=True,
                             mask=mask, temperature=0.8)
    for loss, g in runs:
        assert_loss_close(loss, rl, dtype, what="kl")
        assert_grad_close(g, rg, dtype, gscale=GSCALE)
        assert loss[0, 1] == 0 and not g[0, 1].any()
    for loss, _ in runs[1:]:  # 4 threads > 3 rows: split (rows.h run_rows)
        np.testing.assert_allclose(loss, runs[0][0], rtol=1e-5 if dtype == F32 else 1e-12)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("reduction", ["sum", "batchmean", "none"])
def test_reductions_mask_grad_output(rng, direction, reduction):
    s, _, t, _ = pair(rng, (3, 4, 300), np.float64)
    mask = rng.random((3, 4)) < 0.6
    go = rng.standard_normal((3, 4)) if reduction == "none" else 0.7
    kw = dict(direction=direction, reduction=reduction, mask=mask, temperature=0.8)
    loss, g = lx.kl_divergence(s, t, grad_output=go, return_grad=True, **kw)
    rl, rg = R.kl_divergence(s, t, grad_output=go, return_grad=True, **kw)
    np.testing.assert_allclose(loss, rl, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(g, rg, rtol=1e-9, atol=1e-12)
    assert (g[~mask] == 0).all()
    assert np.array_equal(np.asarray(lx.kl_divergence(s, t, **kw)), np.asarray(loss))


def test_all_masked_is_zero(rng):
    s, _, t, _ = pair(rng, (4, 50), np.float32)
    loss, g = lx.kl_divergence(s, t, mask=np.zeros(4, bool), return_grad=True)
    assert float(loss) == 0.0 and not g.any()


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_finite_differences(rng, direction):
    s, _, t, _ = pair(rng, (2, 9), np.float64, zero_teacher=direction != "reverse")
    _, g = lx.kl_divergence(s, t, direction=direction, return_grad=True, reduction="sum",
                            temperature=0.7)
    num = numeric_grad(lambda z: float(lx.kl_divergence(z, t, direction=direction,
                                                        reduction="sum", temperature=0.7)), s)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_zero_probability_classes():
    # teacher puts no mass on class 0; student puts none on class 2
    s = np.array([[0.0, 1.0, -np.inf]])
    t = np.array([[-np.inf, 0.0, 0.0]])
    fwd = lx.kl_divergence(s, t)                       # q_2 > 0 where p_2 = 0: infinite
    rev = lx.kl_divergence(s, t, direction="reverse")  # p_0 > 0 where q_0 = 0: infinite
    js = lx.kl_divergence(s, t, direction="js")         # always finite, <= ln 2
    assert fwd == np.inf and rev == np.inf
    assert 0 < js < np.log(2)
    np.testing.assert_allclose(js, R.kl_divergence(s, t, direction="js"), rtol=1e-12)
    # where the teacher is 0 and the student -inf too, the term is 0: finite
    s2 = np.array([[-np.inf, 1.0, 2.0]])
    assert np.isfinite(lx.kl_divergence(s2, t))


def test_identical_rows_are_zero(rng):
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    for d in DIRECTIONS:
        loss, g = lx.kl_divergence(x, x.copy(), direction=d, reduction="none", return_grad=True)
        assert np.abs(loss).max() < 1e-6 and np.abs(g).max() < 1e-7


def test_inplace(rng):
    s, _, t, _ = pair(rng, (4, 3000), np.float32)
    _, g = lx.kl_divergence(s, t, return_grad=True, direction="js")
    s2 = s.copy()
    _, g2 = lx.kl_divergence(s2, t, return_grad=True, inplace=True, direction="js")
    assert g2 is s2
    np.testing.assert_array_equal(g, g2)


@pytest.mark.skipif(torch is None, reason="torch is not installed")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_against_torch(rng, direction):
    s, _, t, _ = pair(rng, (32, 5000), np.float32)
    T = 2.0
    loss, g = lx.kl_divergence(s, t, direction=direction, temperature=T, return_grad=True)
    st = torch.from_numpy(s).requires_grad_()
    ls = torch.log_softmax(st / T, -1)
    lt = torch.log_softmax(torch.from_numpy(t) / T, -1)
    a, b = (ls, lt) if direction == "forward" else (lt, ls)  # kl_div(input, target) = KL(target || input)
    ref = torch.nn.functional.kl_div(a, b, log_target=True, reduction="batchmean")
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    np.testing.assert_allclose(g, st.grad.numpy(), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kw, exc, msg", [
    (dict(teacher=np.zeros((3, 9))), ValueError, "teacher_logits: expected the student's shape (3, 10)"),
    (dict(direction="kl"), ValueError, "direction must be one of"),
    (dict(reduction="mean"), ValueError, "reduction='mean'"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(mask=np.ones(3)), TypeError, "mask: expected a boolean array"),
    (dict(mask=np.ones(4, bool)), ValueError, "mask: expected shape (3,)"),
    (dict(inplace=True), ValueError, "inplace=True writes the gradient"),
    (dict(temperature=-1), ValueError, "temperature must be a finite positive number"),
    (dict(return_grad=True, grad_output=np.ones(3)), ValueError, "grad_output must be a scalar"),
    (dict(return_grad=True, reduction="none", grad_output=np.ones(4)), ValueError,
     "grad_output: shape (4,) does not broadcast"),
    (dict(student=np.zeros((3, 10), np.int8) + 1j), TypeError, "student_logits: unsupported dtype"),
    (dict(student=np.zeros((3, 0)), teacher=np.zeros((3, 0))), ValueError, "the vocabulary axis is empty"),
])
def test_errors(kw, exc, msg):
    s = kw.pop("student", np.zeros((3, 10)))
    t = kw.pop("teacher", np.zeros((3, 10)))
    with pytest.raises(exc) as e:
        lx.kl_divergence(s, t, **kw)
    assert msg in str(e.value)


def test_inplace_refuses_aliased_teacher():
    x = np.zeros((3, 10))
    with pytest.raises(ValueError, match="shares memory"):
        lx.kl_divergence(x, x, return_grad=True, inplace=True)


# ------------------------------------------------- logit offsets and huge logits
# softmax ignores a constant added to a row, so the KL must too, however large:
# the kernels take every logit relative to its own row's max (never teacher minus
# student), and the reference takes log p as (z - max) - log sum.

def torch_kl(s64, t64, direction, temperature=1.0):
    """Per-row KL of float64 inputs with torch (F.kl_div, log_target) and the gradient
    of its sum with respect to the student. A -inf teacher logit becomes the lowest
    float64: kl_div's exp(-inf) * -inf is NaN, its limit (this) the 0 of lmxent."""
    st = torch.from_numpy(s64).requires_grad_()
    ls = torch.log_softmax(st / temperature, -1)
    t64 = np.where(t64 == -np.inf, np.finfo(np.float64).min, t64)
    lt = torch.log_softmax(torch.from_numpy(t64) / temperature, -1)

    def kl(inp, target):  # KL(target || inp) per row
        return torch.nn.functional.kl_div(inp, target, log_target=True, reduction="none").sum(-1)
    if direction == "forward":
        loss = kl(ls, lt)
    elif direction == "reverse":
        loss = kl(lt, ls)
    else:
        lm = torch.logaddexp(ls, lt) - np.log(2.0)
        loss = (kl(lm, ls) + kl(lm, lt)) / 2
    loss.sum().backward()
    return loss.detach().numpy(), st.grad.numpy()


def check_against_reference_and_torch(s, s64, t, t64, direction, dtype, temperature=1.0):
    """lmxent (loss with and without the gradient) against the reference, and the
    reference against torch, all on the same (rounded) inputs."""
    kw = dict(direction=direction, reduction="none", temperature=temperature)
    loss, g = lx.kl_divergence(s, t, return_grad=True, **kw)
    rl, rg = R.kl_divergence(s64, t64, return_grad=True, **kw)
    assert_loss_close(loss, rl, dtype, what=f"kl {direction}")
    assert_loss_close(lx.kl_divergence(s, t, **kw), rl, dtype, what=f"kl {direction}, no grad")
    assert_grad_close(g, rg, dtype, gscale=GSCALE / temperature)
    if torch is not None:
        tl, tg = torch_kl(s64, t64, direction, temperature)
        # torch rounds z = x / T at the offset's magnitude (1e6 / 0.7 carries ~1e-10 of
        # error in float64); the reference scales values already centred on the max
        tol = 1e-12 if temperature == 1.0 else 1e-9
        np.testing.assert_allclose(rl, tl, rtol=tol, atol=tol)
        np.testing.assert_allclose(rg, tg, rtol=tol * 100, atol=1e-13 if tol < 1e-9 else tol)


def test_offset_reproducers():
    # the rows (float32): 1.2733 and inf before
    s = np.array([[0.5, 0.1, -0.2]], np.float32)
    t = np.array([[1e8, 0, 0]], np.float32)
    assert abs(float(lx.kl_divergence(s, t)) - 0.7733) < 1e-4
    np.testing.assert_allclose(lx.kl_divergence(s, t), np.log(np.exp([0.0, -0.4, -0.7]).sum()),
                               rtol=1e-6)
    z = np.zeros((1, 3), np.float32)
    huge = np.array([[3e38, 3e38, 0]], np.float32)
    np.testing.assert_allclose(lx.kl_divergence(z, huge), np.log(1.5), rtol=1e-6)
    np.testing.assert_allclose(R.kl_divergence(z, huge), np.log(1.5), rtol=1e-14)


# float16 overflows beyond 65504
OFFSETS = [(d, c) for d in DTYPES for c in ([1e4, 6e4] if d == F16 else [1e4, 1e6, 1e8, 1e30])]


@pytest.mark.parametrize("dtype, c", OFFSETS, ids=[f"{dtype_id(d)}-{c:g}" for d, c in OFFSETS])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("side", ["teacher", "student"])
def test_offset(rng, dtype, c, direction, side):
    # 2500 columns: the offset meets the merge of two chunks too
    s0 = rng.standard_normal((4, 2500)) * 3
    t0 = rng.standard_normal((4, 2500)) * 3
    if direction != "reverse":
        t0[:, ::7] = -np.inf  # impossible teacher classes stay impossible
    s, s64 = lowp(s0 + (c if side == "student" else 0.0), dtype)
    t, t64 = lowp(t0 + (c if side == "teacher" else 0.0), dtype)
    check_against_reference_and_torch(s, s64, t, t64, direction, dtype)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_offset_with_temperature(rng, isa, direction):
    # the scale applies to centred values: kz * (u - max), not (kz * u) - lse
    s0, t0 = rng.standard_normal((2, 3, 300)) * 3
    for c in [1e6, 1e30]:
        s, s64 = lowp(s0 - c, F32)
        t, t64 = lowp(t0 + c, F32)
        check_against_reference_and_torch(s, s64, t, t64, direction, F32, temperature=0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_huge_finite_logits(isa, dtype, direction):
    # differences of the two rows' maxima (3e38 - 0) or of logits far below a huge
    # max (0 - 3e38) must not be formed: an inf or a NaN came out before
    big = {F64: 1.6e308, F16: 6e4}.get(dtype, 3e38)
    rows = np.array([[big, big, 0.0], [0.0, 0.0, 0.0], [big, 0.0, big], [-big, 0.0, -big]])
    s, s64 = lowp(rows[[1, 0, 2, 0]], dtype)
    t, t64 = lowp(rows[[0, 1, 2, 2]], dtype)
    check_against_reference_and_torch(s, s64, t, t64, direction, dtype)
    assert np.isfinite(lx.kl_divergence(s, t, direction=direction, reduction="none")).all()


@pytest.mark.parametrize("dtype", [F32, F16] + ([BF16] if BF16 is not None else []),
                         ids=dtype_id)
@pytest.mark.parametrize("temperature", [1e300, 1e39, 1e-39, 1e-300])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_temperature_outside_float32_is_its_limit(rng, dtype, temperature, direction):
    """1/T outside float32's range (NaN before): the limit, as the reference computes it
    (uniform distributions for a huge T, one-hot ones for a tiny T). Losses and
    gradients beyond the dtype's range are inf, never NaN; in place too."""
    s, s64 = lowp(rng.normal(scale=5.0, size=(3, 7)), dtype)
    t, t64 = lowp(rng.normal(scale=5.0, size=(3, 7)), dtype)
    rl, rg = R.kl_divergence(s64, t64, temperature=temperature, direction=direction,
                               reduction="none", return_grad=True)
    top = float(np.finfo(np.float32).max)
    for inplace in (False, True):
        x = s.copy()
        loss, g = lx.kl_divergence(x, t, temperature=temperature, direction=direction,
                                   reduction="none", return_grad=True, inplace=inplace)
        assert not np.isnan(loss).any() and not np.isnan(g.astype(np.float64)).any()
        np.testing.assert_allclose(loss, np.where(rl > top, np.inf, rl), rtol=1e-5, atol=1e-12)
        big = np.abs(rg) > float(np.finfo(np.float16).max if dtype == F16 else top)
        want = np.where(big, np.sign(rg) * np.inf, rg)
        fin = np.abs(np.where(big, 0.0, rg)).max()
        np.testing.assert_allclose(g.astype(np.float64), want, rtol=2e-2, atol=1e-6 * fin)
