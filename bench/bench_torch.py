"""Benchmark of lmxent.torch (CPU): cross-entropy forward+backward against
F.cross_entropy, torch.compile(F.cross_entropy) and the NumPy call the adapter
wraps (its overhead), and linear_cross_entropy against torch's chunked
F.linear_cross_entropy. Medians of --repeat timed runs after one warm-up run.

    python bench/bench_torch.py --threads 2 --shapes 4096x32000 --dtypes f32 bf16
"""
import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

import lmxent as lx
import lmxent.torch as lt

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def median_ms(cases, repeat, leaves):
    """{name: median ms} of the functions in `cases`, run in turn (a shared machine's
    load drifts: interleaving spreads it over all of them). The leaves' .grad are
    dropped before each timed run: freeing the previous case's gradient (an munmap
    of torch's allocation) would otherwise be charged to the next case."""
    for fn in cases.values():
        fn()  # warm-up (and compilation)
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            for leaf in leaves:
                leaf.grad = None
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(loss_fn, x, t):
    return lambda: loss_fn(x, t).backward()


def cross_entropy_cases(N, V, dtype, repeat):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(N, V, generator=g) * 2).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    xa, ta = lt._bridge.array(x.detach()), t.numpy()
    compiled = torch.compile(F.cross_entropy)
    return median_ms({
        "lmxent.torch": fwd_bwd(lt.cross_entropy, x, t),
        "lmxent NumPy": lambda: lx.cross_entropy_with_grad(xa, ta),
        "F.cross_entropy": fwd_bwd(F.cross_entropy, x, t),
        "compiled F.cross_entropy": fwd_bwd(compiled, x, t),
    }, repeat, [x])


LINEAR = {
    "lmxent.torch.linear_cross_entropy": lt.linear_cross_entropy,
    # thinner chunks than the default (>= min(384, 3/4 D) rows): less memory, slower products
    "lmxent.torch.linear_cross_entropy(chunk_size=128)": lambda h, w, t: lt.linear_cross_entropy(
        h, w, t, chunk_size=128),
    "F.linear_cross_entropy(options)": lambda h, w, t: F.linear_cross_entropy(
        h, w, t, options=torch.nn.LinearCrossEntropyOptions()),
}


def linear_problem(N, D, V, dtype):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, D, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).requires_grad_()
    return h, w, torch.randint(0, V, (N,), generator=g)


def linear_cases(N, D, V, dtype, repeat):
    h, w, t = linear_problem(N, D, V, dtype)
    return median_ms({name: (lambda fn=fn: fn(h, w, t).backward())
                      for name, fn in LINEAR.items()}, repeat, [h, w])


def peak_mb(name, N, D, V, dtype_name):
    """Peak memory (MB of resident set above the inputs) of one forward+backward of a
    LINEAR case, measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--peak-of", name, str(N), str(D), str(V),
                          dtype_name], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _print_peak(name, N, D, V, dtype_name):
    # the resident set sampled every millisecond: ru_maxrss would report importing
    # torch's own peak, which is higher than this one. A small warm-up first, so that
    # the BLAS libraries' one-off buffers are not counted.
    LINEAR[name](*linear_problem(64, int(D), 1024, DTYPES[dtype_name])).backward()
    h, w, t = linear_problem(int(N), int(D), int(V), DTYPES[dtype_name])
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(1e-3)

    sampler = threading.Thread(target=sample)
    sampler.start()
    LINEAR[name](h, w, t).backward()
    done.set()
    sampler.join()
    print(max(peak[0] - before, 0) / 2**20)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", nargs="+", default=["4096x32000"])
    p.add_argument("--dtypes", nargs="+", default=["f32", "bf16"], choices=list(DTYPES))
    p.add_argument("--hidden", type=int, default=0,
                   help="also time linear_cross_entropy with this hidden size D")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--linear-only", action="store_true", help="skip the cross-entropy cases")
    p.add_argument("--peak-of", nargs=5, help=argparse.SUPPRESS)  # the child of peak_mb
    a = p.parse_args()
    if a.peak_of:
        return _print_peak(*a.peak_of)
    torch.set_num_threads(a.threads)
    lx.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, {lx.cpu_info()['isa']}, "
          f"median of {a.repeat} (ms, forward+backward)")
    for shape in a.shapes:
        N, V = (int(s) for s in shape.split("x"))
        for name in a.dtypes:
            r = cross_entropy_cases(N, V, DTYPES[name], a.repeat) if not a.linear_only else {}
            ours = r.get("lmxent.torch")
            line = ", ".join(f"{k} {v:.1f}" for k, v in r.items())
            print(f"{shape} {name}: {line}")
            if ours:
                print(f"    speed-up vs F.cross_entropy {r['F.cross_entropy'] / ours:.1f}x, "
                      f"vs compiled {r['compiled F.cross_entropy'] / ours:.1f}x, adapter "
                      f"overhead {100 * (ours / r['lmxent NumPy'] - 1):+.1f}%")
            if a.hidden:
                r = linear_cases(N, a.hidden, V, DTYPES[name], a.repeat)
                print(f"    D={a.hidden}: " + ", ".join(
                    f"{k} {v:.1f} ms, peak {peak_mb(k, N, a.hidden, V, name):.0f} MB"
                    for k, v in r.items()))


if __name__ == "__main__":
    main()
