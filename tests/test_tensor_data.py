"""Tests of minitorch.tensor_data: layout, indexing, permutation, broadcasting, dtypes (course tasks 2.1, 2.2)."""

from typing import Tuple

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numba import cuda

from minitorch.tensor_data import (
    IndexingError,
    TensorData,
    broadcast_index,
    index_to_position,
    is_cuda_storage,
    prod,
    shape_broadcast,
    strides_from_shape,
    to_index,
)

small_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


@st.composite
def tensor_datas(draw: st.DrawFn) -> TensorData:
    """A TensorData of a random small shape, permuted (non-contiguous) half the time."""
    shape = draw(small_shapes)
    data = np.arange(prod(shape), dtype=np.float64)
    td = TensorData(data, shape)
    if draw(st.booleans()):
        order = draw(st.permutations(range(td.dims)))
        td = td.permute(*order)
    return td


# --------------------------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task2_1
def test_layout() -> None:
    td = TensorData(np.arange(15.0), (3, 5), (5, 1))
    assert td.is_contiguous()
    assert td.shape == (3, 5)
    assert td.strides == (5, 1)
    assert td._shape.dtype == np.int32 and td._strides.dtype == np.int32
    assert td.index((1, 0)) == 5
    assert td.index((1, 2)) == 7
    assert td.get((2, 4)) == 14.0
    assert td.size == 15 and td.dims == 2

    td = TensorData(np.arange(15.0), (5, 3), (1, 5))
    assert td.shape == (5, 3)
    assert not td.is_contiguous()
    assert td.index((1, 0)) == 1
    assert td.index((1, 2)) == 11


@pytest.mark.task2_1
def test_layout_bad() -> None:
    with pytest.raises(IndexingError):
        TensorData([0.0] * 3, (3, 5), (6,))
    with pytest.raises(IndexingError, match="too small"):
        TensorData([0.0] * 3, (2, 2))


@pytest.mark.task2_1
def test_size_one_dims_ignored_by_contiguity() -> None:
    assert TensorData(np.zeros(3), (3, 1), (1, 7)).is_contiguous()
    assert TensorData(np.zeros(3), (1, 3), (99, 1)).is_contiguous()


@pytest.mark.task2_1
def test_strides_from_shape() -> None:
    assert strides_from_shape((2, 3, 4)) == (12, 4, 1)
    assert strides_from_shape((5,)) == (1,)
    assert strides_from_shape(()) == ()


@pytest.mark.task2_1
@given(tensor_datas())
def test_enumeration(td: TensorData) -> None:
    """indices() visits every element exactly once and every position is a valid storage position."""
    indices = list(td.indices())
    assert len(indices) == td.size
    assert len(set(indices)) == td.size
    positions = {td.index(ind) for ind in indices}
    assert positions == set(range(td.size))
    for ind in indices:
        for i, p in enumerate(ind):
            assert 0 <= p < td.shape[i]


@pytest.mark.task2_1
@given(small_shapes)
def test_to_index_round_trip(shape: Tuple[int, ...]) -> None:
    """to_index followed by index_to_position with contiguous strides is the identity on ordinals."""
    sh = np.array(shape, dtype=np.int32)
    st_ = np.array(strides_from_shape(shape), dtype=np.int32)
    out = np.zeros(len(shape), dtype=np.int32)
    for ordinal in range(prod(shape)):
        to_index(ordinal, sh, out)
        assert tuple(out) == np.unravel_index(ordinal, shape)
        assert index_to_position(out, st_) == ordinal


@pytest.mark.task2_1
def test_helpers_accept_longer_index_arrays() -> None:
    """Kernels pass fixed-size scratch arrays: only the first len(shape) entries are used."""
    out = np.full(8, -1, dtype=np.int32)
    to_index(5, np.array([2, 3], dtype=np.int32), out)
    assert tuple(out[:2]) == (1, 2) and out[2] == -1
    assert index_to_position(out, np.array([3, 1], dtype=np.int32)) == 5


@pytest.mark.task2_1
@given(tensor_datas(), st.data())
def test_index(td: TensorData, data: st.DataObject) -> None:
    ind = data.draw(st.tuples(*[st.integers(0, s - 1) for s in td.shape]))
    assert td.index(ind) == int(np.dot(ind, td.strides))
    assert td.index(np.array(ind, dtype=np.int32)) == td.index(ind)
    # Wrong number of entries
    with pytest.raises(IndexingError, match="entries"):
        td.index(ind + (0,))
    # Out of range
    bad = list(ind)
    bad[0] = td.shape[0]
    with pytest.raises(IndexingError, match="out of range"):
        td.index(tuple(bad))
    # Negative
    bad[0] = -1
    with pytest.raises(IndexingError, match="Negative"):
        td.index(tuple(bad))


