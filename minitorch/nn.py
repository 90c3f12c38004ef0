"""Neural-network functions on tensors: pooling, max/argmax, softmax, dropout, convolution (MiniTorch module 4).

Everything here is built from tensor operations and the backend's reductions, so it runs on every backend and its
gradients come from the `Function`s it uses.
"""

from __future__ import annotations

from typing import Optional, Tuple

from .autodiff import Context
from .fast_conv import Conv1dFun, Conv2dFun, conv1d, conv2d
from .tensor import Tensor
from .tensor_functions import Function, _reduce_all, rand

__all__ = [
    "tile",
    "avgpool2d",
    "max_reduce",
    "argmax",
    "Max",
    "max",
    "softmax",
    "logsoftmax",
    "maxpool2d",
    "dropout",
    "Conv1dFun",
    "Conv2dFun",
    "conv1d",
    "conv2d",
]


def _dim(input: Tensor, dim: Optional[int]) -> Optional[int]:
    return input._check_dim(dim)


def tile(input: Tensor, kernel: Tuple[int, int]) -> Tuple[Tensor, int, int]:
    """Split each image into non-overlapping ``kh x kw`` tiles.

    Args:
        input: ``(batch, channel, height, width)``.
        kernel: ``(kh, kw)``, dividing height and width.

    Returns:
        ``(tiles, new_height, new_width)`` with tiles of shape ``(batch, channel, new_height, new_width, kh * kw)``.
    """
    # BEGIN SOLUTION task4_3: view (B, C, H, W) as (B, C, H/kh, kh, W/kw, kw), move kh next to kw, view as (..., kh*kw)
    batch, channel, height, width = input.shape
    kh, kw = kernel
    if height % kh != 0 or width % kw != 0:
        raise ValueError(f"tile: kernel {tuple(kernel)} does not divide the image size of shape {input.shape}.")
    nh, nw = height // kh, width // kw
    x = input if input._tensor.is_contiguous() else input.contiguous()
    x = x.view(batch, channel, nh, kh, nw, kw).permute(0, 1, 2, 4, 3, 5).contiguous()
    return x.view(batch, channel, nh, nw, kh * kw), nh, nw
    # END SOLUTION


def avgpool2d(input: Tensor, kernel: Tuple[int, int]) -> Tensor:
    """Average pooling: ``(batch, channel, h, w) -> (batch, channel, h // kh, w // kw)``."""
    # BEGIN SOLUTION task4_3: the mean of each tile (see tile), viewed as (B, C, H/kh, W/kw)
    batch, channel = input.shape[:2]
    tiles, nh, nw = tile(input, kernel)
    return tiles.mean(4).view(batch, channel, nh, nw)
    # END SOLUTION


def max_reduce(input: Tensor, dim: Optional[int] = None) -> Tensor:
    """Max along `dim` (kept with size 1), or of everything (shape ``(1,)``); no autodiff."""
    dim = _dim(input, dim)
    if dim is None:
        return _reduce_all(input, input.f.max_reduce)
    return input.f.max_reduce(input, dim)


def argmax(input: Tensor, dim: Optional[int] = None) -> Tensor:
    """One-hot (1.0) where the max along `dim` is reached (every maximum when there are ties); a constant."""
    # BEGIN SOLUTION task4_4: 1.0 where input equals its max along dim (max_reduce), else 0.0; no gradient
    m = max_reduce(input.detach(), dim)
    return input.f.eq_zip(input.detach(), m)
    # END SOLUTION


class Max(Function):
    """Max along a dim (kept with size 1), or over everything (shape ``(1,)``).

    Backward sends the gradient to the argmax; ties share it equally.
    """

    @staticmethod
    def forward(ctx: Context, input: Tensor, dim: Optional[int] = None) -> Tensor:
        # BEGIN SOLUTION task4_4: max_reduce over dim (or everything); save what backward needs
        out = max_reduce(input, dim)
        ctx.save_for_backward(input, out, dim)
        return out
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tensor:
        # BEGIN SOLUTION task4_4: grad_output to the positions of the max, split equally between ties
        input, out, dim = ctx.saved_values
        f = grad_output.f
        mask = f.eq_zip(input, out)
        count = _reduce_all(mask, f.add_reduce) if dim is None else f.add_reduce(mask, dim)
        return f.mul_zip(mask, f.mul_zip(grad_output, f.inv_map(count)))
        # END SOLUTION


def max(input: Tensor, dim: Optional[int] = None) -> Tensor:
    """Differentiable max along `dim` (or over everything)."""
    return Max.apply(input, _dim(input, dim))


def softmax(input: Tensor, dim: int) -> Tensor:
    r"""$\exp(x_i) / \sum_j \exp(x_j)$ along `dim`, with the max subtracted first for stability."""
    # BEGIN SOLUTION task4_4: exp(x - max) / sum exp(x - max) along dim (subtracting the max avoids overflow)
    dim = _dim(input, dim)
    shifted = input - max_reduce(input.detach(), dim)
    e = shifted.exp()
    return e / e.sum(dim)
    # END SOLUTION


def logsoftmax(input: Tensor, dim: int) -> Tensor:
    r"""$x_i - \log \sum_j \exp(x_j)$ along `dim`, computed as $(x_i - m) - \log \sum_j \exp(x_j - m)$."""
    # BEGIN SOLUTION task4_4: (x - m) - log sum exp(x - m) along dim, m the max (the log-sum-exp trick)
    dim = _dim(input, dim)
    shifted = input - max_reduce(input.detach(), dim)
    return shifted - shifted.exp().sum(dim).log()
    # END SOLUTION


def maxpool2d(input: Tensor, kernel: Tuple[int, int]) -> Tensor:
    """Max pooling: ``(batch, channel, h, w) -> (batch, channel, h // kh, w // kw)``."""
    # BEGIN SOLUTION task4_4: the max of each tile (see tile), viewed as (B, C, H/kh, W/kw)
    batch, channel = input.shape[:2]
    tiles, nh, nw = tile(input, kernel)
    return max(tiles, 4).view(batch, channel, nh, nw)
    # END SOLUTION


def dropout(input: Tensor, rate: float, ignore: bool = False) -> Tensor:
    """Zero each element with probability `rate` and scale the kept ones by ``1 / (1 - rate)`` (inverted dropout,
    so the expected value is unchanged and evaluation needs no rescaling).

    `ignore=True` (evaluation) returns the input unchanged; ``rate >= 1`` gives zeros. The random mask comes from
    NumPy's global generator.
    """
    # BEGIN SOLUTION task4_4: keep each element with probability 1 - rate, scaled by 1 / (1 - rate)
    if ignore or rate <= 0.0:
        return input
    if rate >= 1.0:
        return input * 0.0
    keep = rand(input.shape, backend=input.backend, dtype=input.dtype) > rate
    return input * keep * (1.0 / (1.0 - rate))
    # END SOLUTION
