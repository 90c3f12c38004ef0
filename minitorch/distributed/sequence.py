"""Cutting a sequence into per-rank shards and putting it back together (the layouts of
:mod:`minitorch.attention.ring_schedule`).

Both are differentiable, with the conventions of data parallelism:

* ``shard_sequence(x)``: ``x`` is the whole tensor, the same on every rank; the loss is the *sum* of what the ranks
  compute from their shards. Its backward scatters each rank's gradient into the full shape and sums over the
  ranks (an ``Allreduce``), so every rank gets the whole gradient of ``x``.
* ``gather_sequence(x_loc)``: every rank gets the whole tensor; a loss computed from it counts *once*. Its backward
  keeps the rows of this rank (no communication).

Both are collective in backward as in forward: every rank must run them.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from ..attention.ring_schedule import check_layout, check_sequence_length, local_length, local_positions
from ..tensor import Tensor
from ..tensor_functions import Function, from_numpy
from .comm import MPI, agree, get_comm

SEQ_DIM = 2  # (B, H, N, D) and (B, H, N): the sequence is axis 2


def _check_tensor(name: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a minitorch Tensor, got {type(x).__name__}")
    if x.dims <= SEQ_DIM:
        raise ValueError(f"{name} must have the sequence on axis {SEQ_DIM} ((B, H, N, D) or (B, H, N)), "
                         f"got shape {x.shape}")


class ShardSequence(Function):
    """``apply(x, comm, layout)``: the rows of axis 2 that ``layout`` gives this rank, in its local order."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: Any, layout: str) -> Tensor:
        P, rank = comm.Get_size(), comm.Get_rank()
        pos = local_positions(x.shape[SEQ_DIM], P, rank, layout)
        ctx.save_for_backward(x.shape, pos, comm)
        return from_numpy(np.take(x.to_numpy(), pos, axis=SEQ_DIM), backend=x.backend, dtype=x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Any, ...]:
        shape, pos, comm = ctx.saved_values
        full = np.zeros(shape, dtype=grad.dtype)
        index = [slice(None)] * len(shape)
        index[SEQ_DIM] = pos
        full[tuple(index)] = grad.to_numpy()
        comm.Allreduce(MPI.IN_PLACE, full, op=MPI.SUM)  # every rank's rows, on every rank
        return from_numpy(full, backend=grad.backend, dtype=grad.dtype), None, None


def shard_sequence(x: Tensor, comm: Any = None, layout: str = "zigzag") -> Tensor:
    """This rank's part of ``x (B, H, N, D)`` (or ``(B, H, N)``): ``(B, H, n_r, D)``.

    ``layout="contiguous"`` gives rank ``r`` chunk ``r`` of ``P``; ``"zigzag"`` chunks ``r`` and ``2P-1-r`` of
    ``2P``. Chunk sizes differ by at most one, so any ``N >= P`` (contiguous) or ``N >= 2P`` (zigzag) works.
    """
    comm = get_comm(comm)
    _check_tensor("x", x)
    check_layout(layout)
    check_sequence_length(x.shape[SEQ_DIM], comm.Get_size(), layout)
    return ShardSequence.apply(x, comm, layout)


class GatherSequence(Function):
    """``apply(x_loc, comm, layout, N)``: every rank's shard put back at its positions, on every rank."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: Any, layout: str, N: int) -> Tensor:
        P, rank = comm.Get_size(), comm.Get_rank()
        local = np.ascontiguousarray(np.moveaxis(x.to_numpy(), SEQ_DIM, 0))  # (n_r, B, H, ...): rows first
        row = int(np.prod(local.shape[1:]))
        counts = [local_length(N, P, r, layout) * row for r in range(P)]
        rows = np.empty((N,) + local.shape[1:], dtype=local.dtype)
        comm.Allgatherv(local, [rows, counts])  # the shards one after another, in rank order
        order = np.concatenate([local_positions(N, P, r, layout) for r in range(P)])
        full = np.empty_like(rows)
        full[order] = rows
        ctx.save_for_backward(local_positions(N, P, rank, layout))
        return from_numpy(np.moveaxis(full, 0, SEQ_DIM), backend=x.backend, dtype=x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Any, ...]:
        (pos,) = ctx.saved_values
        local = np.take(grad.to_numpy(), pos, axis=SEQ_DIM)
        return from_numpy(local, backend=grad.backend, dtype=grad.dtype), None, None, None


def gather_sequence(x_loc: Tensor, comm: Any = None, layout: str = "zigzag") -> Tensor:
    """The whole tensor ``(B, H, N, D)`` (or ``(B, H, N)``) from every rank's shard ``(B, H, n_r, D)``, on every rank.

    The inverse of :func:`shard_sequence` with the same ``layout``. Collective: the shapes are checked on every
    rank at once, so a wrong shard on one rank raises the same ``ValueError`` everywhere.
    """
    comm = get_comm(comm)
    error, info = None, None
    try:
        _check_tensor("x_loc", x_loc)
        check_layout(layout)
        shape = list(x_loc.shape)
        n_r = shape.pop(SEQ_DIM)
        info = (tuple(shape), np.dtype(x_loc.dtype).name, n_r)
    except (TypeError, ValueError) as e:
        error = e
    infos = agree(comm, error, info)
    P = comm.Get_size()
    if len({inf[:2] for inf in infos}) != 1:
        raise ValueError(f"gather_sequence: the shards must agree in every axis but the sequence and in dtype, got "
                         f"{[inf[:2] for inf in infos]} on ranks 0..{P - 1}")
    lengths = [inf[2] for inf in infos]
    N = sum(lengths)
    check_sequence_length(N, P, layout)
    expected = [local_length(N, P, r, layout) for r in range(P)]
    if lengths != expected:
        raise ValueError(f"gather_sequence: the shard lengths {lengths} (ranks 0..{P - 1}) are not the {layout!r} "
                         f"layout of N={N}, which has {expected}")
    return GatherSequence.apply(x_loc, comm, layout, N)
