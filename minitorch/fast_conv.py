"""1-D and 2-D convolution as `Function`s (MiniTorch module 4 semantics), for every backend.

Course semantics: ``out[b, o, w] = sum_{c, k} weight[o, c, k] * input[b, c, w + k]`` (``w - k`` with
``reverse=True``); positions past the edge read zero, so the output has the input's width. 2-D is the same over
``(h + i, w + j)``.

Both directions are computed with NumPy on host copies (one shifted input per kernel offset, contracted over the
channels with a matrix product), and the results are wrapped back onto the input's backend with its dtype. The
backward pass uses that the adjoint of "shift by k" is "shift by -k".
"""

from __future__ import annotations

import itertools
from typing import Tuple

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


def _conv_forward(x: np.ndarray, w: np.ndarray, reverse: bool) -> np.ndarray:
    """x ``(B, C, *S)``, w ``(O, C, *K)`` -> ``(B, O, *S)``."""
    out = np.zeros((x.shape[0], w.shape[0]) + x.shape[2:], dtype=x.dtype)
    for ks in itertools.product(*(range(k) for k in w.shape[2:])):
        xs = _shift(x, ks, reverse)
        wk = w[(slice(None), slice(None)) + ks]  # (O, C)
        out += np.moveaxis(np.tensordot(xs, wk, axes=([1], [1])), -1, 1)
    return out


def _conv_backward(
    x: np.ndarray, w: np.ndarray, g: np.ndarray, reverse: bool
) -> Tuple[np.ndarray, np.ndarray]:
    """Gradients for input ``(B, C, *S)`` and weight ``(O, C, *K)`` from ``g`` ``(B, O, *S)``."""
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    spatial_axes = list(range(2, x.ndim))
    for ks in itertools.product(*(range(k) for k in w.shape[2:])):
        sel = (slice(None), slice(None)) + ks
        wk = w[sel]  # (O, C)
        d_shifted = np.moveaxis(np.tensordot(g, wk, axes=([1], [0])), -1, 1)  # (B, C, *S)
        gx += _shift(d_shifted, ks, not reverse)
        xs = _shift(x, ks, reverse)
        gw[sel] = np.tensordot(g, xs, axes=([0] + spatial_axes, [0] + spatial_axes))  # (O, C)
    return gx, gw


class _ConvFun(Function):
    spatial = 1

    @classmethod
    def forward(cls, ctx: Context, input: Tensor, weight: Tensor, reverse: bool = False) -> Tensor:  # type: ignore[override]
        _check(input, weight, cls.spatial)
        ctx.save_for_backward(input, weight, bool(reverse))
        out = _conv_forward(input.to_numpy(), weight.to_numpy(), bool(reverse))
        return from_numpy(out, backend=input.backend)

    @classmethod
    def backward(cls, ctx: Context, grad_output: Tensor) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        input, weight, reverse = ctx.saved_values
        gx, gw = _conv_backward(input.to_numpy(), weight.to_numpy(), grad_output.to_numpy(), reverse)
        return from_numpy(gx, backend=input.backend), from_numpy(gw, backend=input.backend)


class Conv1dFun(_ConvFun):
    """1-D convolution: input ``(batch, in_channels, width)``, weight ``(out_channels, in_channels, kw)`` ->
    ``(batch, out_channels, width)``. ``Conv1dFun.apply(input, weight[, reverse])``."""

    spatial = 1


class Conv2dFun(_ConvFun):
    """2-D convolution: input ``(batch, in_channels, height, width)``, weight
    ``(out_channels, in_channels, kh, kw)`` -> ``(batch, out_channels, height, width)``."""

    spatial = 2


def conv1d(input: Tensor, weight: Tensor, reverse: bool = False) -> Tensor:
    """Differentiable 1-D convolution (see `Conv1dFun`)."""
    return Conv1dFun.apply(input, weight, reverse)


def conv2d(input: Tensor, weight: Tensor, reverse: bool = False) -> Tensor:
    """Differentiable 2-D convolution (see `Conv2dFun`)."""
    return Conv2dFun.apply(input, weight, reverse)
