"""One rank of the lmxent.distributed tests, launched by tests/test_distributed.py
as `mpirun -n P python3 dist_worker.py`. Every rank builds the same whole
problems from a shared seed, runs the vocabulary-parallel op on its slice, and
compares with the single-process lx call on the whole logits: loss, per-token
loss, LSE, its gradient slice, the LM head's gradients, token statistics, the
data-parallel normaliser; every option, even and uneven slices (a rank with no
vocabulary, slices out of rank order), float32, float64 and bfloat16; and the
errors: refused slices and one rank's refused arguments raise on every rank
(the collectives stay in step: a case after them still runs).

Prints one line per failed check and, on rank 0, "ok <count of checks>" when
every rank passed; exits 1 on any failure. `bench` as the first argument times
a step instead (see docs/distributed.md)."""
import os
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

import lmxent as lx
import lmxent.distributed as lxd

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - a test dependency
    BF16 = None

COMM = MPI.COMM_WORLD
RANK, P = COMM.Get_rank(), COMM.Get_size()
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [F32, F64] + ([BF16] if BF16 is not None else [])
failures, checks = [], [0]


# ------------------------------------------------------------------ helpers

def layouts(V, rng, *, empty_ok=True):
    """Named (starts, sizes) per rank: even, uneven, one rank empty, out of order."""
    out = {"even": np.array_split(np.arange(V), P)}
    cuts = np.sort(rng.choice(np.arange(1, V), P - 1, replace=False)) if P > 1 else []
    out["uneven"] = np.split(np.arange(V), cuts)
    if P > 1 and empty_ok:
        parts = np.array_split(np.arange(V), P - 1)
        out["empty"] = parts[:1] + [np.arange(0)] + parts[1:]  # rank 1 holds nothing
    if P > 2:
        parts = np.array_split(np.arange(V), P)
        out["reversed"] = parts[::-1]
    return {k: (int(v[RANK][0]) if len(v[RANK]) else
                int(sum(len(p) for p in v[:RANK])) % (V + 1), len(v[RANK]))
            for k, v in out.items()}


def tol(dtype, what):
    lowp = np.dtype(dtype) != F64
    if what == "grad":
        return {F64: (1e-9, 1e-11)}.get(np.dtype(dtype), (2**-7, 2**-7) if np.dtype(dtype) == BF16
                                         else (1e-4, 3e-5))
    return (2e-5, 2e-5) if lowp else (1e-10, 1e-10)


def check(name, got, want, dtype, what="loss"):
    """got against want (NaN where want has NaN, equal infinities); the absolute
    tolerance is relative to the largest finite |want|."""
    checks[0] += 1
    try:
        got = np.asarray(np.asarray(got).astype(np.float64))
        want = np.asarray(np.asarray(want).astype(np.float64))
        assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg="NaN")
        inf = np.isinf(want)
        np.testing.assert_array_equal(got[inf], want[inf], err_msg="inf")
        fin = np.isfinite(want)
        rtol, atol = tol(dtype, what)
        scale = max(1e-30 if what == "grad" else 1.0,
                    float(np.max(np.abs(want[fin]), initial=0.0)))
        np.testing.assert_allclose(got[fin], want[fin], rtol=rtol, atol=atol * scale)
    except AssertionError as e:
        failures.append(f"rank {RANK}: {name}: {str(e).strip()[:600]}")


def case(name, fn):
    """Run one case; an exception is a failure (the ranks may then be out of step,
    which the launcher's timeout catches). LMXENT_DIST_TRACE=1 prints each case."""
    if os.environ.get("LMXENT_DIST_TRACE"):
        print(f"rank {RANK}: {name}", file=sys.stderr, flush=True)
    try:
        fn()
    except Exception:
        failures.append(f"rank {RANK}: {name}: raised\n{traceback.format_exc()}")


