"""Module 0: the scalar operators and the higher-order list functions."""

import builtins
import math
from typing import Callable, List, Tuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minitorch import operators
from minitorch.operators import (
    add,
    addLists,
    eq,
    exp,
    id,
    inv,
    inv_back,
    is_close,
    log,
    log_back,
    lt,
    max,
    mul,
    neg,
    negList,
    prod,
    relu,
    relu_back,
    sigmoid,
)
from minitorch.testing import MathTest

small_floats = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)
positive_floats = st.floats(min_value=1e-3, max_value=100, allow_nan=False)
small_lists = st.lists(small_floats, min_size=0, max_size=8)


def assert_close(a: float, b: float) -> None:
    assert is_close(a, b), f"Failure x={a} y={b}"


# ---------------------------------------------------------------------------------------------------------------------
# Task 0.1: the basic operators
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task0_1
@given(small_floats, small_floats)
def test_same_as_python(x: float, y: float) -> None:
    """The operators agree with Python's arithmetic."""
    assert_close(mul(x, y), x * y)
    assert_close(add(x, y), x + y)
    assert_close(neg(x), -x)
    assert_close(max(x, y), x if x > y else y)
    if abs(x) > 1e-5:
        assert_close(inv(x), 1.0 / x)


@pytest.mark.task0_1
@given(small_floats)
def test_relu(a: float) -> None:
    if a > 0:
        assert relu(a) == a
    else:
        assert relu(a) == 0.0


@pytest.mark.task0_1
@given(small_floats, small_floats)
def test_relu_back(a: float, b: float) -> None:
    if a > 0:
        assert relu_back(a, b) == b
    else:
        assert relu_back(a, b) == 0.0


@pytest.mark.task0_1
@given(small_floats)
def test_id(a: float) -> None:
    assert id(a) == a


@pytest.mark.task0_1
@given(small_floats)
def test_lt(a: float) -> None:
    """Check that a - 1.0 is always less than a."""
    assert lt(a - 1.0, a) == 1.0
    assert lt(a, a - 1.0) == 0.0
    assert lt(a, a) == 0.0


@pytest.mark.task0_1
@given(small_floats)
def test_max(a: float) -> None:
    assert max(a - 1.0, a) == a
    assert max(a, a - 1.0) == a
    assert max(a + 1.0, a) == a + 1.0
    assert max(a, a + 1.0) == a + 1.0


@pytest.mark.task0_1
@given(small_floats)
def test_eq(a: float) -> None:
    assert eq(a, a) == 1.0
    assert eq(a, a - 1.0) == 0.0
    assert eq(a, a + 1.0) == 0.0


@pytest.mark.task0_1
def test_comparisons_return_floats() -> None:
    """lt, eq and is_close return 1.0 / 0.0 (floats), so tensor kernels can store them directly."""
    for value in (lt(1.0, 2.0), lt(2.0, 1.0), eq(1.0, 1.0), eq(1.0, 2.0), is_close(1.0, 1.001), is_close(1.0, 2.0)):
        assert isinstance(value, float)
    assert is_close(1.0, 1.0 + 0.5e-2) == 1.0
    assert is_close(1.0, 1.0 + 2e-2) == 0.0


@pytest.mark.task0_1
def test_log_exp_special_values() -> None:
    assert log(1.0) == 0.0
    assert exp(0.0) == 1.0
    assert_close(log(math.e), 1.0)
    assert log(0.0) == -math.inf
    assert math.isnan(log(-1.0))
    assert sigmoid(0.0) == 0.5
    # Stable for large inputs of either sign: no OverflowError, correct limits.
    assert sigmoid(1000.0) == 1.0
    assert sigmoid(-1000.0) == 0.0


