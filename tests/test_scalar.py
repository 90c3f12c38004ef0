"""Module 1: Scalar autodiff (central difference, forward, chain rule, backpropagation)."""

import math
import sys
from typing import Callable, Tuple

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minitorch import operators
from minitorch.autodiff import Context, backpropagate, central_difference, topological_sort
from minitorch.scalar import Scalar, ScalarHistory, derivative_check
from minitorch.scalar_functions import (
    EQ,
    LT,
    Add,
    Exp,
    Inv,
    Log,
    Mul,
    Neg,
    ReLU,
    ScalarFunction,
    Sigmoid,
)
from minitorch.testing import MathTestVariable

small_floats = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False)
small_scalars = small_floats.map(Scalar)


def assert_close(a: float, b: float) -> None:
    assert operators.is_close(a, b), f"Failure x={a} y={b}"


# ---------------------------------------------------------------------------------------------------------------------
# Task 1.1: central difference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task1_1
def test_central_diff() -> None:
    d = central_difference(operators.id, 5, arg=0)
    assert_close(d, 1.0)

    d = central_difference(operators.add, 5, 10, arg=0)
    assert_close(d, 1.0)

    d = central_difference(operators.mul, 5, 10, arg=0)
    assert_close(d, 10.0)

    d = central_difference(operators.mul, 5, 10, arg=1)
    assert_close(d, 5.0)

    d = central_difference(operators.exp, 2, arg=0)
    assert_close(d, operators.exp(2))


@pytest.mark.task1_1
@given(small_floats, small_floats)
def test_central_diff_quadratic(x: float, y: float) -> None:
    """d/dx (x^2 y) = 2 x y and d/dy = x^2, with a custom epsilon."""
    f = lambda a, b: a * a * b  # noqa: E731
    assert abs(central_difference(f, x, y, arg=0, epsilon=1e-4) - 2 * x * y) < 1e-3 * (1 + abs(2 * x * y))
    assert abs(central_difference(f, x, y, arg=1, epsilon=1e-4) - x * x) < 1e-3 * (1 + x * x)


# ---------------------------------------------------------------------------------------------------------------------
# Task 1.2: forward
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task1_2
@given(small_floats, small_floats)
def test_simple(a: float, b: float) -> None:
    # Simple add
    c = Scalar(a) + Scalar(b)
    assert_close(c.data, a + b)

    # Simple mul
    c = Scalar(a) * Scalar(b)
    assert_close(c.data, a * b)

    # Simple relu
    c = Scalar(a).relu() + Scalar(b).relu()
    assert_close(c.data, operators.relu(a) + operators.relu(b))

    # Add others
    c = Scalar(a) + 10 - 2
    assert_close(c.data, a + 8)
    c = 10 - Scalar(a)
    assert_close(c.data, 10 - a)
    c = 2 * Scalar(a) + 1
    assert_close(c.data, 2 * a + 1)

    # Comparisons give 1.0 / 0.0 Scalars
    assert (Scalar(a) < Scalar(a + 1)).data == 1.0
    assert (Scalar(a) > Scalar(a + 1)).data == 0.0
    assert (Scalar(a) == Scalar(a)).data == 1.0
    assert bool(Scalar(a) < a + 1)
    assert not bool(Scalar(0.0))


one_arg, two_arg, _ = MathTestVariable._comp_testing()


@pytest.mark.task1_2
@given(small_floats)
@pytest.mark.parametrize("fn", one_arg)
def test_one_args(fn: Tuple[str, Callable[[float], float], Callable[[Scalar], Scalar]], t1: float) -> None:
    name, base_fn, scalar_fn = fn
    assert_close(scalar_fn(Scalar(t1)).data, base_fn(t1))


@pytest.mark.task1_2
@given(small_floats, small_floats)
@pytest.mark.parametrize("fn", two_arg)
def test_two_args(
    fn: Tuple[str, Callable[[float, float], float], Callable[[Scalar, Scalar], Scalar]], t1: float, t2: float
) -> None:
    name, base_fn, scalar_fn = fn
    assert_close(scalar_fn(Scalar(t1), Scalar(t2)).data, base_fn(t1, t2))