def expect_raise(name, fn, kind, text=""):
    """fn must raise `kind` (mentioning text) on this rank."""
    checks[0] += 1
    try:
        fn()
    except kind as e:
        if text not in str(e):
            failures.append(f"rank {RANK}: {name}: message {str(e)!r} lacks {text!r}")
        return
    except Exception as e:
        failures.append(f"rank {RANK}: {name}: raised {type(e).__name__}: {e}")
        return
    failures.append(f"rank {RANK}: {name}: did not raise")


def logits(rng, shape, dtype):
    return (rng.standard_normal(shape) * 3).astype(dtype)


def dist(**kw):
    return dict(comm=COMM, **kw)


# ---------------------------------------------------------------- the cases

CE_OPTIONS = {
    "plain": {},
    "ignore": {"ignore_index": 3},
    "weight": {"weight": True},
    "smooth": {"label_smoothing": 0.15},
    "smooth_weight": {"label_smoothing": 0.3, "weight": True},
    "smooth_all": {"label_smoothing": 1.0},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "scale": {"logit_scale": 0.6},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "normalizer": {"normalizer": 23.0},
    "everything": {"weight": True, "label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 3.0,
                   "logit_scale": 1.7, "ignore_index": -1},
}


def ce_args(rng, opts, lead, V):
    o = dict(opts)
    if o.get("weight"):
        o["weight"] = rng.uniform(0.2, 2.0, V)
    t = rng.integers(0, V, lead)
    ii = o.get("ignore_index", -100)
    t.reshape(-1)[::4] = ii  # every 4th token ignored (whatever ignore_index is)
    go = rng.standard_normal(lead) if o.get("reduction") == "none" else 1.7
    return o, t, go


def ce_case(name, rng, dtype, lead, V, opts, layout, probs=False):
    v0, k = layout
    x = logits(rng, lead + (V,), dtype)
    o, t, go = ce_args(rng, opts, lead, V)
    if probs:
        o.pop("ignore_index", None)
        q = rng.dirichlet(np.ones(V), lead).astype(np.float32 if dtype != F64 else F64)
        t, tl = q, q[..., v0:v0 + k]
    else:
        tl = t
    xl = np.ascontiguousarray(x[..., v0:v0 + k])
    loss, lse = lxd.cross_entropy(xl, tl, **dist(vocab_start=v0, vocab_size=V), **o,
                                  return_lse=True)
    want, want_lse = lx.cross_entropy(x, t, **o, return_lse=True)
    check(f"{name} loss", loss, want, dtype)
    check(f"{name} lse", lse, want_lse, dtype)
    loss, g = lxd.cross_entropy_with_grad(xl, tl, **dist(vocab_start=v0, vocab_size=V), **o,
                                          grad_output=go)
    want, wg = lx.cross_entropy_with_grad(x, t, **o, grad_output=go)
    check(f"{name} loss (with grad)", loss, want, dtype)
    assert g.dtype == x.dtype and g.shape == xl.shape
    check(f"{name} grad", g, wg[..., v0:v0 + k], dtype, "grad")
    xi = xl.copy()  # in place, over the slice (every rank calls: it is collective)
    _, gi = lxd.cross_entropy_with_grad(xi, tl, **dist(vocab_start=v0, vocab_size=V), **o,
                                        grad_output=go, inplace=True)
    assert gi is xi
    check(f"{name} grad inplace", xi, g, dtype, "grad")


def head_case(name, rng, dtype, V, opts, layout):
    v0, k = layout
    N, D = 19, 8
    h = logits(rng, (N, D), dtype)
    W = (rng.standard_normal((V, D)) * 0.5).astype(dtype)
    b = (rng.standard_normal(V) * 0.1).astype(dtype)
    o, t, go = ce_args(rng, opts, (N,), V)
    if "weight" in o:
        o["class_weight"] = o.pop("weight")
    loss, (dh, dw, db) = lxd.linear_cross_entropy(
        h, W[v0:v0 + k], t, **dist(vocab_start=v0, vocab_size=V), bias=b[v0:v0 + k], **o,
        grad_output=go, chunk_size=7)
    want, (wh, ww, wb) = lx.linear_cross_entropy(h, W, t, bias=b, **o, grad_output=go)
    check(f"{name} loss", loss, want, dtype)
    check(f"{name} d_hidden", dh, wh, dtype, "grad")
    check(f"{name} d_weight", dw, ww[v0:v0 + k], dtype, "grad")
    check(f"{name} d_bias", db, wb[v0:v0 + k], dtype, "grad")


