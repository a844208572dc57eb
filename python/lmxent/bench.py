"""python -m lmxent bench: lmxent against the peers installed on this machine.

Every op family this lmxent build has runs on the same inputs as every peer that
is importable here: NumPy (CuPy with --device cuda, the same vectorised code),
torch eager, torch.compile (on the GPU; on the CPU with --compile, since compiling
takes minutes), Liger-Kernel, Cut Cross-Entropy and quack (GPU only) and JAX. A
peer that is missing or cannot run on the device is listed as skipped, with the
reason; an op a peer does not implement is simply absent from its rows.

Correctness first: each implementation's first result is compared with
lmxent.reference (float64, on the same rounded inputs) before it is timed. Per-row
outputs are compared on the first and last 16 rows; outputs summed over rows (a
mean loss, the LM head's weight gradient) in full, in row chunks. The error is
max |got - ref| / max |ref| and the tolerance 64 units of the compute precision
(float32 for float32 and 16-bit input) plus 2 units of the output's dtype, plus 4
units of a 16-bit input's dtype (a peer may round the logits to the input dtype
first). A result out of tolerance is reported WRONG and not timed; an exception is
reported as "error". The exit status is 1 if lmxent itself is wrong or fails.

Timing: the best of several runs (one for a call slower than 4 s) after the
checked call, which is the warm-up (compilation included); synchronised on the GPU. The
memory copy is a copy of the logits (one read, one write). Bytes counted per op:
one read of the logits for logsumexp, cross_entropy and token_stats; a read and a
write for log_softmax, softmax and the fused gradient; two reads and a write for
kl_divergence with its gradient. "of copy" is the op's GB/s over the copy's. The
LM head is compute-bound and reports GFLOP/s instead: 6 N V D (the logits,
d_hidden and d_weight), D = --hidden. "lmxent speedup" is the peer's time over
lmxent's time for the same op (over plain lmxent, never its inplace variant).
lmxent's large NumPy outputs come from its output cache (lx.set_output_cache), so
each timed call reuses the block the previous result released; NumPy and torch on
the CPU get fresh pages from the OS (zero-filled on first touch) every call. On the
GPU every library reuses memory through its pool.

    python -m lmxent bench --quick                       # < 1 minute on 2 cores
    python -m lmxent bench                               # vocabulary sweep, float32 and bfloat16
    python -m lmxent bench --shapes 4096x128256 --dtypes bfloat16 --ops cross_entropy_with_grad
    python -m lmxent bench --device cuda --out results/  # CuPy arrays, GPU peers
"""
import argparse
import importlib
import os
import time
from functools import partial

import numpy as np

import lmxent as lx
from lmxent import reference as R
from ._cli import EPS, Progress, array_module, machine_info, positive_int, rel_error, to_host, write_json

CHECK_ROWS = 32          # first and last 16 rows
# the default sweep: real vocabularies (Llama 2, GPT-2, Llama 3, Gemma), N*V ~ constant
SWEEP_V = (8192, 32000, 50257, 128256, 256000)
SWEEP_ELEMENTS = {"cpu": 2**24, "cuda": 2**27}
QUICK_SHAPES = ((1024, 8192), (256, 32000))
DEFAULT_HIDDEN = {"cpu": 256, "cuda": 4096}
QUICK_HIDDEN = 128
# above this many multiply-adds a float64 reference of the LM head's summed outputs
# (loss, d_weight) is too slow on the host; they are then left unchecked (and said so)
HEAD_CHECK_MACS = 2**34


class Skip(Exception):
    """A peer, op or dtype that cannot run here; the message says why."""


# --------------------------------------------------------------------- devices

class Device:
    """Where the arrays live: 'cpu' (NumPy) or 'cuda' (CuPy), with a synchronise
    for timing and conversions to the host and to torch."""

    def __init__(self, name):
        self.name, self.xp = name, array_module(name)  # ValueError: no CuPy, no CUDA kernels

    def put(self, host):
        if self.xp is np:
            return host
        try:
            return self.xp.asarray(host)
        except (TypeError, ValueError) as e:
            raise Skip(f"CuPy cannot hold {host.dtype} arrays ({e})") from None

    def sync(self):
        if self.xp is not np:
            self.xp.cuda.runtime.deviceSynchronize()  # the whole device: torch's work too

    @property
    def numpy_peer(self):
        return "numpy" if self.xp is np else "cupy"


def flatten(out):
    """The outputs of a call as a flat tuple: nested tuples (and named tuples) are
    opened, None (an absent gradient) dropped."""
    if out is None:
        return ()
    if isinstance(out, (tuple, list)):
        return tuple(o for item in out for o in flatten(item))
    return (out,)


def best_time(fn, sync, repeats, min_time, max_time):
    """Best wall time of fn(), synchronised, on a warm fn (the caller has run it once):
    at least one run and up to `repeats` within max_time seconds, more (up to 50)
    while under min_time in total. A call slower than max_time is timed once."""
    times, start = [], time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if (len(times) >= repeats or spent > max_time) and (spent >= min_time
                                                            or len(times) >= 50):
            return min(times)


# -------------------------------------------------------------------- problems

