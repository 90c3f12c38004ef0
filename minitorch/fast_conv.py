"""1-D and 2-D convolution as `Function`s (MiniTorch module 4 semantics), for every backend.

Course semantics: ``out[b, o, w] = sum_{c, k} weight[o, c, k] * input[b, c, w + k]`` (``w - k`` with
``reverse=True``); positions past the edge read zero, so the output has the input's width. 2-D is the same over
``(h + i, w + j)``.

Both directions are computed with NumPy on host copies (one shifted input per kernel offset, contracted over the
channels with a matrix product), and the results are wrapped back onto the input's backend with its dtype. The
backward pass uses that the adjoint of "shift by k" is "shift by -k". The 1-D and 2-D versions are separate
functions (course tasks 4.1 and 4.2) built on the same two helpers, `_shift` and `_contract`.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

from .autodiff import Context
from .tensor import Tensor
from .tensor_functions import Function, from_numpy


def _shift(x: np.ndarray, offsets: Tuple[int, ...], reverse: bool) -> np.ndarray:
    """``y[..., j] = x[..., j + k]`` (``j - k`` when `reverse`) over the trailing spatial dims; zero outside."""
    y = np.zeros_like(x)
    lead = x.ndim - len(offsets)
    src = [slice(None)] * x.ndim
    dst = [slice(None)] * x.ndim
    for d, k in enumerate(offsets):
        n = x.shape[lead + d]
        if k >= n:
            return y
        if reverse:
            dst[lead + d], src[lead + d] = slice(k, n), slice(0, n - k)
        else:
            dst[lead + d], src[lead + d] = slice(0, n - k), slice(k, n)
    y[tuple(dst)] = x[tuple(src)]
    return y


def _check(input: Tensor, weight: Tensor, spatial: int) -> None:
    name = f"conv{spatial}d"
    if input.dims != spatial + 2 or weight.dims != spatial + 2:
        raise ValueError(
            f"{name}: input must be (batch, in_channels, {'h, w' if spatial == 2 else 'w'}) and weight "
            f"(out_channels, in_channels, {'kh, kw' if spatial == 2 else 'kw'}); got shapes {input.shape} and "
            f"{weight.shape}."
        )
    if input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{name}: in_channels differ, input shape {input.shape} and weight shape {weight.shape}."
        )


def _contract(xs: np.ndarray, wk: np.ndarray) -> np.ndarray:
    """Mix the channels: ``xs (B, C, *S)`` and ``wk (O, C)`` -> ``(B, O, *S)``, ``sum_c wk[o, c] * xs[b, c, ...]``."""
    return np.moveaxis(np.tensordot(xs, wk, axes=([1], [1])), -1, 1)


def _conv1d_forward(x: np.ndarray, w: np.ndarray, reverse: bool) -> np.ndarray:
    """x ``(B, C, W)``, w ``(O, C, K)`` -> ``(B, O, W)``: one shifted copy of x per kernel offset k, its channels
    mixed by ``w[:, :, k]``, summed over k."""
    # BEGIN SOLUTION task4_1: sum over offsets k of _contract(x shifted by k, w[:, :, k])
    out = np.zeros((x.shape[0], w.shape[0], x.shape[2]), dtype=x.dtype)
    for k in range(w.shape[2]):
        out += _contract(_shift(x, (k,), reverse), w[:, :, k])
    return out
    # END SOLUTION


def _conv1d_backward(x: np.ndarray, w: np.ndarray, g: np.ndarray, reverse: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients for x ``(B, C, W)`` and w ``(O, C, K)`` from g ``(B, O, W)``.

    Offset k's term is linear in x through "shift by k": its adjoint shifts the other way (``not reverse``).
    """
    # BEGIN SOLUTION task4_1: per offset k, the adjoint of its forward term: for x (shift back) and w[:, :, k]
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    for k in range(w.shape[2]):
        gx += _shift(_contract(g, w[:, :, k].T), (k,), not reverse)
        gw[:, :, k] = np.tensordot(g, _shift(x, (k,), reverse), axes=([0, 2], [0, 2]))
    return gx, gw
    # END SOLUTION


