"""The op registry: one row per public function of lmxent (lmxent.<name>, checked
against lmxent.reference.<name>). Read by the self-check (python -m lmxent: a row's
`checks`), the benchmark (python -m lmxent bench: its `bench`, the peers included)
and tests/test_registry.py (every public function has a row). Adding an op: its
module (with its __all__), its reference, one row here, its test.

A check is run(x, t, w, rng) -> [(lmxent's output, the reference's, the output's
dtype name), ...] on logits x (N, V), class ids t (N,) and class weights w (V,); the
self-check's tolerance is `ulps` units of the compute precision plus 2 of the output
dtype (Check.tolerance). The functions are looked up by name at each call, so a wrong
lmxent function patched in is caught."""
import numpy as np

import lmxent as lx
from lmxent import reference as R

from ._cli import EPS
from .bench import bodies as B
from .bench import spec as S
from .bench.peers import jax_impl, torch_impl, xp_impl


class Check:
    """One row of the self-check: run(x, t, w, rng) and its tolerance in units of the
    compute precision."""

    def __init__(self, run, ulps=16):
        self.run, self.ulps = run, ulps

    def tolerance(self, dtype, out_name):
        """The tolerance on rel_error for input dtype `dtype` and an output of dtype
        `out_name`: float32 math (float64 for float64 input) with a result rounded
        once to its dtype."""
        compute = "float64" if dtype == np.float64 else "float32"
        return self.ulps * EPS[compute] + 2 * EPS[out_name]


class Row:
    """One public function: its self-check rows (label -> Check, or a run with the
    default tolerance) and its benchmark (a bench.spec.Op, or None)."""

    def __init__(self, name, *, checks=None, bench=None):
        assert bench is None or bench.name == name, (name, bench.name)
        self.name, self.bench = name, bench
        self.checks = {label: c if isinstance(c, Check) else Check(c)
                       for label, c in (checks or {}).items()}


# ---------------------------------------------------------------- self-checks

# every cross-entropy option at once (all of them move the result)
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0, logit_scale=0.5, ignore_index=0)


def _temperature(name):
    def run(x, t, w, rng):
        got = getattr(lx, name)(x, temperature=0.7)
        return [(got, getattr(R, name)(x.astype(np.float64), temperature=0.7), got.dtype.name)]
    return run


def _options(w, full):
    return dict(OPTIONS, weight=w) if full else {}


def _ce(full):
    def run(x, t, w, rng):
        o = _options(w, full)
        got = lx.cross_entropy(x, t, reduction="none", **o)
        want = R.cross_entropy(x.astype(np.float64), t, reduction="none", **o)
        return [(got, want, got.dtype.name)]
    return run


def _ce_grad(full):
    def run(x, t, w, rng):
        o = _options(w, full)
        loss, g = lx.cross_entropy_with_grad(x, t, **o)
        rl, rg = R.cross_entropy_with_grad(x.astype(np.float64), t, **o)
        return [(loss, rl, loss.dtype.name), (g, rg, x.dtype.name)]
    return run


def _prob_targets(x, t, w, rng):
    q = rng.dirichlet(np.ones(x.shape[-1]), size=x.shape[0]).astype(x.dtype)
    loss, g = lx.cross_entropy_with_grad(x, q, label_smoothing=0.1)
    rl, rg = R.cross_entropy_with_grad(x.astype(np.float64), q.astype(np.float64),
                                       label_smoothing=0.1)
    return [(loss, rl, loss.dtype.name), (g, rg, x.dtype.name)]


def _backward(x, t, w, rng):
    _, lse = lx.cross_entropy(x, t, reduction="none", return_lse=True)
    go = rng.normal(size=t.shape)
    got = lx.cross_entropy_backward(x, t, lse, go, reduction="none")
    want = R.cross_entropy_backward(x.astype(np.float64), t, lse.astype(np.float64), go,
                                    reduction="none")
    return [(got, want, x.dtype.name)]


def _token_stats(x, t, w, rng):
    got = lx.token_stats(x, t, temperature=0.7)
    want = R.token_stats(x.astype(np.float64), t, temperature=0.7)
    return [(g, r, g.dtype.name if g.dtype.kind == "f" else "float64")
            for g, r in zip(got, want)]  # integer fields must match exactly


def _kl(direction):
    def run(x, t, w, rng):
        y = rng.normal(scale=3.0, size=x.shape).astype(x.dtype)
        loss, g = lx.kl_divergence(x, y, direction=direction, return_grad=True,
                                   reduction="sum")
        rl, rg = R.kl_divergence(x.astype(np.float64), y.astype(np.float64),
                                 direction=direction, return_grad=True, reduction="sum")
        return [(loss, rl, loss.dtype.name), (g, rg, x.dtype.name)]
    return run


