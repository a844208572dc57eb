"""lmxent.distributed: the loss, LM head, log-softmax and token statistics of
logits split by vocabulary over ranks (tensor parallelism), the same numbers as
one device, over an existing engine: mpi4py (NumPy arrays) or NCCL through CuPy
(cupy.cuda.nccl.NcclCommunicator, on CuPy's current stream). Each forward costs
one collective of a few numbers per token (ops.py explains the math; docs/
distributed.md the collectives and their cost). global_normalizer is the
data-parallel helper: the "mean" denominator of a batch split over ranks."""
from .comm import MPIComm, NCCLComm, as_comm
from .ops import (
                  RankFailed,
                  cross_entropy,
                  cross_entropy_with_grad,
                  global_normalizer,
                  linear_cross_entropy,
                  log_softmax,
                  logsumexp,
                  token_stats,
)

__all__ = ["cross_entropy", "cross_entropy_with_grad", "linear_cross_entropy", "token_stats",
           "logsumexp", "log_softmax", "global_normalizer", "RankFailed", "MPIComm",
           "NCCLComm", "as_comm"]
