"""Shared math test cases for floats, Scalars and Tensors (MiniTorch course).

``MathTest`` writes every case with Python operators and ``minitorch.operators`` so it runs on floats (and lists of
floats for reductions). ``MathTestVariable`` overrides the cases that need methods (``.sigmoid()``, ``.sum(0)``, ...)
so the same cases run on Scalars and Tensors. ``_comp_testing()`` pairs the two versions of every case by name.

Naming convention: a name ending in ``2`` takes two arguments, one ending in ``red`` takes a list/Tensor to reduce,
anything else takes one argument.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, List, Sequence, Tuple, TypeVar

from . import operators

A = TypeVar("A")

OneArg = Tuple[str, Callable[[A], A]]
TwoArg = Tuple[str, Callable[[A, A], A]]
RedArg = Tuple[str, Callable[[Sequence[A]], A]]


class MathTest(Generic[A]):
    """Test functions on plain floats. Shifts keep every case away from singularities for inputs in [-100, 100]."""

    # One argument ----------------------------------------------------------------------------------------------------
    @staticmethod
    def neg(a: A) -> A:
        """Negate the argument."""
        return -a  # type: ignore[operator]

    @staticmethod
    def addConstant(a: A) -> A:
        """Add a constant to the argument."""
        return 5 + a  # type: ignore[operator]

    @staticmethod
    def square(a: A) -> A:
        """Square by multiplication."""
        return a * a  # type: ignore[operator]

    @staticmethod
    def cube(a: A) -> A:
        """Cube by multiplication."""
        return a * a * a  # type: ignore[operator]

    @staticmethod
    def subConstant(a: A) -> A:
        """Subtract a constant from the argument."""
        return a - 5  # type: ignore[operator]

    @staticmethod
    def multConstant(a: A) -> A:
        """Multiply the argument by a constant."""
        return 5 * a  # type: ignore[operator]

    @staticmethod
    def div(a: A) -> A:
        """Divide the argument by a constant."""
        return a / 5  # type: ignore[operator]

    @staticmethod
    def inv(a: A) -> A:
        """Invert after a shift."""
        return operators.inv(a + 3.5)  # type: ignore[operator]

    @staticmethod
    def sig(a: A) -> A:
        """Sigmoid."""
        return operators.sigmoid(a)  # type: ignore[arg-type]

    @staticmethod
    def log(a: A) -> A:
        """Log of a large (always positive) value."""
        return operators.log(a + 100000)  # type: ignore[operator]

    @staticmethod
    def relu(a: A) -> A:
        """ReLU after a shift."""
        return operators.relu(a + 5.5)  # type: ignore[operator]

    @staticmethod
    def exp(a: A) -> A:
        """Exp of a shifted (never huge) value."""
        return operators.exp(a - 200)  # type: ignore[operator]

    @staticmethod
    def explog(a: A) -> A:
        """Log and exp together."""
        return operators.log(a + 100000) + operators.exp(a - 200)  # type: ignore[operator]

    @staticmethod
    def complex(a: A) -> A:
        """A composition of relu, sigmoid and log."""
        inner = operators.relu(operators.relu(a * 10 + 7) * 6 + 5) * 10  # type: ignore[operator]
        return operators.log(operators.sigmoid(inner)) / 50

    # Two arguments ---------------------------------------------------------------------------------------------------
    @staticmethod
    def add2(a: A, b: A) -> A:
        """Add two arguments."""
        return a + b  # type: ignore[operator]

    @staticmethod
    def mul2(a: A, b: A) -> A:
        """Multiply two arguments."""
        return a * b  # type: ignore[operator]

    @staticmethod
    def div2(a: A, b: A) -> A:
        """Divide by the shifted second argument."""
        return a / (b + 5.5)  # type: ignore[operator]

    @staticmethod
    def gt2(a: A, b: A) -> A:
        """1.0 if a + 1.2 > b."""
        return operators.lt(b, a + 1.2)  # type: ignore[operator]

    @staticmethod
    def lt2(a: A, b: A) -> A:
        """1.0 if a + 1.2 < b."""
        return operators.lt(a + 1.2, b)  # type: ignore[operator]

    @staticmethod
    def eq2(a: A, b: A) -> A:
        """1.0 if a == b + 5.5."""
        return operators.eq(a, b + 5.5)  # type: ignore[operator]

    # Reductions ------------------------------------------------------------------------------------------------------
    @staticmethod
    def sum_red(a: Sequence[A]) -> A:
        """Sum of a list."""
        return operators.sum(a)  # type: ignore[arg-type]

    @staticmethod
    def mean_red(a: Sequence[A]) -> A:
        """Mean of a list (for Tensors: along dim 0)."""
        return operators.sum(a) / float(len(a))  # type: ignore[arg-type]

    @staticmethod
    def mean_full_red(a: Sequence[A]) -> A:
        """Mean of a list (for Tensors: of all elements)."""
        return operators.sum(a) / float(len(a))  # type: ignore[arg-type]

    # Collection ------------------------------------------------------------------------------------------------------
    @classmethod
    def _tests(cls) -> Tuple[List[OneArg], List[TwoArg], List[RedArg]]:
        """This class's versions of all the cases, as ``(name, fn)`` lists: one-arg, two-arg, reductions.

        Names come from ``MathTest`` (sorted), so every subclass lists the same cases in the same order.
        """
        one_arg: List[Any] = []
        two_arg: List[Any] = []
        red_arg: List[Any] = []
        for name in sorted(dir(MathTest)):
            if name.startswith("_") or not callable(getattr(MathTest, name)):
                continue
            case = (name, getattr(cls, name))
            if name.endswith("2"):
                two_arg.append(case)
            elif name.endswith("red"):
                red_arg.append(case)
            else:
                one_arg.append(case)
        return one_arg, two_arg, red_arg

    @classmethod
    def _comp_testing(
        cls,
    ) -> Tuple[
        List[Tuple[str, Callable[..., Any], Callable[..., Any]]],
        List[Tuple[str, Callable[..., Any], Callable[..., Any]]],
        List[Tuple[str, Callable[..., Any], Callable[..., Any]]],
    ]:
        """Pair every case as ``(name, float version from MathTest, this class's version)``."""
        mine = cls._tests()
        base = MathTest._tests()
        return tuple(  # type: ignore[return-value]
            [(name, base_fn, fn) for (name, fn), (_, base_fn) in zip(group, base_group)]
            for group, base_group in zip(mine, base)
        )


class MathTestVariable(MathTest):
    """The same cases for Scalars and Tensors: methods instead of ``operators`` calls, Tensor reductions."""

    @staticmethod
    def inv(a: Any) -> Any:
        return 1.0 / (a + 3.5)

    @staticmethod
    def sig(a: Any) -> Any:
        return a.sigmoid()

    @staticmethod
    def log(a: Any) -> Any:
        return (a + 100000).log()

    @staticmethod
    def relu(a: Any) -> Any:
        return (a + 5.5).relu()

    @staticmethod
    def exp(a: Any) -> Any:
        return (a - 200).exp()

    @staticmethod
    def explog(a: Any) -> Any:
        return (a + 100000).log() + (a - 200).exp()

    @staticmethod
    def complex(a: Any) -> Any:
        return (((a * 10 + 7).relu() * 6 + 5).relu() * 10).sigmoid().log() / 50

    @staticmethod
    def gt2(a: Any, b: Any) -> Any:
        return a + 1.2 > b

    @staticmethod
    def lt2(a: Any, b: Any) -> Any:
        return a + 1.2 < b

    @staticmethod
    def eq2(a: Any, b: Any) -> Any:
        return a == (b + 5.5)

    @staticmethod
    def sum_red(a: Any) -> Any:
        return a.sum(0)

    @staticmethod
    def mean_red(a: Any) -> Any:
        return a.mean(0)

    @staticmethod
    def mean_full_red(a: Any) -> Any:
        return a.mean()