def _lm_head(x, t, w, rng):
    if x.shape[-1] > 5000 or x.dtype == np.float16:  # a (V, D) weight; NumPy has no f16 BLAS
        return []
    h = rng.normal(size=(x.shape[0], 16)).astype(x.dtype)
    W = (rng.normal(size=(x.shape[-1], 16)) / 4).astype(x.dtype)
    loss, grads = lx.linear_cross_entropy(h, W, t, chunk_size=2)
    rl, rg = R.linear_cross_entropy(h.astype(np.float64), W.astype(np.float64), t)
    return [(loss, rl, loss.dtype.name), (grads[0], rg[0], x.dtype.name),
            (grads[1], rg[1], x.dtype.name)]


# the serving setting: every filter on, 5 log-probabilities
DECODING = S.DECODING


def _process_logits(x, t, w, rng):
    got = lx.process_logits(x, **DECODING)
    return [(got, R.process_logits(x.astype(np.float64), **DECODING), x.dtype.name)]


def _sample(x, t, w, rng):
    got = lx.sample(x, seed=7, num_logprobs=5, **DECODING)
    want = R.sample(x.astype(np.float64), seed=7, num_logprobs=5, **DECODING)
    return [(g, r, g.dtype.name if g.dtype.kind == "f" else "float64")
            for g, r in zip(got, want)]  # ids and ranks must match exactly


def _top_k(x, t, w, rng):
    k = min(5, x.shape[-1])
    values, ids = lx.top_k(x, k)
    rv, ri = R.top_k(x.astype(np.float64), k)
    return [(values, rv, x.dtype.name), (ids, ri, "float64")]


# ----------------------------------------------------------------- the table

def _lmxent(call):
    """An lmxent implementation for the benchmark: call(problem) on the device."""
    return lambda p, _: lambda: call(p)