def stats_case(name, rng, dtype, V, layout, ties):
    v0, k = layout
    lead = (4, 6)
    x = (rng.integers(-2, 3, lead + (V,)) if ties else rng.standard_normal(lead + (V,)) * 3)
    x = x.astype(dtype)
    t = rng.integers(0, V, lead)
    t[0, :2] = -100
    got = lxd.token_stats(np.ascontiguousarray(x[..., v0:v0 + k]), t,
                          **dist(vocab_start=v0, vocab_size=V), temperature=0.8)
    want = lx.token_stats(x, t, temperature=0.8)
    for f in want._fields:
        g, w = getattr(got, f), getattr(want, f)
        if w.dtype.kind in "bi":
            checks[0] += 1
            if not np.array_equal(g, w):
                failures.append(f"rank {RANK}: {name} {f}: {g.ravel()} != {w.ravel()}")
        else:
            check(f"{name} {f}", g, w, dtype)


def softmax_case(name, rng, dtype, V, layout):
    v0, k = layout
    x = logits(rng, (5, 3, V), dtype)
    x[0, 0, :] = -np.inf  # a row with no softmax
    x[1, 1, 5] = np.nan   # NaN stays in its row
    xl = np.ascontiguousarray(x[..., v0:v0 + k])
    for T in (1.0, 0.3):
        kw = dist(vocab_start=v0, vocab_size=V, temperature=T)
        check(f"{name} T={T} logsumexp", lxd.logsumexp(xl, **kw), lx.logsumexp(x, temperature=T),
              dtype)
        ls = lxd.log_softmax(xl, **kw)
        assert ls.dtype == x.dtype
        check(f"{name} T={T} log_softmax", ls,
              lx.log_softmax(x, temperature=T)[..., v0:v0 + k], dtype,
              "grad" if dtype == BF16 else "loss")


def edge_case(name, rng, dtype, V, layout):
    """Masked vocabulary (-inf columns, a whole slice for some rows) and a NaN row."""
    v0, k = layout
    x = logits(rng, (6, V), dtype)
    t = rng.integers(0, V, 6)
    x[:, ::3] = -np.inf
    t[t % 3 == 0] += 1
    t = np.minimum(t, V - 1)
    x[1, :] = -np.inf
    x[1, t[1]] = 1.0  # one finite logit: the target's
    x[2, 4] = np.nan
    xl = np.ascontiguousarray(x[:, v0:v0 + k])
    for o in ({}, {"z_loss": 1e-3, "logit_scale": 2.0}):
        loss, g = lxd.cross_entropy_with_grad(xl, t, **dist(vocab_start=v0, vocab_size=V),
                                              reduction="none", **o)
        want, wg = lx.cross_entropy_with_grad(x, t, reduction="none", **o)
        check(f"{name} {o} loss", loss, want, dtype)
        check(f"{name} {o} grad", g, wg[:, v0:v0 + k], dtype, "grad")


