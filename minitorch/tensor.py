"""The `Tensor` class: a `TensorData` plus a backend and an autodiff history (MiniTorch module 2).

Operators on tensors call `Function` classes from `tensor_functions.py`, which record a `History` when an input
needs a gradient; `backward` walks that graph with `autodiff.backpropagate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, List, Optional, Sequence, Tuple, Type, Union

import numpy as np

from .autodiff import Context, backpropagate
from .tensor_data import IndexingError, TensorData, is_cuda_storage, prod, shape_broadcast, to_host_storage
from .tensor_ops import SimpleBackend, TensorBackend

if TYPE_CHECKING:
    from .tensor_data import Shape, Storage, Strides, UserIndex, UserShape, UserStrides
    from .tensor_functions import Function

    TensorLike = Union[float, int, "Tensor", np.ndarray]


@dataclass
class History:
    """How a tensor was made: the `Function`, its `Context` and its tensor inputs.

    A leaf that wants a gradient has a `History` with no `last_fn`; a constant has no history at all.
    `positions` says which positional arguments of `forward` the `inputs` were (non-tensor arguments such as a dim
    are passed through and get no gradient).
    """

    last_fn: Optional[Type["Function"]] = None
    ctx: Optional[Context] = None
    inputs: Sequence["Tensor"] = ()
    positions: Sequence[int] = ()
    n_args: int = 0


_tensor_count = 0


class Tensor:
    """A multi-dimensional array of floats (float64 or float32) with reverse-mode autodiff.

    Args:
        v: the `TensorData` (storage, shape, strides); a host one given with a CUDA backend is copied to the device.
        back: the `History`, or None for a constant.
        name: a name for debugging / graph drawing.
        backend: the `TensorBackend` that runs its operations.
    """

    backend: TensorBackend
    history: Optional[History]
    grad: Optional["Tensor"]
    _tensor: TensorData
    unique_id: int
    name: str

    # Let NumPy defer to Tensor's reflected operators (``array * tensor`` -> ``tensor.__rmul__(array)``).
    __array_ufunc__ = None

    def __init__(
        self,
        v: TensorData,
        back: Optional[History] = None,
        name: Optional[str] = None,
        backend: Optional[TensorBackend] = None,
    ):
        global _tensor_count
        _tensor_count += 1
        self.unique_id = _tensor_count
        if not isinstance(v, TensorData):
            raise TypeError(f"Tensor needs a TensorData, got {type(v).__name__}.")
        if backend is None:
            backend = SimpleBackend
        if backend.cuda and not v.is_cuda:
            # A host TensorData for a CUDA tensor (course code builds tensors this way): copy its storage to the
            # device once, here, with the same shape and strides; the given TensorData stays on the host.
            v = TensorData(backend.ops.to_storage(v._storage), v.shape, v.strides)
        elif v.is_cuda and not backend.cuda:
            raise ValueError(
                f"device storage does not match the host backend {backend.name}; "
                "copy the tensor to it with .to(backend)."
            )
        self._tensor = v
        self.history = back
        self.backend = backend
        self.grad = None
        self.name = name if name is not None else str(self.unique_id)

    # ------------------------------------------------------------------ basic properties
    @property
    def f(self) -> TensorBackend:
        """The backend (course name)."""
        return self.backend

    @property
    def shape(self) -> "UserShape":
        """Shape as a tuple of ints."""
        return self._tensor.shape

    @property
    def size(self) -> int:
        """Number of elements."""
        return self._tensor.size

    @property
    def dims(self) -> int:
        """Number of dimensions."""
        return self._tensor.dims

    @property
    def dtype(self) -> np.dtype:
        """``numpy.float64`` or ``numpy.float32``."""
        return self._tensor.dtype

    @property
    def is_cuda(self) -> bool:
        """Whether the storage lives on the GPU."""
        return self._tensor.is_cuda

    def tuple(self) -> Tuple["Storage", "Shape", "Strides"]:
        """``(storage, _shape, _strides)`` for kernels."""
        return self._tensor.tuple()

    def requires_grad_(self, x: bool = True) -> "Tensor":
        """Mark as a leaf that accumulates a gradient (or, with False, make it a constant). Returns self."""
        self.history = History() if x else None
        return self

    def requires_grad(self) -> bool:
        """True when the tensor has a history (it or something it depends on wants a gradient)."""
        return self.history is not None

    def detach(self) -> "Tensor":
        """The same data without history."""
        return Tensor(self._tensor, backend=self.backend)

    # ------------------------------------------------------------------ conversions
    def to_numpy(self) -> np.ndarray:
        """A NumPy copy of shape `shape` and dtype `dtype` (copied from the device for CUDA)."""
        td = self._tensor
        storage = self.backend.ops.storage_to_numpy(td._storage) if td.is_cuda else np.asarray(td._storage)
        if td.size == 0:
            return np.zeros(td.shape, dtype=td.dtype)
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage, shape=td.shape, strides=tuple(s * itemsize for s in td.strides), writeable=False
        )
        return np.array(view, dtype=td.dtype, copy=True)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.to_numpy()
        return arr if dtype is None else arr.astype(dtype)

    def to(self, backend: TensorBackend) -> "Tensor":
        """A new leaf tensor with the same values and dtype on `backend` (keeps `requires_grad`)."""
        out = _tf.from_numpy(self.to_numpy(), backend=backend)
        if self.requires_grad():
            out.requires_grad_(True)
        return out

    def item(self) -> float:
        """The value of a one-element tensor as a Python float."""
        if self.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}.")
        return self._tensor.get((0,) * self.dims)

    def contiguous(self) -> "Tensor":
        """A row-major copy (differentiable)."""
        return _tf.Copy.apply(self)

    def __repr__(self) -> str:
        return self._tensor.to_string()

    def __getitem__(self, key: Union[int, "UserIndex"]) -> float:
        key2 = (key,) if isinstance(key, (int, np.integer)) else key
        return self._tensor.get(key2)

    def __setitem__(self, key: Union[int, "UserIndex"], val: float) -> None:
        key2 = (key,) if isinstance(key, (int, np.integer)) else key
        self._tensor.set(key2, val)

    # Every Tensor is its own object: hash by identity even though == is elementwise.
    __hash__ = object.__hash__

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def make(
        storage: Union["Storage", List[float]],
        shape: "UserShape",
        strides: Optional["UserStrides"] = None,
        backend: Optional[TensorBackend] = None,
        dtype: Any = None,
    ) -> "Tensor":
        """Make a constant tensor from a storage (list, NumPy array or device array) on `backend`."""
        if backend is None:
            backend = SimpleBackend
        if backend.cuda and not is_cuda_storage(storage):
            storage = backend.ops.to_storage(to_host_storage(storage, dtype))
        elif not backend.cuda and is_cuda_storage(storage):
            storage = storage.copy_to_host()
        return Tensor(TensorData(storage, shape, strides, dtype=dtype), backend=backend)

    def _new(self, tensor_data: TensorData) -> "Tensor":
        """A constant tensor on the same backend around `tensor_data`."""
        return Tensor(tensor_data, backend=self.backend)

    def zeros(self, shape: Optional["UserShape"] = None) -> "Tensor":
        """Zeros of `shape` (default: own shape) with the same dtype and backend."""
        if shape is None:
            shape, size = self.shape, self.size
        else:
            shape = tuple(map(int, shape))
            size = prod(shape)
        storage = self.backend.ops.zeros_storage(size, self.dtype)
        return Tensor(TensorData(storage, shape), backend=self.backend)

    def _ensure_tensor(self, b: "TensorLike") -> "Tensor":
        """Turn a number or NumPy array into a constant tensor of the same dtype and backend."""
        if isinstance(b, Tensor):
            return b
        if isinstance(b, (int, float, np.number, bool)):
            return Tensor.make(np.array([b], dtype=self.dtype), (1,), backend=self.backend)
        if isinstance(b, np.ndarray):
            return _tf.from_numpy(np.asarray(b, dtype=self.dtype), backend=self.backend)
        raise TypeError(f"Cannot combine a Tensor with {type(b).__name__}.")

    def expand(self, other: "Tensor") -> "Tensor":
        """Bring a gradient `other` to this tensor's shape.

        `other` may have a broadcast shape of ``self.shape`` (an op broadcast this tensor): the broadcast dims are
        summed away. It may also be smaller (e.g. the ``(1,)`` gradient of ``sum()``): it is broadcast up.
        """
        if self.shape == other.shape:
            return other
        true_shape = shape_broadcast(self.shape, other.shape)
        if other.shape == true_shape:
            buf = other
        else:  # broadcast `other` up (e.g. a reduction's size-1 dims)
            buf = self.zeros(true_shape)
            self.backend.id_map(other, buf)
            if self.shape == true_shape:
                return buf
        out = buf
        padded = [1] * (len(true_shape) - len(self.shape)) + list(self.shape)
        for dim, size in enumerate(true_shape):
            if padded[dim] == 1 and size != 1:
                out = self.backend.add_reduce(out, dim)
        assert out.size == self.size, f"{out.shape} {self.shape}"
        if not out._tensor.is_contiguous():
            out = self.backend.id_map(out)
        return Tensor.make(out._tensor._storage, self.shape, backend=self.backend)

    # ------------------------------------------------------------------ autodiff (Variable protocol)
    def accumulate_derivative(self, x: "Tensor") -> None:
        """Add `x` (same shape) to `grad`; only for leaves."""
        assert self.is_leaf(), "Only leaf variables can have derivatives."
        if self.grad is None:
            g = self.expand(x)
            # Own the storage: the same derivative tensor may reach several leaves (e.g. both inputs of an Add).
            self.grad = self.backend.id_map(g) if g._tensor._storage is x._tensor._storage else g
        else:
            self.grad = self.backend.add_zip(self.grad, self.expand(x))

    def is_leaf(self) -> bool:
        """True for a user-made tensor that wants a gradient."""
        return self.history is not None and self.history.last_fn is None

    def is_constant(self) -> bool:
        """True when there is no history (no gradient flows)."""
        return self.history is None

    @property
    def parents(self) -> Iterable["Tensor"]:
        """The tensor inputs of the function that made this tensor."""
        assert self.history is not None
        return self.history.inputs

    def chain_rule(self, d_output: Any) -> Iterable[Tuple["Tensor", "Tensor"]]:
        """Pairs ``(input, gradient for that input)``, each gradient shaped like its input."""
        h = self.history
        assert h is not None and h.last_fn is not None and h.ctx is not None
        grads = h.last_fn._backward(h.ctx, d_output)
        n_args = h.n_args or len(h.inputs)
        if len(grads) == len(h.inputs):
            picked = list(grads)
        elif len(grads) == n_args:
            picked = [grads[p] for p in h.positions]
        else:
            raise RuntimeError(
                f"{h.last_fn.__name__}.backward returned {len(grads)} gradients for "
                f"{len(h.inputs)} tensor inputs ({n_args} arguments)."
            )
        out = []
        for inp, d in zip(h.inputs, picked):
            if inp.is_constant():
                continue
            if d is None:
                d = inp.zeros()
            elif not isinstance(d, Tensor):
                d = inp._ensure_tensor(float(d))  # a number: broadcast up by expand
            out.append((inp, inp.expand(d)))
        return out

    def backward(self, grad_output: Optional["Tensor"] = None) -> None:
        """Backpropagate from this tensor; `grad_output` defaults to 1 for a one-element tensor."""
        if grad_output is None:
            if self.size != 1:
                raise ValueError(f"backward() needs grad_output for a tensor of shape {self.shape}.")
            grad_output = Tensor.make(np.ones(1, dtype=self.dtype), (1,), backend=self.backend)
            if self.shape != (1,):
                grad_output = Tensor.make(grad_output._tensor._storage, self.shape, backend=self.backend)
        backpropagate(self, grad_output)

    def zero_grad_(self) -> None:
        """Forget the accumulated gradient."""
        self.grad = None

    # ------------------------------------------------------------------ arithmetic
    def __add__(self, b: "TensorLike") -> "Tensor":
        return _tf.Add.apply(self, self._ensure_tensor(b))

    def __radd__(self, b: "TensorLike") -> "Tensor":
        return _tf.Add.apply(self._ensure_tensor(b), self)

    def __sub__(self, b: "TensorLike") -> "Tensor":
        return _tf.Add.apply(self, _tf.Neg.apply(self._ensure_tensor(b)))

    def __rsub__(self, b: "TensorLike") -> "Tensor":
        return _tf.Add.apply(self._ensure_tensor(b), _tf.Neg.apply(self))

    def __mul__(self, b: "TensorLike") -> "Tensor":
        return _tf.Mul.apply(self, self._ensure_tensor(b))

    def __rmul__(self, b: "TensorLike") -> "Tensor":
        return _tf.Mul.apply(self._ensure_tensor(b), self)

    def __truediv__(self, b: "TensorLike") -> "Tensor":
        return _tf.Mul.apply(self, _tf.Inv.apply(self._ensure_tensor(b)))

    def __rtruediv__(self, b: "TensorLike") -> "Tensor":
        return _tf.Mul.apply(self._ensure_tensor(b), _tf.Inv.apply(self))

    def __matmul__(self, b: "Tensor") -> "Tensor":
        return _tf.MatMul.apply(self, self._ensure_tensor(b))

    def __rmatmul__(self, b: "TensorLike") -> "Tensor":
        return _tf.MatMul.apply(self._ensure_tensor(b), self)

    def __neg__(self) -> "Tensor":
        return _tf.Neg.apply(self)

    def __lt__(self, b: "TensorLike") -> "Tensor":
        return _tf.LT.apply(self, self._ensure_tensor(b))

    def __gt__(self, b: "TensorLike") -> "Tensor":
        return _tf.LT.apply(self._ensure_tensor(b), self)

    def __eq__(self, b: "TensorLike") -> "Tensor":  # type: ignore[override]
        return _tf.EQ.apply(self, self._ensure_tensor(b))

    # ------------------------------------------------------------------ elementwise functions
    def all(self, dim: Optional[int] = None) -> "Tensor":
        """1.0 where every element (along `dim`, or everywhere: shape (1,)) is non-zero."""
        return _tf.All.apply(self, dim)

    def is_close(self, y: "TensorLike") -> "Tensor":
        """1.0 where ``|self - y| < 1e-2``."""
        return _tf.IsClose.apply(self, self._ensure_tensor(y))

    def sigmoid(self) -> "Tensor":
        return _tf.Sigmoid.apply(self)

    def relu(self) -> "Tensor":
        return _tf.ReLU.apply(self)

    def log(self) -> "Tensor":
        return _tf.Log.apply(self)

    def exp(self) -> "Tensor":
        return _tf.Exp.apply(self)

    def square(self) -> "Tensor":
        return _tf.Mul.apply(self, self)

    # ------------------------------------------------------------------ reductions and shapes
    def sum(self, dim: Optional[int] = None) -> "Tensor":
        """Sum over `dim` (kept with size 1), or over everything: shape ``(1,)``."""
        return _tf.Sum.apply(self, self._check_dim(dim))

    def mean(self, dim: Optional[int] = None) -> "Tensor":
        """Mean over `dim` (kept with size 1), or over everything: shape ``(1,)``.

        Raises:
            ValueError: nothing to average (a tensor with no elements, or `dim` of size 0).
        """
        dim = self._check_dim(dim)
        n = self.size if dim is None else self.shape[dim]
        if n == 0:
            where = "its elements" if dim is None else f"dim {dim}"
            raise ValueError(f"mean: the tensor of shape {self.shape} has no values to average over {where}.")
        return self.sum(dim) / float(n)

    def permute(self, *order: int) -> "Tensor":
        """A view with dims reordered (``permute(1, 0)`` transposes a matrix)."""
        if len(order) == 1 and isinstance(order[0], (tuple, list)):
            order = tuple(order[0])
        return _tf.Permute.apply(self, tuple(int(o) for o in order))

    def view(self, *shape: int) -> "Tensor":
        """The same contiguous data with a new shape of the same size."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _tf.View.apply(self, tuple(int(s) for s in shape))

    # ``q.flash_attention(k, v, ...)`` is added by minitorch.attention (attention/api.py), which builds on this
    # module: the core never imports the attention package.

    @property
    def __cuda_array_interface__(self) -> Any:
        """CUDA array interface (v3) of a CUDA tensor's strided view, for zero-copy interop (CuPy, PyTorch)."""
        if not self.is_cuda:
            raise AttributeError("__cuda_array_interface__ needs a CUDA tensor (CudaBackend)")
        from .cuda_ops import cuda_array_interface

        return cuda_array_interface(self._tensor)

    def _check_dim(self, dim: Optional[int]) -> Optional[int]:
        if dim is None:
            return None
        d = int(dim)
        if d < 0:
            d += self.dims
        if not 0 <= d < self.dims:
            raise IndexingError(f"Dim {dim} out of range for shape {self.shape}.")
        return d


# At the bottom: tensor_functions imports Tensor from here (circular import, resolved at call time).
from . import tensor_functions as _tf  # noqa: E402
