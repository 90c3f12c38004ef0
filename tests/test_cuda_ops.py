"""CudaOps: map / zip / reduce / matmul kernels, practice kernels, device storage, gradients.

Runs in Numba's CUDA simulator (tests/conftest.py switches it on), where every CUDA thread is a Python thread:
sizes are tiny, and each test launches few blocks. ``test_kernels_lower_for_gpu`` type-checks and lowers every
kernel for a real GPU (sm_90) without needing one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Callable, Dict, Iterator, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitorch import operators
from minitorch.cuda_ops import (
    SIMULATOR,
    CudaBackend,
    CudaOps,
    _kernel,
    _meta,
    cuda_array_interface,
    fill_kernel,
    matmul_kernel,
    mm_practice,
    sum_practice,
)
from minitorch.tensor import Tensor
from minitorch.tensor_data import TensorData, is_cuda_storage
from minitorch.tensor_functions import from_numpy, grad_check, tensor

pytestmark = pytest.mark.cuda

DTYPES = [np.float64, np.float32]


def rtol(dtype: type) -> float:
    return 1e-10 if dtype == np.float64 else 1e-5


def cu(x: np.ndarray) -> Tensor:
    """A CUDA tensor with a copy of `x` (dtype kept)."""
    return from_numpy(x, backend=CudaBackend)


def rand(shape: Tuple[int, ...], dtype: type = np.float64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def check(t: Tensor, expected: np.ndarray, dtype: type) -> None:
    """`t` is a CUDA tensor of `dtype` on device storage with the values of `expected`."""
    assert t.backend is CudaBackend
    assert is_cuda_storage(t._tensor._storage)
    got = t.to_numpy()
    assert got.dtype == dtype
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=rtol(dtype), atol=rtol(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# The GPU-lowering check (last test) runs in a subprocess without the simulator. It starts with the first test of this
# module so that it overlaps the simulator tests.
# ---------------------------------------------------------------------------------------------------------------------

SKIP_LOWERING = os.environ.get("MINITORCH_SKIP_LOWERING") == "1"

_LOWER_SCRIPT = textwrap.dedent(
    """
    import os, types, numpy as np
    import numba.cuda.dispatcher as dispatcher
    from numba import types as nt
    from numba.cuda import compiler
    # device functions are compiled for the current device: pretend it is an sm_90
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from minitorch import cuda_ops as co, operators as ops

    def lower(kernel, *args):
        res = compiler.compile_cuda(kernel.py_func, nt.void, args, cc=(9, 0))
        return res.library.get_llvm_str()

    i32, i64, b = nt.int32[:], nt.int64, nt.boolean
    full = os.environ.get("MINITORCH_FULL_LOWERING") == "1"
    for dt in (nt.float32, nt.float64):
        A, npdt = dt[:], np.dtype(str(dt))
        maps = (ops.neg, ops.sigmoid, ops.relu, ops.log, ops.exp, ops.id, ops.inv)
        zips = (ops.add, ops.mul, ops.lt, ops.eq, ops.is_close, ops.relu_back, ops.log_back, ops.inv_back)
        reduces = (ops.add, ops.mul, ops.max)
        if not full and dt == nt.float64:  # every function once in float32; each kernel kind in float64
            maps, zips, reduces = maps[:1], zips[:1], reduces[:1]
        for fn in maps:
            lower(co.tensor_map(co._device_fn(fn)), A, i32, i32, i64, A, i32, i32, b)
        for fn in zips:
            lower(co.tensor_zip(co._device_fn(fn)), A, i32, i32, i64, A, i32, i32, A, i32, i32, b)
        for fn in reduces:
            lower(co.tensor_reduce(co._device_fn(fn), 1024, npdt), A, i32, i32, i64, A, i32, i32, i64, dt)
        ir = lower(co.tensor_matrix_multiply(32, npdt), A, A, A, *([i64] * 9))
        if dt == nt.float32:  # the float32 matmul does no double arithmetic
            assert " double " not in ir, "float64 arithmetic in the float32 matmul"
        lower(co.fill_kernel, A, i64, dt)
        if full or dt == nt.float64:
            lower(co.jit_sum_practice, A, A, i64)
            lower(co.jit_mm_practice, A, A, A, i64)
    print("LOWERED")
    """
)

_LOWERING: Dict[str, "subprocess.Popen[str]"] = {}


def _spawn_lowering() -> "subprocess.Popen[str]":
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(
        [sys.executable, "-c", _LOWER_SCRIPT],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module", autouse=True)
def _lowering(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start the lowering subprocess when ``test_kernels_lower_for_gpu`` is selected; reap it at the end."""
    if not SKIP_LOWERING and any(item.name == "test_kernels_lower_for_gpu" for item in request.session.items):
        _LOWERING["proc"] = _spawn_lowering()
    yield
    proc = _LOWERING.pop("proc", None)
    if proc is not None:
        proc.kill()
        proc.communicate()


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny reduce blocks and matmul tiles, so that a handful of elements exercises the multi-block paths."""
    monkeypatch.setattr(CudaOps, "reduce_block", 4)
    monkeypatch.setattr(CudaOps, "tile", 4)


# ---------------------------------------------------------------------------------------------------------------------
# task3_3: map and zip
# ---------------------------------------------------------------------------------------------------------------------

UNARY = [
    ("neg", operators.neg, np.negative),
    ("exp", operators.exp, np.exp),
    ("sigmoid", operators.sigmoid, lambda x: 1.0 / (1.0 + np.exp(-x))),
    ("relu", operators.relu, lambda x: np.maximum(x, 0.0)),
    ("inv", operators.inv, lambda x: 1.0 / x),
]


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,fn,ref", UNARY, ids=[u[0] for u in UNARY])
def test_map(name: str, fn: Callable, ref: Callable, dtype: type) -> None:
    x = rand((3, 5), dtype) + 0.1
    check(CudaOps.map(fn)(cu(x)), ref(x).astype(dtype), dtype)


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_map_permuted_and_log(dtype: type) -> None:
    x = np.abs(rand((2, 3, 4), dtype)) + 0.5
    a = cu(x).permute(2, 0, 1)
    assert not a._tensor.is_contiguous()
    check(CudaBackend.log_map(a), np.log(x.transpose(2, 0, 1)), dtype)
    check(CudaBackend.id_map(a), x.transpose(2, 0, 1), dtype)


@pytest.mark.task3_3
def test_map_into_broadcast_out() -> None:
    """``map(a, out)`` broadcasts `a` to out's shape (used by ``expand``)."""
    x = rand((3, 1))
    a = cu(x)
    out = a.zeros((2, 3, 4))
    res = CudaBackend.id_map(a, out)
    assert res is out
    check(out, np.broadcast_to(x, (2, 3, 4)), np.float64)


