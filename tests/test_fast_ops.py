"""Tests of the Numba CPU backend (`FastOps`, course tasks 3.1 and 3.2) against NumPy.

Every kernel runs in float64 and float32 (the result keeps the dtype), on contiguous inputs (the fast path) and on
permuted, non-contiguous views (the strided path), with broadcasting, odd sizes and sizes that span several
``prange`` chunks / matmul tiles. Gradients of a few Functions on this backend are checked with `grad_check`.

Every kernel has a parallel and a serial build (same source); FastOps runs small ops with the serial one. The property
tests (small shapes) therefore run the serial builds; `test_many_chunks`, `test_matmul_tiles_and_edges` and
`test_parallel_and_serial_builds_agree` run the parallel builds (fixture `force_parallel`). Compile time: each (scalar
function, dtype, build) is one Numba compilation, cached on disk (``cache=True``), so the tests reuse a small set of
scalar functions and compile the parallel builds (the slower ones to compile) for only a few.
"""

from typing import Callable, Iterator, Tuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch import fast_ops, operators
from minitorch.fast_ops import (
    CHUNK,
    MM_TILE_I,
    MM_TILE_J,
    REDUCE_BLOCK,
    FastOps,
    FastTensorBackend,
    _same_dense,
    tensor_map,
    tensor_matrix_multiply,
    tensor_zip,
)
from minitorch.tensor import Tensor
from minitorch.tensor_data import shape_broadcast
from minitorch.tensor_functions import from_numpy, grad_check


@pytest.fixture
def force_parallel() -> Iterator[None]:
    """Run the parallel builds of the kernels whatever the size of the op."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_ops, "PARALLEL_MIN_SIZE", 0)
        mp.setattr(fast_ops, "MM_PARALLEL_MIN_WORK", 0)
        yield


DTYPES = [np.float64, np.float32]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])


def tol(dtype: type) -> dict:
    """Comparison tolerances for a dtype."""
    return dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)


def make(arr: np.ndarray, order: Tuple[int, ...] = ()) -> Tensor:
    """A FastTensorBackend tensor with the values (and dtype) of `arr`; with `order`, a permuted view of a contiguous
    tensor (non-contiguous strides)."""
    if not order or list(order) == sorted(order):
        return from_numpy(arr, backend=FastTensorBackend)
    base = from_numpy(np.ascontiguousarray(arr.transpose(order)), backend=FastTensorBackend)
    return base.permute(*[int(i) for i in np.argsort(order)])


def check(t: Tensor, expected: np.ndarray, dtype: type, atol: float = 0.0) -> None:
    """`t` has `expected`'s shape and values and the dtype `dtype` (`atol` loosens float32 for long sums)."""
    assert t.dtype == np.dtype(dtype)
    out = t.to_numpy()
    assert out.dtype == np.dtype(dtype)
    assert out.shape == expected.shape
    tols = tol(dtype)
    tols["atol"] = max(tols["atol"], atol if dtype == np.float32 else 0.0)
    np.testing.assert_allclose(out, expected.astype(dtype), **tols)


# --------------------------------------------------------------------------------------------------------------------
# Strategies: shapes with odd sizes, a permutation of their dims, a seed for the values
# --------------------------------------------------------------------------------------------------------------------

@st.composite
def shape_and_order(draw: Callable, max_size: int = 7) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """A shape of 1-4 dims of sizes 1..max_size and a permutation of its dims (applied to the storage layout)."""
    shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=4)))
    order = tuple(draw(st.permutations(range(len(shape)))))
    return shape, order


