"""Optimizers: SGD on Scalars (and Tensors), Adam on Tensors (and Scalars)."""

from typing import List

import numpy as np
import pytest

from minitorch.module import Module, Parameter
from minitorch.optim import SGD, Adam
from minitorch.scalar import Scalar


class Quadratic(Module):
    """loss(x, y) = (x - 3)^2 + 2 (y + 1)^2, minimum 0 at (3, -1)."""

    def __init__(self) -> None:
        super().__init__()
        self.x = Parameter(Scalar(0.0))
        self.y = Parameter(Scalar(0.0))

    def forward(self) -> Scalar:
        dx = self.x.value - 3.0
        dy = self.y.value + 1.0
        return dx * dx + 2.0 * dy * dy


def _train(model: Quadratic, opt: "SGD | Adam", steps: int) -> List[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model()
        loss.backward()
        opt.step()
        losses.append(loss.data)
    return losses


@pytest.mark.task1_4
def test_sgd_scalar_quadratic() -> None:
    model = Quadratic()
    opt = SGD(model.parameters(), lr=0.1)
    losses = _train(model, opt, 50)
    assert losses[0] == pytest.approx(11.0)
    assert all(b <= a for a, b in zip(losses, losses[1:]))
    assert model.x.value.data == pytest.approx(3.0, abs=1e-3)
    assert model.y.value.data == pytest.approx(-1.0, abs=1e-3)
    # Parameters stay leaves that receive derivatives.
    assert model.x.value.is_leaf()


@pytest.mark.task1_4
def test_sgd_one_exact_step_and_zero_grad() -> None:
    w = Parameter(Scalar(2.0))
    opt = SGD([w], lr=0.25)
    (w.value * w.value).backward()  # d/dw w^2 = 4
    opt.step()
    assert w.value.data == pytest.approx(1.0)
    assert w.value.derivative is None  # the new value is a fresh leaf
    (w.value * 3.0).backward()
    assert w.value.derivative == 3.0
    opt.zero_grad()
    assert w.value.derivative is None
    opt.step()  # no derivative: nothing moves
    assert w.value.data == pytest.approx(1.0)


def test_adam_scalar_quadratic() -> None:
    model = Quadratic()
    opt = Adam(model.parameters(), lr=0.1)
    losses = _train(model, opt, 300)
    assert losses[-1] < 1e-3 * losses[0]
    # The first Adam step moves every parameter by about lr, whatever the gradient's scale.
    model2 = Quadratic()
    opt2 = Adam(model2.parameters(), lr=0.1)
    _train(model2, opt2, 1)
    assert model2.x.value.data == pytest.approx(0.1, rel=1e-6)
    assert model2.y.value.data == pytest.approx(-0.1, rel=1e-6)


def _adam_reference(x: np.ndarray, grads: List[np.ndarray], lr: float, b1: float, b2: float, eps: float) -> np.ndarray:
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return x


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_tensor_matches_reference(dtype: type, cuda: bool) -> None:
    """Adam on Tensors against the NumPy formula; on the CUDA backend the update runs on the device."""
    tensor_mod = pytest.importorskip("minitorch.tensor")
    Tensor = tensor_mod.Tensor
    backend = None
    if cuda:
        from minitorch.cuda_ops import CudaBackend

        backend = CudaBackend
    start = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.5]], dtype=dtype)
    target = np.array([[0.0, 1.0, 2.0], [-1.0, 0.5, 0.25]], dtype=dtype)
    w = Parameter(Tensor.make(start.ravel().copy(), start.shape, backend=backend))
    t = Tensor.make(target.ravel().copy(), target.shape, backend=backend)
    opt = Adam([w], lr=0.05, betas=(0.8, 0.95), eps=1e-6)

    x = start.astype(np.float64)
    grads = []
    for _ in range(5):
        opt.zero_grad()
        diff = w.value - t
        (diff * diff).sum().backward()
        grads.append(2 * (x - target))
        opt.step()
        x = _adam_reference(start.astype(np.float64), grads, 0.05, 0.8, 0.95, 1e-6)
        assert w.value.dtype == dtype
        assert w.value.shape == start.shape
        assert w.value.is_leaf()
        assert w.value.backend.cuda == cuda
        tol = 1e-10 if dtype == np.float64 else 1e-5
        np.testing.assert_allclose(w.value.to_numpy(), x, rtol=tol, atol=tol)


def test_sgd_tensor_step() -> None:
    tensor_mod = pytest.importorskip("minitorch.tensor")
    Tensor = tensor_mod.Tensor
    start = np.array([1.0, -2.0, 4.0])
    w = Parameter(Tensor.make(start.copy(), (3,)))
    opt = SGD([w], lr=0.1)
    (w.value * w.value).sum().backward()
    opt.step()
    np.testing.assert_allclose(w.value.to_numpy(), start - 0.1 * 2 * start)
    assert w.value.is_leaf() and w.value.grad is None
    (w.value * w.value).sum().backward()
    assert w.value.grad is not None
    opt.zero_grad()
    assert w.value.grad is None