BINARY = [
    ("add", operators.add, np.add),
    ("mul", operators.mul, np.multiply),
    ("lt", operators.lt, lambda x, y: (x < y).astype(x.dtype)),
    ("eq", operators.eq, lambda x, y: (x == y).astype(x.dtype)),
]


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,fn,ref", BINARY, ids=[b[0] for b in BINARY])
def test_zip_broadcast(name: str, fn: Callable, ref: Callable, dtype: type) -> None:
    x = rand((2, 1, 4), dtype, seed=1)
    y = rand((3, 1), dtype, seed=2)
    y[0, 0] = x[0, 0, 0]  # one equal pair for eq
    check(CudaOps.zip(fn)(cu(x), cu(y)), ref(x, y).astype(dtype), dtype)


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_zip_same_shape_and_permuted(dtype: type) -> None:
    x = rand((3, 4), dtype, seed=3)
    y = rand((4, 3), dtype, seed=4)
    check(CudaBackend.add_zip(cu(x), cu(x)), x + x, dtype)  # aligned fast path
    check(CudaBackend.mul_zip(cu(x), cu(y).permute(1, 0)), x * y.T, dtype)
    check(CudaBackend.relu_back_zip(cu(x), cu(y).permute(1, 0)), np.where(x > 0, y.T, 0), dtype)


