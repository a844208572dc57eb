"""lmxent.torch, the PyTorch adapter, against torch's own functions: values and
gradients of every op and option (float64 with gradcheck, float32, bfloat16),
torch.library.opcheck, torch.compile(fullgraph=True), zero-copy conversion, the
CUDA dispatch on a CuPy stand-in, 50 training steps of a small transformer, and a
tiny LlamaForCausalLM with lmxent's loss function."""
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import lmxent as lx  # noqa: E402 -- after the skip without torch
import lmxent.torch as lt  # noqa: E402
from lmxent.torch import _bridge as B  # noqa: E402

BF16_OK = lx.bfloat16_dtype() is not None
needs_bf16 = pytest.mark.skipif(not BF16_OK, reason="ml_dtypes is not installed")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, dtype=torch.float64, scale=2.0, requires_grad=False):
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def ids(gen, shape, V, ignore=0.2, ignore_index=-100):
    t = torch.randint(0, V, shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < ignore, ignore_index, t)


def torch_ce(x, t, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             z_loss=0.0, softcap=None, logit_scale=1.0, normalizer=None):
    """lmxent's cross-entropy written with torch's functions (the conventions of
    lmxent.reference), differentiable by torch's autograd."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    V = z.shape[-1]
    if t.dtype.is_floating_point:
        rows = F.cross_entropy(z.reshape(-1, V), t.reshape(-1, V), weight=weight,
                               reduction="none", label_smoothing=label_smoothing)
        valid = torch.ones(rows.shape, dtype=torch.bool)
        denom = rows.numel()
    else:
        rows = F.cross_entropy(z.reshape(-1, V), t.reshape(-1), weight=weight,
                               ignore_index=ignore_index, reduction="none",
                               label_smoothing=label_smoothing)
        valid = t.reshape(-1) != ignore_index
        w = torch.ones(V, dtype=z.dtype) if weight is None else weight
        denom = w[torch.where(valid, t.reshape(-1), 0)][valid].sum()
    if z_loss:
        rows = rows + torch.where(valid, z_loss * torch.logsumexp(z.reshape(-1, V), -1) ** 2, 0)
    if reduction == "none":
        return rows.reshape(z.shape[:-1])
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (denom if normalizer is None else normalizer)


def close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=rtol, atol=atol)


CE_OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"weight": "w"},
    {"weight": "w", "label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 5.0, "logit_scale": 0.7},
    {"ignore_index": 3},
    {"normalizer": 37.0},
]


def _ce_case(gen, opts, reduction, shape=(3, 5, 17)):
    opts = dict(opts)
    V = shape[-1]
    if opts.get("weight") == "w":
        opts["weight"] = torch.rand(V, generator=gen, dtype=torch.float64) + 0.5
    if "normalizer" in opts and reduction != "mean":
        opts.pop("normalizer")
    x = randn(gen, *shape, requires_grad=True)
    t = ids(gen, shape[:-1], V, ignore_index=opts.get("ignore_index", -100))
    return x, t, dict(opts, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", CE_OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_cross_entropy_options_match_torch(gen, opts, reduction):
    x, t, opts = _ce_case(gen, opts, reduction)
    up = torch.rand(t.shape, generator=gen, dtype=torch.float64) if reduction == "none" else 0.7
    loss = lt.cross_entropy(x, t, **opts)
    want = torch_ce(x, t, **opts)
    close(loss, want)
    (g,) = torch.autograd.grad((loss * up).sum(), x)
    (gw,) = torch.autograd.grad((want * up).sum(), x)
    close(g, gw)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_probability_targets(gen, reduction):
    x = randn(gen, 4, 9, requires_grad=True)
    q = torch.softmax(randn(gen, 4, 9), -1)
    loss = lt.cross_entropy(x, q, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(x, q, reduction=reduction, label_smoothing=0.1)
    close(loss, want)
    close(torch.autograd.grad(loss.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_return_lse(gen, reduction):
    x, t, opts = _ce_case(gen, {"softcap": 4.0, "logit_scale": 1.5}, reduction)
    loss, lse = lt.cross_entropy(x, t, return_lse=True, **opts)
    close(lse, torch.logsumexp(4.0 * torch.tanh(1.5 * x / 4.0), -1))
    assert not lse.requires_grad and lse.dtype == torch.float64
    (g,) = torch.autograd.grad(loss.sum(), x)  # the LSE path: backward from the saved LSE
    close(g, torch.autograd.grad(torch_ce(x, t, **opts).sum(), x)[0])


def test_cross_entropy_float32_and_no_grad(gen):
    x = randn(gen, 64, 300, dtype=torch.float32, requires_grad=True)
    t = ids(gen, (64,), 300)
    loss = lt.cross_entropy(x, t, label_smoothing=0.05)
    want = F.cross_entropy(x, t, label_smoothing=0.05)
    assert loss.dtype == torch.float32
    close(loss, want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss * 3.0, x)
    close(g, torch.autograd.grad(want * 3.0, x)[0], rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        assert not lt.cross_entropy(x, t).requires_grad


def test_backward_twice_with_retain_graph(gen):
    # the saved gradient must not be consumed or scaled in place by the first backward
    x = randn(gen, 5, 8, requires_grad=True)
    t = ids(gen, (5,), 8, ignore=0)
    loss = lt.cross_entropy(x, t)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (loss * 2).backward()
    close(x.grad, 3 * first)


def test_backward_hands_on_the_fused_gradient(gen):
    # loss.backward() adds no pass over the logits: no zero-filled gradients for the
    # extra outputs, no scaling by 1.0, no copy into .grad
    x = randn(gen, 8, 50, dtype=torch.float32, requires_grad=True)
    t = ids(gen, (8,), 50)
    loss = lt.cross_entropy(x, t)
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    logits_sized = {e.name for e in prof.events() if [8, 50] in e.input_shapes}
    assert not logits_sized & {"aten::fill_", "aten::zero_", "aten::mul", "aten::copy_"}
    close(x.grad, torch.autograd.grad(F.cross_entropy(x, t), x)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_matches_torch(gen, dtype, reduction):
    N, D, V = 13, 6, 23
    h = randn(gen, 1, N, D, dtype=dtype, scale=1.0, requires_grad=True)
    w = randn(gen, V, D, dtype=dtype, scale=0.5, requires_grad=True)
    b = randn(gen, V, dtype=dtype, scale=0.5, requires_grad=True)
    t = ids(gen, (1, N), V)
    opts = {"reduction": reduction, "label_smoothing": 0.1, "z_loss": 1e-3}
    loss = lt.linear_cross_entropy(h, w, t, bias=b, chunk_size=4, **opts)
    want = torch_ce(h @ w.T + b, t, **opts)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 1e-6}
    close(loss, want, **tol)
    up = torch.rand(t.shape, generator=gen, dtype=dtype) if reduction == "none" else 0.5
    got = torch.autograd.grad((loss * up).sum(), (h, w, b))
    exp = torch.autograd.grad((want * up).sum(), (h, w, b))
    for a, e in zip(got, exp):
        close(a, e, **tol)


def torch_kl(s, t, T, direction, reduction, mask):
    ls, lq = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    if direction == "forward":
        rows = (lq.exp() * (lq - ls)).sum(-1)
    elif direction == "reverse":
        rows = (ls.exp() * (ls - lq)).sum(-1)
    else:
        lm = torch.logaddexp(ls, lq) - np.log(2.0)
        rows = 0.5 * ((ls.exp() * (ls - lm)).sum(-1) + (lq.exp() * (lq - lm)).sum(-1))
    if mask is not None:
        rows = torch.where(mask, rows, 0)
    if reduction == "none":
        return rows
    n = rows.numel() if mask is None else mask.sum()
    return rows.sum() / (n if reduction == "batchmean" else 1)


@pytest.mark.parametrize("direction", ["forward", "reverse", "js"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_divergence_matches_torch(gen, direction, reduction):
    s = randn(gen, 2, 5, 11, requires_grad=True)
    t = randn(gen, 2, 5, 11)
    mask = torch.rand(2, 5, generator=gen) < 0.7
    loss = lt.kl_divergence(s, t, temperature=1.7, direction=direction, reduction=reduction,
                            mask=mask)
    want = torch_kl(s, t, 1.7, direction, reduction, mask)
    close(loss, want)
    up = torch.rand(2, 5, generator=gen, dtype=torch.float64) if reduction == "none" else 1.3
    close(torch.autograd.grad((loss * up).sum(), s)[0],
          torch.autograd.grad((want * up).sum(), s)[0])
    if direction == "forward" and reduction == "batchmean":  # torch's own function (rows 2-D:
        s2, t2 = s.reshape(-1, 11), t.reshape(-1, 11)  # its batchmean divides by size(0))
        close(lt.kl_divergence(s2, t2, temperature=1.7),
              F.kl_div(F.log_softmax(s2 / 1.7, -1), F.log_softmax(t2 / 1.7, -1),
                       log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("T", [1.0, 0.6])
def test_softmax_family_matches_torch(gen, dim, T):
    x = randn(gen, 4, 3, 9, requires_grad=True)
    up = torch.rand(4, 3, 9, generator=gen, dtype=torch.float64)
    for got, want in [(lt.softmax(x, dim, temperature=T), torch.softmax(x / T, dim)),
                      (lt.log_softmax(x, dim, temperature=T), torch.log_softmax(x / T, dim))]:
        close(got, want)
        close(torch.autograd.grad((got * up).sum(), x)[0],
              torch.autograd.grad((want * up).sum(), x)[0])
    for keepdim in (False, True):
        got = lt.logsumexp(x, dim, keepdim=keepdim, temperature=T)
        want = torch.logsumexp(x / T, dim, keepdim=keepdim)
        close(got, want)
        u = torch.rand(want.shape, generator=gen, dtype=torch.float64)
        close(torch.autograd.grad((got * u).sum(), x)[0],
              torch.autograd.grad((want * u).sum(), x)[0])


def test_token_stats_matches_torch(gen):
    x = randn(gen, 3, 4, 10)
    t = ids(gen, (3, 4), 10)
    s = lt.token_stats(x, t, temperature=0.8)
    z = x / 0.8
    lp = torch.log_softmax(z, -1)
    valid = t != -100
    ti = torch.where(valid, t, 0)
    close(s.lse, torch.logsumexp(z, -1))
    close(s.logprob, torch.where(valid, lp.gather(-1, ti[..., None])[..., 0], 0))
    close(s.entropy, -(lp.exp() * lp).sum(-1))
    close(s.top_prob, lp.exp().amax(-1))
    assert torch.equal(s.correct, valid & (z.argmax(-1) == t))
    assert s.rank.dtype == torch.int64 and torch.equal(s.rank == 0, s.correct)


def test_gradcheck_float64(gen):
    x = randn(gen, 3, 7, requires_grad=True)
    t = ids(gen, (3,), 7, ignore=0.3)
    h = randn(gen, 4, 3, scale=1.0, requires_grad=True)
    w = randn(gen, 7, 3, scale=1.0, requires_grad=True)
    b = randn(gen, 7, scale=1.0, requires_grad=True)
    t4 = ids(gen, (4,), 7, ignore=0.3)
    teacher = randn(gen, 3, 7)
    checks = [
        (lambda x: lt.cross_entropy(x, t, z_loss=0.1, label_smoothing=0.1), (x,)),
        (lambda x: lt.cross_entropy(x, t, reduction="none", softcap=3.0), (x,)),
        (lambda x: lt.cross_entropy(x, t, return_lse=True)[0], (x,)),
        (lambda h, w, b: lt.linear_cross_entropy(h, w, t4, bias=b, chunk_size=3), (h, w, b)),
        (lambda h, w: lt.linear_cross_entropy(h, w, t4, reduction="none"), (h, w)),
        (lambda x: lt.kl_divergence(x, teacher, temperature=2.0, direction="js"), (x,)),
        (lambda x: lt.kl_divergence(x, teacher, reduction="none"), (x,)),
        (lambda x: lt.log_softmax(x, 0, temperature=0.5), (x,)),
        (lambda x: lt.softmax(x, temperature=2.0), (x,)),
        (lambda x: lt.logsumexp(x, 0, keepdim=True, temperature=0.7), (x,)),
    ]
    for fn, inputs in checks:
        assert torch.autograd.gradcheck(fn, inputs)


@needs_bf16
def test_bfloat16(gen):
    x = randn(gen, 16, 40, dtype=torch.bfloat16, requires_grad=True)
    t = ids(gen, (16,), 40)
    loss = lt.cross_entropy(x, t)
    want = F.cross_entropy(x.float(), t)
    assert loss.dtype == torch.float32
    close(loss, want, rtol=1e-5, atol=1e-6)  # float32 math on the same bf16 values
    (g,) = torch.autograd.grad(loss, x)
    assert g.dtype == torch.bfloat16
    close(g.float(), torch.autograd.grad(want, x)[0], rtol=1e-2, atol=1e-4)
    close(lt.log_softmax(x).float(), torch.log_softmax(x.float(), -1), rtol=1e-2, atol=1e-2)
    h = randn(gen, 16, 8, dtype=torch.bfloat16, scale=1.0, requires_grad=True)
    w = randn(gen, 40, 8, dtype=torch.bfloat16, scale=1.0, requires_grad=True)
    lin = lt.linear_cross_entropy(h, w, t)
    close(lin, F.cross_entropy(h.float() @ w.float().T, t), rtol=1e-3, atol=1e-4)
    dh, dw = torch.autograd.grad(lin, (h, w))
    assert dh.dtype == dw.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16]
                         + ([torch.bfloat16] if BF16_OK else []))
def test_conversion_is_zero_copy(dtype):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).to(dtype)[:, 1:5]  # strided view
    a = B.array(t)
    assert a.__array_interface__["data"][0] == t.data_ptr() and a.shape == (4, 4)
    assert a.strides == tuple(s * t.element_size() for s in t.stride())
    back = B.tensor(a)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr() and torch.equal(back, t)


def test_bad_arguments_name_themselves(gen):
    x = randn(gen, 3, 5, requires_grad=True)
    t = ids(gen, (3,), 5)
    with pytest.raises(ValueError, match="reduction"):
        lt.cross_entropy(x, t, reduction="avg")
    with pytest.raises(TypeError, match="label_smoothing"):
        lt.cross_entropy(x, t, label_smoothing="0.1")
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        lt.kl_divergence(x, x * 2)
    with pytest.raises(ValueError, match="targets"):  # lmxent's own check, through the op
        lt.cross_entropy(x, torch.tensor([0, 1, 9]))
    bare, _, _ = torch.ops.lmxent.cross_entropy(x, t, None, -100, "mean", 0.0, 0.0, None, 1.0,
                                                None, False, False)  # neither LSE nor gradient
    with pytest.raises(RuntimeError, match="call lmxent.torch.cross_entropy"):
        bare.backward()


def test_modules(gen):
    x = randn(gen, 2, 3, 6, requires_grad=True)
    t = ids(gen, (2, 3), 6)
    w = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    m = lt.CrossEntropyLoss(w, label_smoothing=0.1)
    close(m(x, t), torch_ce(x, t, weight=w, label_smoothing=0.1))
    assert "weight" in dict(m.named_buffers())
    h = randn(gen, 2, 3, 4, requires_grad=True)
    W = randn(gen, 6, 4)
    lm = lt.LinearCrossEntropyLoss(reduction="sum", chunk_size=2)
    close(lm(h, W, t), torch_ce(h @ W.T, t, reduction="sum"))
    with pytest.raises(ValueError, match="reduction"):
        lt.CrossEntropyLoss(reduction="avg")


def _opcheck_cases(gen):
    x = randn(gen, 3, 6, dtype=torch.float32, requires_grad=True)
    t = ids(gen, (3,), 6, ignore=0.3)
    h = randn(gen, 3, 4, dtype=torch.float32, requires_grad=True)
    w = randn(gen, 6, 4, dtype=torch.float32, requires_grad=True)
    b = randn(gen, 6, dtype=torch.float32, requires_grad=True)
    ce = (-100, "mean", 0.1, 0.01, None, 1.0, None)
    ce_none = (-100, "none", 0.0, 0.0, 3.0, 1.0, None)
    op = torch.ops.lmxent
    return [
        (op.cross_entropy, (x, t, None, *ce, True, False)),
        (op.cross_entropy, (x, t, None, *ce_none, False, True)),
        (op.cross_entropy_backward, (x.detach(), t, torch.zeros(3), torch.ones(3), None,
                                     *ce_none)),
        (op.linear_cross_entropy, (h, w, t, b, None, *ce, 2, None, None, True)),
        (op.linear_cross_entropy, (h, w, t, None, None, *ce_none, None, None, None, False)),
        (op.kl_divergence, (x, x.detach() * 0.5, 1.5, "forward", "batchmean", None, None,
                            True)),
        (op.kl_divergence, (x, x.detach() * 0.5, 1.0, "js", "none", None, None, False)),
        (op.softmax, (x, 1, 0.8, True)),
        (op.softmax, (x, 0, 1.0, False)),
        (op.logsumexp, (x, 1, False, 1.3)),
        (op.token_stats, (x.detach(), t, -100, 1.0)),
    ]


def test_opcheck(gen):
    for op, args in _opcheck_cases(gen):
        torch.library.opcheck(op, args)


class TinyModel(torch.nn.Module):
    """Embedding -> MLP -> LM head; losses from lmxent.torch (or torch)."""

    def __init__(self, V=32, D=16):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Linear(D, D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.mlp(self.emb(ids)))


def test_torch_compile_fullgraph(gen):
    torch.manual_seed(0)
    model = TinyModel().double()
    ids_ = torch.randint(0, 32, (2, 8), generator=gen)
    t = ids(gen, (2, 8), 32)
    teacher = randn(gen, 2, 8, 32)

    def step(model, ids_, t):
        h = model.hidden(ids_)
        logits = model.head(h)
        loss = lt.cross_entropy(logits, t, label_smoothing=0.1)
        loss = loss + lt.cross_entropy(logits, t, reduction="none").mean()
        loss = loss + lt.linear_cross_entropy(h, model.head.weight, t, z_loss=1e-3)
        loss = loss + lt.kl_divergence(logits, teacher, temperature=2.0)
        loss = loss + lt.logsumexp(logits).mean() + lt.log_softmax(logits)[..., 0].mean()
        # a tensor num_items_in_batch: the normalizer in eager mode, a divided "sum" compiled
        loss = loss + lt.causal_lm_loss(logits, t, 32, num_items_in_batch=torch.tensor(5))
        return loss + lt.softmax(logits)[..., 1].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fn in (step, compiled):
        model.zero_grad()
        loss = fn(model, ids_, t)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        if fn is step:
            want, want_grads = loss.detach(), grads
    close(loss, want)
    for g, e in zip(grads, want_grads):
        close(g, e)


def test_torch_compile_inductor(gen):
    # the default backend too: the ops stay opaque calls in the generated code
    x = randn(gen, 4, 10, dtype=torch.float32, requires_grad=True)
    t = ids(gen, (4,), 10)
    f = torch.compile(lambda x, t: lt.cross_entropy(x * 2, t) * 3, fullgraph=True)
    loss = f(x, t)
    (g,) = torch.autograd.grad(loss, x)
    want = F.cross_entropy(x * 2, t) * 3
    close(loss, want, rtol=1e-5, atol=1e-6)
    close(g, torch.autograd.grad(want, x)[0], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------- the CUDA dispatch, faked

def _fake_cupy(monkeypatch, log):
    """tests/test_cuda.py's CuPy stand-in (NumPy storage, lmxent's device path over
    the CPU kernels), plus what the bridge uses: from_dlpack, ExternalStream, views.
    CPU tensors pose as CUDA tensors; log records the device and stream entered."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    try:
        import test_cuda as tc
    finally:
        sys.path.pop(0)
    from lmxent import _arrays as A
    fake = tc.make_fake_cupy()

    class Ctx:
        def __init__(self, what):
            self.what = what

        def __enter__(self):
            log.append(("enter", self.what))

        def __exit__(self, *exc):
            log.append(("exit", self.what))

    fake.cuda = types.SimpleNamespace(
        Device=lambda i: Ctx(("device", i)), ExternalStream=lambda p: Ctx(("stream", p)),
        get_current_stream=lambda: types.SimpleNamespace(ptr=0))

    def from_dlpack(t):
        assert ("enter", ("stream", 77)) in log and log[-1][0] == "enter", "outside the stream"
        return tc.FakeArray(np.from_dlpack(t))

    fake.from_dlpack = from_dlpack
    monkeypatch.setattr(tc.FakeArray, "view", lambda s, d: tc.FakeArray(s._a.view(d)),
                        raising=False)
    monkeypatch.setattr(tc.FakeArray, "__dlpack__", lambda s, **kw: s._a.__dlpack__(**kw),
                        raising=False)
    monkeypatch.setattr(tc.FakeArray, "__dlpack_device__",
                        lambda s: s._a.__dlpack_device__(), raising=False)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(A, "_CUDA", A._CudaKernels(tc.FakeCuda()))
    monkeypatch.setattr(B, "_is_cuda", lambda t: True)
    monkeypatch.setattr(B, "_current_stream", lambda device: 77)
    return tc


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if BF16_OK else []))
def test_cuda_dispatch_on_a_stand_in(monkeypatch, gen, dtype):
    log = []
    x = randn(gen, 6, 9, dtype=dtype, requires_grad=True)
    t = ids(gen, (6,), 9)
    want = lt.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    (want_g,) = torch.autograd.grad(want.sum() * 2, x)
    tc = _fake_cupy(monkeypatch, log)
    seen = []
    from lmxent import _arrays as A
    real = A._CUDA._module  # the stand-in's lmxent._cuda

    class Spy:  # records the array type each cross_entropy kernel call gets
        def __getattr__(self, op):
            f = getattr(real, op)
            if op != "cross_entropy":
                return f
            return lambda *a, **kw: (seen.append(type(a[0] if a else kw["logits"])), f(*a, **kw))[1]

    monkeypatch.setattr(A, "_CUDA", A._CudaKernels(Spy()))
    got = lt.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    (g,) = torch.autograd.grad(got.sum() * 2, x)
    assert seen and all(s is tc.FakeArray for s in seen)  # lmxent's device path ran
    assert log[:2] == [("enter", ("device", None)), ("enter", ("stream", 77))]
    assert log[-1] == ("exit", ("device", None))
    close(got, want)
    assert g.dtype == dtype
    close(g, want_g)


