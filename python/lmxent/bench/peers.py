"""The peers: loading each one (or the reason it is skipped), and implementations
built from a peer's body (bodies.py) on a problem's inputs: torch and the peers
built on it, JAX, NumPy / CuPy."""
import importlib

import numpy as np

import lmxent as lx

from .problem import Skip

# the peers that are Python modules on top of torch, GPU only: name -> (module, what)
GPU_MODULES = {"liger": ("liger_kernel.transformers", "Liger-Kernel"),
               "cce": ("cut_cross_entropy", "Cut Cross-Entropy"),
               "quack": ("quack", "quack")}


def import_peer(name, what):
    """The module `name`, or Skip saying why it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip(f"not installed ({e})") from None
    except Exception as e:  # broken installs (a CUDA library missing...) are skips too
        raise Skip(f"{what} fails to import: {type(e).__name__}: {e}") from None


def _load_torch(dev, args):
    torch = import_peer("torch", "torch")
    if dev.name == "cuda" and not torch.cuda.is_available():
        raise Skip("this torch build has no CUDA")
    if dev.name == "cpu":
        torch.set_num_threads(lx.cpu_info()["threads"])  # the same threads as lmxent
    return torch


def _load_torch_compile(dev, args):
    if dev.name == "cpu" and not args.compile:
        raise Skip("CPU compilation takes minutes: pass --compile to include it")
    return _load_torch(dev, args)


def _gpu_only(name):
    def load(dev, args):
        if dev.name != "cuda":
            raise Skip("GPU only (--device cuda)")
        _load_torch(dev, args)
        return import_peer(*GPU_MODULES[name])
    return load


def _load_jax(dev, args):
    jax = import_peer("jax", "jax")
    try:
        device = jax.devices("gpu" if dev.name == "cuda" else "cpu")[0]
    except RuntimeError as e:
        raise Skip(f"jax has no {dev.name} backend ({e})") from None
    return jax, device


PEERS = {  # name -> loader; the order of the table rows
    "numpy": lambda dev, args: np,
    "torch": _load_torch,
    "torch.compile": _load_torch_compile,
    "liger": _gpu_only("liger"),
    "cce": _gpu_only("cce"),
    "quack": _gpu_only("quack"),
    "jax": _load_jax,
}


def load_peers(dev, args, names=None):
    """({name: handle} of the peers that can run here, {name: why not} of the others);
    names: those to try (default all)."""
    peers, skipped = {}, {}
    for name, load in PEERS.items():
        if names is not None and name not in names:
            continue
        try:
            peers[name] = load(dev, args)
        except Skip as e:
            skipped[name] = str(e)
    return peers, skipped


def torch_view(torch, a):
    """A torch tensor sharing the memory of a NumPy or CuPy array (DLPack for CuPy).
    bfloat16 goes through its bits: torch.from_numpy knows no ml_dtypes, and an older
    CuPy cannot export it."""
    bf16 = a.dtype == lx.bfloat16_dtype()
    if isinstance(a, np.ndarray):
        return (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if bf16
                else torch.from_numpy(a))
    try:
        return torch.from_dlpack(a)
    except Exception:
        if not bf16:
            raise
        return torch.from_dlpack(a.view(np.int16)).view(torch.bfloat16)


def _tensors(p, *names):
    """The named inputs as torch tensors on the device, sharing their memory."""
    import torch
    return [p.converted(("torch", n), lambda n=n: torch_view(torch, p.get(n))) for n in names]


def torch_impl(body, inputs, grad_of=(), private=()):
    """An implementation from body(handle, *tensors) of the named inputs, for torch
    and the peers built on it (the handle is torch, or the peer's module). With
    grad_of (input positions), body returns the scalar loss and the implementation
    (loss, *their gradients) from one backward. Inputs at `private` positions (and
    those with gradients) are copies, for peers that write over their input.
    compiled=True wraps body in torch.compile (the torch.compile peer)."""
    def factory(p, handle, compiled=False):
        import torch
        args = [a.detach().clone() if i in grad_of or i in private else a
                for i, a in enumerate(_tensors(p, *inputs))]
        f = lambda *a: body(handle, *a)  # noqa: E731
        if compiled:
            f = torch.compile(f)
        if not grad_of:
            return lambda: f(*args)
        for i in grad_of:
            args[i].requires_grad_(True)

        def run():
            for i in grad_of:
                args[i].grad = None
            loss = f(*args)
            loss.backward()
            return (loss,) + tuple(args[i].grad for i in grad_of)
        return run
    return factory


def jax_impl(body, inputs, grad_of=()):
    """An implementation from a JAX function body(jax, *arrays), jitted; with
    grad_of, jax.value_and_grad of it. Waits for the result (JAX is asynchronous)."""
    def factory(p, handle):
        jax, device = handle
        if p.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise Skip("JAX computes float64 input in float32 (set JAX_ENABLE_X64=1)")
        args = [p.converted(("jax", n), lambda n=n: jax.device_put(p.host(n), device))
                for n in inputs]
        f = lambda *a: body(jax, *a)  # noqa: E731
        f = jax.jit(jax.value_and_grad(f, argnums=grad_of) if grad_of else f)
        return lambda: jax.block_until_ready(f(*args))
    return factory


def xp_impl(body, inputs):
    """An implementation from a NumPy/CuPy function body(xp, *arrays)."""
    def factory(p, handle):
        args = [p.get(n) for n in inputs]
        return lambda: body(p.dev.xp, *args)
    return factory
