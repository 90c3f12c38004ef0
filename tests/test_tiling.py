"""TileSchedule (minitorch/attention/tiling.py) against brute force.

The masks are recomputed pair by pair with ``reference.reference_mask`` (which shares no code with tiling.py), and
the bytes moved by each loop order are recounted by simulating the loads and stores of the algorithm tile by tile.
"""

from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch.attention.reference import reference_mask
from minitorch.attention.tiling import (
    TileOrder,
    TileSchedule,
    TileType,
    standard_attention_hbm_bytes,
)

pytestmark = pytest.mark.task5_1

LENGTHS = st.one_of(st.sampled_from([1, 2, 17, 37, 97]), st.integers(1, 64))
BLOCKS = st.one_of(st.sampled_from([1, 2, 16, 32, 64, 128]), st.integers(1, 40))


@st.composite
def positions(draw: Any, n: int, default_start: int, allow_empty: bool = True) -> Any:
    """``None`` (the default), a shifted range, a ring buffer's rotated range, or a shuffle; maybe with -1 slots."""
    kind = draw(st.sampled_from(["default", "shifted", "rotated", "shuffled"]))
    if kind == "default":
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pos = np.arange(n) + default_start + draw(st.integers(-3, 10))
    pos = np.maximum(pos, 0)
    if kind == "rotated":
        pos = np.roll(pos, draw(st.integers(0, n)))
    elif kind == "shuffled":
        pos = rng.permutation(pos)
    if allow_empty and draw(st.booleans()):
        pos[rng.random(n) < draw(st.sampled_from([0.1, 0.5, 1.0]))] = -1
    return pos


@st.composite
def schedules(draw: Any) -> Tuple[TileSchedule, Dict[str, Any]]:
    Nq, Nk = draw(LENGTHS), draw(LENGTHS)
    opts: Dict[str, Any] = {
        "causal": draw(st.booleans()),
        "window": draw(st.one_of(st.none(), st.integers(0, max(Nq, Nk) + 3))),
        "num_sinks": draw(st.integers(0, 4)),
        "q_positions": draw(positions(Nq, Nk - Nq)),
        "k_positions": draw(positions(Nk, 0)),
    }
    sched = TileSchedule(Nq, Nk, draw(BLOCKS), draw(BLOCKS), order=draw(st.sampled_from(list(TileOrder))), **opts)
    return sched, opts


def brute_force_visible(sched: TileSchedule, opts: Dict[str, Any]) -> np.ndarray:
    """``(Nq, Nk)`` booleans from the reference's own mask code."""
    return reference_mask(
        1, sched.Nq, sched.Nk, opts["causal"], opts["window"], opts["q_positions"], opts["k_positions"],
        None, opts["num_sinks"],
    )[0]