@pytest.mark.task1_2
def test_constants_and_leaves() -> None:
    """User Scalars are leaves; plain numbers become constants; functions of constants are constants."""
    x = Scalar(2.0)
    assert x.is_leaf() and not x.is_constant()
    y = x * 3
    assert not y.is_leaf() and not y.is_constant()
    c = Scalar(3.0, back=None)
    assert c.is_constant()
    assert (c * 2 + 1).is_constant()
    assert isinstance(x.history, ScalarHistory) and x.history.last_fn is None
    assert y.history is not None and y.history.last_fn is Mul
    assert repr(x) == "Scalar(2.0)"


# ---------------------------------------------------------------------------------------------------------------------
# Task 1.3: chain rule
# ---------------------------------------------------------------------------------------------------------------------


class Function1(ScalarFunction):
    """f(x, y) = x + y + 10, with derivative 1 for both."""

    @staticmethod
    def forward(ctx: Context, x: float, y: float) -> float:
        return x + y + 10

    @staticmethod
    def backward(ctx: Context, d_output: float) -> Tuple[float, float]:
        return d_output, d_output


class Function2(ScalarFunction):
    """f(x, y) = x * y + x, with derivatives y + 1 and x."""

    @staticmethod
    def forward(ctx: Context, x: float, y: float) -> float:
        ctx.save_for_backward(x, y)
        return x * y + x

    @staticmethod
    def backward(ctx: Context, d_output: float) -> Tuple[float, float]:
        x, y = ctx.saved_values
        return d_output * (y + 1), d_output * x


@pytest.mark.task1_3
def test_chain_rule1() -> None:
    x = Scalar(0.0)
    constant = Scalar(0.0, ScalarHistory(last_fn=Function1, ctx=Context(), inputs=[x, x]))
    back = constant.chain_rule(d_output=5)
    assert len(list(back)) == 2


@pytest.mark.task1_3
def test_chain_rule2() -> None:
    var = Scalar(0.0, ScalarHistory())
    constant = Scalar(0.0, ScalarHistory(last_fn=Function1, ctx=Context(), inputs=[var, var]))
    back = list(constant.chain_rule(d_output=5))
    assert len(back) == 2
    variable, deriv = back[0]
    assert deriv == 5


@pytest.mark.task1_3
def test_chain_rule3() -> None:
    """A constant input gets its pair too (the course API: one pair per input, in argument order)."""
    constant = 10
    var = Scalar(5)

    y = Function2.apply(constant, var)
    back = list(y.chain_rule(d_output=5))
    assert len(back) == 2
    (const_in, d_const), (variable, deriv) = back
    assert const_in.is_constant() and const_in.data == 10.0
    assert d_const == 5 * (5 + 1)
    assert variable.unique_id == var.unique_id
    assert deriv == 5 * 10


@pytest.mark.task1_3
@given(small_floats, small_floats, st.booleans())
def test_chain_rule_pairs_every_input_constants_included(a: float, b: float, const_first: bool) -> None:
    """chain_rule pairs every input with its derivative, in argument order, constants included."""
    var = Scalar(b)
    args = (a, var) if const_first else (var, a)
    y = Function2.apply(*args)
    back = list(y.chain_rule(d_output=2.0))
    x_val, y_val = (float(a), b) if const_first else (b, float(a))
    assert [inp.data for inp, _ in back] == [x_val, y_val]
    expected = [2.0 * (y_val + 1), 2.0 * x_val]  # Function2: d/dx (x y + x) = y + 1, d/dy = x
    assert [d for _, d in back] == pytest.approx(expected)
    var_pos = 1 if const_first else 0
    assert back[var_pos][0] is var and back[1 - var_pos][0].is_constant()


@pytest.mark.task1_3
def test_chain_rule4() -> None:
    var1 = Scalar(5)
    var2 = Scalar(10)

    y = Function2.apply(var1, var2)
    back = list(y.chain_rule(d_output=5))
    assert len(back) == 2
    variable, deriv = back[0]
    assert variable.unique_id == var1.unique_id
    assert deriv == 5 * (10 + 1)
    variable, deriv = back[1]
    assert variable.unique_id == var2.unique_id
    assert deriv == 5 * 5


