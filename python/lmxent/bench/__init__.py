"""python -m lmxent bench: lmxent against the peers installed on this machine.

Every op family this lmxent build has runs on the same inputs as every peer that
is importable here: NumPy (CuPy with --device cuda, the same vectorised code),
torch eager, torch.compile (on the GPU; on the CPU with --compile, since compiling
takes minutes), Liger-Kernel, Cut Cross-Entropy and quack (GPU only) and JAX. A
peer that is missing or cannot run on the device is listed as skipped, with the
reason; an op a peer does not implement is simply absent from its rows.

Correctness first: each implementation's first result is compared with
lmxent.reference (float64, on the same rounded inputs) before it is timed. Per-row
outputs are compared on the first and last 16 rows; outputs summed over rows (a
mean loss, the LM head's weight gradient) in full, in row chunks. The error is
max |got - ref| / max |ref| and the tolerance 64 units of the compute precision
(float32 for float32 and 16-bit input) plus 2 units of the output's dtype, plus 4
units of a 16-bit input's dtype (a peer may round the logits to the input dtype
first). A result out of tolerance is reported WRONG and not timed; an exception is
reported as "error". The exit status is 1 if lmxent itself is wrong or fails.

Timing: the best of several runs (one for a call slower than 4 s) after the
checked call, which is the warm-up (compilation included); synchronised on the GPU. The
memory copy is a copy of the logits (one read, one write). Bytes counted per op:
one read of the logits for logsumexp, cross_entropy and token_stats; a read and a
write for log_softmax, softmax and the fused gradient; two reads and a write for
kl_divergence with its gradient. "of copy" is the op's GB/s over the copy's. The
LM head is compute-bound and reports GFLOP/s instead: 6 N V D (the logits,
d_hidden and d_weight), D = --hidden. "lmxent speedup" is the peer's time over
lmxent's time for the same op (over plain lmxent, never its inplace variant).
lmxent's large NumPy outputs come from its output cache (lx.set_output_cache), so
each timed call reuses the block the previous result released; NumPy and torch on
the CPU get fresh pages from the OS (zero-filled on first touch) every call. On the
GPU every library reuses memory through its pool.

    python -m lmxent bench --quick                       # < 1 minute on 2 cores
    python -m lmxent bench                               # vocabulary sweep, float32 and bfloat16
    python -m lmxent bench --shapes 4096x128256 --dtypes bfloat16 --ops cross_entropy_with_grad
    python -m lmxent bench --device cuda --out results/  # CuPy arrays, GPU peers
"""
# Modules: problem (the device and a point's inputs), peers (loading them, building
# implementations), bodies (the peers' code per op), spec (an op family's outputs,
# reference and costs), run (checking and timing one point), timing, report, cli. The
# op families themselves are rows of lmxent._registry; bench/*.py in the repository
# are entry points over this package.
import argparse

from .._cli import machine_info, positive_int, rel_error, write_json
from .bodies import torch_kl, torch_token_stats
from .cli import add_arguments, choices, dtypes_from_names, run, sizes
from .peers import GPU_MODULES, PEERS, import_peer, load_peers, torch_view
from .problem import Device, Problem, Skip
from .run import op_families, select_ops, tolerance
from .timing import best_time, event_times

__all__ = ["GPU_MODULES", "PEERS", "Device", "Problem", "Skip", "add_arguments",
           "best_time", "choices", "dtypes_from_names", "event_times", "import_peer",
           "load_peers", "machine_info", "main", "parser", "op_families", "positive_int", "rel_error", "run",
           "select_ops", "sizes", "tolerance", "torch_kl", "torch_token_stats", "torch_view",
           "write_json"]


def main(argv=None, *, extra_impls=None):
    """Parse argv and run (extra_impls: {op name: {row name: factory}}, more
    implementations to check and time, such as a deliberately wrong one in tests)."""
    ap = parser()
    return run(ap.parse_args(argv), ap, extra_impls)


def parser(prog="python -m lmxent bench", description=None, **defaults):
    """The benchmark's argument parser; the bench scripts give their own prog,
    description and defaults."""
    ap = argparse.ArgumentParser(prog=prog, description=description or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.set_defaults(**defaults)
    return ap


def __getattr__(name):
    if name == "OPS":  # the op families, read from the registry (see run.op_families)
        return op_families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
