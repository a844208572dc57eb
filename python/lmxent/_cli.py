"""Helpers shared by the command-line tools (python -m lmxent check | bench | demo):
the error measure and tolerances results are checked with, a progress bar, and a
description of the machine and library versions for the JSON reports."""
import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np

# Unit roundoff per dtype: 16-bit outputs are rounded once to their dtype; float32
# and float64 results carry a few units of their last place.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def rel_error(got, want):
    """max |got - want| / max |want| over the finite reference values (absolute
    where the reference is all zeros). NaN and inf must sit where the reference
    has them: a mismatch counts as an infinite error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    fin = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), fin) or not np.array_equal(
            np.nan_to_num(got[~fin]), np.nan_to_num(want[~fin])):
        return float("inf")
    if not fin.any():
        return 0.0
    peak = float(np.max(np.abs(want[fin])))
    return float(np.max(np.abs(got[fin] - want[fin]))) / (peak if peak > 0 else 1.0)


class Progress:
    """A one-line progress bar on stderr ("[#####-----] 12/40  0:07 left  label").

    Drawn only when stderr is a terminal (and enabled is not False), so pipes, CI
    logs and captured output get none of it. write() prints a line to stdout
    without tearing the bar."""

    def __init__(self, total, *, enabled=True, width=24):
        self.total, self.done, self.width, self.label = max(int(total), 1), 0, width, ""
        self.on = bool(enabled) and sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, n=0, label=None):
        """Advance by n steps and/or change the label, then redraw."""
        self.done = min(self.done + n, self.total)
        if label is not None:
            self.label = label
        if not self.on:
            return
        fill = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else None
        eta = f"{int(left) // 60}:{int(left) % 60:02d} left" if left is not None else "    "
        sys.stderr.write(f"\r\033[K[{'#' * fill}{'-' * (self.width - fill)}] "
                         f"{self.done}/{self.total}  {eta}  {self.label}"[:200])
        sys.stderr.flush()

    def write(self, text):
        """Print a line to stdout above the bar."""
        if self.on:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
        print(text, flush=True)
        self.update()

    def close(self):
        if self.on:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def array_module(device):
    """numpy for 'cpu'; cupy for 'cuda' when CuPy is installed and this lmxent build
    runs on CuPy arrays. Raises ValueError saying what is missing."""
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as e:
        raise ValueError(f"--device cuda needs CuPy (pip install 'lmxent[cuda]'): {e}") from None
    import lmxent as lx
    try:
        lx.logsumexp(cupy.zeros((1, 2), cupy.float32))
    except TypeError as e:
        raise ValueError(f"--device cuda: this lmxent build cannot run on CuPy arrays ({e})") \
            from None
    return cupy


def to_host(a):
    """A NumPy array, in its own dtype, of a NumPy, CuPy, torch or JAX array."""
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        torch = sys.modules["torch"]
        a = a.detach()
        if a.dtype == torch.bfloat16:  # NumPy has no bfloat16: view the bits
            import lmxent as lx
            return a.view(torch.int16).cpu().numpy().view(lx.bfloat16_dtype())
        return a.cpu().numpy()
    if mod == "cupy":
        return a.get()
    return np.asarray(a)


def cpu_model():
    """The processor's model name ("AMD EPYC 7B13", ...), best effort."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name():
    """The first CUDA device's name, via CuPy (or torch if it is already imported);
    None without a GPU."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


# distribution names of the libraries a report may mention
_DISTRIBUTIONS = ("numpy", "ml_dtypes", "torch", "jax", "jaxlib", "liger-kernel",
                  "cut-cross-entropy", "quack-kernels", "cupy-cuda12x", "cupy-cuda11x",
                  "matplotlib")


def machine_info():
    """CPU model and cores, lmxent's CPU kernels (lx.cpu_info()) and output cache, the
    GPU if any, and the versions of Python and every installed library a report may
    mention."""
    import lmxent as lx

    versions = {"python": platform.python_version(), "lmxent": lx.__version__}
    for dist in _DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "lmxent_cpu": lx.cpu_info(),
            "output_cache": lx.output_cache_info(), "gpu": gpu_name(),
            "platform": platform.platform(), "versions": versions}


def positive_int(text):
    """argparse type: a positive integer."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def write_json(obj, out, name):
    """Writes obj as JSON to the file `name` in the directory `out` (made if missing),
    and returns the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path
