"""Where a benchmark point's data lives and what it is: the device (NumPy or CuPy
arrays), the inputs of one point drawn from fixed seeds, and small helpers on
outputs and dtypes."""
import numpy as np

import lmxent as lx

from .._cli import array_module

CHECK_ROWS = 32          # first and last 16 rows


class Skip(Exception):
    """A peer, op or dtype that cannot run here; the message says why."""


class Device:
    """Where the arrays live: 'cpu' (NumPy) or 'cuda' (CuPy), with a synchronise
    for timing and conversions to the host and to torch."""

    def __init__(self, name):
        self.name, self.xp = name, array_module(name)  # ValueError: no CuPy, no CUDA kernels

    def put(self, host):
        if self.xp is np:
            return host
        try:
            return self.xp.asarray(host)
        except (TypeError, ValueError) as e:
            raise Skip(f"CuPy cannot hold {host.dtype} arrays ({e})") from None

    def sync(self):
        if self.xp is not np:
            self.xp.cuda.runtime.deviceSynchronize()  # the whole device: torch's work too

    @property
    def numpy_peer(self):
        return "numpy" if self.xp is np else "cupy"


class Problem:
    """The inputs of one benchmark point on the device: logits x (N, V) with standard
    deviation 2, class ids t (N,), and on first use a teacher's logits and the LM
    head's hidden (N, D) and weight (V, D), scaled so that its logits have the same
    spread. Each input is drawn from its own seed: every run sees the same data."""

    def __init__(self, dev, N, V, dtype, hidden):
        self.dev, self.N, self.V, self.dtype, self.D = dev, N, V, np.dtype(dtype), hidden
        half = CHECK_ROWS // 2
        self.rows = np.arange(N) if N <= CHECK_ROWS else np.r_[0:half, N - half:N]
        self._host, self._dev, self._conv = {}, {}, {}
        self._make = {  # name -> (seed, rng -> array)
            "x": (0, lambda rng: self._normal(rng, (N, V), 2.0)),
            "t": (1, lambda rng: rng.integers(0, V, N)),
            "teacher": (2, lambda rng: self._normal(rng, (N, V), 2.0)),
            "hidden": (3, lambda rng: self._normal(rng, (N, hidden), 1.0)),
            "weight": (4, lambda rng: self._normal(rng, (V, hidden), 2.0 / np.sqrt(hidden))),
        }
        self.x, self.t = self.get("x"), self.get("t")

    def _normal(self, rng, shape, scale):
        return (scale * rng.standard_normal(shape, np.float32)).astype(self.dtype)

    @property
    def label(self):
        return f"{self.N}x{self.V} {dtype_name(self.dtype)}"

    def host(self, name):
        if name not in self._host:
            seed, make = self._make[name]
            self._host[name] = make(np.random.default_rng([self.N, self.V, seed]))
        return self._host[name]

    def get(self, name):
        """The named input on the device."""
        if name not in self._dev:
            self._dev[name] = self.dev.put(self.host(name))
        return self._dev[name]

    def rows64(self, name):
        """The checked rows of an input, float64 (targets: int64) on the host."""
        a = self.host(name)[self.rows]
        return a if name == "t" else a.astype(np.float64)

    def chunks64(self, *names, elements=2**22):
        """Row chunks of the named inputs (float64; targets int64) covering every row."""
        step = max(1, elements // self.V)
        for i in range(0, self.N, step):
            yield tuple(self.host(n)[i:i + step] if n == "t"
                        else self.host(n)[i:i + step].astype(np.float64) for n in names)

    def converted(self, key, make):
        """A cached conversion of the inputs for a peer (torch tensors, JAX arrays)."""
        if key not in self._conv:
            self._conv[key] = make()
        return self._conv[key]


def dtype_name(dt):
    return "bfloat16" if lx.bfloat16_dtype() is not None and dt == lx.bfloat16_dtype() \
        else np.dtype(dt).name


def summed(f, chunks):
    """Elementwise sums over row chunks of the tuples f(*chunk) returns."""
    total = None
    for c in chunks:
        part = f(*c)
        total = part if total is None else tuple(a + b for a, b in zip(total, part))
    return total


def flatten(out):
    """The outputs of a call as a flat tuple: nested tuples (and named tuples) are
    opened, None (an absent gradient) dropped."""
    if out is None:
        return ()
    if isinstance(out, (tuple, list)):
        return tuple(o for item in out for o in flatten(item))
    return (out,)
