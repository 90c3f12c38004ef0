"""Numba CUDA backend (course tasks 3.3 and 3.4): ``CudaOps`` and ``CudaBackend``.

A CUDA tensor's storage is a 1-D device array that stays on the device between operations: every kernel reads
device storages and writes a freshly allocated device ``out``; nothing is copied back to the host unless asked for
(``to_numpy``). Shapes and strides reach the kernels as cached device arrays (``TensorData.device_meta()``).

Kernels are built by small factories that capture compile-time constants (block size, tile size, dtype), and are
cached per scalar function, so each ``(fn, dtype)`` compiles once:

- ``tensor_map(fn)``, ``tensor_zip(fn)``: one thread per output element, with broadcasting.
- ``tensor_reduce(fn, block, dtype)``: one block per output element; each thread folds a strided slice of the
  reduced dimension, then a shared-memory tree reduction combines the ``block`` partial results.
- ``tensor_matrix_multiply(tile, dtype)``: shared-memory tiled batched matmul ``(B|1, n, m) @ (B|1, m, p)``.
- ``_sum_practice`` / ``_mm_practice``: the course's single-block practice kernels.

Run on Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same code is tested on the CPU; there the default
block and tile sizes are small, because the simulator runs one Python thread per CUDA thread.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, TypeVar

import numba
import numpy as np
from numba import cuda

from .tensor_data import (
    TensorData,
    broadcast_index,
    index_to_position,
    shape_broadcast,
    to_index,
)
from .tensor_ops import TensorBackend, TensorOps

if TYPE_CHECKING:
    from .tensor import Tensor

Fn = TypeVar("Fn")

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

MAX_DIMS = 8
"""Largest number of dimensions a CUDA kernel indexes (size of the per-thread ``cuda.local`` index arrays)."""

THREADS_PER_BLOCK = 32 if SIMULATOR else 256
"""Threads per block of the element-wise kernels (map, zip, fill)."""

REDUCE_BLOCK = 32 if SIMULATOR else 1024
"""Largest block (a power of two) of ``tensor_reduce``: one block per output element."""

REDUCE_MIN_BLOCK = 1 if SIMULATOR else 32
"""Smallest block of ``tensor_reduce`` (a warp on the GPU)."""

TILE = 8 if SIMULATOR else 32
"""Tile side of ``tensor_matrix_multiply``: blocks of ``TILE x TILE`` threads."""

BLOCK_DIM = 32
"""Block size of the course practice kernels (``sum_practice`` sums blocks of 32, ``mm_practice`` needs size < 32)."""


# Index helpers from tensor_data, compiled as device functions.
_to_index = cuda.jit(device=True)(to_index)
_index_to_position = cuda.jit(device=True)(index_to_position)
_broadcast_index = cuda.jit(device=True)(broadcast_index)


# ---------------------------------------------------------------------------------------------------------------------
# Kernel factories
# ---------------------------------------------------------------------------------------------------------------------


def device_jit(fn: Fn, **kwargs: Any) -> Fn:
    """Compile a plain scalar function as a CUDA device function."""
    return cuda.jit(device=True, **kwargs)(fn)  # type: ignore


def jit(fn: Fn, **kwargs: Any) -> Fn:
    """Compile a kernel."""
    return cuda.jit(**kwargs)(fn)  # type: ignore


def tensor_map(fn: Callable[[float], float]) -> Any:
    """CUDA higher-order tensor map: ``out[i] = fn(in[broadcast(i)])``, one thread per output element.

    Args:
        fn: device function mapping a float to a float.

    Returns:
        Kernel ``(out, out_shape, out_strides, out_size, in_storage, in_shape, in_strides, aligned)``;
        ``aligned`` (both contiguous with the same shape) skips the index arithmetic.
    """

    def _map(
        out: Any,
        out_shape: Any,
        out_strides: Any,
        out_size: int,
        in_storage: Any,
        in_shape: Any,
        in_strides: Any,
        aligned: bool,
    ) -> None:
        # BEGIN SOLUTION task3_3: thread i < out_size writes out at i's position: fn of the broadcast input element
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if i < out_size:
            if aligned:
                out[i] = fn(in_storage[i])
            else:
                out_index = cuda.local.array(MAX_DIMS, numba.int32)
                in_index = cuda.local.array(MAX_DIMS, numba.int32)
                _to_index(i, out_shape, out_index)
                _broadcast_index(out_index, out_shape, in_shape, in_index)
                o = _index_to_position(out_index, out_strides)
                j = _index_to_position(in_index, in_strides)
                out[o] = fn(in_storage[j])
        # END SOLUTION

    return jit(_map)


def tensor_zip(fn: Callable[[float, float], float]) -> Any:
    """CUDA higher-order tensor zip: ``out[i] = fn(a[broadcast(i)], b[broadcast(i)])``, one thread per element.

    Returns:
        Kernel ``(out, out_shape, out_strides, out_size, a_storage, a_shape, a_strides,
        b_storage, b_shape, b_strides, aligned)``.
    """

    def _zip(
        out: Any,
        out_shape: Any,
        out_strides: Any,
        out_size: int,
        a_storage: Any,
        a_shape: Any,
        a_strides: Any,
        b_storage: Any,
        b_shape: Any,
        b_strides: Any,
        aligned: bool,
    ) -> None:
        # BEGIN SOLUTION task3_3: thread i < out_size writes out at i's position: fn of the two broadcast inputs
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if i < out_size:
            if aligned:
                out[i] = fn(a_storage[i], b_storage[i])
            else:
                out_index = cuda.local.array(MAX_DIMS, numba.int32)
                a_index = cuda.local.array(MAX_DIMS, numba.int32)
                b_index = cuda.local.array(MAX_DIMS, numba.int32)
                _to_index(i, out_shape, out_index)
                o = _index_to_position(out_index, out_strides)
                _broadcast_index(out_index, out_shape, a_shape, a_index)
                j = _index_to_position(a_index, a_strides)
                _broadcast_index(out_index, out_shape, b_shape, b_index)
                k = _index_to_position(b_index, b_strides)
                out[o] = fn(a_storage[j], b_storage[k])
        # END SOLUTION

    return jit(_zip)


def tensor_reduce(fn: Callable[[float, float], float], block: int = REDUCE_BLOCK, dtype: Any = np.float64) -> Any:
    """CUDA higher-order tensor reduce along one dimension.

    One block per output element. Thread ``t`` of ``T`` folds elements ``t, t + T, t + 2T, ...`` of the reduced
    dimension (so any length works), then the ``T`` partial results are combined by a tree reduction in shared
    memory. ``fn`` must be associative and commutative, ``start`` its identity.

    Args:
        fn: device function ``(acc, x) -> acc``.
        block: the largest block, a power of two (compile-time constant: the shared array's size).
        dtype: storage dtype (compile-time constant: the shared array's dtype).

    Returns:
        Kernel ``(out, out_shape, out_strides, out_size, a_storage, a_shape, a_strides, reduce_dim, start)``,
        launched with ``out_size`` blocks of ``T`` threads, ``T`` a power of two ``<= block`` (the launcher picks
        the smallest that covers the reduced dimension, so short reductions do not idle 1024 threads).
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"reduce block size must be a power of two, got {block}")
    nb_dtype = numba.from_dtype(np.dtype(dtype))

    def _reduce(
        out: Any,
        out_shape: Any,
        out_strides: Any,
        out_size: int,
        a_storage: Any,
        a_shape: Any,
        a_strides: Any,
        reduce_dim: int,
        start: Any,
    ) -> None:
        # BEGIN SOLUTION task3_3: block = one output: each thread folds a strided slice, then a shared-memory tree
        cache = cuda.shared.array(block, nb_dtype)
        out_index = cuda.local.array(MAX_DIMS, numba.int32)
        out_pos = cuda.blockIdx.x
        pos = cuda.threadIdx.x
        threads = cuda.blockDim.x
        if out_pos < out_size:  # the same for every thread of the block: the syncthreads below are safe
            _to_index(out_pos, out_shape, out_index)
            o = _index_to_position(out_index, out_strides)
            # out's index with the reduced coordinate set to 0 is the first element of a's slice
            out_index[reduce_dim] = 0
            base = _index_to_position(out_index, a_strides)
            step = a_strides[reduce_dim]
            acc = start
            for s in range(pos, a_shape[reduce_dim], threads):
                acc = fn(acc, a_storage[base + s * step])
            cache[pos] = acc
            cuda.syncthreads()
            half = threads // 2
            while half > 0:
                if pos < half:
                    cache[pos] = fn(cache[pos], cache[pos + half])
                cuda.syncthreads()
                half //= 2
            if pos == 0:
                out[o] = cache[0]
        # END SOLUTION

    return jit(_reduce)


def tensor_matrix_multiply(tile: int = TILE, dtype: Any = np.float64) -> Any:
    """Shared-memory tiled batched matrix multiply ``out[b] = a[b or 0] @ b[b or 0]``.

    A block of ``tile x tile`` threads computes one ``tile x tile`` tile of ``out``: it walks the shared dimension
    one tile at a time, every thread loading one element of ``a`` and one of ``b`` into shared memory (zero beyond
    the edges), then every thread accumulating its dot product from shared memory. ``threadIdx.x`` runs along
    columns so that warps read rows of ``a``, ``b`` and write rows of ``out`` contiguously. Each element of ``a``
    and ``b`` is read from global memory ``p / tile`` and ``n / tile`` times instead of ``p`` and ``n`` times.

    Shapes and strides are passed as scalars (the kernel is 3-D only); a batch stride of 0 broadcasts.

    Returns:
        Kernel ``(out, a_storage, b_storage, n, m, p, a_s0, a_s1, a_s2, b_s0, b_s1, b_s2)`` writing the contiguous
        ``out`` of shape ``(B, n, p)``; launch with grid ``(ceil(p / tile), ceil(n / tile), B)`` and block
        ``(tile, tile)``.
    """
    nb_dtype = numba.from_dtype(np.dtype(dtype))
    zero = np.dtype(dtype).type(0.0)

    def _mm(
        out: Any,
        a_storage: Any,
        b_storage: Any,
        n: int,
        m: int,
        p: int,
        a_s0: int,
        a_s1: int,
        a_s2: int,
        b_s0: int,
        b_s1: int,
        b_s2: int,
    ) -> None:
        # BEGIN SOLUTION task3_4: tile x tile threads per output tile: stage tiles of a and b in shared memory
        a_shared = cuda.shared.array((tile, tile), nb_dtype)
        b_shared = cuda.shared.array((tile, tile), nb_dtype)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        batch = cuda.blockIdx.z
        row = cuda.blockIdx.y * tile + ty
        col = cuda.blockIdx.x * tile + tx
        a_base = batch * a_s0 + row * a_s1
        b_base = batch * b_s0 + col * b_s2

        acc = zero
        for k0 in range(0, m, tile):
            k = k0 + tx
            if row < n and k < m:
                a_shared[ty, tx] = a_storage[a_base + k * a_s2]
            else:
                a_shared[ty, tx] = zero
            k = k0 + ty
            if k < m and col < p:
                b_shared[ty, tx] = b_storage[b_base + k * b_s1]
            else:
                b_shared[ty, tx] = zero
            cuda.syncthreads()
            for kk in range(tile):
                acc += a_shared[ty, kk] * b_shared[kk, tx]
            cuda.syncthreads()
        if row < n and col < p:
            out[(batch * n + row) * p + col] = acc
        # END SOLUTION

    return jit(_mm)


def _fill(out: Any, size: int, value: Any) -> None:
    """``out[:size] = value``, one thread per element."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < size:
        out[i] = value


fill_kernel = jit(_fill)


def _adam(x: Any, g: Any, m: Any, v: Any, out: Any, size: int, lr: Any, b1: Any, a1: Any, b2: Any, a2: Any,
          eps: Any, c1: Any, c2: Any) -> None:
    """One Adam step per element, in the storage's dtype (the scalars come typed: no float64 math in float32)::

        m = b1 m + a1 g;  v = b2 v + a2 g^2;  out = x - lr (m / c1) / (sqrt(v / c2) + eps)

    with ``a = 1 - b``, ``c1 = 1 - b1^t``, ``c2 = 1 - b2^t``; ``m`` and ``v`` are updated in place."""
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < size:
        gi = g[i]
        mi = b1 * m[i] + a1 * gi
        vi = b2 * v[i] + a2 * gi * gi
        m[i] = mi
        v[i] = vi
        out[i] = x[i] - lr * (mi / c1) / (math.sqrt(vi / c2) + eps)


adam_kernel = jit(_adam)


def adam_step(value: "Tensor", grad: "Tensor", state: Dict[str, Any], lr: float, betas: Tuple[float, float],
              eps: float) -> "Tensor":
    """Adam on the device for a CUDA tensor parameter: ``state`` holds ``step`` and the moments ``m``, ``v`` (device
    arrays, created here at the first step); returns the new value. Nothing crosses the bus."""
    x, g = _contiguous_data(value), _contiguous_data(grad)
    dtype = np.dtype(x.dtype)
    size = x.size
    if "m" not in state:
        state["m"] = CudaOps.zeros_storage(size, dtype)
        state["v"] = CudaOps.zeros_storage(size, dtype)
    state["step"] += 1
    t, (b1, b2), ft = state["step"], betas, dtype.type
    out = cuda.device_array(size, dtype=dtype)
    if size > 0:
        threads = CudaOps.threads_per_block
        adam_kernel[_blocks(size, threads), threads](x._storage, g._storage, state["m"], state["v"], out, size, ft(lr),
                                                     ft(b1), ft(1.0 - b1), ft(b2), ft(1.0 - b2), ft(eps),
                                                     ft(1.0 - b1**t), ft(1.0 - b2**t))
    return value._new(TensorData(out, value.shape))


# ---------------------------------------------------------------------------------------------------------------------
# Course practice kernels
# ---------------------------------------------------------------------------------------------------------------------


def _sum_practice(out: Any, a: Any, size: int) -> None:
    """Block sum (course practice): ``out[block] = sum(a[block * 32 : block * 32 + 32])``.

    Each of the 32 threads loads one element into shared memory (0 past the end), then a tree reduction halves the
    number of active threads each step. Launch with blocks of ``BLOCK_DIM`` threads.
    """
    # BEGIN SOLUTION task3_3: each block sums its 32 elements: load into shared memory, then a tree reduction
    cache = cuda.shared.array(BLOCK_DIM, numba.float64)
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    pos = cuda.threadIdx.x
    if i < size:
        cache[pos] = a[i]
    else:
        cache[pos] = 0.0
    cuda.syncthreads()
    half = BLOCK_DIM // 2
    while half > 0:
        if pos < half:
            cache[pos] += cache[pos + half]
        cuda.syncthreads()
        half //= 2
    if pos == 0:
        out[cuda.blockIdx.x] = cache[0]
    # END SOLUTION


jit_sum_practice = jit(_sum_practice)


def sum_practice(a: "Tensor") -> TensorData:
    """Sum each block of 32 consecutive elements of the 1-D CUDA tensor ``a``.

    Returns:
        ``TensorData`` of shape ``(ceil(size / 32),)`` (at least 1) with a device storage: ``out._storage[b]`` is
        the sum of block ``b``.
    """
    (size,) = a.shape
    td = _contiguous_data(a)
    blocks = max(1, (size + BLOCK_DIM - 1) // BLOCK_DIM)
    out = cuda.device_array(blocks, dtype=td.dtype)
    jit_sum_practice[blocks, BLOCK_DIM](out, td._storage, size)
    return TensorData(out, (blocks,))


def _mm_practice(out: Any, a: Any, b: Any, size: int) -> None:
    """Square matmul in one block (course practice): ``out = a @ b`` for contiguous ``size x size``, size <= 32.

    Each thread copies one element of ``a`` and of ``b`` into shared memory, then computes one output element
    reading only shared memory (one global read and one global write per thread).
    """
    # BEGIN SOLUTION task3_4: one block: copy a and b to shared memory, then each thread computes one output
    a_shared = cuda.shared.array((BLOCK_DIM, BLOCK_DIM), numba.float64)
    b_shared = cuda.shared.array((BLOCK_DIM, BLOCK_DIM), numba.float64)
    row = cuda.threadIdx.y
    col = cuda.threadIdx.x
    if row < size and col < size:
        a_shared[row, col] = a[row * size + col]
        b_shared[row, col] = b[row * size + col]
    cuda.syncthreads()
    if row < size and col < size:
        acc = 0.0
        for k in range(size):
            acc += a_shared[row, k] * b_shared[k, col]
        out[row * size + col] = acc
    # END SOLUTION


jit_mm_practice = jit(_mm_practice)


def mm_practice(a: "Tensor", b: "Tensor") -> TensorData:
    """``a @ b`` for square ``size x size`` CUDA tensors, ``size <= 32``, in a single block.

    Returns:
        ``TensorData`` of shape ``(size, size)`` with a device storage.
    """
    (size, size2) = a.shape
    if size != size2 or tuple(b.shape) != (size, size) or size > BLOCK_DIM:
        raise ValueError(f"mm_practice needs two square matrices of the same size <= {BLOCK_DIM}: {a.shape}, {b.shape}")
    ta = _contiguous_data(a)
    tb = _contiguous_data(b)
    out = cuda.device_array(size * size, dtype=ta.dtype)
    jit_mm_practice[1, (size, size)](out, ta._storage, tb._storage, size)
    return TensorData(out, (size, size))


# ---------------------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------------------

_device_fns: Dict[Callable, Any] = {}
_kernels: Dict[Tuple[Any, ...], Any] = {}


def _device_fn(fn: Callable) -> Any:
    """``fn`` compiled as a device function, once per function."""
    if fn not in _device_fns:
        _device_fns[fn] = device_jit(fn)
    return _device_fns[fn]


def _kernel(kind: str, fn: Callable, *consts: Any) -> Any:
    """The kernel ``kind`` for scalar function ``fn`` and compile-time constants ``consts``, built once."""
    key = (kind, fn) + consts
    if key not in _kernels:
        dfn = _device_fn(fn)
        if kind == "map":
            _kernels[key] = tensor_map(dfn)
        elif kind == "zip":
            _kernels[key] = tensor_zip(dfn)
        else:
            _kernels[key] = tensor_reduce(dfn, *consts)
    return _kernels[key]


def matmul_kernel(tile: int, dtype: Any) -> Any:
    """The tiled matmul kernel for ``(tile, dtype)``, built once."""
    key = ("matmul", tile, np.dtype(dtype))
    if key not in _kernels:
        _kernels[key] = tensor_matrix_multiply(tile, dtype)
    return _kernels[key]


def _blocks(size: int, threads: int) -> int:
    return (size + threads - 1) // threads


def _reduce_threads(size: int) -> int:
    """Threads for reducing ``size`` elements: the smallest power of two covering ``size``, within
    ``[CudaOps.reduce_min_block, CudaOps.reduce_block]``."""
    threads = CudaOps.reduce_min_block
    while threads < size and threads < CudaOps.reduce_block:
        threads *= 2
    return min(threads, CudaOps.reduce_block)


_META_CACHE: Dict[Tuple[Tuple[int, ...], Tuple[int, ...]], Tuple[Any, Any]] = {}
_META_CACHE_MAX = 4096


def _meta(td: TensorData) -> Tuple[Any, Any]:
    """Device copies of ``(shape, strides)`` from ``td.device_meta()``, shared by every tensor of the same layout.

    ``device_meta()`` caches per ``TensorData``, but every op returns a new one; keying on the layout as well means
    a training loop stops copying shapes to the device after its first step. The arrays are never written.
    """
    if td.dims > MAX_DIMS:
        raise ValueError(f"CUDA kernels index at most {MAX_DIMS} dimensions, got shape {td.shape}")
    key = (td.shape, td.strides)
    meta = _META_CACHE.get(key)
    if meta is None:
        if len(_META_CACHE) >= _META_CACHE_MAX:
            _META_CACHE.clear()
        meta = _META_CACHE[key] = td.device_meta()
    return meta


def _empty(like: "Tensor", shape: Tuple[int, ...]) -> "Tensor":
    """A new contiguous CUDA tensor of ``shape`` with ``like``'s dtype and backend, uninitialised (kernels write
    every element)."""
    size = int(np.prod(shape, dtype=np.int64))
    storage = cuda.device_array(size, dtype=like._tensor.dtype)
    return like._new(TensorData(storage, tuple(shape)))


def _contiguous_data(a: "Tensor") -> TensorData:
    td = a._tensor
    if not td.is_contiguous():
        td = a.contiguous()._tensor
    return td


def cuda_array_interface(tensor_data: TensorData) -> Dict[str, Any]:
    """``__cuda_array_interface__`` (version 3) of the strided view ``tensor_data`` over its device storage.

    Shape and strides (in bytes) are the view's; the pointer and stream come from the storage's own interface.
    In the simulator, whose arrays have no such interface, the pointer is that of the host array standing in for
    the device array.
    """
    storage = tensor_data._storage
    dtype = np.dtype(storage.dtype)
    own = getattr(storage, "__cuda_array_interface__", None)
    if own is not None:
        ptr, stream = own["data"][0], own.get("stream")
    else:  # simulator: FakeCUDAArray wraps a NumPy array
        ptr, stream = storage._ary.__array_interface__["data"][0], None
    return {
        "shape": tuple(int(s) for s in tensor_data.shape),
        "strides": tuple(int(s) * dtype.itemsize for s in tensor_data.strides),
        "typestr": dtype.str,
        "data": (ptr, False),
        "version": 3,
        "stream": stream,
    }


class CudaOps(TensorOps):
    """Tensor operations on CUDA device storage. Kernels are compiled once per scalar function and dtype."""

    cuda = True

    threads_per_block = THREADS_PER_BLOCK
    reduce_block = REDUCE_BLOCK
    reduce_min_block = REDUCE_MIN_BLOCK
    tile = TILE

    # -- storage hooks ------------------------------------------------------------------------------------------------

    @staticmethod
    def to_storage(array: np.ndarray) -> Any:
        """Copy a 1-D NumPy array to the device. A single value (``tensor + 2.0``'s constant) is filled on the device
        instead: a launch, not a blocking copy per op (the simulator, where launches are slow, copies)."""
        flat = np.ascontiguousarray(array).reshape(-1)
        if flat.size != 1 or SIMULATOR:
            return cuda.to_device(flat)
        out = cuda.device_array(1, dtype=flat.dtype)
        fill_kernel[1, 1](out, 1, flat[0])
        return out

    @staticmethod
    def zeros_storage(size: int, dtype: Any = np.float64) -> Any:
        """A zero-filled device array, filled on the device (nothing crosses the bus). The simulator, where a
        kernel launch costs far more than a host copy, copies host zeros instead."""
        dtype = np.dtype(dtype)
        if SIMULATOR:
            return cuda.to_device(np.zeros(size, dtype=dtype))
        out = cuda.device_array(size, dtype=dtype)
        if size > 0:
            threads = CudaOps.threads_per_block
            fill_kernel[_blocks(size, threads), threads](out, size, dtype.type(0.0))
        return out

    @staticmethod
    def storage_to_numpy(storage: Any) -> np.ndarray:
        """Copy a device storage back to a host NumPy array (same dtype)."""
        return storage.copy_to_host()

    # -- higher-order ops ---------------------------------------------------------------------------------------------

    @staticmethod
    def map(fn: Callable[[float], float]) -> Callable[..., "Tensor"]:
        """Element-wise ``fn`` with broadcasting into ``out`` (a's broadcast shape) when given."""

        def ret(a: "Tensor", out: Optional["Tensor"] = None) -> "Tensor":
            if out is None:
                out = _empty(a, a.shape)
            if out.size == 0:
                return out
            f = _kernel("map", fn)
            ta, to = a._tensor, out._tensor
            aligned = ta.shape == to.shape and ta.is_contiguous() and to.is_contiguous()
            threads = CudaOps.threads_per_block
            f[_blocks(to.size, threads), threads](
                to._storage, *_meta(to), to.size, ta._storage, *_meta(ta), aligned
            )
            return out

        return ret

    @staticmethod
    def zip(fn: Callable[[float, float], float]) -> Callable[["Tensor", "Tensor"], "Tensor"]:
        """Element-wise ``fn(a, b)`` with broadcasting."""

        def ret(a: "Tensor", b: "Tensor") -> "Tensor":
            ta, tb = a._tensor, b._tensor
            shape = ta.shape if ta.shape == tb.shape else shape_broadcast(ta.shape, tb.shape)
            out = _empty(a, shape)
            if out.size == 0:
                return out
            f = _kernel("zip", fn)
            to = out._tensor
            aligned = ta.shape == tb.shape == to.shape and ta.is_contiguous() and tb.is_contiguous()
            threads = CudaOps.threads_per_block
            f[_blocks(to.size, threads), threads](
                to._storage, *_meta(to), to.size, ta._storage, *_meta(ta), tb._storage, *_meta(tb), aligned
            )
            return out

        return ret

    @staticmethod
    def reduce(fn: Callable[[float, float], float], start: float = 0.0) -> Callable[["Tensor", int], "Tensor"]:
        """Reduce ``dim`` with ``fn`` from ``start``; the result keeps ``dim`` with size 1."""

        def ret(a: "Tensor", dim: int) -> "Tensor":
            ta = a._tensor
            if not -ta.dims <= dim < ta.dims:
                raise IndexError(f"reduce dim {dim} out of range for shape {ta.shape}")
            dim = dim % ta.dims
            shape = list(ta.shape)
            shape[dim] = 1
            out = _empty(a, tuple(shape))
            if out.size == 0:
                return out
            dtype = np.dtype(ta.dtype)
            f = _kernel("reduce", fn, CudaOps.reduce_block, dtype)
            to = out._tensor
            f[to.size, _reduce_threads(ta.shape[dim])](
                to._storage, *_meta(to), to.size, ta._storage, *_meta(ta), dim, dtype.type(start)
            )
            return out

        return ret

    @staticmethod
    def matrix_multiply(a: "Tensor", b: "Tensor") -> "Tensor":
        """Batched matmul ``(B|1, n, m) @ (B|1, m, p) -> (B, n, p)``; 2-D operands are treated as batch 1 (and two
        2-D operands give a 2-D result). Operands may be strided views (permuted, expanded)."""
        ta, tb = a._tensor, b._tensor
        both_2d = ta.dims == 2 and tb.dims == 2
        if ta.dims not in (2, 3) or tb.dims not in (2, 3):
            raise ValueError(f"CUDA matrix_multiply takes 2-D or 3-D tensors, got {ta.shape} @ {tb.shape}")
        a_shape, a_strides = _as_3d(ta)
        b_shape, b_strides = _as_3d(tb)
        if a_shape[2] != b_shape[1]:
            raise ValueError(f"matrix_multiply: inner dimensions differ: {ta.shape} @ {tb.shape}")
        (batch,) = shape_broadcast((a_shape[0],), (b_shape[0],))
        n, m, p = a_shape[1], a_shape[2], b_shape[2]
        out = _empty(a, (n, p) if both_2d else (batch, n, p))
        if out.size == 0:
            return out
        if m == 0:
            return a.zeros(out.shape)
        dtype = np.dtype(ta.dtype)
        tile = CudaOps.tile
        f = matmul_kernel(tile, dtype)
        a_s0 = a_strides[0] if a_shape[0] > 1 else 0
        b_s0 = b_strides[0] if b_shape[0] > 1 else 0
        grid = (_blocks(p, tile), _blocks(n, tile), batch)
        f[grid, (tile, tile)](
            out._tensor._storage,
            ta._storage,
            tb._storage,
            n,
            m,
            p,
            a_s0,
            a_strides[1],
            a_strides[2],
            b_s0,
            b_strides[1],
            b_strides[2],
        )
        return out


def _as_3d(td: TensorData) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """Shape and strides of ``td`` seen as 3-D (a 2-D tensor gets a batch of 1)."""
    shape = tuple(int(s) for s in td.shape)
    strides = tuple(int(s) for s in td.strides)
    if len(shape) == 2:
        return (1,) + shape, (0,) + strides  # type: ignore
    return shape, strides  # type: ignore


CudaBackend = TensorBackend(CudaOps)