@pytest.mark.task2_1
@given(tensor_datas(), st.data())
def test_permute(td: TensorData, data: st.DataObject) -> None:
    order = data.draw(st.permutations(range(td.dims)))
    td2 = td.permute(*order)
    assert td2.shape == tuple(td.shape[o] for o in order)
    assert td2._storage is td._storage
    for ind in td.indices():
        ind2 = tuple(ind[o] for o in order)
        assert td.get(ind) == td2.get(ind2)
    # Permuting back with the inverse order restores shape and strides.
    inverse = tuple(int(i) for i in np.argsort(order))
    td3 = td2.permute(*inverse)
    assert td3.shape == td.shape and td3.strides == td.strides


@pytest.mark.task2_1
def test_permute_bad_order() -> None:
    td = TensorData(np.zeros(6), (2, 3))
    for order in [(0,), (0, 0), (0, 2), (1, 0, 2)]:
        with pytest.raises(IndexingError, match="permutation"):
            td.permute(*order)
    assert td.permute((1, 0)).shape == (3, 2)


@pytest.mark.task2_1
def test_contiguity_of_permutations() -> None:
    td = TensorData(np.zeros(24), (2, 3, 4))
    assert td.is_contiguous()
    assert not td.permute(1, 0, 2).is_contiguous()
    assert not td.permute(2, 1, 0).is_contiguous()
    assert td.permute(2, 1, 0).permute(2, 1, 0).is_contiguous()


@pytest.mark.task2_1
def test_get_set_sample_string() -> None:
    td = TensorData([0.0] * 6, (2, 3))
    td.set((1, 2), 4.5)
    assert td.get((1, 2)) == 4.5
    assert td._storage[5] == 4.5
    for _ in range(20):
        idx = td.sample()
        assert len(idx) == 2 and 0 <= idx[0] < 2 and 0 <= idx[1] < 3
    text = td.to_string()
    assert "4.50" in text and text.count("[") == 3
    storage, shape, strides = td.tuple()
    assert storage is td._storage and tuple(shape) == (2, 3) and tuple(strides) == (3, 1)
    one = TensorData([3.0], (1,))
    assert one.get(0) == 3.0


# --------------------------------------------------------------------------------------------------------------------
# Dtypes and storage kinds
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task2_1
def test_dtypes() -> None:
    assert TensorData([1, 2, 3], (3,)).dtype == np.float64
    assert TensorData(np.arange(3), (3,)).dtype == np.float64  # ints become float64
    td32 = TensorData(np.arange(3, dtype=np.float32), (3,))
    assert td32.dtype == np.float32 and td32._storage.dtype == np.float32
    assert TensorData([1.0, 2.0], (2,), dtype=np.float32).dtype == np.float32
    assert TensorData(np.zeros((2, 3)), (2, 3))._storage.ndim == 1
    assert not td32.is_cuda
    assert not is_cuda_storage(np.zeros(3))


@pytest.mark.task2_1
@pytest.mark.cuda
def test_cuda_storage_detection_and_meta() -> None:
    dev = cuda.to_device(np.arange(6, dtype=np.float32))
    assert is_cuda_storage(dev)
    td = TensorData(dev, (2, 3))
    assert td.is_cuda and td.dtype == np.float32
    assert td.get((1, 1)) == 4.0
    shape, strides = td.device_meta()
    assert td.device_meta()[0] is shape  # cached
    assert tuple(shape.copy_to_host()) == (2, 3) and tuple(strides.copy_to_host()) == (3, 1)
    assert td.permute(1, 0).is_cuda
    assert "4.00" in td.to_string()


# --------------------------------------------------------------------------------------------------------------------
# Broadcasting
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task2_2
def test_shape_broadcast() -> None:
    assert shape_broadcast((1,), (5, 5)) == (5, 5)
    assert shape_broadcast((5, 5), (1,)) == (5, 5)
    assert shape_broadcast((1, 5, 5), (5, 5)) == (1, 5, 5)
    assert shape_broadcast((5, 1, 5, 1), (1, 5, 1, 5)) == (5, 5, 5, 5)
    assert shape_broadcast((2, 5), (5,)) == (2, 5)
    assert shape_broadcast((7, 2, 5), (5,)) == (7, 2, 5)
    assert shape_broadcast((5, 7, 5, 1), (1, 5, 5)) == (5, 7, 5, 5)
    assert shape_broadcast((), (3,)) == (3,)