@pytest.mark.task1_3
def test_context_no_grad() -> None:
    ctx = Context(no_grad=True)
    ctx.save_for_backward(1.0, 2.0)
    assert ctx.saved_values == ()
    ctx = Context()
    ctx.save_for_backward(1.0, 2.0)
    assert ctx.saved_values == (1.0, 2.0) == ctx.saved_tensors


# ---------------------------------------------------------------------------------------------------------------------
# Task 1.4: topological sort and backpropagation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task1_4
def test_topological_sort_diamond() -> None:
    """Every node comes before its parents; each node appears once; constants are skipped."""
    x = Scalar(1.0, name="x")
    a = x * 2
    b = x + 3
    c = Scalar(4.0, back=None)
    out = a * b + c
    order = list(topological_sort(out))
    ids = [v.unique_id for v in order]
    assert ids[0] == out.unique_id
    assert len(ids) == len(set(ids))
    assert c.unique_id not in ids
    position = {uid: i for i, uid in enumerate(ids)}
    for v in order:
        if not v.is_leaf():
            for p in v.parents:
                if not p.is_constant():
                    assert position[v.unique_id] < position[p.unique_id]
    assert ids[-1] == x.unique_id


@pytest.mark.task1_4
def test_deep_graph_no_recursion_limit() -> None:
    """A chain much longer than the recursion limit sorts and backpropagates."""
    depth = sys.getrecursionlimit() + 500
    x = Scalar(1.0)
    y = x
    for _ in range(depth):
        y = y + 1.0
    y.backward()
    assert x.derivative == 1.0
    assert len(list(topological_sort(y))) == depth + 1


@pytest.mark.task1_4
@given(small_floats, small_floats, st.booleans())
def test_backprop_skips_constant_inputs(a: float, b: float, const_first: bool) -> None:
    """chain_rule gives constants a pair too; backpropagate gives them no derivative."""
    var = Scalar(b)
    y = Function2.apply(*((a, var) if const_first else (var, a)))
    const_in = next(inp for inp in y.parents if inp is not var)
    backpropagate(y, 2.0)
    # Function2: f(x, y) = x y + x, so df/dx = y + 1 and df/dy = x
    assert var.derivative == pytest.approx(2.0 * a if const_first else 2.0 * (a + 1))
    assert const_in.is_constant() and const_in.derivative is None


@pytest.mark.task1_4
def test_backprop1() -> None:
    # Example 1: F1(0, v)
    var = Scalar(0)
    var2 = Function1.apply(0, var)
    backpropagate(var2, deriv=5)
    assert var.derivative == 5


@pytest.mark.task1_4
def test_backprop2() -> None:
    # Example 2: F1(0, 0)
    var = Scalar(0)
    var2 = Function1.apply(0, var)
    var3 = Function1.apply(0, var2)
    backpropagate(var3, deriv=5)
    assert var.derivative == 5


@pytest.mark.task1_4
def test_backprop3() -> None:
    # Example 3: F1(F1(0, v1), F1(0, v1)) (a diamond)
    var1 = Scalar(0)
    var2 = Function1.apply(0, var1)
    var3 = Function1.apply(0, var1)
    var4 = Function1.apply(var2, var3)
    backpropagate(var4, deriv=5)
    assert var1.derivative == 10


@pytest.mark.task1_4
def test_backprop4() -> None:
    # Example 4: F1(F1(0, v1), F1(0, v1)) after a shared F1
    var0 = Scalar(0)
    var1 = Function1.apply(0, var0)
    var2 = Function1.apply(0, var1)
    var3 = Function1.apply(0, var1)
    var4 = Function1.apply(var2, var3)
    backpropagate(var4, deriv=5)
    assert var0.derivative == 10


