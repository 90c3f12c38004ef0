"""Scalar: a single float that records the computation that produced it (MiniTorch module 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Tuple, Type, Union

import numpy as np

from .autodiff import Context, Variable, backpropagate, central_difference
from .scalar_functions import EQ, LT, Add, Exp, Inv, Log, Mul, Neg, ReLU, Sigmoid

if TYPE_CHECKING:
    from .scalar_functions import ScalarFunction

ScalarLike = Union[float, int, "Scalar"]


@dataclass(frozen=True)
class ScalarHistory:
    """How a Scalar was made: the function, its context and its inputs.

    A Scalar whose history has ``last_fn=None`` is a leaf (created by the user, receives a derivative); a Scalar with
    no history at all (``None``) is a constant.
    """

    last_fn: Optional[Type["ScalarFunction"]] = None
    ctx: Optional[Context] = None
    inputs: Sequence["Scalar"] = ()


_var_count = 0


def _next_id() -> int:
    global _var_count
    _var_count += 1
    return _var_count


class Scalar:
    """A float in a computation graph; arithmetic on Scalars builds the graph that ``backward`` differentiates.

    Attributes:
        data: the value.
        history: a ``ScalarHistory`` (``None`` for constants).
        derivative: after ``backward``, the derivative of the output with respect to this leaf (else ``None``).
        unique_id: a number unique to this Scalar.
        name: a label (defaults to the id).
    """

    history: Optional[ScalarHistory]
    derivative: Optional[float]
    data: float
    unique_id: int
    name: str

    def __init__(self, v: float, back: Optional[ScalarHistory] = ScalarHistory(), name: Optional[str] = None):
        self.unique_id = _next_id()
        self.data = float(v)
        self.history = back
        self.derivative = None
        self.name = name if name is not None else str(self.unique_id)

    def __repr__(self) -> str:
        return f"Scalar({self.data})"

    # Arithmetic: each operator is one ScalarFunction (or a composition of them).
    def __add__(self, b: ScalarLike) -> Scalar:
        # BEGIN SOLUTION task1_2: self + b with the Add function
        return Add.apply(self, b)
        # END SOLUTION

    def __radd__(self, b: ScalarLike) -> Scalar:
        # BEGIN SOLUTION task1_2: b + self with the Add function
        return Add.apply(b, self)
        # END SOLUTION

    def __sub__(self, b: ScalarLike) -> Scalar:
        # BEGIN SOLUTION task1_2: self - b from Add and Neg
        return Add.apply(self, Neg.apply(b))
        # END SOLUTION

    def __rsub__(self, b: ScalarLike) -> Scalar:
        # BEGIN SOLUTION task1_2: b - self from Add and Neg
        return Add.apply(b, Neg.apply(self))
        # END SOLUTION

    def __mul__(self, b: ScalarLike) -> Scalar:
        return Mul.apply(self, b)

    def __rmul__(self, b: ScalarLike) -> Scalar:
        return Mul.apply(b, self)

    def __truediv__(self, b: ScalarLike) -> Scalar:
        return Mul.apply(self, Inv.apply(b))

    def __rtruediv__(self, b: ScalarLike) -> Scalar:
        return Mul.apply(b, Inv.apply(self))

    def __neg__(self) -> Scalar:
        # BEGIN SOLUTION task1_2: -self with the Neg function
        return Neg.apply(self)
        # END SOLUTION

    def __lt__(self, b: ScalarLike) -> Scalar:
        # BEGIN SOLUTION task1_2: self < b with the LT function
        return LT.apply(self, b)
        # END SOLUTION

    def __gt__(self, b: ScalarLike) -> Scalar:
        # BEGIN SOLUTION task1_2: self > b with the LT function
        return LT.apply(b, self)
        # END SOLUTION

    def __eq__(self, b: ScalarLike) -> Scalar:  # type: ignore[override]
        # BEGIN SOLUTION task1_2: self == b with the EQ function
        return EQ.apply(self, b)
        # END SOLUTION

    # ``__eq__`` builds a Scalar, so hashing goes by identity (Scalars can still be dict keys / set members).
    def __hash__(self) -> int:
        return hash(self.unique_id)

    def __bool__(self) -> bool:
        return bool(self.data)

    def __float__(self) -> float:
        return self.data

    def sigmoid(self) -> Scalar:
        """Sigmoid of this Scalar."""
        # BEGIN SOLUTION task1_2: apply the Sigmoid function
        return Sigmoid.apply(self)
        # END SOLUTION

    def relu(self) -> Scalar:
        """ReLU of this Scalar."""
        # BEGIN SOLUTION task1_2: apply the ReLU function
        return ReLU.apply(self)
        # END SOLUTION

    def log(self) -> Scalar:
        """Natural log of this Scalar."""
        # BEGIN SOLUTION task1_2: apply the Log function
        return Log.apply(self)
        # END SOLUTION

    def exp(self) -> Scalar:
        """Exponential of this Scalar."""
        # BEGIN SOLUTION task1_2: apply the Exp function
        return Exp.apply(self)
        # END SOLUTION

    # Variable protocol (see autodiff.py).
    def accumulate_derivative(self, x: Any) -> None:
        """Add ``x`` to the derivative of this leaf."""
        assert self.is_leaf(), "Only leaf variables can have derivatives."
        if self.derivative is None:
            self.derivative = 0.0
        self.derivative += x

    def is_leaf(self) -> bool:
        """True if this Scalar was created by the user (not by a function)."""
        return self.history is not None and self.history.last_fn is None

    def is_constant(self) -> bool:
        """True if this Scalar has no history (no derivative is computed for it)."""
        return self.history is None

    @property
    def parents(self) -> Iterable[Variable]:
        """The inputs of the function that made this Scalar."""
        assert self.history is not None
        return self.history.inputs

    def chain_rule(self, d_output: Any) -> Iterable[Tuple[Variable, Any]]:
        """One pair ``(input, d_output * d self / d input)`` for every input of ``last_fn``, in argument order.

        Constant inputs (plain numbers given to a function) get their pair too; ``backpropagate`` skips them.
        """
        h = self.history
        assert h is not None and h.last_fn is not None and h.ctx is not None
        # BEGIN SOLUTION task1_3: call last_fn's backward with d_output and pair each input with its derivative
        derivs = h.last_fn._backward(h.ctx, d_output)
        assert len(derivs) == len(h.inputs), f"{h.last_fn.__name__}.backward returned {len(derivs)} derivatives"
        return list(zip(h.inputs, derivs))
        # END SOLUTION

    def backward(self, d_output: Optional[float] = None) -> None:
        """Backpropagate from this Scalar (``d_output`` defaults to 1.0) and fill in the leaves' ``derivative``."""
        if d_output is None:
            d_output = 1.0
        backpropagate(self, d_output)

    def requires_grad_(self, flag: bool = True) -> None:
        """Make a constant a leaf (``flag=True``) or any Scalar a constant (``flag=False``)."""
        if not flag:
            self.history = None
        elif self.history is None:
            self.history = ScalarHistory()


def derivative_check(f: Any, *scalars: Scalar) -> None:
    """Check the derivatives that ``backward`` computes for ``f`` against central differences.

    Args:
        f: a function of ``len(scalars)`` Scalars returning a Scalar.
        *scalars: the point at which to check (their ``derivative`` is reset first).

    Raises:
        AssertionError: if a derivative is missing or differs (rtol and atol 1e-2).
    """
    for x in scalars:
        x.derivative = None
    out = f(*scalars)
    out.backward()
    point = [x.data for x in scalars]
    for i, x in enumerate(scalars):
        check = central_difference(f, *scalars, arg=i)
        expected = check.data if isinstance(check, Scalar) else float(check)
        assert x.derivative is not None, f"No derivative for argument {i} of {f} at {point}"
        np.testing.assert_allclose(
            x.derivative,
            expected,
            rtol=1e-2,
            atol=1e-2,
            err_msg=f"Derivative check failed for argument {i} of {f} at {point}: "
            f"backward gave {x.derivative}, central difference gave {expected}.",
        )
