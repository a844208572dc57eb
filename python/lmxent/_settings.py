"""The CPU kernels' settings: the instruction set and the thread count."""
import operator
import os

import numpy as np

from . import _cpu

__all__ = ["cpu_info", "set_cpu_isa", "set_num_threads", "get_num_threads"]


def cpu_info():
    """The CPU instruction set in use, those available, and the thread count."""
    return {"isa": _cpu.isa(), "available": list(_cpu.available_isas()),
            "threads": _cpu.max_threads()}


def set_cpu_isa(name):
    """Use the 'avx512', 'avx2' or 'base' kernels (for testing and comparison)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string such as 'avx2', got {name!r}")
    _cpu.set_isa(name)


def set_num_threads(n):
    """Threads the CPU kernels may use, for the whole process (every Python thread,
    and forked children from then on). See docs/threads.md."""
    try:
        if isinstance(n, (bool, np.bool_)):  # an int subclass, but surely a mistake
            raise TypeError
        n = operator.index(n)  # ints, NumPy integers, 0-d integer arrays; no floats
    except TypeError:
        raise TypeError(f"n must be an integer number of threads, got {n!r}") from None
    if not 1 <= n <= _cpu.thread_limit:
        raise ValueError(f"n must be between 1 and {_cpu.thread_limit} threads, got {n}")
    _cpu.set_num_threads(n)


def get_num_threads():
    """The thread count the CPU kernels use (set_num_threads, or the default)."""
    return _cpu.max_threads()


def threads_from_env():
    """Checks LMXENT_NUM_THREADS: the kernels read it themselves; a value they cannot
    use is an error here rather than silently the default."""
    env = os.environ.get("LMXENT_NUM_THREADS")
    if env and not (env.isascii() and env.isdigit() and 1 <= int(env) <= _cpu.thread_limit):
        raise ValueError(f"LMXENT_NUM_THREADS must be an integer between 1 and "
                         f"{_cpu.thread_limit}, got {env!r}")
