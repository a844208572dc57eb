"""Threads, fork and long runs (docs/threads.md): a forked child after multi-threaded
work in the parent (os.fork, multiprocessing with each start method, concurrent.futures),
Python threads calling mixed ops at once (compared bitwise with serial results, also
while another thread changes the thread count), set_num_threads process-wide and its
argument errors, and a leak loop.

Every test has a hard timeout, so a regression fails instead of hanging CI: the fork
tests run in a subprocess with a timeout; the in-process tests under a faulthandler
watchdog that dumps every thread's traceback and exits."""
import faulthandler
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import lmxent as lx

from helpers import num_threads

TIMEOUT = 90  # seconds, for a subprocess, a thread; each test takes a few

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="fork and /proc/self are Linux's")


@pytest.fixture(autouse=True)
def watchdog():
    # after the test's own timeouts; to the real stderr (pytest's --capture=sys has no fd)
    faulthandler.dump_traceback_later(2 * TIMEOUT, exit=True, file=sys.__stderr__)
    yield
    faulthandler.cancel_dump_traceback_later()


# The subprocess scripts share these: inputs, the ops, and the pool's workers
# (named lmxent-worker) counted through /proc.
PRELUDE = '''
import os, sys
import numpy as np
import lmxent as lx

def inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 4096), dtype=np.float32)
    long_rows = rng.standard_normal((2, 65536), dtype=np.float32)  # each row split across threads
    t = rng.integers(0, 4096, 512)
    return x, long_rows, t

def work(_=None):
    x, long_rows, t = inputs()
    loss, grad = lx.cross_entropy_with_grad(x, t)
    s = lx.sample(x, top_k=50, top_p=0.9, seed=7, num_logprobs=3)
    return ([lx.logsumexp(x), lx.softmax(long_rows), loss, grad, s.tokens, s.top_logprobs],
            lx.get_num_threads(), workers())

def workers():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread just exited
            pass
    return names.count("lmxent-worker")

def same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b))
'''


