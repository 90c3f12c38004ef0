"""Differentiable tensor functions and tensor constructors (MiniTorch module 2).

Each `Function` has a ``forward(ctx, *inputs)`` that runs backend ops on constant (detached) tensors and a
``backward(ctx, grad_output)`` that returns one gradient per input. Gradients may have a broadcast shape of their
input (or the ``(1,)``/size-1 shape of a reduction): `Tensor.expand` brings them back to the input's shape.
Backward passes use backend ops directly, so they never build a graph.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .autodiff import Context
from .tensor import History, Tensor
from .tensor_data import TensorData, UserShape, is_cuda_storage, prod, shape_broadcast
from .tensor_ops import SimpleBackend, TensorBackend, _check_matmul_shapes

DType = Any


def wrap_tuple(x: Any) -> Tuple[Any, ...]:
    """Make `x` a tuple (a single value becomes a 1-tuple)."""
    if isinstance(x, tuple):
        return x
    return (x,)


def _check_compatible(name: str, tensors: Sequence[Tensor]) -> None:
    """All tensor arguments of one op must share a backend and a dtype.

    Raises:
        ValueError: two backends, naming both.
        TypeError: two dtypes, naming both.
    """
    if len(tensors) < 2:
        return
    first = tensors[0]
    for t in tensors[1:]:
        if t.backend is first.backend and t._tensor.dtype is first._tensor.dtype:
            continue  # (the common case, checked cheaply)
        if t.backend is not first.backend and t.backend.ops is not first.backend.ops:
            raise ValueError(
                f"{name}: tensors are on different backends, {first.backend.name} and {t.backend.name}; "
                "move one with .to(backend)."
            )
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name}: tensors have different dtypes, {np.dtype(first.dtype).name} and {np.dtype(t.dtype).name}."
            )


class Function:
    """Base class of differentiable tensor functions.

    ``apply(*args)`` accepts tensors and plain Python values (dims, shapes, options). Plain values are passed to
    ``forward`` unchanged and get no gradient. ``backward`` returns one gradient per positional argument (course
    convention; entries for non-tensor arguments are ignored) or one per tensor argument; ``None`` means zero.
    """

    @classmethod
    def _backward(cls, ctx: Context, grad_out: Tensor) -> Tuple[Any, ...]:
        return wrap_tuple(cls.backward(ctx, grad_out))  # type: ignore[attr-defined]

    @classmethod
    def _forward(cls, ctx: Context, *inps: Any) -> Tensor:
        return cls.forward(ctx, *inps)  # type: ignore[attr-defined]

    @classmethod
    def apply(cls, *vals: Any) -> Tensor:
        """Run forward on detached inputs and record the history when an input needs a gradient."""
        positions, tensors, raw = [], [], list(vals)
        need_grad = False
        for i, v in enumerate(vals):
            if isinstance(v, Tensor):
                positions.append(i)
                tensors.append(v)
                if v.history is not None:  # forward sees constants (no history), so it builds no graph
                    need_grad = True
                    raw[i] = v.detach()
        _check_compatible(cls.__name__, tensors)
        ctx = Context(not need_grad)
        c = cls._forward(ctx, *raw)
        if not need_grad:
            for v in vals:
                if c is v:  # forward handed an input back: the result is a new tensor all the same
                    return Tensor(c._tensor, None, backend=c.backend)
            return c  # a new constant already
        return Tensor(c._tensor, History(cls, ctx, tensors, positions, len(vals)), backend=c.backend)


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers (no autodiff)
# ---------------------------------------------------------------------------------------------------------------------


def _reshape(t: Tensor, shape: UserShape) -> Tensor:
    """Same data, new shape; copies first when `t` is not contiguous."""
    if not t._tensor.is_contiguous():
        t = t.backend.id_map(t)
    return Tensor.make(t._tensor._storage, tuple(shape), backend=t.backend)


def _flat(t: Tensor) -> Tensor:
    """A 1-D view (or contiguous copy) of all elements, shape ``(size,)``."""
    return _reshape(t, (t.size,))


def _transpose_last(t: Tensor) -> Tensor:
    """View with the last two dims swapped."""
    order = list(range(t.dims))
    order[-2], order[-1] = order[-1], order[-2]
    return t._new(t._tensor.permute(*order))


def _as_3d(t: Tensor, batch: UserShape) -> Tensor:
    """View `t` of shape ``(*b, r, c)``, with ``b`` broadcastable to `batch`, as ``(B|1, r, c)`` (copy if needed)."""
    r, c = t.shape[-2], t.shape[-1]
    s_r, s_c = t._tensor.strides[-2], t._tensor.strides[-1]
    lead_shape, lead_strides = t.shape[:-2], t._tensor.strides[:-2]
    n_lead = prod(lead_shape)
    full = prod(batch)
    if n_lead == 1:
        return t._new(TensorData(t._tensor._storage, (1, r, c), (r * c, s_r, s_c)))
    padded = (1,) * (len(batch) - len(lead_shape)) + tuple(lead_shape)
    if n_lead == full and padded == tuple(batch):
        dims = [(d, s) for d, s in zip(lead_shape, lead_strides) if d != 1]
        if all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1)):
            return t._new(TensorData(t._tensor._storage, (full, r, c), (dims[-1][1], s_r, s_c)))
        return _reshape(t, (full, r, c))
    buf = t.zeros(tuple(batch) + (r, c))  # partial broadcast of the batch dims: materialise
    t.backend.id_map(t, buf)
    return _reshape(buf, (full, r, c))


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """``(*ba, n, m) @ (*bb, m, p) -> (*broadcast(ba, bb), n, p)`` with the backend's 3-D kernel."""
    _check_matmul_shapes(a.shape, b.shape)
    batch = shape_broadcast(a.shape[:-2], b.shape[:-2])
    out3 = a.backend.matrix_multiply(_as_3d(a, batch), _as_3d(b, batch))
    return _reshape(out3, tuple(batch) + (a.shape[-2], b.shape[-1]))


