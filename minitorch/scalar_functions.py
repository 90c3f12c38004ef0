"""Differentiable functions of Scalars (MiniTorch module 1).

Each function is a class with a ``forward`` on floats and a ``backward`` that maps the output's derivative to one
derivative per input. ``ScalarFunction.apply`` does the bookkeeping: it unwraps Scalars, runs ``forward`` and
records a ``ScalarHistory`` on the result so that ``backpropagate`` can later call ``backward``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple, Union

from . import operators
from .autodiff import Context

if TYPE_CHECKING:
    from .scalar import Scalar, ScalarLike


def wrap_tuple(x: Union[float, Tuple[float, ...]]) -> Tuple[float, ...]:
    """Turn a single value into a 1-tuple; leave tuples alone."""
    if isinstance(x, tuple):
        return x
    return (x,)


class ScalarFunction:
    """Base class of the functions in this module.

    Subclasses define ``forward(ctx, *floats) -> float`` and ``backward(ctx, d_out) -> float | tuple[float, ...]``
    as static methods and are called through ``apply``.
    """

    @classmethod
    def _forward(cls, ctx: Context, *inps: float) -> float:
        return cls.forward(ctx, *inps)  # type: ignore[attr-defined]

    @classmethod
    def _backward(cls, ctx: Context, d_out: float) -> Tuple[float, ...]:
        return wrap_tuple(cls.backward(ctx, d_out))  # type: ignore[attr-defined]

    @classmethod
    def apply(cls, *vals: "ScalarLike") -> "Scalar":
        """Call the function on Scalars or plain numbers and return a Scalar that remembers how it was made."""
        from .scalar import Scalar, ScalarHistory

        scalars = [v if isinstance(v, Scalar) else Scalar(v, back=None) for v in vals]
        need_grad = any(not s.is_constant() for s in scalars)
        ctx = Context(no_grad=not need_grad)
        out = cls._forward(ctx, *(s.data for s in scalars))
        back = ScalarHistory(cls, ctx, tuple(scalars)) if need_grad else None
        return Scalar(float(out), back=back)


class Add(ScalarFunction):
    """Addition $f(x, y) = x + y$"""

    @staticmethod
    def forward(ctx: Context, a: float, b: float) -> float:
        return operators.add(a, b)

    @staticmethod
    def backward(ctx: Context, d_output: float) -> Tuple[float, ...]:
        return d_output, d_output


class Log(ScalarFunction):
    """Natural log $f(x) = log(x)$"""

    @staticmethod
    def forward(ctx: Context, a: float) -> float:
        ctx.save_for_backward(a)
        return operators.log(a)

    @staticmethod
    def backward(ctx: Context, d_output: float) -> float:
        (a,) = ctx.saved_values
        return operators.log_back(a, d_output)


class Mul(ScalarFunction):
    """Multiplication $f(x, y) = x * y$"""

    @staticmethod
    def forward(ctx: Context, a: float, b: float) -> float:
        # BEGIN SOLUTION task1_2: a * b (save what backward needs)
        ctx.save_for_backward(a, b)
        return operators.mul(a, b)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> Tuple[float, ...]:
        # BEGIN SOLUTION task1_4: the derivatives for a and for b, each times d_output
        a, b = ctx.saved_values
        return operators.mul(b, d_output), operators.mul(a, d_output)
        # END SOLUTION


class Inv(ScalarFunction):
    """Inverse $f(x) = 1/x$"""

    @staticmethod
    def forward(ctx: Context, a: float) -> float:
        # BEGIN SOLUTION task1_2: 1 / a (save what backward needs)
        ctx.save_for_backward(a)
        return operators.inv(a)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> float:
        # BEGIN SOLUTION task1_4: d_output times the derivative of 1/a at a
        (a,) = ctx.saved_values
        return operators.inv_back(a, d_output)
        # END SOLUTION


class Neg(ScalarFunction):
    """Negation $f(x) = -x$"""

    @staticmethod
    def forward(ctx: Context, a: float) -> float:
        # BEGIN SOLUTION task1_2: return -a
        return operators.neg(a)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> float:
        # BEGIN SOLUTION task1_4: d_output times the derivative of -a
        return operators.neg(d_output)
        # END SOLUTION


class Sigmoid(ScalarFunction):
    r"""Sigmoid $f(x) = \frac{1}{1 + e^{-x}}$, with $f'(x) = f(x) (1 - f(x))$"""

    @staticmethod
    def forward(ctx: Context, a: float) -> float:
        # BEGIN SOLUTION task1_2: sigmoid(a) (save what backward needs)
        out = operators.sigmoid(a)
        ctx.save_for_backward(out)
        return out
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> float:
        # BEGIN SOLUTION task1_4: d_output * s * (1 - s) with the saved s = sigmoid(a)
        (out,) = ctx.saved_values
        return d_output * out * (1.0 - out)
        # END SOLUTION


class ReLU(ScalarFunction):
    """Rectified linear unit $f(x) = max(x, 0)$"""

    @staticmethod
    def forward(ctx: Context, a: float) -> float:
        # BEGIN SOLUTION task1_2: relu(a) (save what backward needs)
        ctx.save_for_backward(a)
        return operators.relu(a)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> float:
        # BEGIN SOLUTION task1_4: d_output times the derivative of relu at a
        (a,) = ctx.saved_values
        return operators.relu_back(a, d_output)
        # END SOLUTION


class Exp(ScalarFunction):
    """Exponential $f(x) = e^x$, with $f'(x) = f(x)$"""

    @staticmethod
    def forward(ctx: Context, a: float) -> float:
        # BEGIN SOLUTION task1_2: exp(a) (save what backward needs)
        out = operators.exp(a)
        ctx.save_for_backward(out)
        return out
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> float:
        # BEGIN SOLUTION task1_4: d_output times the derivative of exp at a
        (out,) = ctx.saved_values
        return operators.mul(out, d_output)
        # END SOLUTION


class LT(ScalarFunction):
    """Less-than $f(x, y) = 1.0$ if $x < y$ else $0.0$ (derivative 0 almost everywhere)"""

    @staticmethod
    def forward(ctx: Context, a: float, b: float) -> float:
        # BEGIN SOLUTION task1_2: 1.0 if a < b else 0.0
        return operators.lt(a, b)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> Tuple[float, ...]:
        # BEGIN SOLUTION task1_4: the derivatives of a comparison (zero almost everywhere), one per input
        return 0.0, 0.0
        # END SOLUTION


class EQ(ScalarFunction):
    """Equality $f(x, y) = 1.0$ if $x = y$ else $0.0$ (derivative 0 almost everywhere)"""

    @staticmethod
    def forward(ctx: Context, a: float, b: float) -> float:
        # BEGIN SOLUTION task1_2: 1.0 if a == b else 0.0
        return operators.eq(a, b)
        # END SOLUTION

    @staticmethod
    def backward(ctx: Context, d_output: float) -> Tuple[float, ...]:
        # BEGIN SOLUTION task1_4: the derivatives of a comparison (zero almost everywhere), one per input
        return 0.0, 0.0
        # END SOLUTION
