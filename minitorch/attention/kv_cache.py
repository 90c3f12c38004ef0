"""Ring buffers for attention: the KV cache (forward and backward) and the decoder feedback buffer.

A decoder that attends over a window of the last ``W`` tokens only ever needs ``W`` keys and values. The ring
buffer keeps exactly those, in fixed memory ``(B, Hkv, capacity, D)``, however many tokens have gone by:

* **Slots.** Position ``p`` lives in slot ``p % capacity``. With ``s`` attention sinks (the first ``s`` tokens,
  which stay forever, StreamingLLM-style) the first ``s`` slots hold them and the other ``capacity - s`` slots form
  the ring: slot of ``p`` is ``p`` if ``p < s`` else ``s + (p - s) % (capacity - s)``. Writing a new token
  overwrites the oldest one of the ring.
* **Pointers.** ``write_ptr`` is the slot the next token goes to; ``read_ptr`` the slot of the oldest non-sink token
  still held (equal to ``write_ptr`` once the ring is full: the classic full ring buffer).
* **Positions, not order.** Every slot records its absolute position (``-1`` while empty). Attention masks are
  functions of positions (docs/api.md), so :meth:`RingBufferKVCache.attend` runs directly on the rotated
  slots: a query at position ``t`` sees exactly the keys ``p <= t`` with ``t - p < capacity - s`` or ``p < s``.

Three buffers, as in the original design:

* the **forward KV cache** (:class:`RingBufferKVCache`): raw storage (NumPy arrays, or device arrays for CUDA),
  written in place, for inference and decoding; ``keys``/``values`` are Tensors over that storage;
* the **backward KV cache** (``RingBufferKVCache(..., keep_graph=True)``, :func:`chunked_causal_attention`): the
  same slots, but written out of place with differentiable gathers, so cached keys and values keep their autograd
  history and training over a long sequence in chunks gives the gradients of full-sequence windowed attention;
* the **decoder feedback buffer** (:class:`DecoderFeedbackBuffer`): the decoder's own outputs, fed back as the
  right-shifted inputs ``[start, y_0, ..., y_{t-1}]`` of the next step.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import numpy as np

from ..cuda_ops import CudaBackend
from ..fast_ops import FastTensorBackend
from ..tensor import Tensor
from ..tensor_functions import Function, from_numpy, zeros
from ..tensor_ops import SimpleBackend, TensorBackend
from .api import flash_attention
from .engine import AttentionEngine, engine_of, raw4, wrap
from .reference import attention_probs
from .spec import check_dropout, check_flag, check_scale, check_seed, make_spec
from .tiling import TileOrder

ArrayLike = Any


# ---------------------------------------------------------------------------------------------------------------------
# Slot arithmetic
# ---------------------------------------------------------------------------------------------------------------------


def slot_of(position: Union[int, np.ndarray], capacity: int, num_sinks: int = 0) -> Union[int, np.ndarray]:
    """Slot of absolute position(s) ``position``: ``p % capacity``, or with sinks ``p`` if ``p < s`` else
    ``s + (p - s) % (capacity - s)``. Works on ints and integer arrays."""
    # BEGIN SOLUTION task5_5: p % capacity; with s sinks: p if p < s else s + (p - s) % (capacity - s)
    p = np.asarray(position, dtype=np.int64)
    ring = capacity - num_sinks
    slot = np.where(p < num_sinks, p, num_sinks + (p - num_sinks) % ring)
    return int(slot) if slot.ndim == 0 else slot
    # END SOLUTION


def held_positions(seen: int, capacity: int, num_sinks: int = 0) -> np.ndarray:
    """The positions a cache holds after ``seen`` tokens, oldest first: the sinks, then the newest ring tokens."""
    ring = capacity - num_sinks
    sinks = np.arange(min(seen, num_sinks), dtype=np.int64)
    start = max(num_sinks, seen - ring)
    return np.concatenate([sinks, np.arange(start, seen, dtype=np.int64)])


# ---------------------------------------------------------------------------------------------------------------------
# Backends and raw arrays
# ---------------------------------------------------------------------------------------------------------------------

BACKENDS = {"simple": SimpleBackend, "fast": FastTensorBackend, "cuda": CudaBackend}
"""The names a cache accepts for its ``backend`` argument."""


def resolve_backend(backend: Any) -> TensorBackend:
    """A TensorBackend from a TensorBackend, one of the names of :data:`BACKENDS`, or None (SimpleBackend)."""
    if backend is None:
        return SimpleBackend
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be a TensorBackend or one of {tuple(BACKENDS)}, got {backend!r}")
        return BACKENDS[backend]
    if not isinstance(backend, TensorBackend):
        raise TypeError(f"backend must be a TensorBackend or one of {tuple(BACKENDS)}, got {type(backend).__name__}")
    return backend


def take_seq(engine: AttentionEngine, a: ArrayLike, idx: np.ndarray) -> ArrayLike:
    """``a[:, :, idx]`` of a ``(B, H, N, D)`` array, as a new array (NumPy or device)."""
    return engine.take_rows(a, np.asarray(idx, dtype=np.int64))


def scatter_seq(engine: AttentionEngine, a: ArrayLike, idx: np.ndarray, n: int) -> ArrayLike:
    """Zeros of length ``n`` along dim 2 with ``out[:, :, idx] = a``."""
    B, H, _, D = a.shape
    out = engine.zeros((B, H, int(n), D), a.dtype)
    engine.write_rows(out, a, np.asarray(idx, dtype=np.int64), np.arange(len(idx), dtype=np.int64))
    return out


def concat_seq(engine: AttentionEngine, parts: List[ArrayLike]) -> ArrayLike:
    """Concatenate ``(B, H, N_i, D)`` arrays along the sequence dim (NumPy or device)."""
    B, H, _, D = parts[0].shape
    out = engine.zeros((B, H, sum(int(p.shape[2]) for p in parts), D), parts[0].dtype)
    start = 0
    for p in parts:
        n = int(p.shape[2])
        engine.write_rows(out, p, np.arange(start, start + n, dtype=np.int64), np.arange(n, dtype=np.int64))
        start += n
    return out


def adopt_backend(x: Any) -> TensorBackend:
    """The backend of keys given without one: a Tensor's own; CudaBackend for a device array; SimpleBackend for a
    NumPy array."""
    if isinstance(x, Tensor):
        return x.backend
    return CudaBackend if hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray) else SimpleBackend


def float_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a NumPy float32 or float64 dtype, or a TypeError naming it."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


# ---------------------------------------------------------------------------------------------------------------------
# Differentiable gathers along the sequence dim (the backward cache's out-of-place slot writes)
# ---------------------------------------------------------------------------------------------------------------------


class SeqTake(Function):
    """``a[:, :, idx]`` for distinct indices ``idx``; backward scatters the gradient back."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, idx: np.ndarray) -> Tensor:
        ctx.save_for_backward(int(a.shape[2]), idx)
        return wrap(take_seq(engine_of(a.backend), raw4(a), idx), a.backend)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        n, idx = ctx.saved_values
        return wrap(scatter_seq(engine_of(grad_output.backend), raw4(grad_output), idx, n), grad_output.backend)


