"""Beyond one machine, over MPI (``mpi4py``): sequence-parallel ring attention and data-parallel training.

    mpiexec -n 4 python -m minitorch.distributed.demo

* :func:`shard_sequence` / :func:`gather_sequence`: cut a ``(B, H, N, D)`` tensor into per-rank shards along the
  sequence (layout ``"zigzag"`` or ``"contiguous"``, see :mod:`minitorch.attention.ring_schedule`) and put it back.
* :func:`ring_attention`: exact attention over the sharded sequence; K/V blocks travel around a ring of ranks,
  partial results merge by log-sum-exp; its backward is a ring too. Memory per rank ``O(N / P)``.
* :func:`allreduce_gradients` / :func:`broadcast_parameters`: data parallelism (average gradients over ranks).
* :func:`abort_on_exception`: one failing rank stops them all instead of leaving them waiting.

``comm`` defaults to ``MPI.COMM_WORLD`` everywhere; with one rank everything reduces to one process. Install the
optional dependency with ``pip install 'minitorch[dist]'`` (mpi4py and the MPICH wheels); without it importing this
package raises an ``ImportError`` that says so. The rest of minitorch never imports it.
"""

from .comm import MPI, abort_on_exception, get_comm  # noqa: F401  (raises the ImportError without mpi4py)
from .data_parallel import allreduce_gradients, broadcast_parameters  # noqa: F401
from .ring import RingAttention, ring_attention  # noqa: F401
from .sequence import gather_sequence, shard_sequence  # noqa: F401

__all__ = [
    "ring_attention", "shard_sequence", "gather_sequence", "allreduce_gradients", "broadcast_parameters",
    "abort_on_exception", "get_comm", "RingAttention", "MPI",
]