def normalizer_case(rng):
    """Each rank a different batch (rank 0: none): the kept-token count, and the
    class-weight sum, over every rank."""
    counts = [0] + [3 + 2 * r for r in range(1, P)]
    V = 11
    w = rng.uniform(0.5, 2.0, V)
    all_t = [rng.integers(-1, V, c) for c in counts]
    mine = all_t[RANK]
    got = lxd.global_normalizer(mine, comm=COMM, ignore_index=-1)
    want = sum(int((t != -1).sum()) for t in all_t)
    check("normalizer count", got if got is not None else 0.0, float(want), F64)
    got = lxd.global_normalizer(mine, comm=COMM, weight=w, ignore_index=-1)
    want = sum(float(w[t[t != -1]].sum()) for t in all_t)
    check("normalizer weights", got if got is not None else 0.0, want, F64)
    nothing = lxd.global_normalizer(np.full(2, -100), comm=COMM)
    checks[0] += 1
    if nothing is not None:
        failures.append(f"rank {RANK}: normalizer of nothing: {nothing}")
    # the global mean: every rank's local loss with normalizer sums to the whole mean
    x = [logits(rng, (c, V), F64) for c in counts]
    t = [np.where(tt < 0, -100, tt) for tt in all_t]
    norm = lxd.global_normalizer(t[RANK], comm=COMM)
    local = lx.cross_entropy(x[RANK], t[RANK], normalizer=norm) if counts[RANK] else 0.0
    total = COMM.allreduce(float(local))
    check("data-parallel mean", total,
          lx.cross_entropy(np.concatenate(x), np.concatenate(t)), F64)


def error_cases(rng):
    V = 10
    x = logits(rng, (3, V), F32)
    t = rng.integers(0, V, 3)
    # slices with a gap (P > 1) or not covering [0, V) (P == 1): every rank raises
    v0, k = layouts(V, rng)["even"]
    kl = k - 1 if RANK == P - 1 else k
    expect_raise("gap", lambda: lxd.cross_entropy(
        np.ascontiguousarray(x[:, v0:v0 + kl]), t, **dist(vocab_start=v0, vocab_size=V)),
        ValueError, "tile")
    # overlapping slices
    if P > 1:
        ov0 = max(0, v0 - 1) if RANK else v0
        expect_raise("overlap", lambda: lxd.cross_entropy(
            np.ascontiguousarray(x[:, ov0:v0 + k]), t, **dist(vocab_start=ov0, vocab_size=V)),
            ValueError, "tile")
    # the last rank's targets are floats of the wrong shape: it raises its own
    # error, the others RankFailed
    bad = np.zeros(5) if RANK == P - 1 else t
    kind, text = (ValueError, "probability targets") if RANK == P - 1 else \
        (lxd.RankFailed, f"[{P - 1}]")
    xl = np.ascontiguousarray(x[:, v0:v0 + k])
    for fn in (lxd.cross_entropy, lxd.cross_entropy_with_grad):
        expect_raise(f"one rank refused ({fn.__name__})", lambda: fn(
            xl, bad, **dist(vocab_start=v0, vocab_size=V)), kind, text)
    # an out-of-range id on one rank
    bad = t.copy()
    if RANK == 0:
        bad[1] = V
    kind, text = (ValueError, "out of range") if RANK == 0 else (lxd.RankFailed, "[0]")
    expect_raise("bad id on rank 0 (token_stats)", lambda: lxd.token_stats(
        xl, bad, **dist(vocab_start=v0, vocab_size=V)), kind, text)
    if P > 1:
        expect_raise("bad id on rank 0 (normalizer)", lambda: lxd.global_normalizer(
            bad, comm=COMM, weight=np.ones(V)), kind, text)
    expect_raise("vocab_size differs", lambda: lxd.logsumexp(
        xl, **dist(vocab_start=v0, vocab_size=V + RANK + (P == 1))), ValueError,
        "vocab_size" if P > 1 else "tile")
    # the collectives are still in step
    check("after errors", lxd.cross_entropy(xl, t, **dist(vocab_start=v0, vocab_size=V)),
          lx.cross_entropy(x, t), F32)