class SeqCat(Function):
    """Concatenation of 4-D tensors along dim 2; backward slices the gradient."""

    @staticmethod
    def forward(ctx: Any, *parts: Tensor) -> Tensor:
        ctx.save_for_backward(tuple(int(p.shape[2]) for p in parts))
        return wrap(concat_seq(engine_of(parts[0].backend), [raw4(p) for p in parts]), parts[0].backend)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tuple[Tensor, ...]:
        (lengths,) = ctx.saved_values
        engine, g = engine_of(grad_output.backend), raw4(grad_output)
        out, start = [], 0
        for n in lengths:
            out.append(wrap(take_seq(engine, g, np.arange(start, start + n)), grad_output.backend))
            start += n
        return tuple(out)


def seq_take(a: Tensor, idx: Union[np.ndarray, slice]) -> Tensor:
    """Differentiable ``a[:, :, idx]`` of a 4-D tensor (``idx`` distinct indices or a slice)."""
    if isinstance(idx, slice):
        idx = np.arange(int(a.shape[2]))[idx]
    idx = np.asarray(idx, dtype=np.int64)
    if len(np.unique(idx)) != len(idx):
        raise ValueError("seq_take needs distinct indices")
    return SeqTake.apply(a, idx)


def seq_cat(*parts: Tensor) -> Tensor:
    """Differentiable concatenation of 4-D tensors along dim 2."""
    if len(parts) == 1:
        return parts[0]
    return SeqCat.apply(*parts)


# ---------------------------------------------------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------------------------------------------------


