"""The one visibility rule (minitorch/attention/masks.py): its definition, its compiled copies, and the property the
tile classification relies on."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest

from minitorch.attention.masks import build_visible, visible
from minitorch.attention.reference import reference_mask

pytestmark = pytest.mark.task5_1

OPTIONS = list(itertools.product([False, True], [-1, 0, 1, 3, 7], [0, 2]))  # causal, window, num_sinks
POS = np.arange(-1, 14)


def test_rule_matches_the_reference_mask() -> None:
    """The rule against reference.reference_mask, which writes the definition of docs/api.md independently."""
    for causal, window, sinks in OPTIONS:
        got = visible(POS[:, None], POS[None, :], causal, window, sinks)
        want = reference_mask(1, len(POS), len(POS), causal, None if window < 0 else window, POS, POS, None,
                              sinks)[0]
        assert np.array_equal(got, want), (causal, window, sinks)


def test_compiled_rule_agrees_with_numpy() -> None:
    """The njit copy (the CPU kernels') gives the NumPy copy's answer on every pair."""
    vis = build_visible(numba.njit)

    @numba.njit
    def grid(pos, causal, window, sinks):  # type: ignore[no-untyped-def]
        out = np.zeros((pos.shape[0], pos.shape[0]), np.bool_)
        for i in range(pos.shape[0]):
            for j in range(pos.shape[0]):
                out[i, j] = vis(pos[i], pos[j], causal, window, sinks)
        return out

    for causal, window, sinks in OPTIONS:
        assert np.array_equal(grid(POS, causal, window, sinks), visible(POS[:, None], POS[None, :], causal, window,
                                                                         sinks))


def test_rule_depends_on_the_difference_and_is_an_interval_containing_zero() -> None:
    """What TileSchedule's corner tests need: for valid pairs, visibility is a function of ``d = qp - kp`` and of
    whether the key is a sink, and for either kind the visible ``d`` form an interval that contains 0 (or none)."""
    for causal, window, sinks in OPTIONS:
        for sink in (True, False):
            keys = [kp for kp in range(0, 14) if (kp < sinks) == sink]
            by_d = {}
            for qp in range(0, 14):
                for kp in keys:
                    by_d.setdefault(qp - kp, set()).add(bool(visible(qp, kp, causal, window, sinks)))
            assert all(len(v) == 1 for v in by_d.values()), "not a function of the difference"
            seen = sorted(d for d, v in by_d.items() if True in v)
            if seen:
                assert 0 in seen and seen == list(range(seen[0], seen[-1] + 1)), (causal, window, sinks, sink, seen)