def _real_cuda():
    if not torch.cuda.is_available():
        return "torch sees no GPU"
    try:
        import cupy  # noqa: F401

        from lmxent import _cuda  # noqa: F401
    except ImportError as e:
        return f"CuPy or lmxent's CUDA build missing: {e}"
    return None


@pytest.mark.skipif(_real_cuda() is not None, reason=str(_real_cuda()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tensors_match_cpu(gen, dtype):
    x = randn(gen, 64, 1000, dtype=dtype, requires_grad=True)
    t = ids(gen, (64,), 1000)
    xc = x.detach().cuda().requires_grad_()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # torch's current stream, not the default one
        for reduction in ("mean", "none"):
            got = lt.cross_entropy(xc, t.cuda(), reduction=reduction, label_smoothing=0.1)
            want = lt.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
            (g,) = torch.autograd.grad(got.sum(), xc)
            (gw,) = torch.autograd.grad(want.sum(), x)
            close(got.cpu(), want, rtol=1e-5, atol=1e-6)
            close(g.cpu().float(), gw.float(), rtol=1e-2, atol=1e-5)
        h = randn(gen, 64, 32, dtype=dtype, scale=1.0).cuda()
        w = randn(gen, 1000, 32, dtype=dtype, scale=0.2).cuda()
        close(lt.linear_cross_entropy(h, w, t.cuda()).cpu(),
              lt.linear_cross_entropy(h.cpu(), w.cpu(), t), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------- training loops

class TinyDecoder(torch.nn.Module):
    """A decoder-only transformer: embeddings, causal self-attention blocks, LM head."""

    def __init__(self, V=48, D=32, layers=2, T=16):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.pos = torch.nn.Parameter(torch.randn(T, D) * 0.02)
        self.blocks = torch.nn.ModuleList(
            torch.nn.TransformerEncoderLayer(D, 4, 64, dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)

    def hidden(self, ids):
        T = ids.shape[1]
        h = self.emb(ids) + self.pos[:T]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(T)
        for b in self.blocks:
            h = b(h, src_mask=mask, is_causal=True)
        return self.norm(h)


def _train(loss_fn, steps=50):
    torch.manual_seed(0)
    model = TinyDecoder()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        seq = torch.randint(0, 48, (4, 17), generator=data)
        seq[:, 1::2] = (seq[:, 0::2][:, :8] * 7 + 3) % 48  # something learnable
        loss = loss_fn(model, seq[:, :-1], seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


def test_training_matches_torch():
    def torch_loss(model, x, y):
        return F.cross_entropy(model.head(model.hidden(x)).reshape(-1, 48), y.reshape(-1))

    def lmxent_loss(model, x, y):
        return lt.cross_entropy(model.head(model.hidden(x)), y)

    def lmxent_head_loss(model, x, y):
        return lt.linear_cross_entropy(model.hidden(x), model.head.weight, y)

    want = _train(torch_loss)
    assert want[-5:].mean() < want[:5].mean() - 0.3  # it learns
    for fn in (lmxent_loss, lmxent_head_loss):
        np.testing.assert_allclose(_train(fn), want, rtol=1e-4)


# ---------------------------------------------------------- Hugging Face

def _tiny_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _loss_and_grads(model, **kw):
    model.zero_grad()
    loss = model(**kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("items", [None, 23, "tensor"])
def test_llama_loss_function(gen, items):
    model = _tiny_llama()
    input_ids = torch.randint(0, 96, (2, 12), generator=gen)
    labels = input_ids.clone()
    labels[0, :3] = -100
    kw = {"input_ids": input_ids, "labels": labels}
    if items is not None:
        kw["num_items_in_batch"] = torch.tensor(23) if items == "tensor" else items
    want, want_g = _loss_and_grads(model, **kw)
    model.loss_function = lt.causal_lm_loss
    got, got_g = _loss_and_grads(model, **kw)
    close(got, want, rtol=1e-5, atol=1e-6)
    for n in want_g:
        close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6)
    # the logits-free loss: decoder hidden states and lm_head.weight
    model.zero_grad()
    head = lt.causal_lm_head_loss(model, **kw)
    head.backward()
    close(head.detach(), want, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        close(p.grad, want_g[n], rtol=1e-4, atol=1e-6)


@needs_bf16
def test_causal_lm_loss_bf16_shift_labels_and_kwargs(gen):
    logits = randn(gen, 2, 7, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = ids(gen, (2, 7), 50)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    from transformers.loss.loss_utils import ForCausalLMLoss
    want = ForCausalLMLoss(logits, labels, 50, num_items_in_batch=torch.tensor(9.0))
    got = lt.causal_lm_loss(logits, None, 50, num_items_in_batch=torch.tensor(9.0),
                            shift_labels=shift, output_attentions=False, unknown=1)
    close(got, want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got, logits)
    close(g.float(), torch.autograd.grad(want, logits)[0].float(), rtol=1e-2, atol=1e-5)
