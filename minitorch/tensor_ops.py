"""Tensor backends: the higher-order ops every backend provides, and the pure-Python `SimpleOps` (MiniTorch module 2).

A backend is a `TensorOps` subclass with four factories: `map`, `zip`, `reduce` (which turn a scalar function from
`operators.py` into a tensor function) and `matrix_multiply`, plus small storage hooks. `TensorBackend(ops)` builds
every concrete tensor function the `Function` classes need (``add_zip``, ``relu_back_zip``, ...) once, and checks
shapes in one place so that every backend reports bad shapes the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Type

import numpy as np

from . import operators
from .tensor_data import (
    MAX_DIMS,
    IndexingError,
    prod,
    Shape,
    Storage,
    Strides,
    broadcast_index,
    index_to_position,
    shape_broadcast,
    to_index,
)

if TYPE_CHECKING:
    from .tensor import Tensor


class MapProto(Protocol):
    def __call__(self, x: "Tensor", out: Optional["Tensor"] = ..., /) -> "Tensor":
        """Apply a unary function elementwise; `out`, when given, has x's broadcast shape."""
        ...


class TensorOps:
    """Interface of a backend. Subclasses override the factories; the storage hooks default to NumPy."""

    cuda: bool = False
    attention: Any = None
    """The backend's attention engine (raw-array flash attention), installed by :mod:`minitorch.attention`; the
    core never imports attention."""

    @staticmethod
    def map(fn: Callable[[float], float]) -> MapProto:
        """Elementwise unary function factory."""
        raise NotImplementedError

    @staticmethod
    def zip(fn: Callable[[float, float], float]) -> Callable[["Tensor", "Tensor"], "Tensor"]:
        """Elementwise binary (broadcasting) function factory."""
        raise NotImplementedError

    @staticmethod
    def reduce(
        fn: Callable[[float, float], float], start: float = 0.0
    ) -> Callable[["Tensor", int], "Tensor"]:
        """Reduction factory: the result keeps the reduced dim with size 1."""
        raise NotImplementedError

    @staticmethod
    def matrix_multiply(a: "Tensor", b: "Tensor") -> "Tensor":
        """Batched matrix multiply ``(B|1, n, m) @ (B|1, m, p) -> (B, n, p)``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- storage hooks
    @staticmethod
    def to_storage(array: np.ndarray) -> Storage:
        """Turn a 1-D NumPy array into this backend's storage (NumPy here)."""
        return np.ascontiguousarray(array).reshape(-1)

    @staticmethod
    def zeros_storage(size: int, dtype: Any) -> Storage:
        """A zero-filled storage of `size` elements."""
        return np.zeros(int(size), dtype=dtype)

    @staticmethod
    def storage_to_numpy(storage: Storage) -> np.ndarray:
        """The storage as a 1-D NumPy array (a copy from the device for CUDA backends)."""
        return np.asarray(storage)


