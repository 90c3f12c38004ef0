"""Scalar math prelude (MiniTorch module 0).

Two kinds of functions live here:

* scalar functions (``mul``, ``add``, ``sigmoid``, ``log_back`` ...). They are the element-wise kernels of every tensor
  backend: ``FastOps`` wraps them with ``numba.njit(inline="always")`` and ``CudaOps`` with
  ``numba.cuda.jit(device=True)``. They therefore use only arithmetic, comparisons and ``math`` calls, and always
  return floats (comparisons return ``1.0`` / ``0.0``). They are also duck-typed: ``add``/``mul``/``neg`` work on
  anything with the matching Python operators (e.g. ``Scalar``).
* higher-order list helpers (``map``, ``zipWith``, ``reduce``, ``negList``, ``addLists``, ``sum``, ``prod``), plain
  Python used by the course and by the Scalar tests.

Note that ``id``, ``max``, ``map``, ``sum`` intentionally shadow the builtins (course names).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List, Optional, TypeVar, Union

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------------------------
# Task 0.1: scalar functions
# ---------------------------------------------------------------------------------------------------------------------


def mul(x: float, y: float) -> float:
    """$f(x, y) = x * y$"""
    # BEGIN SOLUTION task0_1: return x times y
    return x * y
    # END SOLUTION


def id(x: float) -> float:
    """$f(x) = x$"""
    # BEGIN SOLUTION task0_1: return x unchanged
    return x
    # END SOLUTION


def add(x: float, y: float) -> float:
    """$f(x, y) = x + y$"""
    # BEGIN SOLUTION task0_1: return x plus y
    return x + y
    # END SOLUTION


def neg(x: float) -> float:
    """$f(x) = -x$"""
    # BEGIN SOLUTION task0_1: return -x
    return -x
    # END SOLUTION


def lt(x: float, y: float) -> float:
    """$f(x, y) = 1.0$ if x is less than y else $0.0$"""
    # BEGIN SOLUTION task0_1: return 1.0 if x < y else 0.0
    return 1.0 if x < y else 0.0
    # END SOLUTION


def eq(x: float, y: float) -> float:
    """$f(x, y) = 1.0$ if x is equal to y else $0.0$"""
    # BEGIN SOLUTION task0_1: return 1.0 if x == y else 0.0
    return 1.0 if x == y else 0.0
    # END SOLUTION


def max(x: float, y: float) -> float:
    """$f(x, y) = x$ if x is greater than y else $y$"""
    # BEGIN SOLUTION task0_1: return the larger of x and y
    return x if x > y else y
    # END SOLUTION


def is_close(x: float, y: float) -> float:
    """$f(x, y) = 1.0$ if $|x - y| < 10^{-2}$ else $0.0$"""
    # BEGIN SOLUTION task0_1: return 1.0 if |x - y| < 1e-2 else 0.0
    return 1.0 if abs(x - y) < 1e-2 else 0.0
    # END SOLUTION


def sigmoid(x: float) -> float:
    r"""$f(x) = \frac{1}{1 + e^{-x}}$, computed without overflow for either sign of x.

    For $x \ge 0$ we use $\frac{1}{1 + e^{-x}}$, otherwise the equal $\frac{e^x}{1 + e^x}$: the exponent is never
    positive, so ``math.exp`` never overflows.
    """
    # BEGIN SOLUTION task0_1: the sigmoid, with an exponent that is never positive (no overflow for either sign)
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)
    # END SOLUTION


def relu(x: float) -> float:
    """$f(x) = x$ if x is greater than 0, else 0 (the rectified linear unit)."""
    # BEGIN SOLUTION task0_1: return x if x > 0 else 0
    return x if x > 0.0 else 0.0
    # END SOLUTION


def log(x: float) -> float:
    """$f(x) = log(x)$ (natural log) for $x > 0$; ``-inf`` at 0 and ``nan`` below, instead of raising.

    No epsilon is added, so results match NumPy exactly and ``log_back`` is the exact derivative.
    """
    # BEGIN SOLUTION task0_1: natural log for x > 0, -inf at 0, nan below
    if x > 0.0:
        return math.log(x)
    if x == 0.0:
        return -math.inf
    return math.nan
    # END SOLUTION


def exp(x: float) -> float:
    """$f(x) = e^{x}$"""
    # BEGIN SOLUTION task0_1: return e to the x
    return math.exp(x)
    # END SOLUTION


def log_back(x: float, d: float) -> float:
    r"""If $f = log$ as above, compute $d \times f'(x) = d / x$."""
    # BEGIN SOLUTION task0_1: d times the derivative of log at x
    return d / x
    # END SOLUTION


