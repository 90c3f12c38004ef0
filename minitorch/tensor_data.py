"""Storage, shape, strides, indexing and broadcasting (MiniTorch module 2).

A tensor is a flat 1-D *storage* plus a *shape* and *strides* that say where each multi-dimensional index lives:
``position = sum(index[i] * strides[i])``. Permuting dims only permutes shape and strides; no data moves.

The three index helpers (`index_to_position`, `to_index`, `broadcast_index`) are written with plain loops over
arrays so that ``numba.njit(inline="always")`` and ``numba.cuda.jit(device=True)`` compile them unchanged. They only
look at the first ``len(shape)`` / ``len(strides)`` entries of the index arrays, so kernels may pass fixed-size
scratch arrays (``MAX_DIMS`` long).
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Optional, Sequence, Tuple, TypeAlias, Union

import numpy as np
import numpy.typing as npt

MAX_DIMS = 32


class IndexingError(RuntimeError, ValueError):
    """Raised for bad indices, bad permutations and shapes that do not broadcast.

    It is also a `ValueError`, so callers that think of a shape mismatch as a bad value can catch that.
    """


Storage: TypeAlias = Any  # numpy.ndarray (float64/float32) or a 1-D numba CUDA device array
OutIndex: TypeAlias = npt.NDArray[np.int32]
Index: TypeAlias = npt.NDArray[np.int32]
Shape: TypeAlias = npt.NDArray[np.int32]
Strides: TypeAlias = npt.NDArray[np.int32]

UserIndex: TypeAlias = Sequence[int]
UserShape: TypeAlias = Sequence[int]
UserStrides: TypeAlias = Sequence[int]

FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))


def prod(values: Iterable[int]) -> int:
    """Product of a sequence of ints (1 for an empty sequence)."""
    out = 1
    for v in values:
        out *= int(v)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Index helpers (Numba-compilable: no Python objects, only loops over arrays).
# ---------------------------------------------------------------------------------------------------------------


def index_to_position(index: Index, strides: Strides) -> int:
    """Storage position of a multi-dimensional index.

    Args:
        index: index array (at least ``len(strides)`` long).
        strides: the tensor's strides.

    Returns:
        ``sum(index[i] * strides[i])``.
    """
    # BEGIN SOLUTION task2_1: the storage position sum(index[i] * strides[i]) over the dims of strides
    position = 0
    for i in range(len(strides)):
        position += index[i] * strides[i]
    return position
    # END SOLUTION


def to_index(ordinal: int, shape: Shape, out_index: OutIndex) -> None:
    """Turn an ordinal ``0 <= ordinal < prod(shape)`` into the index of that element in row-major order.

    Writes the result into the first ``len(shape)`` entries of `out_index`.
    """
    # BEGIN SOLUTION task2_1: write the row-major index of ordinal into out_index (last dim fastest)
    cur = ordinal
    for i in range(len(shape) - 1, -1, -1):
        size = shape[i]
        out_index[i] = cur % size
        cur = cur // size
    # END SOLUTION


def broadcast_index(big_index: Index, big_shape: Shape, shape: Shape, out_index: OutIndex) -> None:
    """Map an index of the broadcast (bigger) shape to the index of a smaller shape that broadcasts to it.

    Dims of size 1 in `shape` always read index 0; missing leading dims are dropped. Writes the first
    ``len(shape)`` entries of `out_index`.
    """
    # BEGIN SOLUTION task2_2: index of the smaller shape: size-1 dims read 0, missing leading dims are dropped
    offset = len(big_shape) - len(shape)
    for i in range(len(shape)):
        if shape[i] > 1:
            out_index[i] = big_index[i + offset]
        else:
            out_index[i] = 0
    # END SOLUTION


# ---------------------------------------------------------------------------------------------------------------
# Plain Python helpers.
# ---------------------------------------------------------------------------------------------------------------


def shape_broadcast(shape1: UserShape, shape2: UserShape) -> UserShape:
    """Broadcast two shapes NumPy-style (right-aligned; a dim of size 1 stretches).

    Raises:
        IndexingError: naming both shapes when they do not broadcast.
    """
    # BEGIN SOLUTION task2_2: the NumPy broadcast of two shapes (right-aligned, size 1 stretches) or IndexingError
    s1, s2 = tuple(int(s) for s in shape1), tuple(int(s) for s in shape2)
    n = max(len(s1), len(s2))
    p1 = (1,) * (n - len(s1)) + s1
    p2 = (1,) * (n - len(s2)) + s2
    out = []
    for a, b in zip(p1, p2):
        if a == b or b == 1:
            out.append(a)
        elif a == 1:
            out.append(b)
        else:
            raise IndexingError(f"Cannot broadcast shapes {s1} and {s2}.")
    return tuple(out)
    # END SOLUTION


def strides_from_shape(shape: UserShape) -> UserStrides:
    """Row-major (contiguous) strides for `shape`, e.g. ``(2, 3, 4) -> (12, 4, 1)``."""
    # BEGIN SOLUTION task2_1: row-major strides: the last dim has stride 1, each earlier one the product after it
    strides = []
    step = 1
    for s in reversed(tuple(shape)):
        strides.append(step)
        step *= int(s)
    strides.reverse()
    return tuple(strides)
    # END SOLUTION


def is_cuda_storage(storage: Any) -> bool:
    """True for a numba CUDA device array (real or simulator), without importing numba.cuda."""
    if isinstance(storage, np.ndarray):
        return False
    return hasattr(storage, "copy_to_host") or hasattr(storage, "__cuda_array_interface__")


def _float_dtype(dtype: Any) -> np.dtype:
    """float32 stays float32; every other dtype becomes float64."""
    d = np.dtype(dtype) if dtype is not None else np.dtype(np.float64)
    return d if d in FLOAT_DTYPES else np.dtype(np.float64)


def to_host_storage(storage: Any, dtype: Optional[Any]) -> np.ndarray:
    """A 1-D NumPy float storage (float64, or float32 when given/kept) from a list, tuple or array; no copy when
    the array already is one."""
    if isinstance(storage, np.ndarray):
        target = _float_dtype(dtype if dtype is not None else storage.dtype)
        arr = storage if storage.ndim == 1 else storage.reshape(-1)
        return arr if arr.dtype == target else arr.astype(target)
    target = _float_dtype(dtype)
    return np.asarray(storage, dtype=target).reshape(-1)


_LAYOUTS: dict = {}
LAYOUT_CACHE_SIZE = 4096


def _layout(shape: UserShape, strides: Optional[UserStrides]) -> Tuple[Any, ...]:
    """Validated ``(shape, strides, _shape, _strides, size, needed)`` of a layout (``needed``: the storage length it
    reads). Tensors of a program have few distinct layouts, so they are remembered (the int32 arrays are shared and
    never written): making a tensor must cost little next to a small op."""
    try:
        key = (tuple(shape), None if strides is None else tuple(strides))
        hit = _LAYOUTS.get(key)
    except TypeError:  # unhashable entries: validated (and refused) below
        key, hit = None, None
    if hit is not None:
        return hit
    shape = tuple(map(int, shape))
    strides = strides_from_shape(shape) if strides is None else tuple(map(int, strides))
    if len(strides) != len(shape):
        raise IndexingError(f"Strides {strides} do not match shape {shape}.")
    if shape and (min(shape) < 0 or min(strides) < 0):
        raise IndexingError(f"Negative entry in shape {shape} or strides {strides}.")
    size = prod(shape)
    needed = 0
    if size > 0:
        needed = 1 + sum((d - 1) * st for d, st in zip(shape, strides))
    layout = (shape, strides, np.array(shape, dtype=np.int32), np.array(strides, dtype=np.int32), size, needed)
    if key is not None:
        if len(_LAYOUTS) >= LAYOUT_CACHE_SIZE:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    return layout


class TensorData:
    """Storage + shape + strides of a tensor.

    Attributes:
        _storage: 1-D storage (NumPy array or CUDA device array).
        _shape, _strides: int32 arrays of length ``dims``.
        shape, strides: the same as tuples of ints.
        size: number of elements, ``prod(shape)``.
        dims: number of dimensions.
        dtype: ``numpy.float64`` or ``numpy.float32``.
        is_cuda: whether the storage is a device array.
    """

    _storage: Storage
    _strides: Strides
    _shape: Shape
    strides: UserStrides
    shape: UserShape
    dims: int
    size: int

    def __init__(
        self,
        storage: Union[Sequence[float], Storage],
        shape: UserShape,
        strides: Optional[UserStrides] = None,
        dtype: Optional[Any] = None,
    ):
        shape, strides, self._shape, self._strides, self.size, needed = _layout(shape, strides)
        self.is_cuda = is_cuda_storage(storage)
        if self.is_cuda:
            self.dtype = np.dtype(storage.dtype)
            if dtype is not None and np.dtype(dtype) != self.dtype:
                raise TypeError(f"Device storage has dtype {self.dtype}, asked for {np.dtype(dtype)}.")
            if self.dtype not in FLOAT_DTYPES:
                raise TypeError(f"Storage dtype must be float32 or float64, got {self.dtype}.")
            self._storage = storage
        elif dtype is None and type(storage) is np.ndarray and storage.ndim == 1 and storage.dtype in FLOAT_DTYPES:
            self._storage = storage  # (the common case, a float storage as it is)
            self.dtype = storage.dtype
        else:
            self._storage = to_host_storage(storage, dtype)
            self.dtype = self._storage.dtype

        self.shape = shape
        self.strides = strides
        self.dims = len(shape)
        if len(self._storage) < needed:
            raise IndexingError(
                f"Storage of length {len(self._storage)} is too small for shape {shape} with strides {strides}."
            )
        self._device_meta: Optional[Tuple[Any, Any]] = None

    # ------------------------------------------------------------------ device helpers
    def to_cuda_(self) -> None:  # pragma: no cover - course compatibility
        """Move the storage to the GPU in place (course name)."""
        if not self.is_cuda:
            from numba import cuda

            self._storage = cuda.to_device(self._storage)
            self.is_cuda = True
            self._device_meta = None

    def device_meta(self) -> Tuple[Any, Any]:
        """``(shape, strides)`` as int32 device arrays, copied once and cached (CUDA storage only)."""
        if self._device_meta is None:
            from numba import cuda

            self._device_meta = (cuda.to_device(self._shape), cuda.to_device(self._strides))
        return self._device_meta

    # ------------------------------------------------------------------ layout
    def is_contiguous(self) -> bool:
        """True when the strides are the row-major strides of the shape (dims of size 1 are ignored)."""
        expected = 1
        for d, st in zip(reversed(self.shape), reversed(self.strides)):
            if d != 1 and st != expected:
                return False
            expected *= d
        return True

    @staticmethod
    def shape_broadcast(shape_a: UserShape, shape_b: UserShape) -> UserShape:
        """Same as the module-level `shape_broadcast`."""
        return shape_broadcast(shape_a, shape_b)

    def permute(self, *order: int) -> "TensorData":
        """A view with dims reordered: new dim ``i`` is old dim ``order[i]``.

        Raises:
            IndexingError: when `order` is not a permutation of ``range(dims)``.
        """
        # BEGIN SOLUTION task2_1: check order is a permutation of the dims, then reorder shape and strides (no copy)
        if len(order) == 1 and isinstance(order[0], (tuple, list)):
            order = tuple(order[0])
        order = tuple(int(o) for o in order)
        if sorted(order) != list(range(self.dims)):
            raise IndexingError(f"Order {order} is not a permutation of the {self.dims} dims of shape {self.shape}.")
        return TensorData(
            self._storage,
            tuple(self.shape[o] for o in order),
            tuple(self.strides[o] for o in order),
        )
        # END SOLUTION

    # ------------------------------------------------------------------ element access
    def index(self, index: Union[int, UserIndex, Index]) -> int:
        """Storage position of a full index.

        Raises:
            IndexingError: wrong number of indices, an index out of range, or a negative index.
        """
        if isinstance(index, (int, np.integer)):
            index = (int(index),)
        idx = tuple(int(i) for i in index)
        if len(idx) != self.dims:
            raise IndexingError(f"Index {idx} must have {self.dims} entries for shape {self.shape}.")
        for i, (v, d) in enumerate(zip(idx, self.shape)):
            if v < 0:
                raise IndexingError(f"Negative index {v} in dim {i} of index {idx} (shape {self.shape}).")
            if v >= d:
                raise IndexingError(f"Index {idx} out of range for shape {self.shape} (dim {i}).")
        return int(sum(v * st for v, st in zip(idx, self.strides)))

    def indices(self) -> Iterable[UserIndex]:
        """Every index of the shape, in row-major order, as tuples."""
        shape = self._shape
        out_index = np.zeros(self.dims, dtype=np.int32)
        for i in range(self.size):
            to_index(i, shape, out_index)
            yield tuple(int(v) for v in out_index)

    def sample(self) -> UserIndex:
        """A random valid index."""
        return tuple(random.randint(0, s - 1) for s in self.shape)

    def get(self, key: Union[int, UserIndex]) -> float:
        """Value at a full index."""
        return float(self._storage[self.index(key)])

    def set(self, key: Union[int, UserIndex], val: float) -> None:
        """Write a value at a full index."""
        self._storage[self.index(key)] = val

    def tuple(self) -> Tuple[Storage, Shape, Strides]:
        """``(storage, _shape, _strides)``, the arguments kernels take."""
        return (self._storage, self._shape, self._strides)

    def to_string(self) -> str:
        """Nested-bracket text of the values (copies from the device first for CUDA storage)."""
        storage = self._storage.copy_to_host() if self.is_cuda else self._storage
        s = ""
        for index in self.indices():
            line = ""
            for i in range(len(index) - 1, -1, -1):
                if index[i] == 0:
                    line = "\n" + "\t" * i + "[" + line
                else:
                    break
            s += line
            pos = sum(v * st for v, st in zip(index, self.strides))
            s += f"{float(storage[pos]):3.2f}"
            closing = ""
            for i in range(len(index) - 1, -1, -1):
                if index[i] == self.shape[i] - 1:
                    closing += "]"
                else:
                    break
            if closing:
                s += closing
            else:
                s += " "
        return s
