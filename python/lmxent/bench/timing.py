"""Timing: the best wall time of a warm call (the harness), the median of CUDA
events (bench/bench_gpu.py), and the memory copy every bandwidth is compared with."""
import time


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


def copy_time(p, timing):
    """Best time of a copy of problem p's logits into another array (one read, one
    write); timing: best_time's (repeats, min_time, max_time)."""
    dst = p.dev.xp.empty_like(p.x)
    p.dev.xp.copyto(dst, p.x)  # warm: the pages of dst are mapped
    return best_time(lambda: p.dev.xp.copyto(dst, p.x), p.dev.sync, *timing)


def event_times(cp, fn, repeats, stream):
    """(median, min) seconds of `repeats` calls of fn, each between two CUDA events
    recorded on `stream` (CuPy module cp); the device is synchronised first."""
    cp.cuda.Device().synchronize()
    events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(repeats)]
    for a, b in events:
        a.record(stream)
        fn()
        b.record(stream)
    events[-1][1].synchronize()
    ms = sorted(cp.cuda.get_elapsed_time(a, b) for a, b in events)
    return ms[len(ms) // 2] / 1e3, ms[0] / 1e3