class RingBufferKVCache:
    """A ring buffer of keys and values in fixed memory (see the module docstring).

    Args:
        batch, num_kv_heads, head_dim: the ``B, Hkv, D`` of the keys and values appended.
        capacity: number of slots ``C``; the attention window is ``capacity - num_sinks``.
        num_sinks: the first ``num_sinks`` tokens are kept forever (attention sinks).
        backend: a TensorBackend (or ``"simple"``, ``"fast"``, ``"cuda"``): where the storage lives and which
            engine ``attend`` runs (NumPy, Numba CPU, Numba CUDA). Default: the backend of the first keys appended.
        dtype: ``float32`` or ``float64``. Default: the dtype of the first keys appended.
        block_size: slots per tile of the decode kernels (tiles entirely outside the window are skipped; on CUDA,
            slots per split of the split-K kernel, one block of 4 lanes per slot over the head dim and up to 32
            groups of slots: 128 threads). Default ``min(capacity, engine.decode_block)``: 512 on the CPU (a
            one-row step has a fixed cost per tile), 128 on CUDA and NumPy.
        tile_size: flash-attention tile (``block_q = block_k``) of chunk attention (``T > 1``). Default: the
            backend's choice.
        head_tile_size: query heads one decode program processes together.
        order: tile order of chunk attention (``TileOrder``).
        keep_graph: the backward cache: slots are Tensors written out of place, so gradients flow to every
            appended key and value (tensor-level, needs Tensor inputs).

    Attributes:
        seen: tokens appended so far (the next position); length: tokens held, ``min(seen, capacity)``.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        num_sinks: int = 0,
        backend: Any = None,
        dtype: Any = None,
        *,
        block_size: Optional[int] = None,
        tile_size: Optional[int] = None,
        head_tile_size: int = 4,
        order: Any = None,
        keep_graph: bool = False,
    ) -> None:
        for name, val, lo in (("batch", batch, 1), ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1),
                              ("capacity", capacity, 1), ("num_sinks", num_sinks, 0), ("head_tile_size", head_tile_size, 1)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if num_sinks >= capacity:
            raise ValueError(f"num_sinks ({num_sinks}) must be smaller than capacity ({capacity}): the window "
                             f"capacity - num_sinks must hold at least one token")
        self.B, self.Hkv, self.D = int(batch), int(num_kv_heads), int(head_dim)
        self.capacity, self.num_sinks = int(capacity), int(num_sinks)
        self.window = self.capacity - self.num_sinks
        # None: taken from the first keys appended (never a silent float64 NumPy cache beside float32 CUDA tensors)
        self.dtype: Optional[np.dtype] = None if dtype is None else float_dtype(dtype)
        self.backend: Optional[TensorBackend] = None if backend is None else resolve_backend(backend)
        for name, val in (("block_size", block_size), ("tile_size", tile_size)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {val!r}")
        self.block_size: Optional[int] = None if block_size is None else int(block_size)  # None: the engine's
        self.tile_size = None if tile_size is None else int(tile_size)
        self.head_tile_size = int(head_tile_size)
        self.order = TileOrder.Q_MAJOR if order is None else TileOrder(order)
        self.keep_graph = bool(keep_graph)
        self.seen = 0
        # slot -> absolute position (-1: empty), and per batch row (-1 also where the key was padding)
        self._pos = np.full(self.capacity, -1, dtype=np.int64)
        self._kpb = np.full((self.B, self.capacity), -1, dtype=np.int64)
        self._ws: Optional[Tuple[Any, Any, np.ndarray, np.ndarray]] = None  # chunk workspace, see append
        self._last_append = 0
        self._k = self._v = self._k_t = self._v_t = None
        if self.backend is not None and self.dtype is not None:
            self._allocate()

    def _allocate(self) -> None:
        """The slot storage ``(B, Hkv, capacity, D)``, zero-filled, once backend and dtype are known."""
        shape = (self.B, self.Hkv, self.capacity, self.D)
        if self.keep_graph:
            self._k_t = zeros(shape, backend=self.backend, dtype=self.dtype)
            self._v_t = zeros(shape, backend=self.backend, dtype=self.dtype)
        else:
            self._k = self.engine.zeros(shape, self.dtype)
            self._v = self.engine.zeros(shape, self.dtype)

    def _adopt(self, k: Any) -> None:
        """Backend and dtype not given: those of the first keys appended (a Tensor's; NumPy arrays: SimpleBackend;
        device arrays: CudaBackend), then allocate."""
        if self.backend is None:
            self.backend = adopt_backend(k)
        if self.dtype is None:
            dt = np.dtype(getattr(k, "dtype", np.float64))
            self.dtype = dt if dt in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float64)
        self._allocate()

    @property
    def engine(self) -> AttentionEngine:
        """The attention engine of the cache's backend."""
        if self.backend is None:
            raise ValueError("the cache has no backend yet: give backend= (and dtype=) or append keys first")
        return engine_of(self.backend)

    def _storage_ready(self) -> None:
        if self._k is None and self._k_t is None:
            raise ValueError("the cache has no storage yet: give backend= and dtype=, or append keys first")

    # -- pointers and views --------------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        """Tokens held: ``min(seen, capacity)``."""
        return min(self.seen, self.capacity)

    @property
    def write_ptr(self) -> int:
        """The slot the next token is written to."""
        return slot_of(self.seen, self.capacity, self.num_sinks)

    @property
    def read_ptr(self) -> int:
        """The slot of the oldest non-sink token held (``write_ptr`` when there is none yet, or the ring is full)."""
        if self.seen <= self.num_sinks:
            return self.write_ptr
        return slot_of(max(self.num_sinks, self.seen - self.window), self.capacity, self.num_sinks)

    @property
    def positions(self) -> np.ndarray:
        """``(capacity,)`` int64: the absolute position held by each slot, ``-1`` where empty."""
        return self._pos.copy()

    @property
    def key_padding(self) -> np.ndarray:
        """``(B, capacity)`` bool: slots holding a key that was appended as padding for that batch row."""
        return (self._kpb < 0) & (self._pos[None, :] >= 0)

    @property
    def key_storage(self) -> ArrayLike:
        """The raw key slots ``(B, Hkv, capacity, D)`` (NumPy or device array; a Tensor with ``keep_graph``)."""
        self._storage_ready()
        return self._k_t if self.keep_graph else self._k

    @property
    def value_storage(self) -> ArrayLike:
        """The raw value slots ``(B, Hkv, capacity, D)``."""
        self._storage_ready()
        return self._v_t if self.keep_graph else self._v

    @property
    def keys(self) -> "Tensor":
        """Slot storage of the keys as a Tensor ``(B, Hkv, capacity, D)`` (rotated; shares the storage)."""
        self._storage_ready()
        return self._k_t if self.keep_graph else wrap(self._k, self.backend)

    @property
    def values(self) -> "Tensor":
        """Slot storage of the values as a Tensor ``(B, Hkv, capacity, D)`` (rotated; shares the storage)."""
        self._storage_ready()
        return self._v_t if self.keep_graph else wrap(self._v, self.backend)

    def chronological_slots(self) -> np.ndarray:
        """Slots of the held tokens, oldest first: the sink slots, then the ring from ``read_ptr`` on."""
        n_sinks = min(self.seen, self.num_sinks)
        n_ring = self.length - n_sinks
        ring = self.num_sinks + (self.read_ptr - self.num_sinks + np.arange(n_ring, dtype=np.int64)) % self.window
        return np.concatenate([np.arange(n_sinks, dtype=np.int64), ring])

    def unrotate(self) -> Tuple["Tensor", "Tensor"]:
        """``(k, v)`` of the held tokens in chronological order, ``(B, Hkv, length, D)`` each (copies)."""
        self._storage_ready()
        order = self.chronological_slots()
        if self.keep_graph:
            return seq_take(self._k_t, order), seq_take(self._v_t, order)
        return (wrap(take_seq(self.engine, self._k, order), self.backend),
                wrap(take_seq(self.engine, self._v, order), self.backend))

    def reset(self) -> None:
        """Forget every token (the storage is kept)."""
        self.seen = 0
        self._pos[:] = -1
        self._kpb[:] = -1
        self._ws = None

    def __repr__(self) -> str:
        return (f"RingBufferKVCache(B={self.B}, Hkv={self.Hkv}, D={self.D}, capacity={self.capacity}, "
                f"num_sinks={self.num_sinks}, seen={self.seen}, read_ptr={self.read_ptr}, write_ptr={self.write_ptr}, "
                f"backend={getattr(self.backend, 'name', None)}, dtype={getattr(self.dtype, 'name', None)}"
                f"{', keep_graph' if self.keep_graph else ''})")

    # -- input checks ------------------------------------------------------------------------------------------------
    def _check_kv(self, k: Any, v: Any) -> int:
        for name, x in (("k", k), ("v", v)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(f"append: {name} must be a Tensor or an array of shape (B, Hkv, T, D), "
                                f"got {type(x).__name__}")
        ks, vs = tuple(int(s) for s in k.shape), tuple(int(s) for s in v.shape)
        expected = f"(B, Hkv, T, D) = ({self.B}, {self.Hkv}, T, {self.D})"
        if len(ks) != 4 or len(vs) != 4:
            raise ValueError(f"append: k and v must be 4-D {expected}, got k {ks} and v {vs}")
        if ks != vs:
            raise ValueError(f"append: k and v must have the same shape, got k {ks} and v {vs}")
        if ks[0] != self.B or ks[1] != self.Hkv or ks[3] != self.D:
            raise ValueError(f"append: the cache holds {expected}, got k {ks}: "
                             f"batch {ks[0]} vs {self.B}, kv heads {ks[1]} vs {self.Hkv}, head_dim {ks[3]} vs {self.D}")
        return ks[2]

    def _check_q(self, q: Any) -> Tuple[int, int]:
        if not hasattr(q, "shape"):
            raise TypeError(f"attend: q must be a Tensor or an array of shape (B, H, T, D), got {type(q).__name__}")
        qs = tuple(int(s) for s in q.shape)
        if len(qs) != 4 or qs[0] != self.B or qs[3] != self.D or qs[1] % self.Hkv != 0 or qs[1] < 1:
            raise ValueError(f"attend: q must be (B, H, T, D) with B={self.B}, D={self.D} and H a multiple of "
                             f"Hkv={self.Hkv}, got {qs}")
        if qs[2] > self.seen:
            raise ValueError(f"attend: {qs[2]} queries for the newest positions, but the cache has seen only "
                             f"{self.seen} tokens")
        return qs[1], qs[2]

    def _raw(self, x: Any, name: str) -> ArrayLike:
        """A raw contiguous array of this cache's backend and dtype from a Tensor, NumPy array or device array."""
        if isinstance(x, Tensor):
            if bool(x.backend.cuda) != bool(self.backend.cuda):
                raise ValueError(f"{name} is on backend {x.backend.name}, the cache on {self.backend.name}")
            if x.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {np.dtype(x.dtype).name}, the cache {self.dtype.name}")
            return raw4(x)
        if isinstance(x, (list, tuple)) or not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be a Tensor or an array of shape (B, H, T, D), got {type(x).__name__}")
        if np.dtype(x.dtype).kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers, got dtype {np.dtype(x.dtype)}")
        return self.engine.asarray(x, self.dtype)

    @staticmethod
    def _padding(key_padding_mask: Any, B: int, T: int) -> np.ndarray:
        if key_padding_mask is None:
            return np.zeros((B, T), dtype=bool)
        pad = key_padding_mask.to_numpy() if isinstance(key_padding_mask, Tensor) else np.asarray(key_padding_mask)
        if pad.shape != (B, T):
            raise ValueError(f"key_padding_mask must have shape (B, T) = ({B}, {T}) for the keys appended, "
                             f"got {pad.shape}")
        if pad.dtype != np.bool_ and not np.all((pad == 0) | (pad == 1)):
            raise ValueError("key_padding_mask must hold booleans or 0/1 (True/1 means padding)")
        return pad.astype(bool)

    # -- writing ---------------------------------------------------------------------------------------------------------
    def append(self, k: Any, v: Any, key_padding_mask: Any = None) -> None:
        """Append ``T`` tokens ``k, v (B, Hkv, T, D)`` at positions ``seen .. seen + T - 1``.

        Each token goes to its slot, overwriting the oldest ring token. If ``T`` exceeds what the ring can hold only
        the newest tokens are stored (sinks are always kept). ``key_padding_mask (B, T)`` (True: padding) marks keys
        that are stored but never attended for that batch row.

        A chunk (``T > 1``) whose writes evict keys that its own earlier queries still need also keeps a workspace
        for :meth:`attend`: the slots as they were before the append plus the chunk (at most ``capacity + T``
        keys), dropped at the next append.
        """
        T = self._check_kv(k, v)
        pad = self._padding(key_padding_mask, self.B, T)
        if T == 0:
            return
        if self._k is None and self._k_t is None:
            self._adopt(k)
        s, W, C = self.num_sinks, self.window, self.capacity
        start = self.seen
        pos = start + np.arange(T, dtype=np.int64)
        keep = (pos < s) | (pos >= start + T - W)  # the newest W ring tokens (and every sink)
        rows = np.nonzero(keep)[0]
        slots = slot_of(pos[rows], C, s)
        old = self._pos[slots]
        needs_ws = T > 1 and (bool(np.any(~keep)) or bool(np.any((old >= 0) & (pos[rows] > start))))
        chunk_kpb = np.where(pad, -1, pos[None, :])
        if self.keep_graph:
            self._append_graph(k, v, pos, rows, slots, chunk_kpb)
        else:
            kr, vr = self._raw(k, "k"), self._raw(v, "v")
            if needs_ws:
                self._ws = (concat_seq(self.engine, [self._k, kr]), concat_seq(self.engine, [self._v, vr]),
                            np.concatenate([self._pos, pos]), np.concatenate([self._kpb, chunk_kpb], axis=1))
            else:
                self._ws = None
            self.engine.write_rows(self._k, kr, slots, rows)
            self.engine.write_rows(self._v, vr, slots, rows)
        self._pos[slots] = pos[rows]
        self._kpb[:, slots] = chunk_kpb[:, rows]
        self.seen += T
        self._last_append = T

    def _append_graph(self, k: Any, v: Any, pos: np.ndarray, rows: np.ndarray, slots: np.ndarray,
                      chunk_kpb: np.ndarray) -> None:
        """Backward cache: the workspace is ``cat(slots, chunk)`` and the new slots a gather from it (autograd)."""
        if not (isinstance(k, Tensor) and isinstance(v, Tensor)):
            raise TypeError("a keep_graph cache needs Tensor keys and values (their history is what it keeps)")
        if k.dtype != self.dtype or bool(k.backend.cuda) != bool(self.backend.cuda):
            raise TypeError(f"append: k is {np.dtype(k.dtype).name} on {k.backend.name}, the cache "
                            f"{self.dtype.name} on {self.backend.name}")
        C = self.capacity
        ws_k, ws_v = seq_cat(self._k_t, k), seq_cat(self._v_t, v)
        self._ws = (ws_k, ws_v, np.concatenate([self._pos, pos]), np.concatenate([self._kpb, chunk_kpb], axis=1))
        idx = np.arange(C, dtype=np.int64)  # slot j keeps workspace row j (its old content) ...
        idx[slots] = C + rows  # ... unless a chunk token is written to it
        self._k_t, self._v_t = seq_take(ws_k, idx), seq_take(ws_v, idx)

    # -- attention -------------------------------------------------------------------------------------------------------
    def _key_set(self, T: int) -> Tuple[Any, Any, np.ndarray, np.ndarray, bool]:
        """The keys queries for the ``T`` newest positions attend over: ``(k, v, pos (Nk,), kpb (B, Nk), is_slots)``.

        The slots themselves when they hold every key those queries can see; else the chunk workspace.
        """
        if self.keep_graph:
            if self._ws is None:
                raise ValueError("attend on a keep_graph cache must follow an append")
            k, v, pos, kpb = self._ws
            return k, v, pos, kpb, False
        if T > 1 and self._ws is not None:
            k, v, pos, kpb = self._ws
            use = (k, v, pos, kpb, False)
        else:
            use = (self._k, self._v, self._pos, self._kpb, True)
        # every non-sink key the oldest query may see must be present
        q0 = self.seen - T
        lo = max(self.num_sinks, q0 - self.window + 1)
        need = self.seen - lo
        have = int(np.count_nonzero((use[2] >= lo) & (use[2] < self.seen)))
        if have < need:
            raise ValueError(
                f"attend: queries at positions {q0}..{self.seen - 1} see keys from position {lo} on, but the cache "
                f"no longer holds {need - have} of them; attend right after each append, with at most as many "
                f"queries as tokens appended (last append: {self._last_append})"
            )
        return use

    def attend(
        self,
        q: Any,
        scale: Optional[float] = None,
        *,
        dropout: float = 0.0,
        seed: Optional[int] = None,
        return_lse: bool = False,
        attn_bias: Any = None,
    ) -> Any:
        """Attention of ``q (B, H, T, D)``, the queries of the ``T`` newest positions, over the cache.

        A query at position ``t`` sees the keys at positions ``p <= t`` with ``t - p < capacity - num_sinks`` or
        ``p < num_sinks``: causal attention with that window plus the sinks. It is the backend's flash attention
        with the slots' positions, run directly on the rotated slots (a decode step, ``T == 1``, splits the slots
        into ``block_size`` tiles and, on a GPU, one split-K part per tile); ``T > 1`` queries whose keys the
        append overwrote read the chunk workspace instead. Empty slots (position -1) are never read. ``attn_bias``
        (optional, not with ``keep_graph``): an additive bias over the slots, ``(B|1, H|1, T|1, capacity)``
        (``-inf`` masks a slot). Returns what ``q`` is: a Tensor for a Tensor (with autograd in a ``keep_graph``
        cache), else a raw array; ``(out, lse)`` with ``return_lse``.
        """
        H, T = self._check_q(q)
        scale = check_scale(scale, self.D)
        dropout = check_dropout(dropout)
        seed = check_seed(seed, dropout)
        return_lse = check_flag("return_lse", return_lse)
        k, v, pos, kpb, is_slots = self._key_set(T)
        q_pos = self.seen - T + np.arange(T, dtype=np.int64)
        pad = (kpb < 0) & (pos[None, :] >= 0)
        if self.keep_graph:
            if not isinstance(q, Tensor):
                raise TypeError("a keep_graph cache attends Tensor queries")
            if attn_bias is not None:
                raise ValueError("attn_bias is not supported by a keep_graph cache")
            return flash_attention(q, k, v, causal=True, scale=scale, window=self.window, num_sinks=self.num_sinks,
                                   key_padding_mask=pad, q_positions=q_pos, k_positions=pos, dropout=dropout,
                                   seed=seed, return_lse=return_lse, order=self.order, **self._blocks())
        qr = self._raw(q, "q")
        bias = None
        if attn_bias is not None:
            if not is_slots:
                raise ValueError("attn_bias covers the cache slots: attend with it right after single-token appends")
            bias = self._raw(attn_bias, "attn_bias") if isinstance(attn_bias, Tensor) else \
                self.engine.asarray(np.asarray(attn_bias), self.dtype)
        blocks = self._blocks()
        splits = 1
        if T == 1 and is_slots:  # decoding: tiles of block_size slots, split-K where the engine wants it
            block = self.block_size or min(self.capacity, self.engine.decode_block)
            blocks = {"block_q": 1, "block_k": block}
            splits = self.engine.decode_splits(-(-self.capacity // block))
        spec = make_spec(
            tuple(qr.shape), tuple(k.shape), tuple(v.shape), causal=True, scale=scale, window=self.window,
            key_padding_mask=pad, bias_shape=None if bias is None else tuple(bias.shape), dropout=dropout, seed=seed,
            q_positions=q_pos, k_positions=pos, order=self.order, num_sinks=self.num_sinks, num_splits=splits,
            default_blocks=self.engine.default_blocks(self.D), **blocks,
        )
        out, lse = self.engine.forward(qr, k, v, bias, spec)
        if isinstance(q, Tensor):
            out, lse = wrap(out, q.backend), wrap(lse, q.backend)
        return (out, lse) if return_lse else out

    def _blocks(self) -> dict:
        return {} if self.tile_size is None else {"block_q": self.tile_size, "block_k": self.tile_size}

    def attention_weights(self, q: Any, scale: Optional[float] = None, attn_bias: Any = None) -> np.ndarray:
        """Softmax weights ``(B, H, T, capacity)`` of ``q`` (the ``T`` newest positions) over the slots, in slot
        order (zero for empty, padded and invisible slots); float64 NumPy, for inspection (``needs_weights``)."""
        H, T = self._check_q(q)
        qn = q.to_numpy() if isinstance(q, Tensor) else self.engine.to_host(q)
        kn = self._k_t.to_numpy() if self.keep_graph else self.engine.to_host(self._k)
        kn = np.where((self._kpb >= 0)[:, None, :, None], kn, 0.0)  # empty slots are never read
        q_pos = self.seen - T + np.arange(T, dtype=np.int64)
        p, _, _ = attention_probs(qn, kn, causal=True, scale=scale, window=self.window,
                                  key_padding_mask=(self._kpb < 0), attn_bias=attn_bias, q_positions=q_pos,
                                  k_positions=self._pos, num_sinks=self.num_sinks)
        return p


# ---------------------------------------------------------------------------------------------------------------------
# Training in chunks through the backward cache
# ---------------------------------------------------------------------------------------------------------------------


def chunked_causal_attention(
    q: "Tensor",
    k: "Tensor",
    v: "Tensor",
    chunk: int,
    window: Optional[int] = None,
    num_sinks: int = 0,
    *,
    scale: Optional[float] = None,
    key_padding_mask: Any = None,
    dropout: float = 0.0,
    seed: Optional[int] = None,
    block_size: Optional[int] = None,
    tile_size: Optional[int] = None,
    order: Any = None,
) -> "Tensor":
    """Causal attention (window ``window`` plus ``num_sinks`` sinks) over a long sequence, ``chunk`` queries at a
    time through a backward KV cache: each chunk attends over the cached keys of the previous chunks plus its own,
    and the cached keys keep their autograd history. Output and gradients (to q, k, v and upstream) equal those of
    full-sequence ``flash_attention(q, k, v, causal=True, window=window, num_sinks=num_sinks)``; the keys touched
    per chunk are at most ``window + num_sinks + chunk``.

    With dropout, each chunk draws its own mask (coordinates within the chunk's workspace), so the result is a
    valid dropout sample but not the one full-sequence attention draws for the same seed.
    """
    B, H, N, D = (int(s) for s in q.shape)
    Hkv = int(k.shape[1])
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    capacity = (N if window is None else int(window)) + int(num_sinks)
    capacity = max(capacity, int(num_sinks) + 1)
    cache = RingBufferKVCache(B, Hkv, D, capacity, num_sinks, backend=q.backend, dtype=q.dtype,
                              block_size=block_size, tile_size=tile_size, order=order, keep_graph=True)
    pad = None
    if key_padding_mask is not None:
        pad = key_padding_mask.to_numpy() if isinstance(key_padding_mask, Tensor) else np.asarray(key_padding_mask)
        pad = pad.astype(bool)
    outs = []
    for a in range(0, N, chunk):
        b = min(a + chunk, N)
        cache.append(seq_take(k, slice(a, b)), seq_take(v, slice(a, b)),
                     None if pad is None else pad[:, a:b])
        outs.append(cache.attend(seq_take(q, slice(a, b)), scale, dropout=dropout,
                                 seed=None if seed is None else int(seed) + a))
    return seq_cat(*outs)


# ---------------------------------------------------------------------------------------------------------------------
# The decoder feedback buffer
# ---------------------------------------------------------------------------------------------------------------------


class DecoderFeedbackBuffer:
    """The decoder's right-shifted input window ``[start, y_0, ..., y_{t-1}]`` (its last ``capacity`` entries) in a
    ring of ``capacity`` slots of ``(batch, dim)``.

    Input ``n`` of the decoder is ``x_0 = start`` and ``x_{n+1} = y_n``; it lives in slot ``n % capacity``.
    ``push(y_t)`` writes ``x_{t+1}`` at ``write_ptr`` and advances it; ``read_ptr`` is the slot of the oldest
    input still held. ``inputs()`` returns the held inputs in order, ``(batch, L, dim)`` with
    ``L = min(t + 1, capacity)``.
    """

    def __init__(self, capacity: int, batch: int, dim: int, start_value: float = 0.0, backend: Any = None,
                 dtype: Any = np.float64) -> None:
        for name, val in (("capacity", capacity), ("batch", batch), ("dim", dim)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        self.capacity, self.batch, self.dim = int(capacity), int(batch), int(dim)
        self.backend = resolve_backend(backend)
        self.dtype = float_dtype(dtype)
        self.start_value = start_value
        self._buf = np.zeros((self.capacity, self.batch, self.dim), dtype=self.dtype)
        self.reset()

    def reset(self) -> None:
        """Back to ``[start]``."""
        self.count = 1  # inputs written so far (x_0 = start)
        self._buf[0] = self.start_value

    @property
    def pushed(self) -> int:
        """Decoder outputs pushed so far (``t``)."""
        return self.count - 1

    @property
    def length(self) -> int:
        """Inputs held: ``min(t + 1, capacity)``."""
        return min(self.count, self.capacity)

    @property
    def write_ptr(self) -> int:
        """Slot of the next input."""
        return self.count % self.capacity

    @property
    def read_ptr(self) -> int:
        """Slot of the oldest input held."""
        return (self.count - self.length) % self.capacity

    def push(self, y: Any) -> None:
        """Store decoder output ``y (batch, dim)`` (a Tensor or an array) as the next input."""
        arr = y.to_numpy() if isinstance(y, Tensor) else engine_of(self.backend).to_host(y)
        if arr.shape != (self.batch, self.dim):
            raise ValueError(f"push: expected a decoder output of shape (batch, dim) = ({self.batch}, {self.dim}), "
                             f"got {arr.shape}")
        self._buf[self.write_ptr] = arr
        self.count += 1

    def inputs_array(self) -> np.ndarray:
        """The held inputs, oldest first, as a NumPy array ``(batch, L, dim)``."""
        idx = (self.read_ptr + np.arange(self.length)) % self.capacity
        return np.ascontiguousarray(self._buf[idx].transpose(1, 0, 2))

    def inputs(self) -> "Tensor":
        """The right-shifted decoder input window ``[start, y_0, ..., y_{t-1}]`` (last ``capacity``) as a Tensor
        ``(batch, L, dim)``."""
        return from_numpy(self.inputs_array(), backend=self.backend)