@st.composite
def broadcast_pair(draw: Callable) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Two shapes that broadcast: the second drops leading dims and/or has size 1 where the first does not."""
    big = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=4)))
    drop = draw(st.integers(0, len(big) - 1))
    small = tuple(1 if draw(st.booleans()) else s for s in big[drop:])
    if draw(st.booleans()):
        big, small = small, big
    return big, small


seeds = st.integers(0, 2**31 - 1)


def values(seed: int, shape: Tuple[int, ...], dtype: type, low: float = -3.0, high: float = 3.0) -> np.ndarray:
    """Uniform values of `shape` and `dtype`."""
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(dtype)


# --------------------------------------------------------------------------------------------------------------------
# Task 3.1: map, zip, reduce
# --------------------------------------------------------------------------------------------------------------------

MAPS = [
    ("neg", FastTensorBackend.neg_map, np.negative),
    ("relu", FastTensorBackend.relu_map, lambda x: np.maximum(x, 0)),
    ("exp", FastTensorBackend.exp_map, np.exp),
]
ZIPS = [
    ("add", FastTensorBackend.add_zip, np.add),
    ("mul", FastTensorBackend.mul_zip, np.multiply),
    ("lt", FastTensorBackend.lt_zip, lambda x, y: (x < y).astype(np.float64)),
]
REDUCES = [
    ("sum", FastTensorBackend.add_reduce, np.sum),
    ("prod", FastTensorBackend.mul_reduce, np.prod),
    ("max", FastTensorBackend.max_reduce, np.max),
]


@pytest.mark.task3_1
@dtypes
@pytest.mark.parametrize("name, fn, ref", MAPS, ids=[m[0] for m in MAPS])
@given(so=shape_and_order(), seed=seeds)
def test_map(dtype: type, name: str, fn: Callable, ref: Callable, so: Tuple, seed: int) -> None:
    """Elementwise maps on contiguous and permuted inputs; the output is contiguous with the input's dtype."""
    shape, order = so
    x = values(seed, shape, dtype)
    t = make(x, order)
    out = fn(t)
    assert out._tensor.is_contiguous()
    check(out, ref(x), dtype)


@pytest.mark.task3_1
@dtypes
@given(pair=broadcast_pair(), seed=seeds, permute_out=st.booleans())
def test_map_into_broadcast_out(dtype: type, pair: Tuple, seed: int, permute_out: bool) -> None:
    """``map(a, out)`` broadcasts `a` to out's shape (as `Tensor.expand` uses it), also into a permuted `out`."""
    big, small = pair
    out_shape = shape_broadcast(big, small)
    x = values(seed, small, dtype)
    order = tuple(reversed(range(len(out_shape)))) if permute_out else ()
    out = make(np.zeros(out_shape, dtype), order)
    FastTensorBackend.id_map(make(x), out)
    check(out, np.broadcast_to(x, out_shape), dtype)


@pytest.mark.task3_1
@dtypes
@pytest.mark.parametrize("name, fn, ref", ZIPS, ids=[z[0] for z in ZIPS])
@given(pair=broadcast_pair(), seed=seeds, permute=st.booleans())
def test_zip_broadcast(
    dtype: type, name: str, fn: Callable, ref: Callable, pair: Tuple, seed: int, permute: bool
) -> None:
    """Zips of two broadcasting shapes, optionally both permuted (reversed dims)."""
    sa, sb = pair
    x, y = values(seed, sa, dtype), values(seed + 1, sb, dtype)
    ta = make(x, tuple(reversed(range(len(sa)))) if permute else ())
    tb = make(y, tuple(reversed(range(len(sb)))) if permute else ())
    check(fn(ta, tb), ref(x, y), dtype)


@pytest.mark.task3_1
@dtypes
@given(so=shape_and_order(), seed=seeds, permute_b=st.booleans())
def test_zip_same_shape(dtype: type, so: Tuple, seed: int, permute_b: bool) -> None:
    """Same-shape zip: the fast path when both layouts are row-major, the strided path when either is permuted."""
    shape, order = so
    x, y = values(seed, shape, dtype), values(seed + 1, shape, dtype)
    ta = make(x, order)
    tb = make(y, tuple(reversed(range(len(shape)))) if permute_b else ())
    check(FastTensorBackend.mul_zip(ta, tb), x * y, dtype)
    check(FastTensorBackend.add_zip(tb, ta), y + x, dtype)