REGISTRY = [
    Row("logsumexp", checks={"logsumexp": _temperature("logsumexp")},
        bench=S.softmax_family("logsumexp", B.xp_lse, S.read)),
    Row("log_softmax", checks={"log_softmax": _temperature("log_softmax")},
        bench=S.softmax_family("log_softmax", B.xp_log_softmax, S.read_write)),
    Row("softmax", checks={"softmax": _temperature("softmax")},
        bench=S.softmax_family("softmax", B.xp_softmax, S.read_write)),
    Row("cross_entropy",
        checks={"cross_entropy": _ce(False), "cross_entropy (all options)": _ce(True)},
        bench=S.Op("cross_entropy", ("cross_entropy",), ("loss per token",),
                   lambda p: (R.cross_entropy(p.rows64("x"), p.rows64("t"), reduction="none"),),
                   {"lmxent": _lmxent(lambda p: lx.cross_entropy(p.x, p.t, reduction="none")),
                    "numpy": xp_impl(B.xp_ce, ["x", "t"]),
                    "torch": torch_impl(lambda torch, x, t: torch.nn.functional.cross_entropy(
                        x, t, reduction="none"), ["x", "t"]),
                    "liger": torch_impl(lambda liger, x, t: liger.LigerCrossEntropyLoss(
                        reduction="none")(x, t), ["x", "t"], private=(0,)),
                    "jax": jax_impl(lambda jax, x, t: B.xp_ce(jax.numpy, x, t), ["x", "t"])},
                   moved=S.read)),
    Row("cross_entropy_with_grad",
        checks={"cross_entropy_with_grad": _ce_grad(False),
                "cross_entropy_with_grad (all options)": _ce_grad(True),
                "cross_entropy_with_grad (probabilities)": _prob_targets},
        bench=S.Op("cross_entropy_with_grad", ("cross_entropy_with_grad",), ("loss", "d_logits"),
                   S.ce_with_grad_reference,
                   {"lmxent": _lmxent(lambda p: lx.cross_entropy_with_grad(p.x, p.t)),
                    "lmxent inplace": S.inplace(
                        lambda p, buf: lx.cross_entropy_with_grad(buf, p.t, inplace=True)),
                    "numpy": xp_impl(B.xp_ce_grad, ["x", "t"]),
                    "torch": torch_impl(lambda torch, x, t: torch.nn.functional.cross_entropy(
                        x, t), ["x", "t"], grad_of=(0,)),
                    "liger": torch_impl(lambda liger, x, t: liger.LigerCrossEntropyLoss()(x, t),
                                        ["x", "t"], grad_of=(0,)),
                    "quack": torch_impl(lambda quack, x, t: quack.cross_entropy(
                        x, t, reduction="mean"), ["x", "t"], grad_of=(0,)),
                    "jax": jax_impl(lambda jax, x, t: B.xp_ce(jax.numpy, x, t).mean(),
                                    ["x", "t"], grad_of=(0,))},
                   whole=("loss",), moved=S.read_write)),
    Row("cross_entropy_backward", checks={"cross_entropy_backward": _backward}),
    Row("token_stats", checks={"token_stats": _token_stats},
        bench=S.Op("token_stats", ("token_stats",),
                   ("logprob", "lse", "entropy", "correct", "top_prob", "rank"),
                   lambda p: tuple(R.token_stats(p.rows64("x"), p.rows64("t"))),
                   {"lmxent": _lmxent(lambda p: lx.token_stats(p.x, p.t)),
                    "numpy": xp_impl(B.xp_token_stats, ["x", "t"]),
                    "torch": torch_impl(B.torch_token_stats, ["x", "t"]),
                    "jax": jax_impl(lambda jax, x, t: B.xp_token_stats(jax.numpy, x, t),
                                    ["x", "t"])},
                   moved=S.read)),
    # a Jensen-Shannon gradient entry is p_j (c_j - sum_k p_k c_k) with c = log(p / m) / 2:
    # the two terms, up to ln(2) / 2 each, nearly cancel where p_j is large and q_j is
    # not small, so its error is ulps of them (and of the 16k-term sum), not of the result
    Row("kl_divergence",
        checks={"kl_divergence (forward, with grad)": _kl("forward"),
                "kl_divergence (reverse, with grad)": _kl("reverse"),
                "kl_divergence (js, with grad)": Check(_kl("js"), ulps=256)},
        bench=S.Op("kl_divergence", ("kl_divergence",), ("loss", "d_student"), S.kl_reference,
                   {"lmxent": _lmxent(lambda p: lx.kl_divergence(p.x, p.get("teacher"),
                                                                 return_grad=True)),
                    "lmxent inplace": S.inplace(lambda p, buf: lx.kl_divergence(
                        buf, p.get("teacher"), return_grad=True, inplace=True)),
                    "numpy": xp_impl(B.xp_kl_grad, ["x", "teacher"]),
                    "torch": torch_impl(B.torch_kl, ["x", "teacher"], grad_of=(0,)),
                    "liger": torch_impl(lambda liger, s, q: liger.LigerKLDIVLoss(
                        reduction="batchmean", log_target=True)(
                            s.log_softmax(-1), q.log_softmax(-1)), ["x", "teacher"],
                        grad_of=(0,)),
                    "jax": jax_impl(lambda jax, s, q: B.xp_kl(jax.numpy, s, q),
                                    ["x", "teacher"], grad_of=(0,))},
                   whole=("loss",), moved=lambda p: 3 * p.x.nbytes)),
    Row("linear_cross_entropy", checks={"linear_cross_entropy (LM head)": _lm_head},
        bench=S.Op("linear_cross_entropy", ("linear_cross_entropy",),
                   ("loss", "d_hidden", "d_weight"), S.head_reference,
                   {"lmxent": _lmxent(lambda p: lx.linear_cross_entropy(
                       p.get("hidden"), p.get("weight"), p.t)),
                    "numpy": xp_impl(B.xp_linear_ce, ["hidden", "weight", "t"]),
                    "torch": torch_impl(lambda torch, h, w, t: torch.nn.functional.cross_entropy(
                        torch.nn.functional.linear(h, w), t), ["hidden", "weight", "t"],
                        grad_of=(0, 1)),
                    "liger": torch_impl(
                        lambda liger, h, w, t: liger.LigerFusedLinearCrossEntropyLoss()(w, h, t),
                        ["hidden", "weight", "t"], grad_of=(0, 1)),
                    "cce": torch_impl(lambda cce, h, w, t: cce.linear_cross_entropy(h, w, t),
                                      ["hidden", "weight", "t"], grad_of=(0, 1)),
                    "jax": jax_impl(B.jax_head, ["hidden", "weight", "t"], grad_of=(0, 1))},
                   whole=("loss", "d_weight"), flops=lambda p: 6 * p.N * p.V * p.D)),
    # checked by their tests (tests/test_linear_cross_entropy.py, test_evaluation.py)
    Row("linear_target_logprobs"),
    Row("sequence_scores"),
    Row("answer_mask"),
    Row("perplexity"),
    Row("bits_per_byte"),
    Row("calibration"),
    Row("process_logits", checks={"process_logits": _process_logits},
        bench=S.Op("process_logits", ("process_logits",), ("processed logits",),
                   S.process_logits_reference,
                   {"lmxent": _lmxent(lambda p: lx.process_logits(p.x, **S.DECODING)),
                    "numpy": xp_impl(lambda xp, x: B.xp_process(xp, x, **S.DECODING), ["x"]),
                    "torch": torch_impl(lambda torch, x: B.torch_process_hf(
                        torch, x, **S.DECODING), ["x"])},
                   moved=S.read_write)),
    # the sample's draw, then its raw top-n log-probabilities (checked: see
    # spec.sample_reference)
    Row("sample", checks={"sample (with 5 logprobs)": _sample},
        bench=S.Op("sample", ("sample",), ("top_logprobs",), S.sample_reference,
                   {"lmxent": _lmxent(lambda p: lx.sample(
                       p.x, num_logprobs=S.NUM_LOGPROBS, **S.DECODING).top_logprobs),
                    "numpy": xp_impl(lambda xp, x: B.xp_sample(
                        xp, x, S.NUM_LOGPROBS, **S.DECODING), ["x"]),
                    "torch": torch_impl(lambda torch, x: B.torch_sample_hf(
                        torch, x, S.NUM_LOGPROBS, **S.DECODING), ["x"])},
                   moved=S.read)),
    Row("top_k", checks={"top_k": _top_k}),
    # checked by tests/test_decoding.py
    Row("beam_search_step"),
    Row("beam_search"),
]

ROWS = {row.name: row for row in REGISTRY}