@pytest.mark.task3_3
def test_tensor_operators_on_cuda() -> None:
    """The Tensor operators run on the CudaBackend and keep dtype and device storage."""
    x = rand((2, 3), np.float32, seed=5)
    y = rand((3,), np.float32, seed=6)
    a, b = cu(x), cu(y)
    check((a + b) * a - b, (x + y) * x - y, np.float32)
    check((a < b) + (a == a), (x < y).astype(np.float32) + 1, np.float32)
    check(a.sigmoid().relu(), np.maximum(1 / (1 + np.exp(-x)), 0), np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# task3_3: reduce and the block-sum practice kernel
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_each_dim(dtype: type) -> None:
    x = rand((2, 2, 3), dtype, seed=7)
    a = cu(x)
    for dim in range(3):
        check(CudaBackend.add_reduce(a, dim), x.sum(dim, keepdims=True), dtype)
    check(CudaBackend.mul_reduce(a, 2), x.prod(2, keepdims=True), dtype)
    check(CudaBackend.max_reduce(a, 1), x.max(1, keepdims=True), dtype)


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_permuted_longer_than_block(small_blocks: None, dtype: type) -> None:
    """Blocks of 4 threads: each thread folds several elements before the shared-memory tree."""
    x = rand((11, 2), dtype, seed=8)
    a = cu(x).permute(1, 0)  # reduce along a strided dim
    check(CudaBackend.add_reduce(a, 1), x.T.sum(1, keepdims=True), dtype)
    check(CudaBackend.max_reduce(a, 1), x.T.max(1, keepdims=True), dtype)
    check(CudaBackend.add_reduce(a, 0), x.T.sum(0, keepdims=True), dtype)


@pytest.mark.task3_3
def test_reduce_full_block() -> None:
    """A reduced dim longer than the default block (32 in the simulator)."""
    x = rand((1, 70), seed=9)
    check(CudaBackend.add_reduce(cu(x), 1), x.sum(1, keepdims=True), np.float64)
    check(cu(x).sum(), np.array([x.sum()]), np.float64)


@settings(max_examples=8, deadline=None)
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    data=st.data(),
)
@pytest.mark.task3_3
def test_reduce_random_views(shape: list, data: st.DataObject) -> None:
    x = rand(tuple(shape), seed=len(shape))
    order = data.draw(st.permutations(range(len(shape))))
    dim = data.draw(st.integers(0, len(shape) - 1))
    view = cu(x).permute(*order)
    xv = x.transpose(order)
    check(CudaBackend.add_reduce(view, dim), xv.sum(dim, keepdims=True), np.float64)