@pytest.mark.task3_1
@dtypes
@pytest.mark.parametrize("name, fn, ref", REDUCES, ids=[r[0] for r in REDUCES])
@given(so=shape_and_order(max_size=12), seed=seeds, data=st.data())
def test_reduce(dtype: type, name: str, fn: Callable, ref: Callable, so: Tuple, seed: int, data: st.DataObject) -> None:
    """Reductions over every dim of contiguous and permuted inputs keep the dim with size 1 (sizes up to 12: the
    column path needs a contiguous last dim of 8 or more)."""
    shape, order = so
    dim = data.draw(st.integers(0, len(shape) - 1), label="dim")
    x = values(seed, shape, dtype, 0.5, 1.5)  # positive and near 1: products stay well-conditioned
    out = fn(make(x, order), dim)
    check(out, ref(x.astype(np.float64), axis=dim, keepdims=True), dtype)


@pytest.mark.task3_1
@dtypes
def test_many_chunks(dtype: type, force_parallel: None) -> None:
    """Parallel builds on tensors of several ``prange`` chunks, with chunk boundaries inside rows, on every path.

    (Only relu, mul and sum: each parallel build costs a few seconds of compile time, and the kernels do not depend
    on the scalar function.)"""
    shape = (3, 37, 41)  # 4551 elements: 3 chunks, boundaries mid-row
    assert np.prod(shape) > 2 * CHUNK
    x, y = values(0, shape, dtype), values(1, shape[1:], dtype)
    for order in [(), (2, 0, 1), (1, 2, 0)]:
        t = make(x, order)
        check(FastTensorBackend.relu_map(t), np.maximum(x, 0), dtype)
        check(FastTensorBackend.mul_zip(t, make(y)), x * y, dtype)
        check(FastTensorBackend.mul_zip(make(y, (1, 0)), t), y * x, dtype)
        for dim in range(3):
            check(FastTensorBackend.add_reduce(t, dim), x.astype(np.float64).sum(dim, keepdims=True), dtype, 1e-4)
    big = values(2, (5000, 2), dtype)  # reduce a long strided column and a long contiguous row
    check(FastTensorBackend.add_reduce(make(big), 0), big.astype(np.float64).sum(0, keepdims=True), dtype, 2e-3)
    check(FastTensorBackend.add_reduce(make(big.T.copy()), 1), big.T.astype(np.float64).sum(1, keepdims=True), dtype,
          2e-3)  # fmt: skip
    wide = values(3, (7, 2 * REDUCE_BLOCK + 6), dtype)  # column path: several blocks, the last one partial
    check(FastTensorBackend.add_reduce(make(wide), 0), wide.astype(np.float64).sum(0, keepdims=True), dtype, 1e-4)
    out = make(np.zeros((4,) + shape[1:], dtype), (2, 1, 0))  # map into a permuted out, broadcasting the input
    FastTensorBackend.relu_map(make(y), out)
    check(out, np.broadcast_to(np.maximum(y, 0), out.shape), dtype)


@pytest.mark.task3_1
def test_fast_path_detection() -> None:
    """The contiguous fast path is taken exactly when both layouts are the same row-major one."""
    shape = np.array([2, 3, 4], np.int32)
    c = np.array([12, 4, 1], np.int32)
    perm = np.array([1, 2, 6], np.int32)
    assert _same_dense(shape, c, shape, c)
    assert not _same_dense(shape, c, shape, perm)
    assert not _same_dense(shape, perm, shape, perm)  # same strides, but not row-major
    assert not _same_dense(shape, c, np.array([2, 3, 1], np.int32), np.array([3, 1, 1], np.int32))
    # size-1 dims may have any stride
    s1 = np.array([2, 1, 4], np.int32)
    assert _same_dense(s1, np.array([4, 4, 1], np.int32), s1, np.array([4, 99, 1], np.int32))