def _check_matmul_shapes(a_shape: tuple, b_shape: tuple) -> None:
    """Raise `ValueError` naming both shapes unless ``a @ b`` is a valid (batched) matrix product."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError(f"matmul needs at least 2-D tensors, got shapes {a_shape} and {b_shape}.")
    if a_shape[-1] != b_shape[-2]:
        raise ValueError(
            f"matmul inner dimensions do not match: shapes {a_shape} and {b_shape} "
            f"({a_shape[-1]} != {b_shape[-2]})."
        )
    try:
        shape_broadcast(a_shape[:-2], b_shape[:-2])
    except IndexingError:
        raise ValueError(
            f"matmul batch dimensions do not broadcast: shapes {a_shape} and {b_shape}."
        ) from None


class TensorBackend:
    """All the tensor functions of one backend, built from its `TensorOps` class.

    Attributes:
        ops: the `TensorOps` subclass.
        cuda: whether storages live on the GPU.
        name: the ops class name (used in error messages).
    """

    @property
    def attention(self) -> Any:
        """The attention engine of this backend's ops (``ops.attention``; None until :mod:`minitorch.attention`
        is imported, which ``import minitorch`` does)."""
        return self.ops.attention

    def __init__(self, ops: Type[TensorOps]):
        self.ops = ops
        self.cuda = bool(getattr(ops, "cuda", False))
        self.name = ops.__name__

        # Maps
        self.neg_map = ops.map(operators.neg)
        self.sigmoid_map = ops.map(operators.sigmoid)
        self.relu_map = ops.map(operators.relu)
        self.log_map = ops.map(operators.log)
        self.exp_map = ops.map(operators.exp)
        self.id_map = ops.map(operators.id)
        self.inv_map = ops.map(operators.inv)

        # Zips (shape-checked here, so every backend raises the same error)
        self.add_zip = self._checked_zip(ops.zip(operators.add))
        self.mul_zip = self._checked_zip(ops.zip(operators.mul))
        self.lt_zip = self._checked_zip(ops.zip(operators.lt))
        self.eq_zip = self._checked_zip(ops.zip(operators.eq))
        self.is_close_zip = self._checked_zip(ops.zip(operators.is_close))
        self.relu_back_zip = self._checked_zip(ops.zip(operators.relu_back))
        self.log_back_zip = self._checked_zip(ops.zip(operators.log_back))
        self.inv_back_zip = self._checked_zip(ops.zip(operators.inv_back))

        # Reductions
        self.add_reduce = ops.reduce(operators.add, 0.0)
        self.mul_reduce = ops.reduce(operators.mul, 1.0)
        self.max_reduce = ops.reduce(operators.max, float("-inf"))

        self._matrix_multiply = ops.matrix_multiply

    @staticmethod
    def _checked_zip(
        fn: Callable[["Tensor", "Tensor"], "Tensor"]
    ) -> Callable[["Tensor", "Tensor"], "Tensor"]:
        def checked(a: "Tensor", b: "Tensor") -> "Tensor":
            if a.shape != b.shape:
                shape_broadcast(a.shape, b.shape)  # raises IndexingError naming both shapes
            return fn(a, b)

        checked.__doc__ = fn.__doc__
        return checked

    def matrix_multiply(self, a: "Tensor", b: "Tensor") -> "Tensor":
        """3-D batched matmul ``(B|1, n, m) @ (B|1, m, p) -> (B, n, p)`` with shape checks."""
        if a.dims != 3 or b.dims != 3:
            raise ValueError(
                f"backend matrix_multiply takes 3-D tensors, got shapes {a.shape} and {b.shape} "
                "(use the @ operator for 2-D and N-D tensors)."
            )
        _check_matmul_shapes(a.shape, b.shape)
        return self._matrix_multiply(a, b)

    def __repr__(self) -> str:
        return f"TensorBackend({self.name})"


# ---------------------------------------------------------------------------------------------------------------------
# SimpleOps: readable pure-Python loops over the index helpers.
# ---------------------------------------------------------------------------------------------------------------------


class SimpleOps(TensorOps):
    """Reference backend: one Python loop iteration per output element. Slow but obviously right."""

    cuda = False

    @staticmethod
    def map(fn: Callable[[float], float]) -> MapProto:
        """Elementwise `fn`; with ``out`` given, `a` is broadcast to out's shape.

        Args:
            fn: scalar function of one float.

        Returns:
            ``(a: Tensor[shape], out: Tensor[broadcast shape] | None) -> Tensor``.
        """
        f = tensor_map(fn)

        def ret(a: "Tensor", out: Optional["Tensor"] = None) -> "Tensor":
            if out is None:
                out = a.zeros(a.shape)
            f(*out.tuple(), *a.tuple())
            return out

        return ret

    @staticmethod
    def zip(fn: Callable[[float, float], float]) -> Callable[["Tensor", "Tensor"], "Tensor"]:
        """Elementwise `fn` of two tensors broadcast to a common shape."""
        f = tensor_zip(fn)

        def ret(a: "Tensor", b: "Tensor") -> "Tensor":
            shape = a.shape if a.shape == b.shape else shape_broadcast(a.shape, b.shape)
            out = a.zeros(shape)
            f(*out.tuple(), *a.tuple(), *b.tuple())
            return out

        return ret

    @staticmethod
    def reduce(
        fn: Callable[[float, float], float], start: float = 0.0
    ) -> Callable[["Tensor", int], "Tensor"]:
        """Reduce dim `dim` with `fn` starting from `start`; the result has size 1 in that dim."""
        f = tensor_reduce(fn)

        def ret(a: "Tensor", dim: int) -> "Tensor":
            out_shape = list(a.shape)
            out_shape[dim] = 1
            out = a.zeros(tuple(out_shape))
            out._tensor._storage[:] = start
            f(*out.tuple(), *a.tuple(), dim)
            return out

        return ret

    @staticmethod
    def matrix_multiply(a: "Tensor", b: "Tensor") -> "Tensor":
        """``(Ba, n, m) @ (Bb, m, p) -> (max(Ba, Bb), n, p)`` where a batch size of 1 broadcasts."""
        batch = max(a.shape[0], b.shape[0])
        out = a.zeros((batch, a.shape[1], b.shape[2]))
        _simple_matmul(*out.tuple(), *a.tuple(), *b.tuple())
        return out


def tensor_map(fn: Callable[[float], float]) -> Callable[..., None]:
    """Low-level map: ``out[i] = fn(in[broadcast(i)])`` over every index of the output shape."""

    def _map(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        in_storage: Storage,
        in_shape: Shape,
        in_strides: Strides,
    ) -> None:
        # BEGIN SOLUTION task2_3: for every output ordinal: its index, the broadcast input index, out[o] = fn(in[j])
        # Python lists instead of int32 arrays: same index helpers, much faster element access in pure Python.
        out_shape_l, out_strides_l = out_shape.tolist(), out_strides.tolist()
        in_shape_l, in_strides_l = in_shape.tolist(), in_strides.tolist()
        out_index = [0] * MAX_DIMS
        in_index = [0] * MAX_DIMS
        for i in range(prod(out_shape_l)):
            to_index(i, out_shape_l, out_index)
            broadcast_index(out_index, out_shape_l, in_shape_l, in_index)
            o = index_to_position(out_index, out_strides_l)
            j = index_to_position(in_index, in_strides_l)
            out[o] = fn(in_storage[j])
        # END SOLUTION

    return _map


def tensor_zip(fn: Callable[[float, float], float]) -> Callable[..., None]:
    """Low-level zip: ``out[i] = fn(a[broadcast(i)], b[broadcast(i)])``."""

    def _zip(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        a_storage: Storage,
        a_shape: Shape,
        a_strides: Strides,
        b_storage: Storage,
        b_shape: Shape,
        b_strides: Strides,
    ) -> None:
        # BEGIN SOLUTION task2_3: for every output ordinal: broadcast a and b indices, out[o] = fn(a[j], b[k])
        out_shape_l, out_strides_l = out_shape.tolist(), out_strides.tolist()
        a_shape_l, a_strides_l = a_shape.tolist(), a_strides.tolist()
        b_shape_l, b_strides_l = b_shape.tolist(), b_strides.tolist()
        out_index = [0] * MAX_DIMS
        a_index = [0] * MAX_DIMS
        b_index = [0] * MAX_DIMS
        for i in range(prod(out_shape_l)):
            to_index(i, out_shape_l, out_index)
            broadcast_index(out_index, out_shape_l, a_shape_l, a_index)
            broadcast_index(out_index, out_shape_l, b_shape_l, b_index)
            o = index_to_position(out_index, out_strides_l)
            j = index_to_position(a_index, a_strides_l)
            k = index_to_position(b_index, b_strides_l)
            out[o] = fn(a_storage[j], b_storage[k])
        # END SOLUTION

    return _zip


def tensor_reduce(fn: Callable[[float, float], float]) -> Callable[..., None]:
    """Low-level reduce: ``out[i] = fn(...fn(out[i], a[i with dim=0]) ..., a[i with dim=n-1])``."""

    def _reduce(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        a_storage: Storage,
        a_shape: Shape,
        a_strides: Strides,
        reduce_dim: int,
    ) -> None:
        # BEGIN SOLUTION task2_3: for every output element: fold fn over the reduced dim, starting from out[o]
        out_shape_l, out_strides_l, a_strides_l = out_shape.tolist(), out_strides.tolist(), a_strides.tolist()
        out_index = [0] * MAX_DIMS
        n = int(a_shape[reduce_dim])
        for i in range(prod(out_shape_l)):
            to_index(i, out_shape_l, out_index)
            o = index_to_position(out_index, out_strides_l)
            acc = out[o]
            for s in range(n):
                out_index[reduce_dim] = s
                acc = fn(acc, a_storage[index_to_position(out_index, a_strides_l)])
            out[o] = acc
        # END SOLUTION

    return _reduce


def _simple_matmul(
    out: Storage,
    out_shape: Shape,
    out_strides: Strides,
    a_storage: Storage,
    a_shape: Shape,
    a_strides: Strides,
    b_storage: Storage,
    b_shape: Shape,
    b_strides: Strides,
) -> None:
    """Triple loop matmul of 3-D strided operands; a batch dim of size 1 is read with stride 0."""
    # BEGIN SOLUTION task2_3: out[n, i, j] = sum_k a[n, i, k] * b[n, k, j] (a batch dim of size 1 broadcasts)
    a_strides, b_strides, out_strides = a_strides.tolist(), b_strides.tolist(), out_strides.tolist()
    a_batch = a_strides[0] if a_shape[0] > 1 else 0
    b_batch = b_strides[0] if b_shape[0] > 1 else 0
    inner = int(a_shape[2])
    for n in range(int(out_shape[0])):
        for i in range(int(out_shape[1])):
            for j in range(int(out_shape[2])):
                a_pos = n * a_batch + i * a_strides[1]
                b_pos = n * b_batch + j * b_strides[2]
                acc = 0.0
                for k in range(inner):
                    acc += a_storage[a_pos] * b_storage[b_pos]
                    a_pos += a_strides[2]
                    b_pos += b_strides[1]
                out[n * out_strides[0] + i * out_strides[1] + j * out_strides[2]] = acc
    # END SOLUTION


SimpleBackend = TensorBackend(SimpleOps)