def run_all():
    rng = np.random.default_rng(1234)  # the same stream on every rank
    for dtype in DTYPES:
        dn = "bf16" if dtype == BF16 else dtype.name
        for V in (37, 1000):
            lay = layouts(V, rng)
            for lname, layout in lay.items():
                for oname, opts in CE_OPTIONS.items():
                    if V == 1000 and oname not in ("plain", "everything", "none"):
                        continue
                    nm = f"ce {dn} V={V} {lname} {oname}"
                    case(nm, lambda: ce_case(nm, rng, dtype, (3, 5), V, opts, layout))
                for oname, opts in (("plain", {}), ("smooth_weight", CE_OPTIONS["smooth_weight"]),
                                    ("everything", {"weight": True, "label_smoothing": 0.1,
                                                    "z_loss": 1e-3, "softcap": 5.0,
                                                    "reduction": "none"})):
                    nm = f"ce probs {dn} V={V} {lname} {oname}"
                    case(nm, lambda: ce_case(nm, rng, dtype, (7,), V, opts, layout, probs=True))
                for ties in (False, True):
                    nm = f"token_stats {dn} V={V} {lname} ties={ties}"
                    case(nm, lambda: stats_case(nm, rng, dtype, V, layout, ties))
                nm = f"softmax {dn} V={V} {lname}"
                case(nm, lambda: softmax_case(nm, rng, dtype, V, layout))
                nm = f"edges {dn} V={V} {lname}"
                case(nm, lambda: edge_case(nm, rng, dtype, V, layout))
        V = 29
        for lname, layout in layouts(V, rng, empty_ok=False).items():
            for oname, opts in (("plain", {}), ("everything", CE_OPTIONS["everything"]),
                                ("none", {"reduction": "none", "label_smoothing": 0.1})):
                nm = f"head {dn} {lname} {oname}"
                case(nm, lambda: head_case(nm, rng, dtype, V, opts, layout))
    case("normalizer", lambda: normalizer_case(rng))
    case("errors", lambda: error_cases(rng))


def bench():
    """Time of a cross_entropy_with_grad step (4096 x 128256 float32 by default,
    argv: n V) on P ranks, and of its two collectives alone (the agreement and
    the gather of the row states, after a barrier): the rest is the kernels."""
    n, V = (int(a) for a in sys.argv[2:4]) if len(sys.argv) > 3 else (4096, 128256)
    rng = np.random.default_rng(0)
    v0, k = layouts(V, rng)["even"]
    x = rng.standard_normal((n, k), dtype=np.float32)
    t = rng.integers(0, V, n)
    steps, colls = [], []
    for _ in range(4):
        COMM.Barrier()
        t0 = time.perf_counter()
        lxd.cross_entropy_with_grad(x, t, comm=COMM, vocab_start=v0, vocab_size=V)
        steps.append(COMM.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    comm = lxd.MPIComm(COMM)
    for _ in range(20):
        COMM.Barrier()
        t0 = time.perf_counter()
        comm.allgather(np.zeros(5))
        comm.allgather(np.zeros((3, n)))
        colls.append(COMM.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if RANK == 0:
        step, coll = min(steps[1:]) * 1e3, float(np.median(colls)) * 1e3
        one = ""
        if P == 1:
            t0 = time.perf_counter()
            lx.cross_entropy_with_grad(x, t)
            one = f"; lx.cross_entropy_with_grad {(time.perf_counter() - t0) * 1e3:.0f} ms"
        print(f"P={P} {n}x{V}: step {step:.0f} ms, collectives {coll:.2f} ms, kernels and "
              f"row math {step - coll:.0f} ms; {3 * 8} bytes per token sent, {3 * 8 * P} "
              f"received" + one)


def main():
    if sys.argv[1:2] == ["bench"]:
        bench()
        return 0
    run_all()
    allf = COMM.gather(failures, root=0)
    total = COMM.reduce(checks[0], root=0)
    if RANK == 0:
        bad = [f for fs in allf for f in fs]
        for f in bad[:40]:
            print(f)
        print(f"{len(bad)} failed of {total} checks" if bad else f"ok {total}")
        code = 1 if bad else 0
    else:
        code = 0
    return COMM.bcast(code, root=0)


if __name__ == "__main__":
    sys.exit(main())
