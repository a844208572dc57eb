"""Running the benchmark's ops on one point: which ops and implementations run,
each implementation's check against the float64 reference (before it is timed),
its time, throughput and speedup."""
from functools import partial

import numpy as np

from .. import _registry
from .._cli import EPS, rel_error, to_host
from .problem import Problem, Skip, dtype_name, flatten
from .timing import best_time, copy_time


def op_families():
    """The op families the benchmark knows, in the registry's order (read when
    called: the registry imports this package's pieces)."""
    return [row.bench for row in _registry.REGISTRY if row.bench is not None]


def select_ops(dev, names=None):
    """(ops to run, {name: why not} for the ops this lmxent build lacks or cannot run
    on the device: lmxent raises TypeError for arrays it has no kernels for, and a
    tiny problem finds that out before the sweep)."""
    ops, missing, tiny = [], {}, Problem(dev, 2, 16, np.float32, 4)
    for op in op_families():
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
