"""lmxent: the loss layer of language-model training and evaluation.

Stable log-softmax, online log-sum-exp cross-entropy with the gradient fused into
the same pass, for NumPy (compiled C++ kernels, vectorised and threaded) and, with
the CUDA build, CuPy. `lmxent.reference` is the float64 oracle every kernel is
checked against."""
import operator as _operator
import os as _os

import numpy as _np

from . import reference
from ._arrays import (bfloat16_dtype, check_cuda_errors, output_cache_info, set_cuda_validation,
                      set_output_cache)
from .cross_entropy import cross_entropy, cross_entropy_backward, cross_entropy_with_grad
from .softmax import log_softmax, logsumexp, softmax
from .linear_cross_entropy import linear_cross_entropy, linear_target_logprobs
from .token_stats import TokenStats, token_stats
from .kl_divergence import kl_divergence
from .evaluation import (answer_mask, bits_per_byte, calibration, perplexity,
                         sequence_scores)
from . import plot  # matplotlib is imported only when a plot is drawn
from . import _cpu

__version__ = "0.1.0"


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
        if isinstance(n, (bool, _np.bool_)):  # an int subclass, but surely a mistake
            raise TypeError
        n = _operator.index(n)  # ints, NumPy integers, 0-d integer arrays; no floats
    except TypeError:
        raise TypeError(f"n must be an integer number of threads, got {n!r}") from None
    if not 1 <= n <= _cpu.thread_limit:
        raise ValueError(f"n must be between 1 and {_cpu.thread_limit} threads, got {n}")
    _cpu.set_num_threads(n)


def get_num_threads():
    """The thread count the CPU kernels use (set_num_threads, or the default)."""
    return _cpu.max_threads()


def _threads_from_env():
    # The kernels read LMXENT_NUM_THREADS themselves; a value they cannot use is
    # an error here rather than silently the default.
    env = _os.environ.get("LMXENT_NUM_THREADS")
    if env and not (env.isascii() and env.isdigit() and 1 <= int(env) <= _cpu.thread_limit):
        raise ValueError(f"LMXENT_NUM_THREADS must be an integer between 1 and "
                         f"{_cpu.thread_limit}, got {env!r}")


_threads_from_env()

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad",
           "cross_entropy_backward", "linear_cross_entropy", "linear_target_logprobs",
           "reference", "cpu_info", "set_cpu_isa",
           "set_num_threads", "get_num_threads", "bfloat16_dtype",
           "sequence_scores", "answer_mask", "perplexity", "bits_per_byte", "calibration",
           "plot", "token_stats", "TokenStats", "kl_divergence",
           "set_cuda_validation", "check_cuda_errors", "set_output_cache", "output_cache_info"]