def _conv2d_forward(x: np.ndarray, w: np.ndarray, reverse: bool) -> np.ndarray:
    """x ``(B, C, H, W)``, w ``(O, C, KH, KW)`` -> ``(B, O, H, W)``: as `_conv1d_forward`, over offsets (i, j)."""
    # BEGIN SOLUTION task4_2: sum over offsets (i, j) of _contract(x shifted by (i, j), w[:, :, i, j])
    out = np.zeros((x.shape[0], w.shape[0]) + x.shape[2:], dtype=x.dtype)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            out += _contract(_shift(x, (i, j), reverse), w[:, :, i, j])
    return out
    # END SOLUTION


def _conv2d_backward(x: np.ndarray, w: np.ndarray, g: np.ndarray, reverse: bool) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients for x ``(B, C, H, W)`` and w ``(O, C, KH, KW)`` from g ``(B, O, H, W)`` (see `_conv1d_backward`)."""
    # BEGIN SOLUTION task4_2: as _conv1d_backward, for every offset (i, j)
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            gx += _shift(_contract(g, w[:, :, i, j].T), (i, j), not reverse)
            gw[:, :, i, j] = np.tensordot(g, _shift(x, (i, j), reverse), axes=([0, 2, 3], [0, 2, 3]))
    return gx, gw
    # END SOLUTION


class _ConvFun(Function):
    """Shared glue: NumPy copies in, the subclass's `conv_forward` / `conv_backward`, tensors on the input's backend
    out."""

    spatial: int
    conv_forward: Callable[[np.ndarray, np.ndarray, bool], np.ndarray]
    conv_backward: Callable[[np.ndarray, np.ndarray, np.ndarray, bool], Tuple[np.ndarray, np.ndarray]]

    @classmethod
    def forward(cls, ctx: Context, input: Tensor, weight: Tensor, reverse: bool = False) -> Tensor:  # type: ignore[override]
        _check(input, weight, cls.spatial)
        ctx.save_for_backward(input, weight, bool(reverse))
        out = cls.conv_forward(input.to_numpy(), weight.to_numpy(), bool(reverse))
        return from_numpy(out, backend=input.backend)

    @classmethod
    def backward(cls, ctx: Context, grad_output: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        input, weight, reverse = ctx.saved_values
        gx, gw = cls.conv_backward(input.to_numpy(), weight.to_numpy(), grad_output.to_numpy(), reverse)
        return from_numpy(gx, backend=input.backend), from_numpy(gw, backend=input.backend)


class Conv1dFun(_ConvFun):
    """1-D convolution: input ``(batch, in_channels, width)``, weight ``(out_channels, in_channels, kw)`` ->
    ``(batch, out_channels, width)``. ``Conv1dFun.apply(input, weight[, reverse])``."""

    spatial = 1
    conv_forward = staticmethod(_conv1d_forward)
    conv_backward = staticmethod(_conv1d_backward)


class Conv2dFun(_ConvFun):
    """2-D convolution: input ``(batch, in_channels, height, width)``, weight
    ``(out_channels, in_channels, kh, kw)`` -> ``(batch, out_channels, height, width)``."""

    spatial = 2
    conv_forward = staticmethod(_conv2d_forward)
    conv_backward = staticmethod(_conv2d_backward)


def conv1d(input: Tensor, weight: Tensor, reverse: bool = False) -> Tensor:
    """Differentiable 1-D convolution (see `Conv1dFun`)."""
    return Conv1dFun.apply(input, weight, reverse)


def conv2d(input: Tensor, weight: Tensor, reverse: bool = False) -> Tensor:
    """Differentiable 2-D convolution (see `Conv2dFun`)."""
    return Conv2dFun.apply(input, weight, reverse)