@pytest.mark.task3_1
@dtypes
def test_low_level_kernels_on_raw_storage(dtype: type) -> None:
    """The kernels take (storage, shape, strides) NumPy arrays, as in the course (serial builds here: the same
    compiled code as FastOps' own serial neg/add kernels, loaded from Numba's disk cache)."""
    x = values(3, (4, 6), dtype)
    storage = np.ascontiguousarray(x.T).reshape(-1)  # x stored column-major
    shape = np.array([4, 6], np.int32)
    strides_t = np.array([1, 4], np.int32)
    strides_c = np.array([6, 1], np.int32)
    out = np.zeros(24, dtype)
    tensor_map(operators.neg, parallel=False)(out, shape, strides_c, storage, shape, strides_t)
    np.testing.assert_allclose(out.reshape(4, 6), -x)
    row = values(4, (6,), dtype)
    tensor_zip(operators.add, parallel=False)(out, shape, strides_c, storage, shape, strides_t, row,
                                              np.array([6], np.int32), np.array([1], np.int32))  # fmt: skip
    np.testing.assert_allclose(out.reshape(4, 6), x + row, **tol(dtype))


@pytest.mark.task3_1
def test_kernels_built_once_per_function() -> None:
    """`FastOps.map/zip/reduce` reuse the compiled kernels of a scalar function (no recompilation)."""
    FastOps.map(operators.neg)
    kernels = fast_ops._MAP_KERNELS[operators.neg]
    FastOps.map(operators.neg)
    assert fast_ops._MAP_KERNELS[operators.neg] is kernels
    t = make(values(5, (3, 3), np.float64))
    FastOps.map(operators.neg)(t)
    n_sigs = len(kernels.serial.signatures)
    FastOps.map(operators.neg)(t)
    FastTensorBackend.neg_map(t)
    assert len(kernels.serial.signatures) == n_sigs


@pytest.mark.task3_1
@pytest.mark.task3_2
@dtypes
def test_parallel_and_serial_builds_agree(dtype: type) -> None:
    """The size thresholds pick the build; both give the same values (the same rounding, even for the sum)."""
    x, y = values(12, (5, 4, 3), dtype), values(13, (4, 1), dtype)
    w = values(14, (5, 3, 6), dtype)
    results = {}
    for build, threshold in [("parallel", 0), ("serial", 10**9)]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fast_ops, "PARALLEL_MIN_SIZE", threshold)
            mp.setattr(fast_ops, "MM_PARALLEL_MIN_WORK", threshold)
            t = make(x, (2, 0, 1))
            results[build] = [
                FastTensorBackend.mul_zip(t, make(y)),
                FastTensorBackend.relu_map(t),
                FastTensorBackend.add_reduce(t, 1),
                FastTensorBackend.matrix_multiply(t, make(w)),
            ]
    expected = [x * y, np.maximum(x, 0), x.astype(np.float64).sum(1, keepdims=True), np.matmul(x, w)]
    for par, ser, ref in zip(results["parallel"], results["serial"], expected):
        np.testing.assert_array_equal(par.to_numpy(), ser.to_numpy())
        check(ser, ref, dtype)
    kernels = fast_ops._ZIP_KERNELS[operators.mul]
    assert len(kernels.parallel.signatures) >= 1 and len(kernels.serial.signatures) >= 1


# --------------------------------------------------------------------------------------------------------------------
# Task 3.2: matrix multiply
# --------------------------------------------------------------------------------------------------------------------


@st.composite
def matmul_case(draw: Callable) -> Tuple:
    """Batch sizes (one may be 1: broadcast), matrix sizes (odd ones, around the 4x4 register block), layouts."""
    batch = draw(st.integers(1, 3))
    ba = draw(st.sampled_from([1, batch]))
    bb = draw(st.sampled_from([1, batch]))
    n, m, p = (draw(st.integers(1, 10)) for _ in range(3))
    order_a = draw(st.sampled_from([(), (0, 2, 1), (2, 1, 0), (1, 0, 2)]))
    order_b = draw(st.sampled_from([(), (0, 2, 1), (2, 1, 0), (1, 0, 2)]))
    return (ba, n, m), (bb, m, p), order_a, order_b


