"""Optimizers: SGD (Scalars and Tensors) and Adam.

Parameters are duck-typed: a Scalar value exposes ``.data`` and ``.derivative``, a Tensor value exposes ``.grad``,
``.to_numpy()``, ``.backend`` and ``.dtype``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .module import Parameter
from .scalar import Scalar


def _grad_of(value: Any) -> Optional[Any]:
    """The derivative stored on a parameter value: ``.derivative`` for Scalars, ``.grad`` for Tensors."""
    if value is None:
        return None
    if isinstance(value, Scalar):
        return value.derivative
    return getattr(value, "grad", None)


def _from_numpy_like(array: np.ndarray, like: Any) -> Any:
    """A new Tensor holding ``array``, with the dtype (if it has one) and the backend of the Tensor ``like``."""
    from .tensor import Tensor  # lazy: tensor.py is not needed for Scalar training

    dtype = getattr(like, "dtype", None)
    data = np.ascontiguousarray(array, dtype=dtype)
    return Tensor.make(data.ravel(), tuple(data.shape), backend=like.backend)


class Optimizer:
    """Base class: holds the list of Parameters and clears their derivatives."""

    def __init__(self, parameters: Sequence[Parameter]):
        self.parameters = list(parameters)

    def zero_grad(self) -> None:
        """Forget the derivatives of all parameters (call before each ``backward``)."""
        for p in self.parameters:
            value = p.value
            if value is None:
                continue
            if isinstance(value, Scalar):
                value.derivative = None
            elif hasattr(value, "grad"):
                value.grad = None


class SGD(Optimizer):
    """Stochastic gradient descent: ``value <- value - lr * derivative``."""

    def __init__(self, parameters: Sequence[Parameter], lr: float = 1.0):
        super().__init__(parameters)
        self.lr = lr

    def step(self) -> None:
        """Move every parameter that has a derivative one step downhill."""
        for p in self.parameters:
            value = p.value
            g = _grad_of(value)
            if g is None:
                continue
            if isinstance(value, Scalar):
                p.update(Scalar(value.data - self.lr * g))
            else:
                # Tensor arithmetic keeps the storage on the parameter's backend (e.g. on the GPU). Detaching first
                # records no graph; Parameter.update then marks the result as a fresh leaf.
                base = value.detach() if hasattr(value, "detach") else value
                p.update(base - self.lr * g)


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015) with bias correction.

    The update runs on NumPy copies of the value and gradient; the first and second moments are kept per parameter as
    NumPy arrays of the parameter's dtype. Works for Tensor parameters and, as a convenience, for Scalar ones. A CUDA
    tensor's update runs on the device (:func:`minitorch.cuda_ops.adam_step`, moments in device arrays).
    """

    def __init__(
        self,
        parameters: Sequence[Parameter],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(parameters)
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.state: Dict[int, Dict[str, Any]] = {}  # by parameter index: step, m, v

    def step(self) -> None:
        """Apply one Adam update to every parameter that has a derivative."""
        beta1, beta2 = self.betas
        for i, p in enumerate(self.parameters):
            value = p.value
            g = _grad_of(value)
            if g is None:
                continue
            is_scalar = isinstance(value, Scalar)
            if not is_scalar and getattr(value.backend, "cuda", False):  # on the device, no round trip via NumPy
                from .cuda_ops import adam_step

                st = self.state.get(i)
                if st is None or st.get("shape") != value.shape:
                    st = self.state[i] = {"step": 0, "shape": value.shape}
                p.update(adam_step(value, g, st, self.lr, self.betas, self.eps))
                continue
            if is_scalar:
                x = np.asarray(value.data, dtype=np.float64)
                grad = np.asarray(g, dtype=np.float64)
            else:
                x = np.asarray(value.to_numpy())
                grad = np.asarray(g.to_numpy(), dtype=x.dtype).reshape(x.shape)
            st = self.state.get(i)
            if st is None or st["m"].shape != x.shape:
                st = {"step": 0, "m": np.zeros_like(x), "v": np.zeros_like(x)}
                self.state[i] = st
            st["step"] += 1
            t = st["step"]
            m = st["m"] = (beta1 * st["m"] + (1.0 - beta1) * grad).astype(x.dtype, copy=False)
            v = st["v"] = (beta2 * st["v"] + (1.0 - beta2) * grad * grad).astype(x.dtype, copy=False)
            m_hat = m / (1.0 - beta1**t)
            v_hat = v / (1.0 - beta2**t)
            new = (x - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)).astype(x.dtype, copy=False)
            if is_scalar:
                p.update(Scalar(float(new)))
            else:
                p.update(_from_numpy_like(new, value))
