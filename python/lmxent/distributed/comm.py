"""The communicator interface of lmxent.distributed, and its adapters.

lmxent.distributed needs two collectives of a communicator, on arrays of its
array library (NumPy for MPI, CuPy for NCCL):

    allgather(x) -> (size, *x.shape): every rank's x, stacked in rank order
    allreduce(x) -> x, replaced in place by the elementwise sum over ranks

plus `rank`, `size` and `xp` (the array module). The per-row states it gathers
are float64; allreduce also sums float32 (d_hidden of the LM head).

MPIComm wraps an mpi4py communicator (NumPy arrays; CuPy arrays through a
CUDA-aware MPI: the current stream is synchronised first, as MPI reads the
memory itself). NCCLComm wraps a cupy.cuda.nccl.NcclCommunicator: its
collectives are enqueued on CuPy's current stream, with no host
synchronisation. Anything with the four attributes is accepted as it is (a
torch.distributed process group can implement them). as_comm picks the adapter.
"""
import numpy as np


class MPIComm:
    """An mpi4py communicator (mpi4py.MPI.Comm) for NumPy arrays, or CuPy arrays
    with a CUDA-aware MPI build (xp=cupy)."""

    def __init__(self, comm, xp=np):
        self.comm, self.xp = comm, xp
        self.rank, self.size = comm.Get_rank(), comm.Get_size()

    def _ready(self, x):
        if self.xp is not np:  # MPI reads device memory itself: the stream's work first
            self.xp.cuda.get_current_stream().synchronize()
        return x

    def allgather(self, x):
        x = self.xp.ascontiguousarray(x)
        out = self.xp.empty((self.size,) + x.shape, x.dtype)
        self.comm.Allgather(self._ready(x), out)
        return out

    def allreduce(self, x):
        from mpi4py import MPI
        self.comm.Allreduce(MPI.IN_PLACE, self._ready(x), op=MPI.SUM)
        return x


class NCCLComm:
    """A cupy.cuda.nccl.NcclCommunicator: collectives on CuPy's current stream."""

    def __init__(self, comm):
        import cupy
        from cupy.cuda import nccl
        self.comm, self.xp, self._nccl = comm, cupy, nccl
        self.rank, self.size = comm.rank_id(), comm.size()

    def _dtype(self, dtype):
        n = self._nccl
        types = {np.dtype(np.float64): n.NCCL_FLOAT64, np.dtype(np.float32): n.NCCL_FLOAT32,
                 np.dtype(np.int64): n.NCCL_INT64}
        if dtype not in types:
            raise TypeError(f"NCCLComm: no NCCL type for {dtype}")
        return types[dtype]

    def allgather(self, x):
        x = self.xp.ascontiguousarray(x)
        out = self.xp.empty((self.size,) + x.shape, x.dtype)
        self.comm.allGather(x.data.ptr, out.data.ptr, x.size, self._dtype(x.dtype),
                            self.xp.cuda.get_current_stream().ptr)
        return out

    def allreduce(self, x):
        self.comm.allReduce(x.data.ptr, x.data.ptr, x.size, self._dtype(x.dtype),
                            self._nccl.NCCL_SUM, self.xp.cuda.get_current_stream().ptr)
        return x


def as_comm(comm, xp=np):
    """The adapter for `comm`: an mpi4py communicator, a cupy.cuda.nccl
    NcclCommunicator, or an object with rank, size, xp, allgather and allreduce
    (returned as it is). xp: the array library of the call (numpy or cupy), for
    MPI."""
    if all(hasattr(comm, a) for a in ("rank", "size", "xp", "allgather", "allreduce")):
        return comm
    kind = type(comm)
    if kind.__module__.split(".")[0] == "mpi4py":
        return MPIComm(comm, xp)
    if kind.__name__ == "NcclCommunicator":
        return NCCLComm(comm)
    raise TypeError(f"comm: expected an mpi4py communicator, a cupy.cuda.nccl."
                    f"NcclCommunicator or an lmxent.distributed communicator, got "
                    f"{kind.__name__}")
