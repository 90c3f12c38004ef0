"""Tests of minitorch.nn and minitorch.fast_conv: pooling, max, softmax, dropout, convolution (course module 4)."""

from typing import Any, List, Tuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minitorch.nn as nn
from minitorch.tensor_functions import from_numpy, grad_check, rand, tensor
from minitorch.tensor_ops import SimpleBackend, TensorBackend


seeds = st.integers(0, 2**16)


def randn(seed: int, shape: Tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Distinct (tie-free) normal values."""
    return np.random.default_rng(seed).standard_normal(shape) * scale


# --------------------------------------------------------------------------------------------------------------------
# NumPy references
# --------------------------------------------------------------------------------------------------------------------


def np_softmax(a: np.ndarray, dim: int) -> np.ndarray:
    e = np.exp(a - a.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)


def np_logsoftmax(a: np.ndarray, dim: int) -> np.ndarray:
    m = a.max(axis=dim, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis=dim, keepdims=True))


def np_pool(a: np.ndarray, kernel: Tuple[int, int], reduce: Any) -> np.ndarray:
    b, c, h, w = a.shape
    kh, kw = kernel
    return reduce(a.reshape(b, c, h // kh, kh, w // kw, kw), axis=(3, 5))


def np_conv1d(x: np.ndarray, w: np.ndarray, reverse: bool = False) -> np.ndarray:
    """Direct loops over the course definition."""
    batch, cin, width = x.shape
    cout, _, kw = w.shape
    out = np.zeros((batch, cout, width))
    for b in range(batch):
        for o in range(cout):
            for p in range(width):
                for c in range(cin):
                    for k in range(kw):
                        q = p - k if reverse else p + k
                        if 0 <= q < width:
                            out[b, o, p] += w[o, c, k] * x[b, c, q]
    return out


def np_conv2d(x: np.ndarray, w: np.ndarray, reverse: bool = False) -> np.ndarray:
    batch, cin, height, width = x.shape
    cout, _, kh, kw = w.shape
    out = np.zeros((batch, cout, height, width))
    for b in range(batch):
        for o in range(cout):
            for y in range(height):
                for xx in range(width):
                    for c in range(cin):
                        for i in range(kh):
                            for j in range(kw):
                                yy, xj = (y - i, xx - j) if reverse else (y + i, xx + j)
                                if 0 <= yy < height and 0 <= xj < width:
                                    out[b, o, y, xx] += w[o, c, i, j] * x[b, c, yy, xj]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task4_3
def test_tile() -> None:
    a = np.arange(2 * 4 * 6, dtype=np.float64).reshape(1, 2, 4, 6)
    tiles, nh, nw = nn.tile(from_numpy(a), (2, 3))
    assert (nh, nw) == (2, 2) and tiles.shape == (1, 2, 2, 2, 6)
    expected = a.reshape(1, 2, 2, 2, 2, 3).transpose(0, 1, 2, 4, 3, 5).reshape(1, 2, 2, 2, 6)
    np.testing.assert_array_equal(tiles.to_numpy(), expected)
    with pytest.raises(ValueError, match="divide"):
        nn.tile(from_numpy(a), (3, 3))


@pytest.mark.task4_3
@given(seeds, st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 1), (4, 4)]), st.booleans())
def test_avgpool2d(seed: int, kernel: Tuple[int, int], permuted: bool) -> None:
    a = randn(seed, (1, 2, 4, 4))
    t = from_numpy(a)
    if permuted:  # a non-contiguous view with the same values
        t = from_numpy(np.ascontiguousarray(a.transpose(0, 1, 3, 2))).permute(0, 1, 3, 2)
    out = nn.avgpool2d(t, kernel)
    np.testing.assert_allclose(out.to_numpy(), np_pool(a, kernel, np.mean), atol=1e-12)
    grad_check(lambda x: nn.avgpool2d(x, kernel), t)


@pytest.mark.task4_4  # maxpool2d needs max (task 4.4)
@given(seeds, st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 1), (4, 4)]))
def test_maxpool2d(seed: int, kernel: Tuple[int, int]) -> None:
    a = randn(seed, (1, 2, 4, 4))
    t = from_numpy(a)
    out = nn.maxpool2d(t, kernel)
    np.testing.assert_allclose(out.to_numpy(), np_pool(a, kernel, np.max))
    grad_check(lambda x: nn.maxpool2d(x, kernel), t)


# --------------------------------------------------------------------------------------------------------------------
# Max and argmax
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task4_4
@given(seeds, st.integers(0, 2))
def test_max(seed: int, dim: int) -> None:
    a = randn(seed, (2, 3, 4))
    t = from_numpy(a)
    np.testing.assert_array_equal(nn.max(t, dim).to_numpy(), a.max(axis=dim, keepdims=True))
    np.testing.assert_array_equal(nn.max(t).to_numpy(), [a.max()])
    np.testing.assert_array_equal(nn.max(t, -1).to_numpy(), a.max(axis=-1, keepdims=True))
    grad_check(lambda x: nn.max(x, dim), t)
    grad_check(lambda x: nn.max(x), t)


@pytest.mark.task4_4
def test_max_ties_share_gradient() -> None:
    t = tensor([[1.0, 3.0, 3.0], [2.0, 0.0, -1.0]], requires_grad=True)
    nn.max(t, 1).sum().backward()
    assert t.grad is not None
    np.testing.assert_array_equal(t.grad.to_numpy(), [[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])


@pytest.mark.task4_4
def test_max_of_very_negative_values() -> None:
    t = tensor([-1e12, -2e12])
    assert nn.max(t, 0)[0] == -1e12


@pytest.mark.task4_4
@given(seeds, st.integers(0, 1))
def test_argmax(seed: int, dim: int) -> None:
    a = randn(seed, (3, 4))
    out = nn.argmax(from_numpy(a), dim).to_numpy()
    expected = np.zeros_like(a)
    idx = a.argmax(axis=dim)
    if dim == 0:
        expected[idx, np.arange(4)] = 1.0
    else:
        expected[np.arange(3), idx] = 1.0
    np.testing.assert_array_equal(out, expected)


# --------------------------------------------------------------------------------------------------------------------
# Softmax and log-softmax
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task4_4
@given(seeds, st.integers(0, 2))
def test_softmax(seed: int, dim: int) -> None:
    a = randn(seed, (2, 3, 4), scale=3.0)
    t = from_numpy(a)
    out = nn.softmax(t, dim)
    np.testing.assert_allclose(out.to_numpy(), np_softmax(a, dim), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.sum(dim).to_numpy(), 1.0, rtol=1e-12)
    grad_check(lambda x: nn.softmax(x, dim), t)


@pytest.mark.task4_4
@given(seeds, st.integers(0, 2))
def test_logsoftmax(seed: int, dim: int) -> None:
    a = randn(seed, (2, 3, 4), scale=3.0)
    t = from_numpy(a)
    out = nn.logsoftmax(t, dim)
    np.testing.assert_allclose(out.to_numpy(), np_logsoftmax(a, dim), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.exp().to_numpy(), np_softmax(a, dim), rtol=1e-10, atol=1e-12)
    grad_check(lambda x: nn.logsoftmax(x, dim), t)


@pytest.mark.task4_4
def test_softmax_is_stable() -> None:
    a = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1002.0, -1001.0]])
    for dtype in (np.float64, np.float32):
        t = from_numpy(a.astype(dtype))
        s = nn.softmax(t, 1)
        ls = nn.logsoftmax(t, 1)
        assert s.dtype == dtype and ls.dtype == dtype
        assert np.all(np.isfinite(s.to_numpy())) and np.all(np.isfinite(ls.to_numpy()))
        np.testing.assert_allclose(s.to_numpy(), np_softmax(a, 1), rtol=1e-5)
        np.testing.assert_allclose(ls.to_numpy(), np_logsoftmax(a, 1), rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task4_4
def test_dropout() -> None:
    np.random.seed(0)
    t = rand((20, 50)) + 1.0
    np.testing.assert_array_equal(nn.dropout(t, 0.0).to_numpy(), t.to_numpy())
    np.testing.assert_array_equal(nn.dropout(t, 0.5, ignore=True).to_numpy(), t.to_numpy())
    assert np.all(nn.dropout(t, 1.0).to_numpy() == 0.0)
    out = nn.dropout(t, 0.25).to_numpy()
    kept = out != 0.0
    assert 0.65 < kept.mean() < 0.85
    np.testing.assert_allclose(out[kept], t.to_numpy()[kept] / 0.75)  # inverted dropout scaling
    f32 = nn.dropout(rand((3,), dtype=np.float32), 0.5)
    assert f32.dtype == np.float32


@pytest.mark.task4_4
def test_dropout_gradient_follows_mask() -> None:
    np.random.seed(1)
    x = rand((4, 5), requires_grad=True)
    out = nn.dropout(x, 0.5)
    out.sum().backward()
    assert x.grad is not None
    np.testing.assert_allclose(x.grad.to_numpy(), (out.to_numpy() != 0) * 2.0)


# --------------------------------------------------------------------------------------------------------------------
# Convolution
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task4_1
def test_conv1d_simple() -> None:
    t = tensor([0.0, 1.0, 2.0, 3.0]).view(1, 1, 4)
    w = tensor([[1.0, 2.0, 3.0]]).view(1, 1, 3)
    np.testing.assert_array_equal(nn.conv1d(t, w).to_numpy(), [[[8.0, 14.0, 8.0, 3.0]]])
    np.testing.assert_array_equal(nn.conv1d(t, w, True).to_numpy(), [[[0.0, 1.0, 4.0, 10.0]]])
    assert nn.Conv1dFun.apply(t, w).shape == (1, 1, 4)


@pytest.mark.task4_1
@given(seeds, st.integers(1, 4), st.booleans())
def test_conv1d(seed: int, kw: int, reverse: bool) -> None:
    x = randn(seed, (2, 2, 5))
    w = randn(seed + 1, (3, 2, kw))
    tx, tw = from_numpy(x), from_numpy(w)
    out = nn.conv1d(tx, tw, reverse)
    np.testing.assert_allclose(out.to_numpy(), np_conv1d(x, w, reverse), atol=1e-12)
    grad_check(lambda a, b: nn.conv1d(a, b, reverse), tx, tw)


@pytest.mark.task4_2
@given(seeds, st.sampled_from([(1, 1), (2, 2), (1, 3), (3, 2)]), st.booleans())
def test_conv2d(seed: int, kernel: Tuple[int, int], reverse: bool) -> None:
    x = randn(seed, (2, 2, 4, 3))
    w = randn(seed + 1, (2, 2) + kernel)
    tx, tw = from_numpy(x), from_numpy(w)
    out = nn.conv2d(tx, tw, reverse)
    np.testing.assert_allclose(out.to_numpy(), np_conv2d(x, w, reverse), atol=1e-12)
    grad_check(lambda a, b: nn.conv2d(a, b, reverse), tx, tw)


@pytest.mark.task4_2
def test_conv_of_permuted_input_and_float32() -> None:
    x = randn(5, (1, 2, 3, 4))
    w = randn(6, (2, 2, 2, 2))
    tx = from_numpy(np.ascontiguousarray(x.transpose(0, 1, 3, 2))).permute(0, 1, 3, 2)
    np.testing.assert_allclose(nn.conv2d(tx, from_numpy(w)).to_numpy(), np_conv2d(x, w), atol=1e-12)
    out32 = nn.conv2d(from_numpy(x.astype(np.float32)), from_numpy(w.astype(np.float32)))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32.to_numpy(), np_conv2d(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.task4_1
def test_conv_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\(1, 2, 5\).*\(3, 3, 2\)"):
        nn.conv1d(rand((1, 2, 5)), rand((3, 3, 2)))
    with pytest.raises(ValueError):
        nn.conv1d(rand((2, 5)), rand((3, 2, 2)))
    with pytest.raises(ValueError):
        nn.conv2d(rand((1, 2, 5)), rand((3, 2, 2)))


# --------------------------------------------------------------------------------------------------------------------
# Every backend (tiny inputs)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.task4_4
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backend_nn_forward(backend: TensorBackend, dtype: Any) -> None:
    a = randn(7, (1, 1, 2, 4)).astype(dtype)
    t = from_numpy(a, backend=backend)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    checks = [(nn.softmax(t, 3), np_softmax(a, 3))]
    if dtype == np.float64 or backend is SimpleBackend:  # one kernel per (function, dtype) on compiled backends
        checks += [
            (nn.logsoftmax(t, 3), np_logsoftmax(a, 3)),
            (nn.max(t, 3), a.max(axis=3, keepdims=True)),
            (nn.maxpool2d(t, (2, 2)), np_pool(a, (2, 2), np.max)),
            (nn.avgpool2d(t, (2, 2)), np_pool(a, (2, 2), np.mean)),
            (nn.conv2d(t, from_numpy(np.ones((1, 1, 1, 2), dtype=dtype), backend=backend)), np_conv2d(a, np.ones((1, 1, 1, 2)))),
        ]
    for got, want in checks:
        assert got.backend is backend and got.dtype == dtype
        np.testing.assert_allclose(got.to_numpy(), want, **tol)


@pytest.mark.task4_4
def test_backend_nn_grad(backend: TensorBackend) -> None:
    t = from_numpy(randn(8, (1, 1, 2, 2)), backend=backend)
    w = from_numpy(randn(9, (1, 1, 1, 2)), backend=backend)
    grad_check(lambda x, k: nn.logsoftmax(nn.conv2d(x, k), 3) * nn.max(x, 2), t, w)


@pytest.mark.task4_4
def test_backends_agree(backends: List[TensorBackend]) -> None:
    a = randn(10, (2, 3))
    results = [nn.softmax(from_numpy(a, backend=be), 1).to_numpy() for be in backends]
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-12)
