"""torch tensors to lmxent's arrays and back, without copying the data.

CPU tensors become NumPy arrays over the same memory (tensor.numpy()); bfloat16
tensors, which NumPy does not know, are viewed as int16 and that array re-viewed
as ml_dtypes.bfloat16 (no float32 copy). Results come back through
torch.from_numpy (bfloat16 through the same int16 view), sharing the arrays'
memory, so an lmxent output pool block is released when its tensor is.

CUDA tensors become CuPy arrays through DLPack (cupy.from_dlpack), and lmxent's
CuPy path runs inside `on_device_of(t)`: CuPy's current device and stream are
then torch's current ones (cupy.cuda.ExternalStream over
torch.cuda.current_stream().cuda_stream), so lmxent's kernels are queued behind
torch's work with no host synchronisation, and DLPack's stream hand-over between
the two libraries is a no-op (same stream). `__cuda_array_interface__` would not
do: it names no stream and shows bfloat16 as opaque bytes. This path has not run
on a GPU yet; tests/test_torch.py runs it on a CuPy stand-in (`_cuda_module` and
`_is_cuda` are the seams it replaces)."""
import contextlib

import numpy as np
import torch

import lmxent as lx


def _bf16():
    dt = lx.bfloat16_dtype()
    if dt is None:
        raise TypeError("bfloat16 tensors need the ml_dtypes package (pip install ml_dtypes)")
    return dt


def _is_cuda(t):
    return t.device.type == "cuda"


def _cuda_module():
    try:
        import cupy
    except ImportError as e:
        raise TypeError(f"CUDA tensors need CuPy and lmxent's CUDA build: {e}") from None
    return cupy


def _current_stream(device):
    return torch.cuda.current_stream(device).cuda_stream


def array(t):
    """The NumPy (CPU tensor) or CuPy (CUDA tensor) array over t's memory; None stays None."""
    if t is None:
        return None
    t = t.detach()
    bf16 = t.dtype == torch.bfloat16
    if bf16:
        t = t.view(torch.int16)
    if _is_cuda(t):
        a = _cuda_module().from_dlpack(t)
    elif t.device.type == "cpu":
        a = t.numpy()
    else:
        raise TypeError(f"lmxent.torch runs on CPU and CUDA tensors, got one on {t.device}")
    return a.view(_bf16()) if bf16 else a


def tensor(a):
    """The tensor over an lmxent result (NumPy or CuPy array; a scalar becomes 0-d)."""
    if not hasattr(a, "dtype"):
        a = np.asarray(a)
    bf16 = a.dtype == lx.bfloat16_dtype()
    if bf16:
        a = a.view(np.int16)
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.from_dlpack(a)
    return t.view(torch.bfloat16) if bf16 else t


@contextlib.contextmanager
def on_device_of(t):
    """Runs the body with CuPy on t's device and torch's current stream there (a
    no-op for a CPU tensor)."""
    if not _is_cuda(t):
        yield
        return
    cupy = _cuda_module()
    with cupy.cuda.Device(t.device.index), cupy.cuda.ExternalStream(_current_stream(t.device)):
        yield


def call(fn, main, *args, **kwargs):
    """fn(*arrays, **options) on the device of tensor `main`: tensor arguments (also
    in kwargs) become arrays; array results (also in tuples) become tensors."""
    with on_device_of(main):
        conv = [array(a) if isinstance(a, torch.Tensor) else a for a in args]
        kw = {k: array(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return _tensors(fn(*conv, **kw))


def _tensors(r):
    if isinstance(r, tuple):
        return tuple(_tensors(x) for x in r)
    return None if r is None else tensor(r)