@pytest.mark.task0_1
@given(positive_floats, small_floats)
def test_backs_match_central_difference(a: float, d: float) -> None:
    """log_back, inv_back and relu_back are d times the derivative of log, inv and relu."""
    h = 1e-6
    for f, f_back in ((log, log_back), (inv, inv_back), (relu, relu_back)):
        numeric = d * (f(a + h) - f(a - h)) / (2 * h)
        assert abs(f_back(a, d) - numeric) <= 1e-3 * (1 + abs(numeric))
    assert relu_back(-a, d) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Task 0.2: properties
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task0_2
@given(small_floats)
def test_sigmoid(a: float) -> None:
    """Sigmoid lies in [0, 1], 1 - sigmoid(a) == sigmoid(-a), sigmoid(0) == 0.5, and it is increasing."""
    # BEGIN SOLUTION task0_2: property test: sigmoid in [0, 1], sigmoid(-a) == 1 - sigmoid(a), increasing
    s = sigmoid(a)
    assert 0.0 <= s <= 1.0
    assert_close(1.0 - s, sigmoid(-a))
    assert sigmoid(0.0) == 0.5
    assert sigmoid(a + 1.0) >= s
    if abs(a) < 30:  # away from saturation, strictly increasing
        assert sigmoid(a + 1.0) > s
    # END SOLUTION


@pytest.mark.task0_2
@given(small_floats, small_floats, small_floats)
def test_transitive(a: float, b: float, c: float) -> None:
    """lt is transitive."""
    # BEGIN SOLUTION task0_2: property test: lt is transitive
    if lt(a, b) and lt(b, c):
        assert lt(a, c)
    # END SOLUTION


@pytest.mark.task0_2
@given(small_floats, small_floats)
def test_symmetric(a: float, b: float) -> None:
    """mul and add are symmetric."""
    # BEGIN SOLUTION task0_2: property test: mul and add are symmetric
    assert mul(a, b) == mul(b, a)
    assert add(a, b) == add(b, a)
    # END SOLUTION


@pytest.mark.task0_2
@given(small_floats, small_floats, small_floats)
def test_distribute(x: float, y: float, z: float) -> None:
    r"""$z \times (x + y) = z \times x + z \times y$"""
    # BEGIN SOLUTION task0_2: property test: z * (x + y) == z * x + z * y
    assert_close(mul(z, add(x, y)), add(mul(z, x), mul(z, y)))
    # END SOLUTION


@pytest.mark.task0_2
@given(small_floats)
def test_other(a: float) -> None:
    """exp and log are inverses; neg and inv are involutions."""
    # BEGIN SOLUTION task0_2: property test of your choice (e.g. exp/log inverses, neg/inv involutions)
    assert_close(log(exp(a / 10)), a / 10)
    assert neg(neg(a)) == a
    assume(abs(a) > 1e-3)
    assert_close(inv(inv(a)), a)
    assert_close(exp(log(abs(a))), abs(a))
    # END SOLUTION


# ---------------------------------------------------------------------------------------------------------------------
# Task 0.3: higher-order functions
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task0_3
@given(small_floats, small_floats, small_floats, small_floats)
def test_zip_with(a: float, b: float, c: float, d: float) -> None:
    x1, x2 = addLists([a, b], [c, d])
    y1, y2 = a + c, b + d
    assert_close(x1, y1)
    assert_close(x2, y2)


@pytest.mark.task0_3
@given(st.lists(small_floats, min_size=5, max_size=5), st.lists(small_floats, min_size=5, max_size=5))
def test_sum_distribute(ls1: List[float], ls2: List[float]) -> None:
    """sum(ls1) + sum(ls2) == sum(addLists(ls1, ls2))"""
    assert_close(operators.sum(ls1) + operators.sum(ls2), operators.sum(addLists(ls1, ls2)))


@pytest.mark.task0_3
@given(small_lists)
def test_sum(ls: List[float]) -> None:
    assert_close(operators.sum(ls), math.fsum(ls))


@pytest.mark.task0_3
@given(small_floats, small_floats, small_floats)
def test_prod(x: float, y: float, z: float) -> None:
    assert_close(prod([x, y, z]), x * y * z)