def _reduce_all(t: Tensor, reduce: Any) -> Tensor:
    """Reduce every element to shape ``(1,)``."""
    return reduce(_flat(t), 0)


def _to_ints(x: Any) -> Tuple[int, ...]:
    """A shape/order given as ints, a sequence, or (course style) a Tensor."""
    if isinstance(x, Tensor):
        return tuple(int(v) for v in x.to_numpy().reshape(-1))
    if isinstance(x, (int, np.integer)):
        return (int(x),)
    return tuple(int(v) for v in x)


# ---------------------------------------------------------------------------------------------------------------------
# Elementwise functions
# ---------------------------------------------------------------------------------------------------------------------


class Neg(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor) -> Tensor:
        return t1.f.neg_map(t1)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        return grad_output.f.neg_map(grad_output)


class Inv(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor) -> Tensor:
        ctx.save_for_backward(t1)
        return t1.f.inv_map(t1)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        (t1,) = ctx.saved_values
        return grad_output.f.inv_back_zip(t1, grad_output)


class Add(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor, t2: Tensor) -> Tensor:
        return t1.f.add_zip(t1, t2)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tuple[Tensor, Tensor]:
        return grad_output, grad_output


class Mul(Function):
    @staticmethod
    def forward(ctx: Context, a: Tensor, b: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise a * b with the backend's mul_zip (save what backward needs)
        ctx.save_for_backward(a, b)
        return a.f.mul_zip(a, b)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tuple[Tensor, Tensor]:
        # BEGIN SOLUTION task2_4: the gradients for a and b: grad_output times the other input
        a, b = ctx.saved_values
        f = grad_output.f
        return f.mul_zip(grad_output, b), f.mul_zip(grad_output, a)
        # END SOLUTION


class Sigmoid(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise sigmoid with the backend's sigmoid_map (save what backward needs)
        out = t1.f.sigmoid_map(t1)
        ctx.save_for_backward(out)
        return out
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_4: grad_output * s * (1 - s) from the saved s, with backend ops
        (s,) = ctx.saved_values
        f = grad_output.f
        ds = f.add_zip(s, f.neg_map(f.mul_zip(s, s)))  # s - s^2 = s (1 - s)
        return f.mul_zip(grad_output, ds)
        # END SOLUTION


class ReLU(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise relu with the backend's relu_map (save what backward needs)
        ctx.save_for_backward(t1)
        return t1.f.relu_map(t1)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_4: grad_output where the input was positive, else 0 (relu_back_zip)
        (t1,) = ctx.saved_values
        return grad_output.f.relu_back_zip(t1, grad_output)
        # END SOLUTION


class Log(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise log with the backend's log_map (save what backward needs)
        ctx.save_for_backward(t1)
        return t1.f.log_map(t1)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_4: grad_output / input (log_back_zip)
        (t1,) = ctx.saved_values
        return grad_output.f.log_back_zip(t1, grad_output)
        # END SOLUTION


class Exp(Function):
    @staticmethod
    def forward(ctx: Context, t1: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise exp with the backend's exp_map (save what backward needs)
        out = t1.f.exp_map(t1)
        ctx.save_for_backward(out)
        return out
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_4: grad_output times the saved exp(input)
        (out,) = ctx.saved_values
        return grad_output.f.mul_zip(grad_output, out)
        # END SOLUTION


# ---------------------------------------------------------------------------------------------------------------------
# Reductions and comparisons
# ---------------------------------------------------------------------------------------------------------------------


class Sum(Function):
    """``sum(a, dim)``: keeps `dim` with size 1; ``dim=None`` sums everything to shape ``(1,)``."""

    @staticmethod
    def forward(ctx: Context, a: Tensor, dim: Optional[int] = None) -> Tensor:
        # BEGIN SOLUTION task2_3: add_reduce over dim, or over every element (shape (1,)) when dim is None
        if dim is None:
            return _reduce_all(a, a.f.add_reduce)
        return a.f.add_reduce(a, int(dim))
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_4: the gradient of a sum: grad_output for every element (expand broadcasts it back)
        # d(sum)/da = 1 everywhere: the size-1 (or (1,)) gradient is broadcast back to a's shape by Tensor.expand.
        return grad_output
        # END SOLUTION


class All(Function):
    """1.0 where all elements (along `dim`, or everywhere: shape ``(1,)``) are non-zero (a product of 0/1s)."""

    @staticmethod
    def forward(ctx: Context, a: Tensor, dim: Optional[int] = None) -> Tensor:
        if dim is None:
            return _reduce_all(a, a.f.mul_reduce)
        return a.f.mul_reduce(a, int(dim))

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> None:
        return None


class _Comparison(Function):
    """A 0/1-valued comparison: piecewise constant, so its gradient is zero for both inputs."""

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tuple[None, None]:
        # BEGIN SOLUTION task2_4: the gradients of a 0/1 comparison (None means zero), one per input
        return None, None
        # END SOLUTION


class LT(_Comparison):
    @staticmethod
    def forward(ctx: Context, a: Tensor, b: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise a < b (1.0 / 0.0) with the backend's lt_zip
        return a.f.lt_zip(a, b)
        # END SOLUTION


class EQ(_Comparison):
    @staticmethod
    def forward(ctx: Context, a: Tensor, b: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise a == b (1.0 / 0.0) with the backend's eq_zip
        return a.f.eq_zip(a, b)
        # END SOLUTION


class IsClose(_Comparison):
    @staticmethod
    def forward(ctx: Context, a: Tensor, b: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_3: elementwise is_close with the backend's is_close_zip
        return a.f.is_close_zip(a, b)
        # END SOLUTION


# ---------------------------------------------------------------------------------------------------------------------
# Shape functions
# ---------------------------------------------------------------------------------------------------------------------


class Permute(Function):
    """Reorder dims (a view: no data moves)."""

    @staticmethod
    def forward(ctx: Context, a: Tensor, order: Any) -> Tensor:
        # BEGIN SOLUTION task2_3: a view of a with its dims reordered (TensorData.permute); save the order
        order = _to_ints(order)
        ctx.save_for_backward(order)
        return a._new(a._tensor.permute(*order))
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task2_4: permute grad_output back with the inverse of the saved order
        (order,) = ctx.saved_values
        inverse = [0] * len(order)
        for i, o in enumerate(order):
            inverse[o] = i
        return grad_output._new(grad_output._tensor.permute(*inverse))
        # END SOLUTION


class View(Function):
    """New shape of the same size for a contiguous tensor; one entry may be -1 (inferred)."""

    @staticmethod
    def forward(ctx: Context, a: Tensor, shape: Any) -> Tensor:
        shape = list(_to_ints(shape))
        if not a._tensor.is_contiguous():
            raise ValueError(
                f"view() needs a contiguous tensor, got shape {a.shape} with strides {a._tensor.strides}; "
                "call .contiguous() first."
            )
        if shape.count(-1) > 1:
            raise ValueError(f"view(): only one dim may be -1, got {tuple(shape)}.")
        if -1 in shape:
            rest = prod(s for s in shape if s != -1)
            if rest == 0 or a.size % rest != 0:
                raise ValueError(f"view(): cannot view shape {a.shape} as {tuple(shape)}.")
            shape[shape.index(-1)] = a.size // rest
        if prod(shape) != a.size:
            raise ValueError(f"view(): shape {tuple(shape)} has {prod(shape)} elements, shape {a.shape} has {a.size}.")
        ctx.save_for_backward(a.shape)
        return Tensor.make(a._tensor._storage, tuple(shape), backend=a.backend)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        (original,) = ctx.saved_values
        return _reshape(grad_output, original)


class Copy(Function):
    """A contiguous copy."""

    @staticmethod
    def forward(ctx: Context, a: Tensor) -> Tensor:
        return a.f.id_map(a)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        return grad_output


class MatMul(Function):
    """Matrix product ``(*ba, n, m) @ (*bb, m, p) -> (*broadcast(ba, bb), n, p)``.

    2-D inputs are viewed as 3-D ``(1, n, m)`` for the backend's batched kernel and the result viewed back, as in
    MiniTorch; more than one batch dim is flattened into one. Broadcast batch dims are summed in backward by
    `Tensor.expand`.
    """

    @staticmethod
    def forward(ctx: Context, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return _matmul(a, b)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tuple[Tensor, Tensor]:
        a, b = ctx.saved_values
        grad_a = _matmul(grad_output, _transpose_last(b))
        grad_b = _matmul(_transpose_last(a), grad_output)
        return grad_a, grad_b


# ---------------------------------------------------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------------------------------------------------


def _dtype(dtype: DType) -> np.dtype:
    d = np.dtype(dtype)
    if d not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise TypeError(f"dtype must be float64 or float32, got {d}.")
    return d


def zeros(shape: UserShape, backend: TensorBackend = SimpleBackend, dtype: DType = np.float64) -> Tensor:
    """A constant tensor of zeros."""
    shape = _to_ints(shape)
    return Tensor.make(backend.ops.zeros_storage(prod(shape), _dtype(dtype)), shape, backend=backend)


def ones(shape: UserShape, backend: TensorBackend = SimpleBackend, dtype: DType = np.float64) -> Tensor:
    """A constant tensor of ones."""
    shape = _to_ints(shape)
    return Tensor.make(np.ones(prod(shape), dtype=_dtype(dtype)), shape, backend=backend)


def rand(
    shape: UserShape,
    backend: TensorBackend = SimpleBackend,
    requires_grad: bool = False,
    dtype: DType = np.float64,
) -> Tensor:
    """Uniform [0, 1) values (from NumPy's global generator, so ``np.random.seed`` makes them repeatable)."""
    shape = _to_ints(shape)
    values = np.random.random(prod(shape)).astype(_dtype(dtype))
    t = Tensor.make(values, shape, backend=backend)
    t.requires_grad_(requires_grad)
    return t


def _tensor(
    ls: Any,
    shape: UserShape,
    backend: TensorBackend = SimpleBackend,
    requires_grad: bool = False,
    dtype: DType = np.float64,
) -> Tensor:
    """A tensor from a flat list of values and a shape."""
    values = np.asarray(ls, dtype=_dtype(dtype)).reshape(-1)
    t = Tensor.make(values, _to_ints(shape), backend=backend)
    t.requires_grad_(requires_grad)
    return t


def tensor(
    ls: Any,
    backend: TensorBackend = SimpleBackend,
    requires_grad: bool = False,
    dtype: DType = np.float64,
) -> Tensor:
    """A tensor from (nested) lists of numbers; a single number gives shape ``(1,)``."""
    arr = np.asarray(ls.to_numpy() if isinstance(ls, Tensor) else ls, dtype=_dtype(dtype))
    if arr.ndim == 0:
        arr = arr.reshape(1)
    return _tensor(arr.reshape(-1), arr.shape, backend=backend, requires_grad=requires_grad, dtype=dtype)


def from_numpy(
    array: Any,
    backend: TensorBackend = SimpleBackend,
    requires_grad: bool = False,
    dtype: Optional[DType] = None,
) -> Tensor:
    """A tensor with a copy of a NumPy array (or anything ``numpy.asarray`` takes, or a device array for CUDA).

    float32 and float64 are kept; other dtypes (ints, bools, float16) become float64 unless `dtype` is given.
    A 0-d array becomes shape ``(1,)``.

    Raises:
        TypeError: `backend` is not a `TensorBackend` (e.g. the string ``"fast"``), or the array is complex
            (tensors are real: its imaginary part would be dropped).
    """
    if not isinstance(backend, TensorBackend):
        raise TypeError(f"from_numpy: backend must be a TensorBackend (minitorch.SimpleBackend, FastTensorBackend or "
                        f"CudaBackend), got {backend!r} of type {type(backend).__name__}.")
    if is_cuda_storage(array):
        array = array.copy_to_host()
    arr = np.asarray(array)
    if arr.dtype.kind == "c":
        raise TypeError(f"from_numpy: the array of shape {arr.shape} is complex ({arr.dtype}); tensors are real "
                        "(float32 or float64): pass array.real, array.imag or abs(array).")
    if dtype is None:
        dtype = arr.dtype if arr.dtype in (np.dtype(np.float64), np.dtype(np.float32)) else np.float64
    arr = np.array(arr, dtype=_dtype(dtype), copy=True, order="C")
    shape = arr.shape if arr.ndim > 0 else (1,)
    storage = backend.ops.to_storage(arr.reshape(-1)) if backend.cuda else arr.reshape(-1)
    t = Tensor.make(storage, shape, backend=backend)
    t.requires_grad_(requires_grad)
    return t


tensor_from_numpy = from_numpy


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checking
# ---------------------------------------------------------------------------------------------------------------------


def grad_central_difference(
    f: Any, *vals: Tensor, arg: int = 0, epsilon: Optional[float] = None, ind: Sequence[int]
) -> float:
    """Central-difference estimate of d sum(f(*vals)) / d vals[arg][ind].

    `epsilon` defaults to 1e-6 for float64 and 1e-3 for float32.
    """
    x = vals[arg]
    if epsilon is None:
        epsilon = 1e-6 if x.dtype == np.float64 else 1e-3
    up = zeros(x.shape, backend=x.backend, dtype=x.dtype)
    up[tuple(ind)] = epsilon
    plain = [v.detach() if isinstance(v, Tensor) else v for v in vals]
    vals1 = [v + up if j == arg else v for j, v in enumerate(plain)]
    vals2 = [v - up if j == arg else v for j, v in enumerate(plain)]
    delta = f(*vals1).sum() - f(*vals2).sum()
    return delta[0] / (epsilon * 2.0)


def grad_check(f: Any, *vals: Tensor, samples: int = 3) -> None:
    """Check the gradients backward gives for ``f(*vals).sum()`` against central differences.

    For every input, up to `samples` random indices are compared (rtol and atol 1e-2). Use float64 inputs.
    """
    for x in vals:
        x.requires_grad_(True)
        x.zero_grad_()
    random.seed(10)
    out = f(*vals)
    out.sum().backward()
    for i, x in enumerate(vals):
        assert x.grad is not None, f"argument {i} received no gradient"
        assert x.grad.shape == x.shape, f"gradient of argument {i} has shape {x.grad.shape}, expected {x.shape}"
        indices = {tuple(x._tensor.sample()) for _ in range(samples)}
        for ind in sorted(indices):
            check = grad_central_difference(f, *vals, arg=i, ind=ind)
            np.testing.assert_allclose(
                x.grad[ind],
                check,
                1e-2,
                1e-2,
                err_msg=(
                    f"Gradient check failed for function {getattr(f, '__name__', f)}.\n"
                    f"Input {i} of shape {x.shape} at index {ind}: backward gives {x.grad[ind]}, "
                    f"central difference gives {check}."
                ),
            )