class Problem:
    """The inputs of one benchmark point on the device: logits x (N, V) with standard
    deviation 2, class ids t (N,), and on first use a teacher's logits and the LM
    head's hidden (N, D) and weight (V, D), scaled so that its logits have the same
    spread. Each input is drawn from its own seed: every run sees the same data."""

    def __init__(self, dev, N, V, dtype, hidden):
        self.dev, self.N, self.V, self.dtype, self.D = dev, N, V, np.dtype(dtype), hidden
        half = CHECK_ROWS // 2
        self.rows = np.arange(N) if N <= CHECK_ROWS else np.r_[0:half, N - half:N]
        self._host, self._dev, self._conv = {}, {}, {}
        self._make = {  # name -> (seed, rng -> array)
            "x": (0, lambda rng: self._normal(rng, (N, V), 2.0)),
            "t": (1, lambda rng: rng.integers(0, V, N)),
            "teacher": (2, lambda rng: self._normal(rng, (N, V), 2.0)),
            "hidden": (3, lambda rng: self._normal(rng, (N, hidden), 1.0)),
            "weight": (4, lambda rng: self._normal(rng, (V, hidden), 2.0 / np.sqrt(hidden))),
        }
        self.x, self.t = self.get("x"), self.get("t")

    def _normal(self, rng, shape, scale):
        return (scale * rng.standard_normal(shape, np.float32)).astype(self.dtype)

    @property
    def label(self):
        return f"{self.N}x{self.V} {dtype_name(self.dtype)}"

    def host(self, name):
        if name not in self._host:
            seed, make = self._make[name]
            self._host[name] = make(np.random.default_rng([self.N, self.V, seed]))
        return self._host[name]

    def get(self, name):
        """The named input on the device."""
        if name not in self._dev:
            self._dev[name] = self.dev.put(self.host(name))
        return self._dev[name]

    def rows64(self, name):
        """The checked rows of an input, float64 (targets: int64) on the host."""
        a = self.host(name)[self.rows]
        return a if name == "t" else a.astype(np.float64)

    def chunks64(self, *names, elements=2**22):
        """Row chunks of the named inputs (float64; targets int64) covering every row."""
        step = max(1, elements // self.V)
        for i in range(0, self.N, step):
            yield tuple(self.host(n)[i:i + step] if n == "t"
                        else self.host(n)[i:i + step].astype(np.float64) for n in names)

    def converted(self, key, make):
        """A cached conversion of the inputs for a peer (torch tensors, JAX arrays)."""
        if key not in self._conv:
            self._conv[key] = make()
        return self._conv[key]


def dtype_name(dt):
    return "bfloat16" if lx.bfloat16_dtype() is not None and dt == lx.bfloat16_dtype() \
        else np.dtype(dt).name


def summed(f, chunks):
    """Elementwise sums over row chunks of the tuples f(*chunk) returns."""
    total = None
    for c in chunks:
        part = f(*c)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    return total


# ------------------------------------------------------------------------ peers
# Each loader returns a handle (usually the module) or raises Skip with the reason.

def _import(name, what):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip(f"not installed ({e})") from None
    except Exception as e:  # broken installs (a CUDA library missing...) are skips too
        raise Skip(f"{what} fails to import: {type(e).__name__}: {e}") from None


def _load_torch(dev, args):
    torch = _import("torch", "torch")
    if dev.name == "cuda" and not torch.cuda.is_available():
        raise Skip("this torch build has no CUDA")
    if dev.name == "cpu":
        torch.set_num_threads(lx.cpu_info()["threads"])  # the same threads as lmxent
    return torch


def _load_torch_compile(dev, args):
    if dev.name == "cpu" and not args.compile:
        raise Skip("CPU compilation takes minutes: pass --compile to include it")
    return _load_torch(dev, args)


def _gpu_only(module, what):
    def load(dev, args):
        if dev.name != "cuda":
            raise Skip("GPU only (--device cuda)")
        _load_torch(dev, args)
        return _import(module, what)
    return load


def _load_jax(dev, args):
    jax = _import("jax", "jax")
    try:
        device = jax.devices("gpu" if dev.name == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise Skip(f"jax has no {dev.name} backend ({e})") from None
    return jax, device


PEERS = {  # name -> loader; the order of the table rows
    "numpy": lambda dev, args: np,
    "torch": _load_torch,
    "torch.compile": _load_torch_compile,
    "liger": _gpu_only("liger_kernel.transformers", "Liger-Kernel"),
    "cce": _gpu_only("cut_cross_entropy", "Cut Cross-Entropy"),
    "quack": _gpu_only("quack", "quack"),
    "jax": _load_jax,
}


def _tensors(p, *names):
    """The named inputs as torch tensors on the device, sharing their memory."""
    import torch

    def conv(name):
        a = p.get(name)
        if p.dev.xp is not np:
            return torch.from_dlpack(a)
        if a.dtype == lx.bfloat16_dtype():  # torch.from_numpy knows no ml_dtypes
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    return [p.converted(("torch", n), lambda n=n: conv(n)) for n in names]


def torch_impl(body, inputs, grad_of=(), private=()):
    """An implementation from body(handle, *tensors) of the named inputs, for torch
    and the peers built on it (the handle is torch, or the peer's module). With
    grad_of (input positions), body returns the scalar loss and the implementation
    (loss, *their gradients) from one backward. Inputs at `private` positions (and
    those with gradients) are copies, for peers that write over their input.
    compiled=True wraps body in torch.compile (the torch.compile peer)."""
    def factory(p, handle, compiled=False):
        import torch
        args = [a.detach().clone() if i in grad_of or i in private else a
                for i, a in enumerate(_tensors(p, *inputs))]
        f = lambda *a: body(handle, *a)  # noqa: E731
        if compiled:
            f = torch.compile(f)
        if not grad_of:
            return lambda: f(*args)
        for i in grad_of:
            args[i].requires_grad_(True)

        def run():
            for i in grad_of:
                args[i].grad = None
            loss = f(*args)
            loss.backward()
            return (loss,) + tuple(args[i].grad for i in grad_of)
        return run
    return factory


def jax_impl(body, inputs, grad_of=()):
    """An implementation from a JAX function body(jax, *arrays), jitted; with
    grad_of, jax.value_and_grad of it. Waits for the result (JAX is asynchronous)."""
    def factory(p, handle):
        jax, device = handle
        if p.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise Skip("JAX computes float64 input in float32 (set JAX_ENABLE_X64=1)")
        args = [p.converted(("jax", n), lambda n=n: jax.device_put(p.host(n), device))
                for n in inputs]
        f = lambda *a: body(jax, *a)  # noqa: E731
        f = jax.jit(jax.value_and_grad(f, argnums=grad_of) if grad_of else f)
        return lambda: jax.block_until_ready(f(*args))
    return factory


def xp_impl(body, inputs):
    """An implementation from a NumPy/CuPy function body(xp, *arrays)."""
    def factory(p, handle):
        args = [p.get(n) for n in inputs]
        return lambda: body(p.dev.xp, *args)
    return factory


# ------------------------------------------------------- NumPy / CuPy (and JAX)
# Straightforward vectorised code, computing in float32 for 16-bit input (float64
# for float64), like lmxent; outputs of the logits' size keep the input's dtype.
# Bodies without in-place updates also serve JAX (xp = jax.numpy).

def _f(xp, a):
    return a if a.dtype == np.float64 else a.astype(np.float32)


def _xp_lse(xp, x):
    z = _f(xp, x)
    m = z.max(axis=-1, keepdims=True)
    return (m + xp.log(xp.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]


def _xp_log_softmax(xp, x):
    return (_f(xp, x) - _xp_lse(xp, x)[:, None]).astype(x.dtype)


def _xp_softmax(xp, x):
    z = _f(xp, x)
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def _xp_ce(xp, x, t):
    return _xp_lse(xp, x) - _f(xp, x[xp.arange(len(t)), t])


def _xp_ce_grad_of(xp, z, t):
    """(mean loss, gradient) of float32/64 logits z."""
    n, r = len(t), xp.arange(len(t))
    lse = _xp_lse(xp, z)
    g = xp.exp(z - lse[:, None])
    g[r, t] -= 1.0
    g /= n
    return xp.mean(lse - z[r, t]), g


def _xp_ce_grad(xp, x, t):
    loss, g = _xp_ce_grad_of(xp, _f(xp, x), t)
    return loss, g.astype(x.dtype, copy=False)


def _xp_linear_ce(xp, h, w, t):
    h32, w32 = _f(xp, h), _f(xp, w)
    loss, g = _xp_ce_grad_of(xp, h32 @ w32.T, t)
    return loss, (g @ w32).astype(h.dtype, copy=False), (g.T @ h32).astype(w.dtype, copy=False)


def _xp_token_stats(xp, x, t):
    z, r = _f(xp, x), xp.arange(len(t))
    lse = _xp_lse(xp, z)
    lp = z - lse[:, None]
    zt = z[r, t][:, None]
    rank = ((z > zt) | ((z == zt) & (xp.arange(z.shape[1]) < t[:, None]))).sum(-1)
    return (zt[:, 0] - lse, lse, -(xp.exp(lp) * lp).sum(-1), rank == 0,
            xp.exp(z.max(-1) - lse), rank)


def _xp_kl_terms(xp, s, q):
    """Forward KL(teacher || student) of student logits s and teacher logits q:
    the log-probabilities of both and the teacher's probabilities."""
    ls = _f(xp, s) - _xp_lse(xp, s)[:, None]
    lt = _f(xp, q) - _xp_lse(xp, q)[:, None]
    return ls, lt, xp.exp(lt)


def _xp_kl(xp, s, q):
    """The forward KL, batchmean (for JAX's autodiff)."""
    ls, lt, pt = _xp_kl_terms(xp, s, q)
    return (pt * (lt - ls)).sum() / len(s)


def _xp_kl_grad(xp, s, q):
    """The forward KL, batchmean, and its gradient (p_student - p_teacher) / N."""
    ls, lt, pt = _xp_kl_terms(xp, s, q)
    return (pt * (lt - ls)).sum() / len(s), ((xp.exp(ls) - pt) / len(s)).astype(s.dtype)


# ---------------------------------------------------------------- torch bodies

def _torch_token_stats(torch, x, t):
    z = x.float() if x.dtype != torch.float64 else x
    lse = torch.logsumexp(z, -1)
    lp = z - lse[:, None]
    zt = z.gather(1, t[:, None])
    ids = torch.arange(z.shape[1], device=z.device)
    rank = ((z > zt) | ((z == zt) & (ids < t[:, None]))).sum(-1)
    return (zt[:, 0] - lse, lse, -(lp.exp() * lp).sum(-1), rank == 0,
            (z.amax(-1) - lse).exp(), rank)


def _torch_kl(torch, s, q):
    F = torch.nn.functional
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(q, -1), log_target=True,
                    reduction="batchmean")


def _jax_head(jax, h, w, t):
    z = jax.numpy.matmul(h, w.T, precision="highest",  # no TF32: the others use none
                         preferred_element_type=jax.numpy.float32)
    return _xp_ce(jax.numpy, z, t).mean()


# ---------------------------------------------------------------------- the ops

class Op:
    """One op family: the lmxent functions it needs (it runs only when this build
    has them all), the names of its outputs and which of them are summed over all
    rows (`whole`; the others are per row), its float64 reference outputs for a
    problem (per-row ones on problem.rows; None: left unchecked), the bytes it must
    move or the FLOPs it must do, and its implementations: row name -> factory
    (problem, peer handle) -> a call returning the outputs in that order."""

    def __init__(self, name, needs, outputs, reference, impls, *, whole=(),
                 moved=lambda p: 0, flops=lambda p: 0):
        self.name, self.needs, self.outputs, self.reference = name, needs, outputs, reference
        self.impls, self.whole, self.moved, self.flops = impls, whole, moved, flops

    @property
    def available(self):
        return all(hasattr(lx, n) for n in self.needs)


def _read(p):        # one read of the logits
    return p.x.nbytes


def _read_write(p):  # one read, one write
    return 2 * p.x.nbytes


def _inplace(call):
    """lmxent with inplace=True: the first call (the checked one) overwrites a copy of
    the logits with the gradient; the timed calls then run on their own output."""
    def factory(p, _):
        buf = p.x.copy()
        return lambda: call(p, buf)
    return factory


def _softmax_family(name, xp_body, moved):
    return Op(name, (name,), (name,), lambda p: (getattr(R, name)(p.rows64("x")),), {
        "lmxent": lambda p, _: lambda: getattr(lx, name)(p.x),
        "numpy": xp_impl(xp_body, ["x"]),
        "torch": torch_impl(lambda torch, x: getattr(torch, name)(x, -1), ["x"]),
        "quack": torch_impl(lambda quack, x: quack.softmax(x), ["x"])
        if name == "softmax" else None,
        "jax": jax_impl(lambda jax, x: xp_body(jax.numpy, x), ["x"]),
    }, moved=moved)


def _ce_with_grad_reference(p):
    loss = summed(lambda x, t: (R.cross_entropy(x, t, reduction="sum"),),
                  p.chunks64("x", "t"))[0] / p.N
    grad = R.cross_entropy_with_grad(p.rows64("x"), p.rows64("t"), normalizer=p.N)[1]
    return loss, grad


def _head_reference(p):
    """The LM head from the reference cross-entropy of float64 logits h @ W.T:
    d_hidden = g @ W, d_weight = g.T @ h."""
    W = p.host("weight").astype(np.float64)
    g_rows = R.cross_entropy_with_grad(p.rows64("hidden") @ W.T, p.rows64("t"),
                                       normalizer=p.N)[1]
    if p.N * p.V * p.D > HEAD_CHECK_MACS:
        return None, g_rows @ W, None

    def part(h, t):
        loss, g = R.cross_entropy_with_grad(h @ W.T, t, reduction="sum")
        return loss, g.T @ h
    loss, d_weight = summed(part, p.chunks64("hidden", "t"))
    return loss / p.N, g_rows @ W, d_weight / p.N


def _kl_reference(p):
    loss = summed(lambda s, q: (R.kl_divergence(s, q, reduction="sum"),),
                  p.chunks64("x", "teacher"))[0] / p.N
    grad = R.kl_divergence(p.rows64("x"), p.rows64("teacher"), reduction="sum",
                           return_grad=True)[1] / p.N
    return loss, grad


OPS = [
    _softmax_family("logsumexp", _xp_lse, _read),
    _softmax_family("log_softmax", _xp_log_softmax, _read_write),
    _softmax_family("softmax", _xp_softmax, _read_write),
    Op("cross_entropy", ("cross_entropy",), ("loss per token",),
       lambda p: (R.cross_entropy(p.rows64("x"), p.rows64("t"), reduction="none"),), {
           "lmxent": lambda p, _: lambda: lx.cross_entropy(p.x, p.t, reduction="none"),
           "numpy": xp_impl(_xp_ce, ["x", "t"]),
           "torch": torch_impl(lambda torch, x, t: torch.nn.functional.cross_entropy(
               x, t, reduction="none"), ["x", "t"]),
           "liger": torch_impl(lambda liger, x, t: liger.LigerCrossEntropyLoss(
               reduction="none")(x, t), ["x", "t"], private=(0,)),
           "jax": jax_impl(lambda jax, x, t: _xp_ce(jax.numpy, x, t), ["x", "t"]),
       }, moved=_read),
    Op("cross_entropy_with_grad", ("cross_entropy_with_grad",), ("loss", "d_logits"),
       _ce_with_grad_reference, {
           "lmxent": lambda p, _: lambda: lx.cross_entropy_with_grad(p.x, p.t),
           "lmxent inplace": _inplace(
               lambda p, buf: lx.cross_entropy_with_grad(buf, p.t, inplace=True)),
           "numpy": xp_impl(_xp_ce_grad, ["x", "t"]),
           "torch": torch_impl(lambda torch, x, t: torch.nn.functional.cross_entropy(x, t),
                               ["x", "t"], grad_of=(0,)),
           "liger": torch_impl(lambda liger, x, t: liger.LigerCrossEntropyLoss()(x, t),
                               ["x", "t"], grad_of=(0,)),
           "quack": torch_impl(lambda quack, x, t: quack.cross_entropy(x, t, reduction="mean"),
                               ["x", "t"], grad_of=(0,)),
           "jax": jax_impl(lambda jax, x, t: _xp_ce(jax.numpy, x, t).mean(), ["x", "t"],
                           grad_of=(0,)),
       }, whole=("loss",), moved=_read_write),
    Op("linear_cross_entropy", ("linear_cross_entropy",), ("loss", "d_hidden", "d_weight"),
       _head_reference, {
           "lmxent": lambda p, _: lambda: lx.linear_cross_entropy(
               p.get("hidden"), p.get("weight"), p.t),
           "numpy": xp_impl(_xp_linear_ce, ["hidden", "weight", "t"]),
           "torch": torch_impl(lambda torch, h, w, t: torch.nn.functional.cross_entropy(
               torch.nn.functional.linear(h, w), t), ["hidden", "weight", "t"],
               grad_of=(0, 1)),
           "liger": torch_impl(lambda liger, h, w, t: liger.LigerFusedLinearCrossEntropyLoss()(
               w, h, t), ["hidden", "weight", "t"], grad_of=(0, 1)),
           "cce": torch_impl(lambda cce, h, w, t: cce.linear_cross_entropy(h, w, t),
                             ["hidden", "weight", "t"], grad_of=(0, 1)),
           "jax": jax_impl(_jax_head, ["hidden", "weight", "t"], grad_of=(0, 1)),
       }, whole=("loss", "d_weight"), flops=lambda p: 6 * p.N * p.V * p.D),
    Op("token_stats", ("token_stats",),
       ("logprob", "lse", "entropy", "correct", "top_prob", "rank"),
       lambda p: tuple(R.token_stats(p.rows64("x"), p.rows64("t"))), {
           "lmxent": lambda p, _: lambda: lx.token_stats(p.x, p.t),
           "numpy": xp_impl(_xp_token_stats, ["x", "t"]),
           "torch": torch_impl(_torch_token_stats, ["x", "t"]),
           "jax": jax_impl(lambda jax, x, t: _xp_token_stats(jax.numpy, x, t), ["x", "t"]),
       }, moved=_read),
    Op("kl_divergence", ("kl_divergence",), ("loss", "d_student"), _kl_reference, {
        "lmxent": lambda p, _: lambda: lx.kl_divergence(p.x, p.get("teacher"),
                                                        return_grad=True),
        "lmxent inplace": _inplace(lambda p, buf: lx.kl_divergence(
            buf, p.get("teacher"), return_grad=True, inplace=True)),
        "numpy": xp_impl(_xp_kl_grad, ["x", "teacher"]),
        "torch": torch_impl(_torch_kl, ["x", "teacher"], grad_of=(0,)),
        "liger": torch_impl(lambda liger, s, q: liger.LigerKLDIVLoss(
            reduction="batchmean", log_target=True)(
                s.log_softmax(-1), q.log_softmax(-1)), ["x", "teacher"], grad_of=(0,)),
        "jax": jax_impl(lambda jax, s, q: _xp_kl(jax.numpy, s, q), ["x", "teacher"],
                        grad_of=(0,)),
    }, whole=("loss",), moved=lambda p: 3 * p.x.nbytes),
]


def select_ops(dev, names=None):
    """(ops to run, {name: why not} for the ops this lmxent build lacks or cannot run
    on the device: lmxent raises TypeError for arrays it has no kernels for, and a
    tiny problem finds that out before the sweep)."""
    ops, missing, tiny = [], {}, Problem(dev, 2, 16, np.float32, 4)
    for op in OPS:
        if not op.available:
            missing[op.name] = "not in this lmxent build"
            continue
        try:
            op.impls["lmxent"](tiny, None)()
        except TypeError as e:
            missing[op.name] = f"not on {dev.name} in this lmxent build ({e})"
            continue
        except Exception:  # a failure, not a missing kernel: the sweep reports it
            pass
        if names is None or op.name in names:
            ops.append(op)
    return ops, missing


# ------------------------------------------------------------------- one point

def tolerance(problem_dtype, out_dtype):
    """The check's tolerance on rel_error (see the module docstring)."""
    dt = dtype_name(problem_dtype)
    tol = 64 * EPS["float64" if dt == "float64" else "float32"]
    tol += 2 * EPS.get(dtype_name(out_dtype), 0.0)
    return tol + (4 * EPS[dt] if dt in ("float16", "bfloat16") else 0.0)


def check(op, p, outputs, expected):
    """Compare an implementation's outputs with the reference: whole outputs in full,
    the others on p.rows; integer and boolean outputs exactly. Returns (worst error
    over its tolerance, that error, the output it was in, the outputs left unchecked)."""
    outputs = flatten(outputs)
    if len(outputs) != len(op.outputs):
        return float("inf"), float("inf"), f"{len(outputs)} outputs, expected " \
            f"{len(op.outputs)} ({', '.join(op.outputs)})", []
    worst, unchecked = (0.0, 0.0, ""), []
    for name, got, want in zip(op.outputs, outputs, expected):
        if want is None:
            unchecked.append(name)
            continue
        got = to_host(got)
        if name not in op.whole:
            got = got[p.rows]
        if got.shape != np.shape(want):
            return float("inf"), float("inf"), f"{name} has shape {got.shape}", unchecked
        if got.dtype.kind in "biu":
            err = ratio = 0.0 if np.array_equal(got, want) else float("inf")
        else:
            err = rel_error(got, want)
            ratio = err / tolerance(p.dtype, got.dtype)
        if ratio >= worst[0]:
            worst = (ratio, err, name)
    return worst + (unchecked,)


def implementations(op, peers, extra):
    """(row name, factory, peer handle) of every implementation of op that can run:
    lmxent's, the loaded peers' (torch.compile compiles the torch body), extra ones."""
    for impl, factory in dict(op.impls, **extra).items():
        if factory is None:
            continue
        if impl.startswith("lmxent") or impl in extra:
            yield impl, factory, None
        elif impl in peers:
            yield impl, factory, peers[impl]
        if impl == "torch" and "torch.compile" in peers:
            yield "torch.compile", partial(factory, compiled=True), peers["torch.compile"]


def copy_time(p, timing):
    """Best time of a copy of the logits into another array (one read, one write)."""
    dst = p.dev.xp.empty_like(p.x)
    p.dev.xp.copyto(dst, p.x)  # warm: the pages of dst are mapped
    return best_time(lambda: p.dev.xp.copyto(dst, p.x), p.dev.sync, *timing)


def run_point(p, ops, peers, timing, progress, extra_impls):
    """Check and time every implementation of every op on problem p."""
    copy_s = copy_time(p, timing)
    copy_gbs = 2 * p.x.nbytes / copy_s / 1e9
    rows = []
    for op in ops:
        expected = op.reference(p)
        for impl, factory, handle in implementations(op, peers, extra_impls.get(op.name, {})):
            name = p.dev.numpy_peer if impl == "numpy" else impl
            progress.update(0, f"{p.label} {op.name}: {name}")
            rows.append(run_impl(op, p, name, factory, handle, expected, timing, copy_gbs))
            progress.update(1)
    for r in rows:  # lmxent's speedup over each peer, per op
        base = next(b for b in rows if b["op"] == r["op"] and b["impl"] == "lmxent")
        if not r["impl"].startswith("lmxent") and r["status"] == base["status"] == "ok":
            r["lmxent_speedup"] = r["seconds"] / base["seconds"]
    return dict(shape=[p.N, p.V], dtype=dtype_name(p.dtype), hidden=p.D,
                copy_seconds=copy_s, copy_gbs=copy_gbs, results=rows)


def run_impl(op, p, peer, factory, handle, expected, timing, copy_gbs):
    """Check, then time, one implementation: a row of the report."""
    row = dict(op=op.name, impl=peer)
    try:
        fn = factory(p, handle)
        out = fn()
        p.dev.sync()
        ratio, err, where, unchecked = check(op, p, out, expected)
        del out  # the checked call was the warm-up
        row.update(max_error=err, error_over_tolerance=ratio, worst_output=where)
        if unchecked:
            row.update(unchecked=unchecked)
        if not ratio <= 1.0:
            row.update(status="WRONG")
            return row
        s = best_time(fn, p.dev.sync, *timing)
    except Skip as e:
        row.update(status="skipped", detail=str(e))
        return row
    except Exception as e:  # a failing implementation is a result, not a crash
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        row.update(status="error", detail=f"{type(e).__name__}: {msg}".rstrip(": "))
        return row
    row.update(status="ok", seconds=s)
    moved, flops = op.moved(p), op.flops(p)
    if moved:
        row.update(gbs=moved / s / 1e9, copy_fraction=moved / s / 1e9 / copy_gbs)
    if flops:
        row.update(gflops=flops / s / 1e9)
    return row


# ----------------------------------------------------------------- reporting

def _row_lines(res):
    N, V = res["shape"]
    lines = [f"\n{N} x {V} {res['dtype']}: memory copy {res['copy_seconds'] * 1e3:.2f} ms "
             f"= {res['copy_gbs']:.1f} GB/s"
             + (f"   (LM head: D = {res['hidden']})" if any(
                 r["op"] == "linear_cross_entropy" for r in res["results"]) else ""),
             f"  {'op':<25}{'impl':<16}{'ms':>10}{'throughput':>16}{'of copy':>9}"
             f"{'lmxent speedup':>16}"]
    last_op = None
    for r in res["results"]:
        op = r["op"] if r["op"] != last_op else ""
        last_op = r["op"]
        if r["status"] == "WRONG":
            lines.append(f"  {op:<25}{r['impl']:<16}  WRONG: max error {r['max_error']:.2e} = "
                         f"{r['error_over_tolerance']:.3g}x the tolerance (in "
                         f"{r['worst_output']}); "
                         "not timed")
            continue
        if r["status"] != "ok":
            lines.append(f"  {op:<25}{r['impl']:<16}  {r['status']}: {r['detail']}")
            continue
        rate = (f"{r['gbs']:.1f} GB/s" if "gbs" in r else f"{r['gflops']:.0f} GFLOP/s")
        frac = f"{r['copy_fraction'] * 100:.0f}%" if "copy_fraction" in r else ""
        speed = f"{r['lmxent_speedup']:.1f}x" if "lmxent_speedup" in r else ""
        lines.append(f"  {op:<25}{r['impl']:<16}{r['seconds'] * 1e3:10.2f}{rate:>16}{frac:>9}"
                     f"{speed:>16}" + (f"  ({', '.join(r['unchecked'])}: too large to check)"
                                       if "unchecked" in r else ""))
    return lines


def plot(report, path):
    """Throughput against vocabulary size, a panel per op, a line per implementation
    and dtype, and the memory copy's bandwidth dashed. Returns False without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    ops = [op.name for op in OPS if any(r["op"] == op.name for res in report["results"]
                                        for r in res["results"])]
    dtypes = sorted({res["dtype"] for res in report["results"]})
    styles = dict(zip(dtypes, ["-", "--", ":", "-."]))
    impls = list(dict.fromkeys(r["impl"] for res in report["results"] for r in res["results"]))
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    cols = min(3, len(ops))
    rows = -(-len(ops) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.9 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, op in zip(axes, ops):
        head = op == "linear_cross_entropy"
        for dt in dtypes:
            points = sorted(((res["shape"][1], r) for res in report["results"]
                             if res["dtype"] == dt for r in res["results"]
                             if r["op"] == op and r["status"] == "ok"), key=lambda vr: vr[0])
            for impl in impls:
                xy = [(v, r["gflops"] if head else r["gbs"]) for v, r in points
                      if r["impl"] == impl]
                if xy:
                    ax.plot(*zip(*xy), styles[dt], marker="o", ms=3, color=colors[impl],
                            label=impl + (f" {dt}" if len(dtypes) > 1 else ""))
            copy = sorted((res["shape"][1], res["copy_gbs"]) for res in report["results"]
                          if res["dtype"] == dt)
            if not head and copy:
                ax.plot(*zip(*copy), styles[dt], color="gray", alpha=0.6, lw=2,
                        label="memory copy" + (f" {dt}" if len(dtypes) > 1 else ""))
        ax.set(xscale="log", yscale="log", title=op, xlabel="vocabulary size V",
               ylabel="GFLOP/s" if head else "GB/s (higher is better)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(ops):]:
        ax.set_visible(False)
    m = report["machine"]
    fig.suptitle(f"lmxent {m['versions']['lmxent']} on {report['device']}: {m['cpu']}, "
                 f"{m['cores']} cores ({m['lmxent_cpu']['isa']})"
                 + (f", {m['gpu']}" if report["device"] == "cuda" else ""), fontsize=10)
    fig.savefig(path, dpi=110)
    return True


# ------------------------------------------------------------------ arguments

def _shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
        if all(len(s) == 2 and min(s) > 0 for s in shapes):
            return shapes
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected NxV[,NxV...] with positive integers (rows x "
                                     f"vocabulary), got {text!r}")


def _dtypes(text):
    names = text.split(",")
    bad = [n for n in names if n not in EPS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype {bad[0]!r} (choose from "
                                         f"{', '.join(EPS)})")
    return names


def _choice(valid, what):
    def parse(text):
        names = text.split(",")
        for n in names:
            if n not in valid:
                raise argparse.ArgumentTypeError(f"unknown {what} {n!r} (choose from "
                                                 f"{', '.join(valid)})")
        return names
    return parse


def add_arguments(ap):
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: NumPy arrays (default); cuda: CuPy arrays on the GPU")
    ap.add_argument("--shapes", type=_shapes, metavar="NxV,...",
                    help="rows x vocabulary (default: V in 8192, 32000, 50257, 128256, 256000 "
                         "with N*V = 2^24 on the CPU, 2^27 on the GPU)")
    ap.add_argument("--dtypes", type=_dtypes, metavar="DT,...",
                    help="float32, bfloat16, float16, float64 (default: float32,bfloat16; "
                         "--quick: float32)")
    ap.add_argument("--ops", type=_choice([op.name for op in OPS], "op"), metavar="OP,...",
                    help="op families to run: " + ", ".join(op.name for op in OPS)
                         + " (default: all this build has)")
    ap.add_argument("--peers", type=_choice(list(PEERS), "peer"), metavar="PEER,...",
                    help="peers to compare with: " + ", ".join(PEERS)
                         + " (default: every one installed)")
    ap.add_argument("--hidden", type=positive_int, metavar="D",
                    help="the LM head's hidden size (default 256 on the CPU, 4096 on the GPU)")
    ap.add_argument("--repeats", type=positive_int, default=5,
                    help="timed runs per implementation, best taken (default 5; --quick 3)")
    ap.add_argument("--quick", action="store_true",
                    help=f"shapes {', '.join(f'{n}x{v}' for n, v in QUICK_SHAPES)}, float32, "
                         f"D = {QUICK_HIDDEN}, fewer runs: under a minute on 2 cores")
    ap.add_argument("--compile", action="store_true",
                    help="include torch.compile on the CPU (always included on the GPU)")
    ap.add_argument("--out", default="lmxent-bench", metavar="DIR",
                    help="where bench.json and bench.png go (default ./lmxent-bench)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv=None, *, extra_impls=None):
    """Parse argv and run (extra_impls: {op name: {row name: factory}}, more
    implementations to check and time, such as a deliberately wrong one in tests)."""
    ap = argparse.ArgumentParser(prog="python -m lmxent bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv), ap, extra_impls)


def load_peers(dev, args):
    """({name: handle} of the peers that can run here, {name: why not} of the others)."""
    peers, skipped = {}, {}
    for name, load in PEERS.items():
        if args.peers is not None and name not in args.peers:
            continue
        try:
            peers[name] = load(dev, args)
        except Skip as e:
            skipped[name] = str(e)
    return peers, skipped


def run(args, parser, extra_impls=None):
    extra_impls = extra_impls or {}
    try:
        dev = Device(args.device)
    except ValueError as e:
        parser.error(str(e))
    ops, missing = select_ops(dev, args.ops)
    for name in args.ops or ():
        if name in missing:
            parser.error(f"--ops: {name} is {missing[name]}")
    shapes = args.shapes or (list(QUICK_SHAPES) if args.quick else [
        (max(1, round(SWEEP_ELEMENTS[dev.name] / v)), v) for v in SWEEP_V])
    dtypes, dtype_skips = [], {}
    for name in args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"]):
        dt = lx.bfloat16_dtype() if name == "bfloat16" else np.dtype(name)
        if dt is None:
            dtype_skips[name] = "ml_dtypes is not installed"
        else:
            dtypes.append(dt)
    # (repeats, min seconds, max seconds) of each timing
    timing = (min(args.repeats, 3), 0.05, 1.0) if args.quick else (args.repeats, 0.3, 4.0)
    hidden = args.hidden or (QUICK_HIDDEN if args.quick else DEFAULT_HIDDEN[dev.name])
    peers, skipped = load_peers(dev, args)
    shown = {n: dev.numpy_peer if n == "numpy" else n for n in PEERS}

    machine = machine_info()
    print(f"lmxent {lx.__version__} bench on {dev.name}: {machine['cpu']}, {machine['cores']} "
          f"cores, CPU kernels {machine['lmxent_cpu']['isa']} with "
          f"{machine['lmxent_cpu']['threads']} threads"
          + (f"; GPU {machine['gpu']}" if dev.name == "cuda" else ""))
    print("peers: " + ", ".join(shown[n] for n in peers)
          + "".join(f"\n  skipped {shown[n]}: {why}" for n, why in skipped.items()))
    if missing:
        print("ops skipped: " + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    for name, why in dtype_skips.items():
        print(f"{name} skipped: {why}")

    per_point = sum(1 for op in ops
                    for _ in implementations(op, peers, extra_impls.get(op.name, {})))
    progress = Progress(per_point * len(shapes) * len(dtypes), enabled=not args.no_progress)
    results = []
    try:
        for dt in dtypes:
            for N, V in shapes:
                try:
                    p = Problem(dev, N, V, dt, hidden)
                except Skip as e:  # CuPy has no bfloat16
                    dtype_skips[dtype_name(dt)] = str(e)
                    progress.update(per_point)
                    progress.write(f"{N}x{V} {dtype_name(dt)} skipped: {e}")
                    continue
                results.append(run_point(p, ops, peers, timing, progress, extra_impls))
                del p
                for line in _row_lines(results[-1]):
                    progress.write(line)
    finally:
        progress.close()

    report = dict(device=dev.name, machine=machine, quick=args.quick, timing=timing,
                  peers=dict({shown[n]: "ok" for n in peers},
                             **{shown[n]: f"skipped: {why}" for n, why in skipped.items()}),
                  ops_missing=missing, dtypes_skipped=dtype_skips, results=results)
    write_report(report, args.out)
    bad = [f"{res['shape'][0]}x{res['shape'][1]} {res['dtype']} {r['op']} {r['impl']}: "
           f"{r['status']}" for res in results for r in res["results"]
           if r["impl"].startswith("lmxent") and r["status"] != "ok"]
    for b in bad:
        print("lmxent FAILED: " + b)
    return 1 if bad else 0


def write_report(report, out):
    """bench.json and (with matplotlib) bench.png in the directory `out`."""
    print(f"\nwrote {write_json(report, out, 'bench.json')}")
    if not report["results"]:
        return
    png = os.path.join(out, "bench.png")
    if plot(report, png):
        print(f"wrote {png}")
    else:
        print("plot skipped: matplotlib is not installed (pip install 'lmxent[plot]')")
