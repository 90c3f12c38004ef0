"""The toy 2-D datasets."""

import random
from typing import Callable

import pytest

from minitorch.datasets import Graph, circle, datasets, diag, simple, spiral, split, xor


@pytest.mark.parametrize("name", sorted(datasets))
@pytest.mark.parametrize("N", [1, 10, 51])
def test_shapes(name: str, N: int) -> None:
    random.seed(0)
    g = datasets[name](N)
    assert isinstance(g, Graph)
    assert g.N == N == len(g.X) == len(g.y)
    for x1, x2 in g.X:
        assert isinstance(x1, float) and isinstance(x2, float)
    assert set(g.y) <= {0, 1}


@pytest.mark.parametrize("name", sorted(datasets))
def test_deterministic_given_seed(name: str) -> None:
    random.seed(123)
    a = datasets[name](40)
    random.seed(123)
    b = datasets[name](40)
    assert a == b


def test_random_points_in_unit_square_and_different_seeds_differ() -> None:
    random.seed(1)
    a = simple(30)
    random.seed(2)
    b = simple(30)
    assert a.X != b.X
    assert all(0.0 <= v <= 1.0 for pt in a.X for v in pt)


RULES = {
    simple: lambda x1, x2: x1 < 0.5,
    diag: lambda x1, x2: x1 + x2 < 0.5,
    split: lambda x1, x2: x1 < 0.2 or x1 > 0.8,
    xor: lambda x1, x2: (x1 < 0.5 and x2 > 0.5) or (x1 > 0.5 and x2 < 0.5),
    circle: lambda x1, x2: (x1 - 0.5) ** 2 + (x2 - 0.5) ** 2 > 0.1,
}


@pytest.mark.parametrize("make", list(RULES), ids=lambda f: f.__name__)
def test_labels_follow_rules(make: Callable[[int], Graph]) -> None:
    random.seed(7)
    g = make(100)
    rule = RULES[make]
    assert g.y == [1 if rule(x1, x2) else 0 for x1, x2 in g.X]


def test_both_classes_present() -> None:
    random.seed(3)
    for name, make in datasets.items():
        g = make(200)
        assert 0 < sum(g.y) < g.N, name


def test_spiral_is_balanced_and_ignores_seed() -> None:
    g = spiral(50)
    assert g.y == [0] * 25 + [1] * 25
    random.seed(99)
    assert spiral(50) == g
    assert spiral(7).y == [0] * 3 + [1] * 4
