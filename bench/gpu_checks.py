"""Device checks of bench/gpu_check.sh that tests/test_cuda.py does not make.

    python bench/gpu_checks.py repeat   # bitwise: repeat, in place vs not, streams
    python bench/gpu_checks.py large    # more than 2^31 elements (about 20 GB of GPU memory)
    python bench/gpu_checks.py decoding # sample / process_logits: CPU vs GPU, and peers' times
    python bench/gpu_checks.py --dry-run repeat large decoding   # what would run; no GPU needed

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

decoding: the benchmark's setting of lx.sample (64 x 128256, temperature 0.7, top-k
50, top-p 0.9, 5 raw log-probabilities), float32 and bfloat16, on CuPy: tokens, ranks
and top ids equal to the CPU kernel's, log-probabilities within 1e-6, process_logits
bitwise equal, bitwise the same on repeat. Then times (informational, never a
failure): lx.sample with and without the log-probabilities, torch's HF-style sort
pipeline on the GPU, and FlashInfer's top_k_top_p_sampling_from_logits (given
logits / T: its own generator, no log-probabilities), each skipped with its reason
when not importable.

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


# ---------------------------------------------------------------- decoding

def _per_call(cp, f, n=20):
    """Seconds per call of f, the whole device synchronised (torch's streams too)."""
    import time
    f()
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    cp.cuda.runtime.deviceSynchronize()
    return (time.perf_counter() - t0) / n


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def decoding(cp, c, shape=(64, 128256), calls=20):
    from lmxent.bench import spec
    opts, n_lp = spec.DECODING, spec.NUM_LOGPROBS
    bf16 = lx.bfloat16_dtype()
    dtypes = [("float32", np.float32)] + ([("bfloat16", bf16)] if bf16 is not None else [])
    rng = np.random.default_rng(17)
    for dtname, dt in dtypes:
        xh = (3 * rng.standard_normal(shape)).astype(np.float32).astype(dt)
        x = cp.asarray(xh)
        what = f"decoding {dtname} {shape[0]}x{shape[1]}"
        try:
            got = lx.sample(x, seed=5, num_logprobs=n_lp, **opts)
            want = lx.sample(xh, seed=5, num_logprobs=n_lp, **opts)
            c.ok(all(np.array_equal(_host(getattr(got, f)), getattr(want, f))
                     for f in ("tokens", "rank", "top_ids")),
                 f"{what}: sample's tokens, ranks and top ids equal the CPU kernel's")
            c.ok(all(np.allclose(_host(getattr(got, f)), getattr(want, f), rtol=1e-6, atol=1e-6)
                     for f in ("logprob", "top_logprobs")),
                 f"{what}: sample's log-probabilities within 1e-6 of the CPU kernel's")
            again = lx.sample(x, seed=5, num_logprobs=n_lp, **opts)
            c.ok(all(c.same_bits(a, b) for a, b in zip(got, again)),
                 f"{what}: sample bitwise the same on repeat")
            y, yh = _host(lx.process_logits(x, **opts)), lx.process_logits(xh, **opts)
            u = f"u{yh.itemsize}"
            c.ok(np.array_equal(y.view(u), yh.view(u)),
                 f"{what}: process_logits bitwise equal to the CPU kernel's")
        except Exception as e:
            c.ok(False, f"{what}: {type(e).__name__}: {e}")
            continue
        _decoding_times(cp, x, what, calls)


def _decoding_times(cp, x, what, calls):
    """Prints the time per call of lx.sample and its peers on x (informational)."""
    from lmxent.bench import bodies, spec
    opts, n_lp = spec.DECODING, spec.NUM_LOGPROBS
    times = {"lmxent sample (5 raw logprobs)": lambda: lx.sample(x, num_logprobs=n_lp, **opts),
             "lmxent sample (token only)": lambda: lx.sample(x, **opts)}
    tx = None
    try:
        import torch
        try:
            tx = torch.from_dlpack(x)
        except BufferError:  # bfloat16, which DLPack may not carry: its bits
            tx = torch.from_dlpack(x.view(np.int16)).view(torch.bfloat16)
        times["torch sort pipeline (HF way)"] = lambda: bodies.torch_sample_hf(
            torch, tx, n_lp, **opts)
    except Exception as e:
        print(f"skipped torch: {type(e).__name__}: {e}")
    try:
        import flashinfer.sampling as fs
        if tx is None:
            raise ImportError("needs torch")
        times["FlashInfer top_k_top_p_sampling_from_logits"] = \
            lambda: fs.top_k_top_p_sampling_from_logits(
                tx.float() / opts["temperature"], opts["top_k"], opts["top_p"])
    except Exception as e:
        print(f"skipped FlashInfer: not importable here ({type(e).__name__}: {e})")
    base = None
    for name, f in times.items():
        try:
            s = _per_call(cp, f, calls)
        except Exception as e:
            print(f"{what}: {name}: {type(e).__name__}: {str(e)[:160]}")
            continue
        base = base or s
        print(f"{what}: {name:45s} {s * 1e3:9.3f} ms  ({s / base:.2f}x lmxent's time)",
              flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="gpu_checks.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checks", nargs="+", choices=["repeat", "large", "decoding"])
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
        {"repeat": repeat, "large": large, "decoding": decoding}[name](cp, c)
    print(f"{c.count - len(c.failures)}/{c.count} checks passed")
    for f in c.failures:
        print("FAILED: " + f)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