@pytest.mark.task0_3
def test_empty_reductions() -> None:
    assert operators.sum([]) == 0.0
    assert prod([]) == 1.0


@pytest.mark.task0_3
@given(small_lists)
def test_negList(ls: List[float]) -> None:
    check = negList(ls)
    assert len(check) == len(ls)
    for i, j in zip(ls, check):
        assert_close(i, -j)


@pytest.mark.task0_3
@given(small_lists)
def test_map_zip_reduce_forms(ls: List[float]) -> None:
    """The curried course forms and the direct forms agree."""
    assert operators.map(neg)(ls) == operators.map(neg, ls) == [-x for x in ls]
    assert operators.zipWith(mul)(ls, ls) == operators.zipWith(mul, ls, ls) == [x * x for x in ls]
    assert operators.reduce(max, -1e9)(ls) == builtins.max(ls + [-1e9])


# ---------------------------------------------------------------------------------------------------------------------
# The shared MathTest cases run on floats; the scalar functions compile with Numba
# ---------------------------------------------------------------------------------------------------------------------

one_arg, two_arg, red_arg = MathTest._tests()


@given(small_floats)
@pytest.mark.parametrize("fn", one_arg)
def test_one_args(fn: Tuple[str, Callable[[float], float]], t1: float) -> None:
    name, base_fn = fn
    assert math.isfinite(base_fn(t1))


@given(small_floats, small_floats)
@pytest.mark.parametrize("fn", two_arg)
def test_two_args(fn: Tuple[str, Callable[[float, float], float]], t1: float, t2: float) -> None:
    name, base_fn = fn
    assert math.isfinite(base_fn(t1, t2))


@given(st.lists(small_floats, min_size=1, max_size=6))
@pytest.mark.parametrize("fn", red_arg)
def test_red_args(fn: Tuple[str, Callable[[List[float]], float]], ls: List[float]) -> None:
    name, base_fn = fn
    assert math.isfinite(base_fn(ls))


@pytest.mark.task0_1
def test_scalar_functions_compile_with_numba() -> None:
    """Tensor backends wrap these functions with numba.njit(inline="always"); they must compile and agree.

    One jitted kernel calls all of them (as FastOps' kernels do), so Numba compiles only once.
    """
    numba = pytest.importorskip("numba")
    j = numba.njit(inline="always")
    f_id, f_neg, f_sigmoid, f_relu, f_log, f_exp, f_inv = (
        j(f) for f in (id, neg, sigmoid, relu, log, exp, inv)
    )
    f_mul, f_add, f_lt, f_eq, f_max, f_is_close = (j(f) for f in (mul, add, lt, eq, max, is_close))
    f_log_back, f_inv_back, f_relu_back = (j(f) for f in (log_back, inv_back, relu_back))

    @numba.njit
    def kernel(x, y):  # type: ignore[no-untyped-def]
        return (
            f_id(x), f_neg(x), f_sigmoid(x), f_relu(x), f_log(x), f_exp(x), f_inv(x),
            f_mul(x, y), f_add(x, y), f_lt(x, y), f_eq(x, y), f_max(x, y), f_is_close(x, y),
            f_log_back(x, y), f_inv_back(x, y), f_relu_back(x, y),
        )  # fmt: skip

    def reference(x: float, y: float) -> Tuple[float, ...]:
        return (
            id(x), neg(x), sigmoid(x), relu(x), log(x), exp(x), inv(x),
            mul(x, y), add(x, y), lt(x, y), eq(x, y), max(x, y), is_close(x, y),
            log_back(x, y), inv_back(x, y), relu_back(x, y),
        )  # fmt: skip

    for x, y in ((-3.5, 2.0), (0.75, 0.75), (2.0, -1.0), (-50.0, 3.0), (40.0, 40.001)):
        assert kernel(x, y) == pytest.approx(reference(x, y), rel=1e-12, abs=1e-300, nan_ok=True), (x, y)
