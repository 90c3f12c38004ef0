"""Toy 2-D binary classification datasets (MiniTorch course).

Every generator takes the number of points ``N`` and returns a ``Graph``: points in the unit square and a 0/1 label
per point. Random ones use Python's ``random`` module, so ``random.seed(s)`` makes them reproducible.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple


def make_pts(N: int) -> List[Tuple[float, float]]:
    """``N`` points drawn uniformly from the unit square."""
    return [(random.random(), random.random()) for _ in range(N)]


@dataclass
class Graph:
    """A dataset: ``N`` points ``X`` (pairs of floats) and their labels ``y`` (0 or 1)."""

    N: int
    X: List[Tuple[float, float]]
    y: List[int]


def simple(N: int) -> Graph:
    """Label 1 on the left half of the square (a vertical boundary)."""
    X = make_pts(N)
    y = [1 if x1 < 0.5 else 0 for x1, _ in X]
    return Graph(N, X, y)


def diag(N: int) -> Graph:
    """Label 1 below the diagonal line x1 + x2 = 0.5."""
    X = make_pts(N)
    y = [1 if x1 + x2 < 0.5 else 0 for x1, x2 in X]
    return Graph(N, X, y)


def split(N: int) -> Graph:
    """Label 1 in the two outer vertical bands (x1 < 0.2 or x1 > 0.8)."""
    X = make_pts(N)
    y = [1 if x1 < 0.2 or x1 > 0.8 else 0 for x1, _ in X]
    return Graph(N, X, y)


def xor(N: int) -> Graph:
    """Label 1 in the top-left and bottom-right quadrants."""
    X = make_pts(N)
    y = [1 if (x1 < 0.5 and x2 > 0.5) or (x1 > 0.5 and x2 < 0.5) else 0 for x1, x2 in X]
    return Graph(N, X, y)


def circle(N: int) -> Graph:
    """Label 1 outside a circle of squared radius 0.1 around the center."""
    X = make_pts(N)
    y = [1 if (x1 - 0.5) ** 2 + (x2 - 0.5) ** 2 > 0.1 else 0 for x1, x2 in X]
    return Graph(N, X, y)


def spiral(N: int) -> Graph:
    """Two interleaved spirals (deterministic): ``N // 2`` points of class 0, the rest of class 1."""

    def arm(n: int, sign: float) -> List[Tuple[float, float]]:
        pts = []
        for i in range(5, 5 + n):
            t = sign * 10.0 * i / (n if n > 0 else 1)
            pts.append((t * math.cos(t) / 20.0, t * math.sin(t) / 20.0))
        return pts

    n0 = N // 2
    n1 = N - n0
    X = [(a + 0.5, b + 0.5) for a, b in arm(n0, 1.0)]
    # The second arm: the same curve at negative t, with x and y swapped.
    X += [(b + 0.5, a + 0.5) for a, b in arm(n1, -1.0)]
    y = [0] * n0 + [1] * n1
    return Graph(N, X, y)


datasets: Dict[str, Callable[[int], Graph]] = {
    "Simple": simple,
    "Diag": diag,
    "Split": split,
    "Xor": xor,
    "Circle": circle,
    "Spiral": spiral,
}
