"""The attention engine: the raw-array attention of one backend, and the seam between tensors and kernels.

Every backend carries its engine as ``backend.attention`` (an :class:`AttentionEngine`; the engines are installed
by :mod:`minitorch.attention.kernels`, the core never imports them). The tensor front end
(:mod:`.api`, :mod:`.functions`, the caches, DMA) validates a call into an :class:`~.spec.AttentionSpec` and hands
*raw arrays* to the engine: NumPy arrays for the Simple and Fast backends, numba device arrays for CUDA::

    out, lse = engine.forward(q, k, v, bias, spec)
    dq, dk, dv, dbias = engine.backward(q, k, v, bias, out, lse, dout, spec, dlse=None)

Shapes: ``q, out, dout, dq (B, H, Nq, D)``; ``k, v, dk, dv (B, Hkv, Nk, D)``; ``lse, dlse (B, H, Nq)`` (natural log,
``-inf`` for a row that sees no key); ``bias, dbias (Bb, Hb, Nqb, Nk)`` or ``None``. ``dlse`` is the gradient of
the lse output, when it has one (``d lse_i / d s_ij = P_ij``). Flash attention, Dynamic Mask Attention and
ring-cache decoding are all this one call with different specs (see :mod:`.spec`).

Besides the two kernels an engine provides what the front end needs on its arrays: the gradient of learnable
sinks (``sinks_backward``), DMA's importance and top-k selection (data-dependent, so computed where the data lives),
and a few array helpers for the caches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Tuple

import numpy as np

from ..tensor import Tensor
from ..tensor_data import TensorData
from .sinks import sinks_backward
from .tiling import default_block_sizes

if TYPE_CHECKING:
    from ..tensor_ops import TensorBackend
    from .spec import AttentionSpec

Array = Any
"""A NumPy array or a numba device array."""


class AttentionEngine:
    """Interface of a backend's attention (see the module docstring). Subclasses implement the kernels; the host
    (NumPy) array helpers here serve the Simple and Fast backends."""

    name = "engine"
    blocks_for = "cpu"
    """Which tuning table of :func:`~.tiling.default_block_sizes` gives the default tiles."""

    def default_blocks(self, D: int) -> Tuple[int, int]:
        """Default ``(Br, Bc)`` for head dim ``D``."""
        return default_block_sizes(D, self.blocks_for)

    decode_block = 128
    """Default slots per key tile of a one-query decode step (``RingBufferKVCache(block_size=None)``)."""

    def decode_splits(self, n_tiles: int) -> int:
        """How many split-K parts a single-query decode over ``n_tiles`` key tiles should run (1: none). A GPU
        needs many blocks to be busy; a CPU has more programs than threads already."""
        return 1

    # -- the two kernels -------------------------------------------------------------------------------------
    def forward(self, q: Array, k: Array, v: Array, bias: Optional[Array], spec: "AttentionSpec") -> Tuple[Array, Array]:
        raise NotImplementedError

    def backward(self, q: Array, k: Array, v: Array, bias: Optional[Array], out: Array, lse: Array, dout: Array,
                 spec: "AttentionSpec", dlse: Optional[Array] = None) -> Tuple[Array, Array, Array, Optional[Array]]:
        raise NotImplementedError

    def sinks_backward(self, out: Array, lse: Array, dout: Optional[Array], dlse: Optional[Array],
                       spec: "AttentionSpec") -> Array:
        """The gradient of the call's learnable sinks, ``(H,)``: ``-sum_(b, i) P_sink delta`` (:mod:`.sinks`), from
        its ``out``, ``lse`` and their incoming gradients (either may be None: zero). Host arrays here."""
        return sinks_backward(out, lse, dout, dlse, spec.sinks)

    # -- Dynamic Mask Attention's data-dependent parts ------------------------------------------------------
    def importance(self, v: Array, dt_proj: Array, a_coef: Array, log_space: bool) -> Tuple[Array, Array]:
        raise NotImplementedError

    def importance_backward(self, dz: Array, v: Array, dt_proj: Array, a_coef: Array, z: Array, u: Array,
                            log_space: bool, dv: Array) -> Tuple[Array, Array, Array]:
        raise NotImplementedError

    def select(self, z: Array, dspec: Any) -> Any:
        raise NotImplementedError

    # -- arrays ------------------------------------------------------------------------------------------------
    def asarray(self, x: Any, dtype: Any) -> Array:
        """``x`` (NumPy, device array or array-like) as a contiguous array of this backend and ``dtype``."""
        if hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray):
            x = x.copy_to_host()
        return np.ascontiguousarray(x, dtype=dtype)

    def to_host(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape: Tuple[int, ...], dtype: Any) -> Array:
        return np.zeros(shape, dtype=dtype)

    def write_rows(self, dst: Array, src: Array, dst_rows: np.ndarray, src_rows: np.ndarray) -> None:
        """``dst[:, :, dst_rows[n]] = src[:, :, src_rows[n]]`` for 4-D ``(B, H, N, D)`` arrays, in place."""
        dst[:, :, dst_rows] = src[:, :, src_rows]

    def take_rows(self, src: Array, rows: np.ndarray) -> Array:
        """``src[:, :, rows]`` as a new contiguous array."""
        return np.ascontiguousarray(src[:, :, rows])


def engine_of(backend: "TensorBackend") -> AttentionEngine:
    """The attention engine of a backend (a clear error for a backend that has none)."""
    engine = getattr(backend, "attention", None)
    if engine is None:
        raise TypeError(f"backend {getattr(backend, 'name', backend)!r} has no attention engine")
    return engine


def raw4(t: Tensor) -> Array:
    """The tensor's data as a contiguous array of its shape (NumPy or device array), a view when possible."""
    if not t._tensor.is_contiguous():
        t = t.contiguous()
    storage = t._tensor._storage
    n = t.size
    if storage.shape[0] != n:
        storage = storage[:n]
    return storage.reshape(t.shape)


def wrap(array: Array, backend: "TensorBackend") -> Tensor:
    """A constant tensor around a contiguous NumPy or device array (no copy)."""
    shape = tuple(map(int, array.shape))
    flat = array.reshape(math.prod(shape))
    if isinstance(flat, np.ndarray) and not backend.cuda:  # (the common case: a host array as it is)
        return Tensor(TensorData(flat, shape), backend=backend)
    return Tensor.make(flat, shape, backend=backend)
