"""Data parallelism over MPI: every rank holds the whole model and a slice of the global batch.

One training step on ``P`` ranks is the step of one process on the whole batch when

1. the parameters start equal (:func:`broadcast_parameters`, or the same seed everywhere),
2. each rank's loss is the mean over its equal share of the batch, and
3. after ``backward`` the gradients are averaged over the ranks (:func:`allreduce_gradients`): the mean of the
   ranks' mean-loss gradients is the gradient of the mean loss over the whole batch.

The optimizer then takes the same step on every rank, so the parameters stay equal without ever being sent again.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from ..module import Module
from ..tensor import Tensor
from ..tensor_functions import from_numpy
from .comm import MPI, agree, get_comm


def _tensor_parameters(module: Any) -> List[Tuple[str, Any]]:
    if not isinstance(module, Module):
        raise TypeError(f"module must be a minitorch Module, got {type(module).__name__}")
    return [(name, p) for name, p in module.named_parameters() if isinstance(p.value, Tensor)]


def _agree_on_parameters(comm: Any, module: Any) -> Tuple[List[Tuple[str, Any]], np.ndarray]:
    """The module's tensor parameters, after checking on every rank at once that all ranks hold the same ones; and
    ``has_grad (P, n_params)``: which parameters have a gradient on which rank."""
    error, params, info = None, [], None
    try:
        params = _tensor_parameters(module)
        info = ([(name, p.value.shape, np.dtype(p.value.dtype).name) for name, p in params],
                [p.value.grad is not None for _, p in params])
    except TypeError as e:
        error = e
    infos = agree(comm, error, info)
    for rank, inf in enumerate(infos):
        if inf[0] != infos[0][0]:
            raise ValueError(f"ranks 0 and {rank} hold different parameters (names, shapes or dtypes): the model "
                             f"must be built the same way on every rank")
    return params, np.array([inf[1] for inf in infos], dtype=bool).reshape(len(infos), len(params))


def allreduce_gradients(module: Module, comm: Any = None) -> None:
    """Replace every Parameter's gradient by its mean over the ranks of ``comm`` (default ``MPI.COMM_WORLD``).

    One ``Allreduce`` per dtype moves all gradients at once. A parameter without a gradient on some ranks counts as
    zero there; one without a gradient anywhere keeps ``grad = None`` (the optimizer skips it, as it would in one
    process). Collective: call it on every rank, after ``backward`` and before clipping and the optimizer step.
    """
    comm = get_comm(comm)
    params, has_grad = _agree_on_parameters(comm, module)
    any_grad = has_grad.any(axis=0)
    by_dtype: Dict[str, List[int]] = {}
    for i, (_, p) in enumerate(params):
        if any_grad[i]:
            by_dtype.setdefault(np.dtype(p.value.dtype).name, []).append(i)
    for dtype, idx in sorted(by_dtype.items()):
        values = [params[i][1].value for i in idx]
        flat = np.concatenate([np.zeros(v.size, dtype) if v.grad is None else v.grad.to_numpy().reshape(-1)
                               for v in values]).astype(dtype, copy=False)
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        flat /= comm.Get_size()
        offset = 0
        for v in values:
            v.grad = from_numpy(flat[offset: offset + v.size].reshape(v.shape), backend=v.backend, dtype=v.dtype)
            offset += v.size


def broadcast_parameters(module: Module, comm: Any = None, root: int = 0) -> None:
    """Copy every Parameter's value from rank ``root`` to all ranks, so that data-parallel training starts equal."""
    comm = get_comm(comm)
    params, _ = _agree_on_parameters(comm, module)
    for _, p in params:
        value = np.ascontiguousarray(p.value.to_numpy())
        comm.Bcast(value, root=root)
        p.update(from_numpy(value, backend=p.value.backend, dtype=p.value.dtype))
