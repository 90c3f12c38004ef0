"""The plan of ring attention (minitorch/attention/ring_schedule.py), checked by brute force; no MPI needed.

Layouts partition the sequence; every step's kernel call covers every visible (query, key) pair of the step and a
skipped step has none; zigzag balances causal work exactly; the LSE merge of two partial results is the softmax
over the union of their keys (float64 NumPy reference).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch.attention.reference import reference_mask
from minitorch.attention.ring_schedule import (
    chunk_bounds,
    chunks_see,
    local_length,
    local_positions,
    lse_merge,
    rank_chunks,
    ring_plan,
)

layouts = st.sampled_from(["contiguous", "zigzag"])
windows = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def sequences(draw):  # type: ignore[no-untyped-def]
    P = draw(st.integers(1, 6))
    layout = draw(layouts)
    N = draw(st.integers(P * (2 if layout == "zigzag" else 1), 90))
    return N, P, layout


@given(sequences())
def test_layouts_partition_the_sequence(seq) -> None:  # type: ignore[no-untyped-def]
    N, P, layout = seq
    pos = [local_positions(N, P, r, layout) for r in range(P)]
    assert sorted(np.concatenate(pos).tolist()) == list(range(N))
    assert [len(p) for p in pos] == [local_length(N, P, r, layout) for r in range(P)]
    b = chunk_bounds(N, P if layout == "contiguous" else 2 * P)
    sizes = np.diff(b)
    assert sizes.max() - sizes.min() <= 1 and sizes.min() >= 1 and b[-1] == N
    for r in range(P):  # rank r's rows are its chunks, in order: r (and 2P-1-r)
        expect = np.concatenate([np.arange(b[c], b[c + 1]) for c in rank_chunks(P, r, layout)])
        assert np.array_equal(pos[r], expect)
    if layout == "zigzag":
        assert rank_chunks(P, 0, layout) == (0, 2 * P - 1)


@given(sequences(), st.booleans(), windows)
def test_plan_covers_every_visible_pair_and_skips_only_empty_blocks(seq, causal, window) -> None:  # type: ignore
    N, P, layout = seq
    for rank in range(P):
        q_pos = local_positions(N, P, rank, layout)
        plan = ring_plan(N, P, rank, layout, causal, window)
        assert [s.kv_rank for s in plan] == [(rank - s) % P for s in range(P)]
        for step in plan:
            k_pos = local_positions(N, P, step.kv_rank, layout)
            vis = reference_mask(1, len(q_pos), len(k_pos), causal, window, q_pos, k_pos)[0]
            if step.skipped:
                assert not vis.any()
                continue
            inside = np.zeros_like(vis)
            inside[step.q_rows, step.k_rows] = True
            assert not (vis & ~inside).any(), "a visible pair outside the kernel call"
            assert vis[step.q_rows, step.k_rows].any()
            # the pair flags are exact at chunk granularity
            b = chunk_bounds(N, P if layout == "contiguous" else 2 * P)
            for qc, kc, computed in step.pairs:
                brute = reference_mask(1, b[qc + 1] - b[qc], b[kc + 1] - b[kc], causal, window,
                                       np.arange(b[qc], b[qc + 1]), np.arange(b[kc], b[kc + 1]))
                assert computed == bool(brute.any()), (qc, kc)


@given(st.integers(-5, 30), st.integers(1, 12), st.integers(-5, 30), st.integers(1, 12), st.booleans(), windows)
def test_chunks_see_is_brute_force(qa, qn, ka, kn, causal, window) -> None:  # type: ignore[no-untyped-def]
    q, k = np.arange(qa, qa + qn), np.arange(ka, ka + kn)
    d = q[:, None] - k[None, :]
    ok = np.ones_like(d, dtype=bool)
    if causal:
        ok &= d >= 0
    if window is not None:
        ok &= (d < window) if causal else (np.abs(d) < window)
    assert chunks_see((qa, qa + qn), (ka, ka + kn), causal, window) == bool(ok.any())


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(P: int) -> None:
    """Visible pairs per rank under a causal mask: equal for zigzag; rank 0 does ~1/(2P-1) of rank P-1 contiguous."""
    N = 2 * P * 16

    def work(layout: str):  # type: ignore[no-untyped-def]
        counts = []
        for r in range(P):
            q = local_positions(N, P, r, layout)
            counts.append(sum(int(reference_mask(1, len(q), N // P, True, None, q,
                                                 local_positions(N, P, s.kv_rank, layout)).sum())
                              for s in ring_plan(N, P, r, layout, causal=True)))
        return counts

    zig, cont = work("zigzag"), work("contiguous")
    assert sum(zig) == sum(cont) == N * (N + 1) // 2
    assert len(set(zig)) == 1
    assert cont[0] * (2 * P - 2) < cont[-1]


def _softmax_stats(s: np.ndarray, v: np.ndarray):  # type: ignore[no-untyped-def]
    """Reference ``(out, lse)`` of scores ``s (n, m)`` (``-inf`` = masked) over values ``v (m, D)``, float64."""
    m = np.max(s, axis=1, initial=-np.inf)
    safe = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - safe[:, None])
    total = e.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.where(total > 0, safe + np.log(total), -np.inf)
        out = np.where(total[:, None] > 0, (e @ v) / total[:, None], 0.0)
    return out, lse


@given(st.integers(0, 2**16), st.integers(1, 12), st.integers(1, 12))
def test_lse_merge_is_the_softmax_over_both_key_sets(seed: int, m1: int, m2: int) -> None:
    rng = np.random.default_rng(seed)
    n, D = 6, 3
    s = 4 * rng.standard_normal((n, m1 + m2))
    s[0, :m1] = -np.inf  # row 0 sees only the second key set, row 1 only the first, row 2 none
    s[1, m1:] = -np.inf
    s[2] = -np.inf
    v = rng.standard_normal((m1 + m2, D))
    out_a, lse_a = _softmax_stats(s[:, :m1], v[:m1])
    out_b, lse_b = _softmax_stats(s[:, m1:], v[m1:])
    out, lse = lse_merge(out_a, lse_a, out_b, lse_b)
    want_out, want_lse = _softmax_stats(s, v)
    np.testing.assert_allclose(out, want_out, rtol=1e-13, atol=1e-14)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse)) and lse[2] == -np.inf and (out[2] == 0).all()
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)], rtol=1e-13, atol=1e-13)


def test_bad_layout_and_sizes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_plan(16, 2, 0, "spiral")
    with pytest.raises(ValueError, match="N >= 8"):
        ring_plan(7, 4, 0, "zigzag")
    with pytest.raises(ValueError, match=r"rank must be in \[0, 4\)"):
        local_positions(16, 4, 4, "contiguous")