def run_script(tmp_path, body, threads=2):
    """Runs PRELUDE + body as a script file (spawned children re-import it) in a
    fresh interpreter with LMXENT_NUM_THREADS=threads; returns its stdout."""
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    package_root = os.path.dirname(os.path.dirname(lx.__file__))
    env = dict(os.environ, LMXENT_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    env.pop("OMP_NUM_THREADS", None)
    try:
        proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {TIMEOUT} s (killed); output so far: {e.stdout!r} {e.stderr!r}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_os_fork_after_threaded_parent(tmp_path):
    out = run_script(tmp_path, '''
        parent, n, _ = work()          # the parent's pool is running
        assert n == 2 and workers() == 1, (n, workers())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            before = workers()         # fork copies only the calling thread
            child, n, after = work()
            os.write(w, f"{before} {after} {n} {same(child, parent)}".encode())
            os._exit(0)
        os.close(w)
        report = os.read(r, 100).decode()
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        print(report)
    ''')
    before, after, n, same = out.split()
    assert (before, after, n, same) == ("0", "1", "2", "True"), out  # 2 threads in the child


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_multiprocessing_pool(tmp_path, method):
    out = run_script(tmp_path, f'''
        import multiprocessing as mp
        if __name__ == "__main__":
            parent, _, _ = work()
            with mp.get_context("{method}").Pool(2) as pool:
                results = pool.map(work, range(4))
            assert all(same(child, parent) for child, _, _ in results)
            print(*sorted({{(n, w) for _, n, w in results}}))
    ''')
    assert out.split() == ["(2,", "1)"], out  # each child: 2 threads, its own worker


def test_process_pool_executor_fork(tmp_path):
    out = run_script(tmp_path, '''
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        if __name__ == "__main__":
            parent, _, _ = work()
            with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as ex:
                results = list(ex.map(work, range(4)))
            assert all(same(child, parent) for child, _, _ in results)
            print(*sorted({(n, w) for _, n, w in results}))
    ''')
    assert out.split() == ["(2,", "1)"], out


def test_fork_while_another_thread_runs_kernels(tmp_path):
    # The fork lands while the pool is busy with a job of another Python thread.
    out = run_script(tmp_path, '''
        import threading
        parent, _, _ = work()
        x, _, _ = inputs()
        stop = threading.Event()
        def busy():
            while not stop.is_set():
                lx.logsumexp(x)
        th = threading.Thread(target=busy)
        th.start()
        statuses = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                child, n, w = work()
                os._exit(0 if same(child, parent) and (n, w) == (2, 1) else 1)
            statuses.append(os.waitpid(pid, 0)[1])
        stop.set(); th.join()
        print(*statuses)
    ''')
    assert out.split() == ["0"] * 5, out


def test_fork_child_with_one_thread(tmp_path):
    out = run_script(tmp_path, '''
        parent, _, _ = work()
        lx.set_num_threads(1)
        pid = os.fork()
        if pid == 0:
            child, n, w = work()
            os._exit(0 if same(child, parent) and (n, w) == (1, 0) else 1)
        _, status = os.waitpid(pid, 0)
        print(status)
    ''', threads=4)
    assert out.split() == ["0"], out


def test_set_num_threads_is_process_wide(tmp_path):
    # Set in one Python thread: another thread's kernels use it (3 tasks: 2 workers).
    out = run_script(tmp_path, '''
        import threading
        t = threading.Thread(target=lx.set_num_threads, args=(3,))
        t.start(); t.join()
        x = np.ones((64, 4096), np.float32)
        lx.logsumexp(x)
        print(lx.get_num_threads(), lx.cpu_info()["threads"], workers())
    ''', threads=1)
    assert out.split() == ["3", "3", "2"], out


def test_num_threads_getter_sees_other_threads():
    with num_threads(1):
        t = threading.Thread(target=lx.set_num_threads, args=(np.int32(3),))
        t.start()
        t.join()
        assert lx.get_num_threads() == 3
        assert lx.cpu_info()["threads"] == 3


@pytest.mark.parametrize("n", [1, 7, np.int64(2), np.uint8(4), np.array(5)])
def test_set_num_threads_accepts_integers(n):
    with num_threads(1):
        lx.set_num_threads(n)
        assert lx.get_num_threads() == int(n)
        assert type(lx.get_num_threads()) is int


@pytest.mark.parametrize("n, error", [
    (1.7, TypeError), (2.0, TypeError), ("3", TypeError), (None, TypeError), (True, TypeError),
    (np.float64(2), TypeError), (np.array(2.0), TypeError), (np.array([2]), TypeError),
    (0, ValueError), (-1, ValueError), (2**31, ValueError), (10**6, ValueError),
    (2**64, ValueError)])
def test_set_num_threads_refuses(n, error):
    before = lx.get_num_threads()
    with pytest.raises(error, match=r"^n must be"):
        lx.set_num_threads(n)
    assert lx.get_num_threads() == before


def test_set_cpu_isa_refuses_non_strings():
    with pytest.raises(TypeError, match=r"^name must be a string"):
        lx.set_cpu_isa(None)


def test_bad_thread_env_var_is_an_import_error(tmp_path):
    package_root = os.path.dirname(os.path.dirname(lx.__file__))
    env = dict(os.environ, LMXENT_NUM_THREADS="two", PYTHONPATH=package_root)
    proc = subprocess.run([sys.executable, "-c", "import lmxent"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0 and "LMXENT_NUM_THREADS must be an integer" in proc.stderr


def mixed_ops(rows):
    """Closures over fixed inputs for each op family; rows >= 4 keeps each row on one
    thread (results then do not depend on the thread count); rows=2 splits rows."""
    rng = np.random.default_rng(rows)
    V = 65536 if rows == 2 else 4096
    x = rng.standard_normal((rows, V), dtype=np.float32)
    x16 = x.astype(np.float16)
    teacher = rng.standard_normal((rows, V)).astype(np.float32)
    t = rng.integers(0, V, rows)
    h = rng.standard_normal((rows, 64), dtype=np.float32)
    w = rng.standard_normal((V, 64), dtype=np.float32) * 0.1
    return [
        lambda: [lx.softmax(x)],
        lambda: [lx.log_softmax(x16)],
        lambda: list(lx.cross_entropy_with_grad(x, t, label_smoothing=0.1)),
        lambda: [np.asarray(v) for v in lx.token_stats(x, t)],
        lambda: list(lx.kl_divergence(x, teacher, return_grad=True)),
        lambda: [lx.linear_cross_entropy(h, w, t, return_grads=False)],
        lambda: list(lx.sample(x, top_k=50, top_p=0.9, seed=3, num_logprobs=3)),
        lambda: [lx.process_logits(x16, top_p=0.9, repetition_penalty=1.2,
                                   prev_tokens=t.reshape(-1, 1))],
        lambda: list(lx.top_k(x, 5)),
    ]


def hammer(ops, expected, n_threads, rounds, stop=None):
    """n_threads Python threads call the ops in different orders; every result must
    equal the serial one bit for bit."""
    errors = []

    def worker(k):
        try:
            for i in range(rounds):
                j = (k + i) % len(ops)
                got = ops[j]()
                if not all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, expected[j])):
                    errors.append(f"thread {k}, round {i}: op {j} differs")
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(f"thread {k}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT)
    if stop is not None:
        stop.set()
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors[:5]


@pytest.mark.parametrize("rows", [64, 2])
@pytest.mark.parametrize("n_threads", [4, 8])
def test_threads_mixed_ops_match_serial(rows, n_threads):
    with num_threads(4):
        ops = mixed_ops(rows)
        expected = [op() for op in ops]
        hammer(ops, expected, n_threads, rounds=24)


def test_threads_while_thread_count_changes():
    with num_threads(4):
        ops = mixed_ops(64)
        expected = [op() for op in ops]
        stop = threading.Event()

        def changer():
            i = 0
            while not stop.is_set():
                lx.set_num_threads(1 + i % 4)
                i += 1

        ch = threading.Thread(target=changer, daemon=True)
        ch.start()
        try:
            hammer(ops, expected, 6, rounds=24, stop=stop)
        finally:
            stop.set()
            ch.join(TIMEOUT)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_no_leak_over_many_calls():
    limit = lx.output_cache_info()["limit"]
    lx.set_output_cache(0)  # the cache's held blocks would count as growth
    try:
        with num_threads(2):
            rng = np.random.default_rng(0)
            x = rng.standard_normal((64, 4096), dtype=np.float32)  # 1 MiB outputs
            long_rows = rng.standard_normal((2, 65536), dtype=np.float32)
            t = rng.integers(0, 4096, 64)
            teacher = x[::-1].copy()

            def calls(n):
                for _ in range(n):
                    lx.softmax(x)
                    lx.softmax(long_rows)
                    lx.cross_entropy_with_grad(x, t)
                    lx.token_stats(x, t)
                    lx.kl_divergence(x, teacher, return_grad=True)

            calls(100)  # warm up: the pool's workers, scratch buffers, allocator arenas
            before = rss_bytes()
            calls(400)  # 2000 kernel calls, about 2 GiB of outputs in all
            growth = rss_bytes() - before
        assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 2000 calls"
    finally:
        lx.set_output_cache(limit)
