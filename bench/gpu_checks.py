"""Device checks of bench/gpu_check.sh that tests/test_cuda.py does not make.

    python bench/gpu_checks.py repeat   # bitwise: repeat, in place vs not, streams
    python bench/gpu_checks.py large    # more than 2^31 elements (about 20 GB of GPU memory)
    python bench/gpu_checks.py --dry-run repeat large   # what would run; no GPU needed

repeat: every op (log_softmax, softmax, cross_entropy, cross_entropy_with_grad,
token_stats, kl_divergence with its gradient) on one-block-per-row and split-row
shapes, float32 and bfloat16, with -inf/NaN rows among them: results must be
bitwise the same when called again, in place (inplace=True) and out of place, and
on a non-blocking stream (read on that stream without any synchronisation by the
caller); each also within a loose tolerance of lmxent.reference on a few rows, so
an identical wrong answer does not pass. Deferred validation is checked on the
non-blocking stream. Run it again with CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 (the
arrays then name the per-thread default stream): gpu_check.sh does.

large: 64-bit indexing on the device: 2049 rows of 2^20 + 1 float32 logits
(2^31 + 2^20 + 2049 elements; row 2047 straddles element 2^31) and one row of
2^31 + 17 elements (split across blocks). Rows holding random values, among them
those at and past element 2^31, are compared with the float64 reference; the
other rows are zeros, whose loss is log(V). A 32-bit offset would wrap and
read or write another row.

Prints one line per check and "FAILED: ..." for each failure; exit status 1 on a
failure, 2 when no GPU or CUDA build is here.
"""
import argparse
import os
import sys

import numpy as np

import lmxent as lx
from lmxent import reference as R
from lmxent.bench import rel_error

TOL = {"float32": 1e-4, "bfloat16": 2e-2}   # loose: bitwise equality is the point


class Checks:
    def __init__(self, cp):
        self.cp, self.failures, self.count = cp, [], 0

    def ok(self, cond, what):
        self.count += 1
        print(("ok      " if cond else "FAILED: ") + what, flush=True)
        if not cond:
            self.failures.append(what)

    def same_bits(self, a, b):
        """Bitwise equality of two device arrays (NaN payloads included)."""
        cp = self.cp
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        u = {1: cp.uint8, 2: cp.uint16, 4: cp.uint32, 8: cp.uint64}[a.dtype.itemsize]
        return bool((cp.ascontiguousarray(a).view(u) == cp.ascontiguousarray(b).view(u)).all())

    def close(self, got, want, dtname, what):
        err = rel_error(got, want)
        self.ok(err <= TOL[dtname], f"{what}: error {err:.2e} against the reference")


# ----------------------------------------------------------------- repeat

def _data(cp, rng, n, V, dt):
    x = (3.0 * rng.standard_normal((n, V))).astype(np.float32)
    if n > 2:
        x[1, :] = -np.inf
        x[1, 5] = 0.0                      # one finite entry in a row of -inf
        x[2, 7] = np.nan                   # NaN stays in its row
    t = rng.integers(0, V, n)
    return x.astype(dt), t


def _ops(cp, x, t, q):
    """name -> (out-of-place call, in-place call or None); each returns a tuple."""
    def ce_grad(inplace):
        def f():
            buf = x.copy() if inplace else x
            loss, g = lx.cross_entropy_with_grad(buf, t, reduction="none", inplace=inplace)
            return loss, g
        return f

    def kl(inplace):
        def f():
            buf = x.copy() if inplace else x
            return lx.kl_divergence(buf, q, reduction="none", return_grad=True,
                                    inplace=inplace)
        return f

    def out_into(fn):
        def f():
            o = cp.empty_like(x)
            getattr(lx, fn)(x, out=o)
            return (o,)
        return f

    return {
        "log_softmax": (lambda: (lx.log_softmax(x),), out_into("log_softmax")),
        "softmax": (lambda: (lx.softmax(x),), out_into("softmax")),
        "cross_entropy": (lambda: lx.cross_entropy(x, t, reduction="none", return_lse=True),
                          None),
        "cross_entropy_with_grad": (ce_grad(False), ce_grad(True)),
        "token_stats": (lambda: tuple(lx.token_stats(x, t)), None),
        "kl_divergence": (kl(False), kl(True)),
    }