@pytest.mark.task3_2
@dtypes
@given(case=matmul_case(), seed=seeds)
def test_matmul(dtype: type, case: Tuple, seed: int) -> None:
    """Batched matmul with broadcast batch and any strides (transposed A packs A; transposed B needs no copy)."""
    sa, sb, order_a, order_b = case
    x, y = values(seed, sa, dtype), values(seed + 1, sb, dtype)
    out = FastTensorBackend.matrix_multiply(make(x, order_a), make(y, order_b))
    check(out, np.matmul(x.astype(np.float64), y.astype(np.float64)), dtype)


@pytest.mark.task3_2
@dtypes
def test_matmul_tiles_and_edges(dtype: type, force_parallel: None) -> None:
    """Sizes over one cache tile with edges that are not multiples of the 4x4 block; 2-D and N-D through ``@``."""
    n, m, p = MM_TILE_I + 7, 33, MM_TILE_J + 6
    x, y = values(6, (2, n, m), dtype), values(7, (1, m, p), dtype)
    ref = np.matmul(x.astype(np.float64), y.astype(np.float64))
    check(FastTensorBackend.matrix_multiply(make(x), make(y)), ref, dtype)
    check(FastTensorBackend.matrix_multiply(make(x, (0, 2, 1)), make(y, (0, 2, 1))), ref, dtype)
    check(make(x[0]) @ make(y[0]), ref[0], dtype)  # 2-D via the MatMul Function
    z = values(8, (3, 2, n, m), dtype)
    check(make(z) @ make(y[0]), np.matmul(z.astype(np.float64), y[0].astype(np.float64)), dtype)


@pytest.mark.task3_2
@dtypes
def test_matmul_strided_output(dtype: type) -> None:
    """The low-level kernel writes through the output's strides (here a transposed output)."""
    x, y = values(9, (2, 5, 6), dtype), values(10, (2, 6, 7), dtype)
    out = np.zeros(2 * 5 * 7, dtype)
    out_shape = np.array([2, 5, 7], np.int32)
    out_strides = np.array([35, 1, 5], np.int32)  # each batch stored column-major
    tensor_matrix_multiply(
        out, out_shape, out_strides,
        x.reshape(-1), np.array(x.shape, np.int32), np.array([30, 6, 1], np.int32),
        y.reshape(-1), np.array(y.shape, np.int32), np.array([42, 7, 1], np.int32),
    )  # fmt: skip
    got = out.reshape(2, 7, 5).transpose(0, 2, 1)
    np.testing.assert_allclose(got, np.matmul(x.astype(np.float64), y.astype(np.float64)), **tol(dtype))


# --------------------------------------------------------------------------------------------------------------------
# Gradients on this backend (float64)
# --------------------------------------------------------------------------------------------------------------------


def _grad_inputs(*shapes: Tuple[int, ...], order: Tuple[int, ...] = ()) -> Tuple[Tensor, ...]:
    rng = np.random.default_rng(11)
    out = []
    for i, s in enumerate(shapes):
        x = rng.uniform(-1, 1, size=s) + 0.1  # away from relu's kink at 0 (in practice)
        out.append(make(x, order if i == 0 else ()))
    return tuple(out)


@pytest.mark.task3_1
def test_grad_check_elementwise_and_reduce() -> None:
    """Mul (broadcast), ReLU, Exp and Sum(dim) on permuted inputs."""
    a, b = _grad_inputs((3, 4, 2), (4, 1), order=(2, 0, 1))
    grad_check(lambda a, b: ((a * b).relu() + a).sum(1), a, b)
    (c,) = _grad_inputs((2, 5))
    grad_check(lambda c: (c.exp() * c).sum(0), c)


@pytest.mark.task3_2
def test_grad_check_matmul() -> None:
    """MatMul with a broadcast batch and a transposed (non-contiguous) operand."""
    a, b = _grad_inputs((2, 3, 4), (4, 5), order=(0, 2, 1))
    grad_check(lambda a, b: a @ b, a, b)