@pytest.mark.task2_2
@pytest.mark.parametrize("a,b", [((2, 5), (5, 2)), ((5, 7, 5, 1), (1, 5, 1, 5)), ((3,), (4,))])
def test_shape_broadcast_error_names_shapes(a: Tuple[int, ...], b: Tuple[int, ...]) -> None:
    with pytest.raises(IndexingError) as info:
        shape_broadcast(a, b)
    assert str(a) in str(info.value) and str(b) in str(info.value)
    with pytest.raises(ValueError):  # IndexingError is also a ValueError
        shape_broadcast(a, b)


@st.composite
def broadcast_pair(draw: st.DrawFn) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    big = draw(small_shapes)
    n = draw(st.integers(0, len(big)))
    small = tuple(draw(st.sampled_from([1, s])) for s in big[len(big) - n :])
    return big, small


@pytest.mark.task2_2
@given(broadcast_pair(), st.booleans())
def test_shape_broadcast_matches_numpy(pair: Tuple[Tuple[int, ...], Tuple[int, ...]], swap: bool) -> None:
    a, b = pair if not swap else pair[::-1]
    assert shape_broadcast(a, b) == np.broadcast_shapes(a, b)


@pytest.mark.task2_2
@given(broadcast_pair())
def test_broadcast_index(pair: Tuple[Tuple[int, ...], Tuple[int, ...]]) -> None:
    """Reading the small tensor at broadcast_index gives NumPy's broadcast value."""
    big, small = pair
    values = np.arange(prod(small), dtype=np.float64).reshape(small) if small else np.array([0.0])
    small_shape = small if small else (1,)
    expected = np.broadcast_to(values.reshape(small_shape), shape_broadcast(big, small_shape))
    full = expected.shape
    big_index = np.zeros(len(full), dtype=np.int32)
    out_index = np.zeros(len(small_shape), dtype=np.int32)
    td = TensorData(values.reshape(-1), small_shape)
    for ordinal in range(prod(full)):
        to_index(ordinal, np.array(full, dtype=np.int32), big_index)
        broadcast_index(big_index, np.array(full, dtype=np.int32), td._shape, out_index)
        pos = index_to_position(out_index, td._strides)
        assert td._storage[pos] == expected[tuple(big_index)]


# --------------------------------------------------------------------------------------------------------------------
# The index helpers compile unchanged with Numba (CPU and CUDA)
# --------------------------------------------------------------------------------------------------------------------


_nb_to_index = numba.njit(inline="always")(to_index)
_nb_index_to_position = numba.njit(inline="always")(index_to_position)
_nb_broadcast_index = numba.njit(inline="always")(broadcast_index)


@numba.njit
def _nb_positions(big_shape: np.ndarray, shape: np.ndarray, strides: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    big_index = np.zeros(16, dtype=np.int32)  # oversize scratch arrays, as kernels use
    index = np.zeros(16, dtype=np.int32)
    for i in range(size):
        _nb_to_index(i, big_shape, big_index)
        _nb_broadcast_index(big_index, big_shape, shape, index)
        out[i] = _nb_index_to_position(index, strides)
    return out


def _py_positions(big_shape: np.ndarray, shape: np.ndarray, strides: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    big_index = np.zeros(16, dtype=np.int32)
    index = np.zeros(16, dtype=np.int32)
    for i in range(size):
        to_index(i, big_shape, big_index)
        broadcast_index(big_index, big_shape, shape, index)
        out[i] = index_to_position(index, strides)
    return out


@pytest.mark.task2_2
def test_helpers_compile_with_njit() -> None:
    big = np.array([2, 3, 4], dtype=np.int32)
    small = np.array([3, 1], dtype=np.int32)
    strides = np.array([1, 5], dtype=np.int32)
    np.testing.assert_array_equal(_nb_positions(big, small, strides, 24), _py_positions(big, small, strides, 24))


_d_to_index = cuda.jit(device=True)(to_index)
_d_index_to_position = cuda.jit(device=True)(index_to_position)
_d_broadcast_index = cuda.jit(device=True)(broadcast_index)


@cuda.jit
def _cuda_positions(out, big_shape, shape, strides, size):  # type: ignore[no-untyped-def]
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i < size:
        big_index = cuda.local.array(8, numba.int32)
        index = cuda.local.array(8, numba.int32)
        _d_to_index(i, big_shape, big_index)
        _d_broadcast_index(big_index, big_shape, shape, index)
        out[i] = _d_index_to_position(index, strides)


@pytest.mark.task2_2
@pytest.mark.cuda
def test_helpers_compile_as_cuda_device_functions() -> None:
    big = np.array([2, 3], dtype=np.int32)
    small = np.array([3], dtype=np.int32)
    strides = np.array([2], dtype=np.int32)
    out = np.zeros(6, dtype=np.int64)
    _cuda_positions[1, 8](out, big, small, strides, 6)
    np.testing.assert_array_equal(out, _py_positions(big, small, strides, 6))
