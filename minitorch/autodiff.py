"""Reverse-mode automatic differentiation shared by ``Scalar`` and ``Tensor`` (MiniTorch module 1).

Anything that follows the ``Variable`` protocol can be differentiated by ``backpropagate``: it only needs a
``unique_id``, to know whether it is a leaf or a constant, its ``parents`` and a ``chain_rule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Protocol, Tuple

# ---------------------------------------------------------------------------------------------------------------------
# Task 1.1: numerical derivatives
# ---------------------------------------------------------------------------------------------------------------------


def central_difference(f: Any, *vals: Any, arg: int = 0, epsilon: float = 1e-6) -> Any:
    r"""Approximate the derivative of ``f`` with respect to argument ``arg`` by a central difference.

    $f'_i(x_0, \ldots, x_{n-1}) \approx \frac{f(\ldots, x_i + \epsilon, \ldots) - f(\ldots, x_i - \epsilon, \ldots)}
    {2\epsilon}$

    Args:
        f: function of ``len(vals)`` arguments (floats, or anything supporting ``+``/``-`` with floats).
        *vals: the point $x_0, \ldots, x_{n-1}$ at which to differentiate.
        arg: index $i$ of the argument to differentiate with respect to.
        epsilon: the small step $\epsilon$.

    Returns:
        An approximation of $f'_i(x_0, \ldots, x_{n-1})$ (of the type ``f`` returns).
    """
    # BEGIN SOLUTION task1_1: (f at x_arg + epsilon minus f at x_arg - epsilon) / (2 epsilon)
    upper = list(vals)
    lower = list(vals)
    upper[arg] = upper[arg] + epsilon
    lower[arg] = lower[arg] - epsilon
    return (f(*upper) - f(*lower)) / (2.0 * epsilon)
    # END SOLUTION


# ---------------------------------------------------------------------------------------------------------------------
# Tasks 1.3 and 1.4: the Variable protocol and backpropagation
# ---------------------------------------------------------------------------------------------------------------------


class Variable(Protocol):
    """What ``topological_sort`` and ``backpropagate`` need from a node of the computation graph."""

    def accumulate_derivative(self, x: Any) -> None:
        """Add ``x`` to the derivative stored on this leaf."""
        ...

    @property
    def unique_id(self) -> int:
        """An id unique to this variable (hashable, used to mark visited nodes)."""
        ...

    def is_leaf(self) -> bool:
        """True if the variable was created by the user (no ``last_fn``) and wants a derivative."""
        ...

    def is_constant(self) -> bool:
        """True if the variable has no history: no derivative flows to or through it."""
        ...

    @property
    def parents(self) -> Iterable["Variable"]:
        """The inputs of the function that produced this variable."""
        ...

    def chain_rule(self, d_output: Any) -> Iterable[Tuple["Variable", Any]]:
        """Pairs ``(input, derivative of the output with respect to that input, times d_output)``."""
        ...


def topological_sort(variable: Variable) -> Iterable[Variable]:
    """Order the computation graph behind ``variable`` so that every node comes before its parents.

    The result starts with ``variable`` itself (the right-most node) and ends with leaves. Constants are left out.
    The depth-first search uses an explicit stack, so arbitrarily deep graphs (long chains) do not hit Python's
    recursion limit.

    Args:
        variable: the right-most variable (usually the output).

    Returns:
        Non-constant variables, each once, in reverse topological order.
    """
    # BEGIN SOLUTION task1_4: every non-constant node once, each before its parents (depth-first, no recursion)
    if variable.is_constant():
        return []
    finished: List[Variable] = []  # post-order: a node is added after all its parents
    seen = {variable.unique_id}
    stack: List[Tuple[Variable, Any]] = [(variable, iter(variable.parents))]
    while stack:
        node, parents = stack[-1]
        for parent in parents:
            if parent.is_constant() or parent.unique_id in seen:
                continue
            seen.add(parent.unique_id)
            stack.append((parent, iter(parent.parents)))
            break
        else:  # every parent done
            stack.pop()
            finished.append(node)
    finished.reverse()
    return finished
    # END SOLUTION


def backpropagate(variable: Variable, deriv: Any) -> None:
    """Run backpropagation from ``variable`` and accumulate derivatives on the leaves.

    Each node is visited once, after every node that uses it, with the sum of the derivatives that reached it;
    ``chain_rule`` spreads that sum to its parents. Leaves receive it via ``accumulate_derivative``.

    Args:
        variable: the right-most variable.
        deriv: the derivative of the final output with respect to ``variable`` (``1.0`` for a scalar loss).
    """
    # BEGIN SOLUTION task1_4: visit nodes in topological order, sum derivatives per node, chain_rule to parents
    pending: Dict[int, Any] = {variable.unique_id: deriv}
    for node in topological_sort(variable):
        d = pending.pop(node.unique_id, None)
        if d is None:  # not reachable by a derivative (cannot happen for a well-formed graph)
            continue
        if node.is_leaf():
            node.accumulate_derivative(d)
            continue
        for parent, d_parent in node.chain_rule(d):
            if parent.is_constant():
                continue
            key = parent.unique_id
            if key in pending:
                pending[key] = pending[key] + d_parent
            else:
                pending[key] = d_parent
    # END SOLUTION


@dataclass
class Context:
    """Per-call storage that a ``forward`` fills for its ``backward``.

    With ``no_grad=True`` (no input needs a derivative) nothing is saved.
    """

    no_grad: bool = False
    saved_values: Tuple[Any, ...] = ()

    def save_for_backward(self, *values: Any) -> None:
        """Store ``values`` for the backward pass (ignored under ``no_grad``)."""
        if self.no_grad:
            return
        self.saved_values = values

    @property
    def saved_tensors(self) -> Tuple[Any, ...]:
        """Alias of ``saved_values`` (the name Tensor functions use)."""
        return self.saved_values