def inv(x: float) -> float:
    """$f(x) = 1/x$"""
    # BEGIN SOLUTION task0_1: return 1 / x
    return 1.0 / x
    # END SOLUTION


def inv_back(x: float, d: float) -> float:
    r"""If $f(x) = 1/x$ compute $d \times f'(x) = -d / x^2$."""
    # BEGIN SOLUTION task0_1: d times the derivative of 1/x at x
    return -d / (x * x)
    # END SOLUTION


def relu_back(x: float, d: float) -> float:
    r"""If $f = relu$ compute $d \times f'(x)$ (the derivative at 0 is taken as 0)."""
    # BEGIN SOLUTION task0_1: d times the derivative of relu at x (0 at x = 0)
    return d if x > 0.0 else 0.0
    # END SOLUTION


# ---------------------------------------------------------------------------------------------------------------------
# Task 0.3: higher-order functions on lists
# ---------------------------------------------------------------------------------------------------------------------


def map(
    fn: Callable[[T], T], ls: Optional[Iterable[T]] = None
) -> Union[Callable[[Iterable[T]], List[T]], List[T]]:
    """Higher-order map.

    ``map(fn)`` returns a function that applies ``fn`` to every element of a list (the course form);
    ``map(fn, ls)`` applies it right away.
    """

    # BEGIN SOLUTION task0_3: return a function that applies fn to every item (or apply it to ls right away)
    def _map(items: Iterable[T]) -> List[T]:
        return [fn(x) for x in items]

    return _map if ls is None else _map(ls)
    # END SOLUTION


def zipWith(
    fn: Callable[[T, T], T], ls1: Optional[Iterable[T]] = None, ls2: Optional[Iterable[T]] = None
) -> Union[Callable[[Iterable[T], Iterable[T]], List[T]], List[T]]:
    """Higher-order zip-with: ``zipWith(fn)(xs, ys) == [fn(x, y) for x, y in zip(xs, ys)]``.

    As with ``map``, ``zipWith(fn, xs, ys)`` applies it right away.
    """

    # BEGIN SOLUTION task0_3: return a function that combines two lists pairwise with fn (or apply it right away)
    def _zip(items1: Iterable[T], items2: Iterable[T]) -> List[T]:
        return [fn(x, y) for x, y in zip(items1, items2)]

    if ls1 is None and ls2 is None:
        return _zip
    assert ls1 is not None and ls2 is not None, "zipWith needs both lists or neither"
    return _zip(ls1, ls2)
    # END SOLUTION


def reduce(fn: Callable[[T, T], T], start: T) -> Callable[[Iterable[T]], T]:
    r"""Higher-order reduce: ``reduce(fn, x0)([x1, ..., xn]) == fn(...fn(fn(x0, x1), x2)..., xn)``."""

    # BEGIN SOLUTION task0_3: return a function that folds a list with fn, starting from start
    def _reduce(items: Iterable[T]) -> T:
        acc = start
        for x in items:
            acc = fn(acc, x)
        return acc

    return _reduce
    # END SOLUTION


def negList(ls: Iterable[float]) -> List[float]:
    """Negate every element of a list (using ``map`` and ``neg``)."""
    # BEGIN SOLUTION task0_3: negate every element with map and neg
    return map(neg)(ls)
    # END SOLUTION


def addLists(ls1: Iterable[float], ls2: Iterable[float]) -> List[float]:
    """Add the elements of two lists pairwise (using ``zipWith`` and ``add``)."""
    # BEGIN SOLUTION task0_3: add two lists pairwise with zipWith and add
    return zipWith(add)(ls1, ls2)
    # END SOLUTION


def sum(ls: Iterable[float]) -> float:
    """Sum a list (using ``reduce`` and ``add``); the empty sum is 0.0."""
    # BEGIN SOLUTION task0_3: sum a list with reduce and add
    return reduce(add, 0.0)(ls)
    # END SOLUTION


def prod(ls: Iterable[float]) -> float:
    """Multiply the elements of a list (using ``reduce`` and ``mul``); the empty product is 1.0."""
    # BEGIN SOLUTION task0_3: multiply the elements of a list with reduce and mul
    return reduce(mul, 1.0)(ls)
    # END SOLUTION