def tile_block(a: np.ndarray, sched: TileSchedule, tq: int, tk: int) -> np.ndarray:
    qs, qe = sched.q_range(tq)
    ks, ke = sched.k_range(tk)
    return a[qs:qe, ks:ke]


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------
@given(schedules())
def test_tile_types_are_sound(case: Tuple[TileSchedule, Dict[str, Any]]) -> None:
    """SKIP tiles hold no visible pair; DENSE tiles hold only visible pairs and no empty slot."""
    sched, opts = case
    vis = brute_force_visible(sched, opts)
    assert sched.types.shape == (sched.Tr, sched.Tc)
    for tq in range(sched.Tr):
        for tk in range(sched.Tc):
            block = tile_block(vis, sched, tq, tk)
            kind = TileType(int(sched.types[tq, tk]))
            if kind == TileType.SKIP:
                assert not block.any(), f"SKIP tile ({tq}, {tk}) has a visible pair"
            elif kind == TileType.DENSE:
                assert block.all(), f"DENSE tile ({tq}, {tk}) has a masked pair"
                qs, qe = sched.q_range(tq)
                ks, ke = sched.k_range(tk)
                assert (sched.q_pos[qs:qe] >= 0).all() and (sched.k_pos[ks:ke] >= 0).all()
    # every visible pair lies in a tile that is processed
    for i, j in zip(*np.nonzero(vis)):
        assert sched.types[i // sched.block_q, j // sched.block_k] != TileType.SKIP


@given(LENGTHS, LENGTHS, BLOCKS, BLOCKS, st.booleans(),
       st.one_of(st.none(), st.sampled_from([1, 2]), st.integers(1, 100)), st.integers(-5, 20))
def test_tile_types_are_exact_for_contiguous_positions(
    Nq: int, Nk: int, Br: int, Bc: int, causal: bool, window: Any, shift: int
) -> None:
    """With contiguous increasing positions (no sinks; queries before position 0 are empty, as in the default
    layout when Nq > Nk) and a window of at least 1, the classification is exact: a tile is SKIP iff nothing in it
    is visible and DENSE iff everything is (no needless masking, no needless loads). (``window=0`` hides every key;
    its diagonal tiles are conservatively TRIANGLE, which the soundness test allows.)"""
    q_pos = np.arange(Nq) + (Nk - Nq) + shift
    q_pos[q_pos < 0] = -1
    opts = {"causal": causal, "window": window, "num_sinks": 0, "q_positions": q_pos, "k_positions": None}
    sched = TileSchedule(Nq, Nk, Br, Bc, causal=causal, window=window, q_positions=q_pos)
    vis = brute_force_visible(sched, opts)
    for tq in range(sched.Tr):
        for tk in range(sched.Tc):
            block = tile_block(vis, sched, tq, tk)
            expected = TileType.SKIP if not block.any() else TileType.DENSE if block.all() else TileType.TRIANGLE
            assert sched.types[tq, tk] == expected, f"tile ({tq}, {tk}): {TileType(int(sched.types[tq, tk]))}"


def test_causal_grid_picture() -> None:
    """The familiar causal picture: DENSE below the diagonal, TRIANGLE on it, SKIP above."""
    sched = TileSchedule(8, 8, 2, 2, causal=True)
    assert sched.to_text() == "/...\n#/..\n##/.\n###/"
    assert sched.counts() == {"SKIP": 6, "DENSE": 6, "TRIANGLE": 4}


def test_sinks_escape_the_window() -> None:
    """With a sliding window, tiles of sink keys stay visible (DENSE), the keys between sink and window are SKIP."""
    sched = TileSchedule(16, 16, 4, 4, causal=True, window=4, num_sinks=4)
    assert sched.types[3, 0] == TileType.DENSE  # sinks 0..3 seen by queries 12..15 despite the window
    assert sched.types[3, 1] == TileType.SKIP  # keys 4..7 are outside every window of queries 12..15
    no_sinks = TileSchedule(16, 16, 4, 4, causal=True, window=4)
    assert no_sinks.types[3, 0] == TileType.SKIP


# ---------------------------------------------------------------------------------------------------------------
# Geometry and order
# ---------------------------------------------------------------------------------------------------------------
@given(schedules())
def test_iteration_covers_every_tile_once_in_order(case: Tuple[TileSchedule, Dict[str, Any]]) -> None:
    sched, _ = case
    tiles = list(sched)
    pairs = [(t.tq, t.tk) for t in tiles]
    assert len(pairs) == sched.Tr * sched.Tc == len(set(pairs))
    if sched.order == TileOrder.Q_MAJOR:  # outer loop over query tiles
        assert pairs == [(tq, tk) for tq in range(sched.Tr) for tk in range(sched.Tc)]
    else:  # outer loop over key tiles
        assert pairs == [(tq, tk) for tk in range(sched.Tc) for tq in range(sched.Tr)]
    for t in tiles:
        assert (t.q_start, t.q_end) == sched.q_range(t.tq) and (t.k_start, t.k_end) == sched.k_range(t.tk)
        assert t.type == sched.types[t.tq, t.tk]
    work = sched.work()
    assert [(t.tq, t.tk) for t in work] == [(t.tq, t.tk) for t in tiles if t.type != TileType.SKIP]
    for tq in range(sched.Tr):
        assert list(sched.kv_tiles_for(tq)) == [t.tk for t in tiles if t.tq == tq and t.type != TileType.SKIP]
    for tk in range(sched.Tc):
        assert list(sched.q_tiles_for(tk)) == [t.tq for t in tiles if t.tk == tk and t.type != TileType.SKIP]


@given(LENGTHS, LENGTHS, BLOCKS, BLOCKS)
def test_ranges_partition_rows_and_columns(Nq: int, Nk: int, Br: int, Bc: int) -> None:
    sched = TileSchedule(Nq, Nk, Br, Bc)
    assert sched.Tr == -(-Nq // Br) and sched.Tc == -(-Nk // Bc)
    rows: List[int] = sum((list(range(*sched.q_range(t))) for t in range(sched.Tr)), [])
    cols: List[int] = sum((list(range(*sched.k_range(t))) for t in range(sched.Tc)), [])
    assert rows == list(range(Nq)) and cols == list(range(Nk))
    assert all(0 < sched.q_range(t)[1] - sched.q_range(t)[0] <= Br for t in range(sched.Tr))


# ---------------------------------------------------------------------------------------------------------------
# Memory traffic (the FlashAttention IO analysis)
# ---------------------------------------------------------------------------------------------------------------
def simulated_hbm_elements(sched: TileSchedule, D: int, order: TileOrder) -> int:
    """Run the forward loop nest of ``order`` and count every element loaded from / stored to main memory."""
    moved = 0

    def rows(tq: int) -> int:
        return sched.q_range(tq)[1] - sched.q_range(tq)[0]

    def cols(tk: int) -> int:
        return sched.k_range(tk)[1] - sched.k_range(tk)[0]

    if order == TileOrder.Q_MAJOR:  # FlashAttention 2
        for tq in range(sched.Tr):
            moved += rows(tq) * D  # load Q_i
            for tk in range(sched.Tc):
                if sched.types[tq, tk] != TileType.SKIP:
                    moved += 2 * cols(tk) * D  # load K_j, V_j
            moved += rows(tq) * D + rows(tq)  # store O_i, lse_i
    else:  # FlashAttention 1, Algorithm 1
        for tk in range(sched.Tc):
            moved += 2 * cols(tk) * D  # load K_j, V_j
            for tq in range(sched.Tr):
                if sched.types[tq, tk] != TileType.SKIP:
                    moved += rows(tq) * D  # load Q_i
                    moved += rows(tq) * D + 2 * rows(tq)  # load O_i, l_i, m_i
                    moved += rows(tq) * D + 2 * rows(tq)  # store O_i, l_i, m_i
    return moved


@given(schedules(), st.sampled_from([1, 8, 64]), st.sampled_from([2, 4, 8]))
def test_hbm_bytes_match_a_simulated_count(case: Tuple[TileSchedule, Dict[str, Any]], D: int, itemsize: int) -> None:
    sched, _ = case
    for order in TileOrder:
        assert sched.hbm_bytes(D, itemsize, order) == itemsize * simulated_hbm_elements(sched, D, order)
    assert sched.hbm_bytes(D, itemsize) == sched.hbm_bytes(D, itemsize, sched.order)


@given(st.integers(2, 40), st.integers(1, 64), st.sampled_from([1, 16, 64]), st.booleans())
def test_k_major_moves_more_bytes(T: int, block: int, D: int, causal: bool) -> None:
    """FlashAttention 1's K-major order re-reads and re-writes O, l, m for every visited tile, while FA2 re-reads
    only K and V: with T x T full tiles (T > 1), K-major moves more bytes."""
    sched = TileSchedule(T * block, T * block, block, block, causal=causal)
    assert sched.hbm_bytes(D, 4, TileOrder.K_MAJOR) > sched.hbm_bytes(D, 4, TileOrder.Q_MAJOR)


def test_single_tile_orders_move_the_same_inputs() -> None:
    """One tile: both orders read Q, K, V once; K-major also reads the initial O, l, m (2 + D per row)."""
    sched = TileSchedule(10, 12, 16, 16)
    D = 8
    q_major = 10 * D + 12 * 2 * D + 10 * (D + 1)
    assert sched.hbm_bytes(D, 1, TileOrder.Q_MAJOR) == q_major
    assert sched.hbm_bytes(D, 1, TileOrder.K_MAJOR) == 12 * 2 * D + 10 * (3 * D + 4)


def test_flash_io_far_below_standard_attention() -> None:
    """The FlashAttention IO claim at N=4096, D=64: standard attention moves the N x N matrices S and P; the
    tiled algorithm moves only Q, K, V, O (K and V once per query tile), so its traffic shrinks as tiles grow."""
    N, D = 4096, 64
    standard = standard_attention_hbm_bytes(N, N, D)
    full = TileSchedule(N, N, 128, 128)
    causal = TileSchedule(N, N, 128, 128, causal=True)
    assert full.hbm_bytes(D, 4, TileOrder.Q_MAJOR) < standard / 3
    assert full.hbm_bytes(D, 4, TileOrder.K_MAJOR) < standard / 2
    assert causal.hbm_bytes(D, 4, TileOrder.Q_MAJOR) < standard / 6  # SKIP tiles are never loaded
    bigger = TileSchedule(N, N, 256, 256)  # Theta(N^2 D^2 / M): doubling the on-chip tile ~halves the traffic
    assert bigger.hbm_bytes(D, 4, TileOrder.Q_MAJOR) < 0.55 * full.hbm_bytes(D, 4, TileOrder.Q_MAJOR)


@pytest.mark.parametrize("N,block", [(1024, 32), (4096, 64), (4096, 128)])
def test_causal_skips_about_half(N: int, block: int) -> None:
    sched = TileSchedule(N, N, block, block, causal=True)
    T = N // block
    assert sched.skip_fraction() == pytest.approx((1 - 1 / T) / 2)  # the T (T - 1) / 2 tiles above the diagonal
    assert 0.45 < sched.skip_fraction() < 0.5
    assert sched.visible_fraction() == pytest.approx((N + 1) / (2 * N))
    assert TileSchedule(N, N, block, block).skip_fraction() == 0.0