@pytest.mark.task1_4
@given(small_floats, small_floats)
def test_diamond_derivatives(a: float, b: float) -> None:
    """f(x, y) = (x * y) * (x + y): df/dx = 2xy + y^2, df/dy = x^2 + 2xy (x used twice on each path)."""
    x, y = Scalar(a), Scalar(b)
    out = (x * y) * (x + y)
    out.backward()
    assert x.derivative is not None and y.derivative is not None
    assert math.isclose(x.derivative, 2 * a * b + b * b, rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(y.derivative, a * a + 2 * a * b, rel_tol=1e-9, abs_tol=1e-6)


@pytest.mark.task1_4
def test_derivatives_accumulate_and_reset() -> None:
    x = Scalar(3.0)
    (x * x).backward()
    (x * x).backward()
    assert x.derivative == 12.0
    x.derivative = None
    (x * 2).backward(d_output=0.5)
    assert x.derivative == 1.0


def _away_from(value: float, points: Tuple[float, ...], gap: float) -> bool:
    return all(abs(value - p) > gap for p in points)


# Points where a case is singular or not differentiable (inv: -3.5; relu: -5.5; complex: -0.7).
ONE_ARG_KINKS = (-3.5, -5.5, -0.7)


@pytest.mark.task1_4
@given(small_floats)
@pytest.mark.parametrize("fn", one_arg)
def test_one_derivative(fn: Tuple[str, Callable[[float], float], Callable[[Scalar], Scalar]], t1: float) -> None:
    name, _, scalar_fn = fn
    assume(_away_from(t1, ONE_ARG_KINKS, 0.1))
    derivative_check(scalar_fn, Scalar(t1))


@pytest.mark.task1_4
@given(small_floats, small_floats)
@pytest.mark.parametrize("fn", two_arg)
def test_two_derivative(
    fn: Tuple[str, Callable[[float, float], float], Callable[[Scalar, Scalar], Scalar]], t1: float, t2: float
) -> None:
    name, _, scalar_fn = fn
    assume(abs(t2 + 5.5) > 0.1)  # div2 divides by t2 + 5.5
    assume(abs(t1 + 1.2 - t2) > 1e-3)  # lt2 / gt2 jump there
    assume(abs(t1 - t2 - 5.5) > 1e-3)  # eq2 jumps there
    derivative_check(scalar_fn, Scalar(t1), Scalar(t2))


FUNCTIONS = [
    ("add", lambda x, y: Add.apply(x, y), 2),
    ("mul", lambda x, y: Mul.apply(x, y), 2),
    ("lt", lambda x, y: LT.apply(x, y), 2),
    ("eq", lambda x, y: EQ.apply(x, y), 2),
    ("log", lambda x: Log.apply(x + 101.0), 1),
    ("inv", lambda x: Inv.apply(x + 101.0), 1),
    ("neg", lambda x: Neg.apply(x), 1),
    ("sigmoid", lambda x: Sigmoid.apply(x), 1),
    ("relu", lambda x: ReLU.apply(x), 1),
    ("exp", lambda x: Exp.apply(x / 10.0), 1),
]


@pytest.mark.task1_4
@given(small_floats, small_floats)
@pytest.mark.parametrize("case", FUNCTIONS, ids=[c[0] for c in FUNCTIONS])
def test_every_scalar_function(case: Tuple[str, Callable[..., Scalar], int], a: float, b: float) -> None:
    """Each ScalarFunction on its own, away from its jumps and kinks."""
    name, f, arity = case
    if arity == 1:
        assume(abs(a) > 1e-3)  # relu kink
        derivative_check(f, Scalar(a))
    else:
        assume(abs(a - b) > 1e-3)  # lt / eq jumps
        derivative_check(f, Scalar(a), Scalar(b))


@pytest.mark.task1_4
def test_derivative_check_catches_wrong_backward() -> None:
    class BadSquare(ScalarFunction):
        @staticmethod
        def forward(ctx: Context, a: float) -> float:
            ctx.save_for_backward(a)
            return a * a

        @staticmethod
        def backward(ctx: Context, d_output: float) -> float:
            (a,) = ctx.saved_values
            return a * d_output  # wrong: should be 2 * a * d_output

    with pytest.raises(AssertionError):
        derivative_check(lambda x: BadSquare.apply(x), Scalar(3.0))