def _reference(name, x64, t, q64):
    if name == "log_softmax":
        return (R.log_softmax(x64),)
    if name == "softmax":
        return (R.softmax(x64),)
    if name == "cross_entropy":
        return R.cross_entropy(x64, t, reduction="none", return_lse=True)
    if name == "cross_entropy_with_grad":
        return R.cross_entropy_with_grad(x64, t, reduction="none")
    if name == "token_stats":
        return tuple(R.token_stats(x64, t))
    return R.kl_divergence(x64, q64, reduction="none", return_grad=True)


def repeat(cp, c):
    bf16 = lx.bfloat16_dtype()
    dtypes = [("float32", np.float32)] + ([("bfloat16", bf16)] if bf16 is not None else [])
    stream = cp.cuda.Stream(non_blocking=True)
    print(f"current stream {cp.cuda.get_current_stream().ptr:#x}, "
          f"CUPY_CUDA_PER_THREAD_DEFAULT_STREAM={os.environ.get('CUPY_CUDA_PER_THREAD_DEFAULT_STREAM', '')}")
    rng = np.random.default_rng(14)
    for dtname, dt in dtypes:
        for n, V in [(300, 9001), (2, 262144), (1, 1 << 20)]:
            xh, th = _data(cp, rng, n, V, dt)
            qh = (2.0 * rng.standard_normal((n, V))).astype(dt)
            x, t, q = cp.asarray(xh), cp.asarray(th), cp.asarray(qh)
            rows = [0, n - 1]  # finite rows: the -inf/NaN ones are compared bitwise only
            x64, q64 = xh[rows].astype(np.float64), qh[rows].astype(np.float64)
            for name, (f, f_inplace) in _ops(cp, x, t, q).items():
                what = f"{name} {dtname} {n}x{V}"
                try:
                    first = f()
                    again = f()
                    c.ok(all(c.same_bits(a, b) for a, b in zip(first, again)),
                         f"{what}: bitwise the same on repeat")
                    if f_inplace is not None:
                        other = f_inplace()
                        c.ok(all(c.same_bits(a, b) for a, b in zip(first, other)),
                             f"{what}: in place / out= bitwise the same as out of place")
                    with stream:
                        xs, ts, qs = cp.asarray(xh), cp.asarray(th), cp.asarray(qh)
                        on_stream = _ops(cp, xs, ts, qs)[name][0]()
                        host = [a.get() for a in on_stream]  # .get() waits on this stream only
                    c.ok(all(np.array_equal(h.view(f"u{h.itemsize}"),
                                            a.get().view(f"u{h.itemsize}"))
                             for h, a in zip(host, first)),
                         f"{what}: bitwise the same on a non-blocking stream")
                    want = _reference(name, x64, th[rows], q64)
                    for got, w in zip(first, want):
                        g = got.get()
                        g = g[rows] if g.ndim else g
                        if g.dtype.kind in "biu":
                            c.ok(np.array_equal(g, w), f"{what}: integer output exact")
                        else:
                            c.close(g.astype(np.float64), w, dtname if g.dtype == dt
                                    else "float32", what)
                except Exception as e:  # one failing op must not hide the others
                    c.ok(False, f"{what}: {type(e).__name__}: {e}")
    # deferred validation on the non-blocking stream: no round trip, the record names the row
    previous = lx.set_cuda_validation("deferred")
    try:
        with stream:
            x = cp.asarray(rng.standard_normal((8, 1000)).astype(np.float32))
            t = cp.asarray(np.array([1, 2, 3, 1000, 4, 5, 6, 7]))
            loss, _ = lx.cross_entropy_with_grad(x, t, reduction="none")
            nan = np.isnan(loss.get())
            try:
                lx.check_cuda_errors()
                c.ok(False, "deferred validation: check_cuda_errors raised nothing")
            except ValueError as e:
                c.ok(nan[3] and nan.sum() == 1 and "3" in str(e),
                     f"deferred validation on a stream: NaN rows {np.flatnonzero(nan)}; {e}")
    except Exception as e:
        c.ok(False, f"deferred validation on a stream: {type(e).__name__}: {e}")
    finally:
        lx.set_cuda_validation(previous)