@pytest.mark.task3_3
@pytest.mark.parametrize("n", [16, 64])
def test_sum_practice(n: int) -> None:
    x = rand((n,), seed=n)
    out = sum_practice(cu(x))
    assert isinstance(out, TensorData) and is_cuda_storage(out._storage)
    blocks = out._storage.copy_to_host()
    assert blocks.shape == ((n + 31) // 32,)
    for b in range(len(blocks)):
        np.testing.assert_allclose(blocks[b], x[32 * b : 32 * b + 32].sum())
    # course style: element access on the device storage
    np.testing.assert_allclose(sum(out._storage[i] for i in range(len(blocks))), x.sum())


# ---------------------------------------------------------------------------------------------------------------------
# task3_4: matrix multiply and the practice matmul
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task3_4
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_3d_batch_broadcast(small_blocks: None, dtype: type) -> None:
    """Tiles of 4 with sizes that are not multiples of 4; batch 1 broadcast on either side."""
    a = rand((2, 5, 6), dtype, seed=10)
    b = rand((1, 6, 3), dtype, seed=11)
    check(CudaBackend.matrix_multiply(cu(a), cu(b)), a @ b, dtype)
    bt, at = b.transpose(0, 2, 1).copy(), a.transpose(0, 2, 1).copy()
    check(CudaBackend.matrix_multiply(cu(bt), cu(at)), bt @ at, dtype)  # batch 1 on the left


@pytest.mark.task3_4
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_strided_and_2d(dtype: type) -> None:
    a = rand((3, 4), dtype, seed=12)
    b = rand((5, 4), dtype, seed=13)
    bt = cu(b).permute(1, 0)  # transposed view, no copy
    out = CudaOps.matrix_multiply(cu(a), bt)  # 2-D @ 2-D stays 2-D at the ops level
    check(out, a @ b.T, dtype)
    check(cu(a) @ bt, a @ b.T, dtype)  # through MatMul.apply


@pytest.mark.task3_4
def test_matmul_nd_through_tensor(small_blocks: None) -> None:
    a = rand((2, 1, 3, 4), seed=14)
    b = rand((3, 4, 2), seed=15)
    check(cu(a) @ cu(b), a @ b, np.float64)


@pytest.mark.task3_4
def test_matmul_shape_errors() -> None:
    with pytest.raises(ValueError):
        CudaOps.matrix_multiply(cu(rand((1, 2, 3))), cu(rand((1, 4, 2))))
    with pytest.raises(ValueError):
        CudaBackend.matrix_multiply(cu(rand((2, 3))), cu(rand((3, 2))))  # backend level: 3-D only


@pytest.mark.task3_4
@pytest.mark.parametrize("size", [2, 5])
def test_mm_practice(size: int) -> None:
    a = rand((size, size), seed=size)
    b = rand((size, size), seed=size + 1)
    out = mm_practice(cu(a), cu(b))
    assert isinstance(out, TensorData) and out.shape == (size, size)
    np.testing.assert_allclose(out._storage.copy_to_host().reshape(size, size), a @ b)
    np.testing.assert_allclose(out._storage[size + 1], (a @ b)[1, 1])  # course style access


@pytest.mark.task3_4
def test_mm_practice_rejects_big() -> None:
    with pytest.raises(ValueError):
        mm_practice(cu(rand((2, 3))), cu(rand((3, 2))))


# ---------------------------------------------------------------------------------------------------------------------
# task3_3 / task3_4: the backend as a whole: storage, dtype, caching, interop, gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_to_numpy_round_trip_keeps_dtype(dtype: type) -> None:
    x = rand((2, 3), dtype, seed=16)
    t = cu(x)
    assert t.dtype == dtype and t._tensor._storage.dtype == dtype
    back = t.to_numpy()
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(tensor(x.tolist(), backend=CudaBackend, dtype=dtype).to_numpy(), x)


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_stays_on_device(dtype: type) -> None:
    a = cu(rand((2, 3), dtype, seed=17))
    outs = [a + a, -a, a.sum(1), a.zeros(), a.permute(1, 0).contiguous()]  # matmul: `check` in the task3_4 tests
    for o in outs:
        s = o._tensor._storage
        assert is_cuda_storage(s) and not isinstance(s, np.ndarray)
        assert s.dtype == dtype
        assert o.dtype == dtype


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_host_tensor_data_moves_to_device(dtype: type) -> None:
    """Course code builds ``Tensor(TensorData(values, shape, strides), backend=CudaBackend)`` from host values: the
    storage is copied to the device once, with its layout; the caller's TensorData stays on the host."""
    x = rand((2, 3), dtype, seed=21)
    td = TensorData(np.ascontiguousarray(x.T).reshape(-1), (2, 3), (1, 2), dtype=dtype)  # a transposed layout
    t = Tensor(td, backend=CudaBackend)
    assert t.is_cuda and is_cuda_storage(t._tensor._storage) and t.dtype == dtype
    assert t._tensor.strides == (1, 2)
    assert not td.is_cuda and isinstance(td._storage, np.ndarray)
    check(t, x, dtype)
    check(t * t + t, x * x + x, dtype)
    device_td = t._tensor
    with pytest.raises(ValueError, match="SimpleOps"):
        Tensor(device_td)  # device storage for the host backend is an error, not a silent copy


@pytest.mark.task3_3
@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_storage_and_fill(dtype: type) -> None:
    z = CudaOps.zeros_storage(7, dtype)
    assert is_cuda_storage(z) and z.dtype == dtype
    np.testing.assert_array_equal(z.copy_to_host(), np.zeros(7, dtype))
    fill_kernel[1, 8](z, 5, np.dtype(dtype).type(2.5))  # the device-side fill used on a real GPU
    np.testing.assert_array_equal(z.copy_to_host(), np.array([2.5] * 5 + [0.0] * 2, dtype))
    assert CudaOps.storage_to_numpy(z).dtype == dtype


@pytest.mark.task3_3
def test_kernels_cached_per_function() -> None:
    """One compiled kernel per (scalar function, constants): building ops twice reuses it."""
    CudaOps.map(operators.neg)(cu(rand((2,))))
    CudaOps.map(operators.neg)(cu(rand((2,), np.float32)))
    assert _kernel("map", operators.neg) is _kernel("map", operators.neg)
    assert _kernel("reduce", operators.add, 32, np.dtype(np.float64)) is not _kernel(
        "reduce", operators.add, 32, np.dtype(np.float32)
    )
    assert matmul_kernel(8, np.float32) is matmul_kernel(8, np.float32)
    # shape/strides device copies are shared by tensors of the same layout
    assert _meta(cu(rand((2, 3)))._tensor) is _meta(cu(rand((2, 3), seed=1))._tensor)


@pytest.mark.task3_3
def test_cuda_array_interface() -> None:
    x = rand((3, 4), np.float32, seed=18)
    t = cu(x).permute(1, 0)
    cai = cuda_array_interface(t._tensor)
    assert cai["shape"] == (4, 3)
    assert cai["strides"] == (4, 16)
    assert cai["typestr"] == np.dtype(np.float32).str
    assert cai["version"] == 3 and cai["data"][1] is False
    if SIMULATOR:  # the pointer is the host array standing in for device memory: read it back through NumPy
        holder = type("H", (), {"__array_interface__": dict(cai, version=3)})()
        np.testing.assert_array_equal(np.asarray(holder), x.T)
    else:  # pragma: no cover - real GPU
        from numba import cuda

        holder = type("H", (), {"__cuda_array_interface__": cai})()
        np.testing.assert_array_equal(cuda.as_cuda_array(holder).copy_to_host(), x.T)
    if hasattr(type(t), "__cuda_array_interface__"):  # exposed by Tensor (delegates here)
        assert t.__cuda_array_interface__["strides"] == cai["strides"]


@pytest.mark.task3_3
def test_too_many_dims() -> None:
    a = cu(np.zeros((1,) * 9))
    with pytest.raises(ValueError):
        CudaBackend.neg_map(a.permute(*reversed(range(9))))


@pytest.mark.task3_3
def test_grad_check_elementwise() -> None:
    a = cu(rand((2, 3), seed=19))
    b = cu(rand((3,), seed=20))
    grad_check(lambda x, y: (x * y + x).sigmoid(), a, b)


@pytest.mark.task3_4
def test_grad_check_reduce_and_matmul(small_blocks: None) -> None:
    a = cu(rand((2, 3), seed=21))
    b = cu(rand((3, 2), seed=22))
    grad_check(lambda x, y: (x @ y).sum(0), a, b)


@pytest.mark.task3_3
def test_grad_check_permute_log() -> None:
    a = cu(np.abs(rand((2, 3), seed=23)) + 0.5)
    grad_check(lambda x: x.permute(1, 0).log().relu(), a)


# ---------------------------------------------------------------------------------------------------------------------
# Compiles for a real GPU: typing and lowering to NVVM IR need neither a GPU nor NVVM.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task3_3
@pytest.mark.skipif(SKIP_LOWERING, reason="MINITORCH_SKIP_LOWERING=1")
def test_kernels_lower_for_gpu() -> None:
    """The kernels type-check and lower for sm_90 (catches code that only the simulator accepts: Python objects,
    untyped constants, runtime-sized arrays). Every scalar function in float32 and each kernel kind in float64;
    ``MINITORCH_FULL_LOWERING=1`` lowers every combination. Runs in a subprocess without the simulator, started
    when this module's tests start (see ``_lowering``)."""
    proc = _LOWERING.pop("proc", None) or _spawn_lowering()
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0 and "AttributeError" in err and ("compile_cuda" in err or "get_current_device" in err):
        pytest.skip("numba-cuda internals changed: " + err[-300:])
    assert proc.returncode == 0 and "LOWERED" in out, err[-3000:]