# ------------------------------------------------------------------- large

def large(cp, c):
    rng = np.random.default_rng(31)
    V, N = (1 << 20) + 1, 2049
    x = cp.zeros((N, V), cp.float32)
    random_rows = [0, 2047, 2048]
    host = {r: (4.0 * rng.standard_normal(V)).astype(np.float32) for r in random_rows}
    for r, v in host.items():
        x[r] = cp.asarray(v)
    t = rng.integers(0, V, N)
    print(f"{N} x {V} float32 = {N * V} elements (2^31 = {2**31})", flush=True)
    check_rows = random_rows + [1, 2046, N - 1]
    x64 = np.stack([host.get(r, np.zeros(V, np.float32)) for r in check_rows]).astype(np.float64)
    tc = t[check_rows]
    try:
        loss = lx.cross_entropy(x, cp.asarray(t), reduction="none").get()
        c.close(loss[check_rows], R.cross_entropy(x64, tc, reduction="none"), "float32",
                "cross_entropy past 2^31 elements")
        zero = np.setdiff1d(np.arange(N), random_rows)
        c.ok(np.allclose(loss[zero], np.log(V), rtol=1e-5), "cross_entropy: zero rows log(V)")
        st = lx.token_stats(x, cp.asarray(t))
        c.close(st.logprob.get()[check_rows], R.token_stats(x64, tc).logprob, "float32",
                "token_stats past 2^31 elements")
        ls = lx.log_softmax(x)
        c.close(ls[check_rows].get(), R.log_softmax(x64), "float32",
                "log_softmax past 2^31 elements")
        del ls
        _, g = lx.cross_entropy_with_grad(x, cp.asarray(t), reduction="sum", inplace=True)
        c.close(g[check_rows].get(), R.cross_entropy_with_grad(x64, tc, reduction="sum")[1],
                "float32", "cross_entropy_with_grad in place past 2^31 elements")
    except Exception as e:
        c.ok(False, f"{N}x{V}: {type(e).__name__}: {e}")
    del x
    cp.get_default_memory_pool().free_all_blocks()
    # one row longer than 2^31: split across blocks; random values around element 2^31
    V = (1 << 31) + 17
    lo, hi = (1 << 31) - 4096, (1 << 31) + 17
    try:
        x = cp.zeros((1, V), cp.float32)
        win = (4.0 * rng.standard_normal(hi - lo)).astype(np.float32)
        x[0, lo:hi] = cp.asarray(win)
        tgt = np.array([V - 3])
        loss = float(lx.cross_entropy(x, cp.asarray(tgt), reduction="sum").get())
        w64 = win.astype(np.float64)
        lse = np.log((V - (hi - lo)) + np.exp(w64).sum())
        want = lse - w64[tgt[0] - lo]
        c.ok(abs(loss - want) <= 1e-4 * abs(want), f"one row of {V} elements: loss "
             f"{loss:.6f}, reference {want:.6f}")
    except (ValueError, TypeError) as e:
        print(f"one row of {V} elements: refused ({type(e).__name__}: {e})")
    except Exception as e:
        c.ok(False, f"one row of {V} elements: {type(e).__name__}: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="gpu_checks.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checks", nargs="+", choices=["repeat", "large"])
    ap.add_argument("--dry-run", action="store_true", help="say what would run; no GPU")
    args = ap.parse_args(argv)
    if args.dry_run:
        print(f"gpu_checks: would run {', '.join(args.checks)} (lmxent {lx.__version__})")
        return 0
    try:
        import cupy as cp
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no GPU")
        from lmxent import _cuda  # noqa: F401
    except Exception as e:
        print(f"gpu_checks: needs CuPy, a GPU and lmxent._cuda: {type(e).__name__}: {e}")
        return 2
    c = Checks(cp)
    for name in args.checks:
        {"repeat": repeat, "large": large}[name](cp, c)
    print(f"{c.count - len(c.failures)}/{c.count} checks passed")
    for f in c.failures:
        print("FAILED: " + f)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
