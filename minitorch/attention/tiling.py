"""Which tiles of the attention matrix exist, what kind they are, and in which order they are visited.

Flash attention never builds the ``(Nq, Nk)`` score matrix. It cuts the queries into ``Tr`` tiles of ``Br`` rows
and the keys into ``Tc`` tiles of ``Bc`` columns and visits the ``Tr x Tc`` tile pairs one at a time. Masks make
many pairs uninteresting:

* ``SKIP``: every (query, key) pair in the tile is masked. The tile is never loaded.
* ``DENSE``: every pair is visible. The kernel runs the plain inner loop with no per-element test.
* ``TRIANGLE``: some pairs are masked (the causal diagonal, a window's edge, an empty slot): masked per element.

:class:`TileSchedule` is the single source of truth for this classification. The CPU and CUDA kernels, the tests
and the visualizer all take their tiles from it, so what a student sees is what the kernels do.

Positions, not indices, define the masks (DESIGN.md section 3): query row ``i`` sits at position ``q_pos[i]``,
key slot ``j`` at ``k_pos[j]``; ``-1`` marks an empty slot. A ring buffer's rotated slots therefore need no
reordering: the schedule simply sees non-monotone positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


class TileType(IntEnum):
    """Kind of one (query tile, key tile) pair. The integer values are what the kernels read."""

    SKIP = 0
    DENSE = 1
    TRIANGLE = 2


class TileOrder(str, Enum):
    """Loop order over tiles.

    * ``Q_MAJOR``: FlashAttention 2. Outer loop over query tiles; the output tile, ``m`` and ``l`` stay on chip
      while the inner loop streams key/value tiles.
    * ``K_MAJOR``: FlashAttention 1, Algorithm 1. Outer loop over key/value tiles; for every query tile the
      partial ``O``, ``l``, ``m`` are read from main memory, updated and written back.
    """

    Q_MAJOR = "q_major"
    K_MAJOR = "k_major"


def default_block_sizes(head_dim: int, backend: str = "fast") -> Tuple[int, int]:
    """Block sizes ``(Br, Bc)`` chosen from the head dimension.

    On the CPU a tile of ``Br x D`` queries plus ``Bc x D`` keys and values should sit in L1/L2; on the GPU the
    tiles must fit 48 KB of shared memory. Larger D therefore gets smaller tiles.
    """
    if backend == "cuda":
        if head_dim <= 32:
            return 64, 64
        if head_dim <= 64:
            return 64, 32
        return 32, 32
    if head_dim <= 32:
        return 64, 128
    if head_dim <= 128:
        return 64, 64
    return 32, 32


def visible(q: np.ndarray, k: np.ndarray, causal: bool, window: int, num_sinks: int = 0) -> np.ndarray:
    """Elementwise mask: may a query at position ``q`` see a key at position ``k``? (broadcasts; -1 = empty).

    Keys at positions ``< num_sinks`` (attention sinks, used by the ring-buffer cache) ignore the window.
    """
    q = np.asarray(q)
    k = np.asarray(k)
    ok = (q >= 0) & (k >= 0)
    if causal:
        ok &= k <= q
        if window >= 0:
            ok &= ((q - k) < window) | (k < num_sinks)
    elif window >= 0:
        ok &= (np.abs(q - k) < window) | (k < num_sinks)
    return ok


def _as_positions(pos: Optional[Sequence[int]], n: int, default_start: int, name: str) -> np.ndarray:
    if pos is None:
        return np.arange(default_start, default_start + n, dtype=np.int64)
    arr = np.asarray(pos)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if np.any(arr < -1):
        raise ValueError(f"{name} must be >= 0, or -1 for an empty slot; got min {arr.min()}")
    return arr


@dataclass(frozen=True)
class Tile:
    """One (query tile, key tile) pair: rows ``q_start:q_end`` and columns ``k_start:k_end``."""

    tq: int
    tk: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    type: TileType


class TileSchedule:
    """All tiles of an attention call, their :class:`TileType` and their processing order.

    Args:
        Nq, Nk: number of query rows and key slots.
        block_q, block_k: ``Br`` and ``Bc``.
        causal, window: the masks (window ``None`` or ``-1`` for none; see DESIGN.md section 3).
        q_positions, k_positions: absolute positions (defaults: keys ``0..Nk-1``, queries bottom-right aligned
            ``Nk-Nq..Nk-1``); ``-1`` marks an empty slot.
        order: :class:`TileOrder`.
        num_sinks: keys at positions ``< num_sinks`` are exempt from the window (attention sinks).

    Attributes:
        Tr, Tc: number of query and key tiles.
        types: ``int8`` array ``(Tr, Tc)`` of :class:`TileType` values.
        q_pos, k_pos: the positions used.
    """

    def __init__(
        self,
        Nq: int,
        Nk: int,
        block_q: int = 64,
        block_k: int = 64,
        causal: bool = False,
        window: Optional[int] = None,
        q_positions: Optional[Sequence[int]] = None,
        k_positions: Optional[Sequence[int]] = None,
        order: TileOrder = TileOrder.Q_MAJOR,
        num_sinks: int = 0,
    ) -> None:
        if Nq < 0 or Nk < 0:
            raise ValueError(f"Nq and Nk must be >= 0, got Nq={Nq}, Nk={Nk}")
        if block_q < 1 or block_k < 1:
            raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
        self.Nq, self.Nk = int(Nq), int(Nk)
        self.block_q, self.block_k = int(block_q), int(block_k)
        self.causal = bool(causal)
        self.window = -1 if window is None else int(window)
        self.order = TileOrder(order)
        self.num_sinks = int(num_sinks)
        # Default positions: keys 0..Nk-1 and queries bottom-right aligned (the last query at the last key).
        # When Nq > Nk the defaults are shifted up so that no position is negative (-1 means "empty").
        shift = max(0, self.Nq - self.Nk)
        self.k_pos = _as_positions(k_positions, self.Nk, shift, "k_positions")
        self.q_pos = _as_positions(q_positions, self.Nq, shift + self.Nk - self.Nq, "q_positions")
        self.Tr = -(-self.Nq // self.block_q)
        self.Tc = -(-self.Nk // self.block_k)
        self.types = self._classify()

    # -- classification --------------------------------------------------------------------------------------
    @staticmethod
    def _tile_bounds(pos: np.ndarray, block: int, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per tile: min and max valid position, and whether the tile holds an empty (-1) slot."""
        lo = np.full(count, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(count, -1, dtype=np.int64)
        empty = np.zeros(count, dtype=bool)
        for t in range(count):
            p = pos[t * block : (t + 1) * block]
            valid = p[p >= 0]
            empty[t] = valid.size < p.size
            if valid.size:
                lo[t], hi[t] = valid.min(), valid.max()
        return lo, hi, empty

    def _classify(self) -> np.ndarray:
        types = np.full((self.Tr, self.Tc), TileType.TRIANGLE, dtype=np.int8)
        if self.Tr == 0 or self.Tc == 0:
            return types
        qlo, qhi, qempty = self._tile_bounds(self.q_pos, self.block_q, self.Tr)
        klo, khi, kempty = self._tile_bounds(self.k_pos, self.block_k, self.Tc)
        qlo, qhi, qempty = qlo[:, None], qhi[:, None], qempty[:, None]
        klo, khi, kempty = klo[None, :], khi[None, :], kempty[None, :]
        no_valid = (qhi < 0) | (khi < 0)
        W = self.window
        has_sink = klo < self.num_sinks  # a sink key in the tile: the window cannot skip it
        all_sink = khi < self.num_sinks  # only sink keys: the window does not apply at all
        if self.causal:
            # visible iff 0 <= q - k (< W): all visible iff the extreme pairs are.
            all_vis = khi <= qlo
            none_vis = klo > qhi
            if W >= 0:
                all_vis &= ((qhi - klo) < W) | all_sink
                none_vis |= ((qlo - khi) >= W) & ~has_sink
        else:
            all_vis = np.ones_like(no_valid)
            none_vis = np.zeros_like(no_valid)
            if W >= 0:
                all_vis = (((qhi - klo) < W) & ((khi - qlo) < W)) | all_sink
                none_vis = (((klo - qhi) >= W) | ((qlo - khi) >= W)) & ~has_sink
        types[all_vis & ~qempty & ~kempty] = TileType.DENSE
        types[none_vis | no_valid] = TileType.SKIP
        return types

    # -- geometry --------------------------------------------------------------------------------------------
    def q_range(self, tq: int) -> Tuple[int, int]:
        """Rows ``[start, end)`` of query tile ``tq``."""
        return tq * self.block_q, min((tq + 1) * self.block_q, self.Nq)

    def k_range(self, tk: int) -> Tuple[int, int]:
        """Columns ``[start, end)`` of key tile ``tk``."""
        return tk * self.block_k, min((tk + 1) * self.block_k, self.Nk)

    def tile(self, tq: int, tk: int) -> Tile:
        qs, qe = self.q_range(tq)
        ks, ke = self.k_range(tk)
        return Tile(tq, tk, qs, qe, ks, ke, TileType(int(self.types[tq, tk])))

    def __iter__(self) -> Iterator[Tile]:
        """All tiles, SKIP included, in processing order."""
        if self.order == TileOrder.Q_MAJOR:
            pairs = ((tq, tk) for tq in range(self.Tr) for tk in range(self.Tc))
        else:
            pairs = ((tq, tk) for tk in range(self.Tc) for tq in range(self.Tr))
        for tq, tk in pairs:
            yield self.tile(tq, tk)

    def work(self) -> List[Tile]:
        """The tiles a kernel actually processes (not SKIP), in processing order."""
        return [t for t in self if t.type != TileType.SKIP]

    def kv_tiles_for(self, tq: int) -> np.ndarray:
        """Key tiles query tile ``tq`` must visit (Q-major inner loop, dQ kernel)."""
        return np.nonzero(self.types[tq] != TileType.SKIP)[0]

    def q_tiles_for(self, tk: int) -> np.ndarray:
        """Query tiles key tile ``tk`` must visit (K-major inner loop, dK/dV kernel)."""
        return np.nonzero(self.types[:, tk] != TileType.SKIP)[0]

    # -- statistics ------------------------------------------------------------------------------------------
    def counts(self) -> Dict[str, int]:
        """Number of tiles of each type."""
        return {t.name: int(np.sum(self.types == t)) for t in TileType}

    def _tile_areas(self) -> np.ndarray:
        rows = np.array([self.q_range(t)[1] - self.q_range(t)[0] for t in range(self.Tr)], dtype=np.int64)
        cols = np.array([self.k_range(t)[1] - self.k_range(t)[0] for t in range(self.Tc)], dtype=np.int64)
        return rows[:, None] * cols[None, :]

    def skip_fraction(self) -> float:
        """Fraction of the ``Nq x Nk`` score entries that lie in skipped tiles (work saved)."""
        total = self.Nq * self.Nk
        if total == 0:
            return 0.0
        return float(self._tile_areas()[self.types == TileType.SKIP].sum()) / total

    def visible_fraction(self) -> float:
        """Fraction of (query, key) pairs actually visible under the mask."""
        total = self.Nq * self.Nk
        if total == 0:
            return 0.0
        return float(visible(self.q_pos[:, None], self.k_pos[None, :], self.causal, self.window, self.num_sinks).sum()) / total

    def hbm_bytes(self, head_dim: int, itemsize: int = 4, order: Optional[TileOrder] = None) -> int:
        """Bytes moved between main memory (HBM / DRAM) and on-chip memory (SRAM / cache) by the forward pass.

        Q-major (FlashAttention 2): each query tile is read once and its output and lse written once; each
        visited tile reads a ``Bc x D`` key tile and a value tile.
        K-major (FlashAttention 1, Algorithm 1): each key/value tile is read once; each visited tile reads the
        query tile and the partial ``O_i, l_i, m_i`` and writes ``O_i, l_i, m_i`` back.
        """
        order = self.order if order is None else TileOrder(order)
        D = int(head_dim)
        rows = np.array([self.q_range(t)[1] - self.q_range(t)[0] for t in range(self.Tr)], dtype=np.int64)
        cols = np.array([self.k_range(t)[1] - self.k_range(t)[0] for t in range(self.Tc)], dtype=np.int64)
        work = self.types != TileType.SKIP
        if order == TileOrder.Q_MAJOR:
            q_and_out = int(rows.sum()) * (2 * D + 1)  # read Q_i, write O_i and lse_i
            kv = int((work * cols[None, :]).sum()) * 2 * D  # K_j, V_j per visited tile
            elements = q_and_out + kv
        else:
            kv = int(cols.sum()) * 2 * D  # every K_j, V_j read once
            # per visited tile: read Q_i, O_i, l_i, m_i and write O_i, l_i, m_i
            per_row = 2 * D + 2 + D + 2
            qo = int((work * rows[:, None]).sum()) * per_row
            elements = kv + qo
        return elements * int(itemsize)

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"TileSchedule(Nq={self.Nq}, Nk={self.Nk}, Br={self.block_q}, Bc={self.block_k}, Tr={self.Tr}, "
            f"Tc={self.Tc}, causal={self.causal}, window={self.window}, order={self.order.value}, "
            f"DENSE={c['DENSE']}, TRIANGLE={c['TRIANGLE']}, SKIP={c['SKIP']})"
        )

    def to_text(self) -> str:
        """The tile grid as text: ``#`` DENSE, ``/`` TRIANGLE, ``.`` SKIP (one row per query tile)."""
        sym = {TileType.DENSE: "#", TileType.TRIANGLE: "/", TileType.SKIP: "."}
        return "\n".join("".join(sym[TileType(int(t))] for t in row) for row in self.types)


def standard_attention_hbm_bytes(Nq: int, Nk: int, head_dim: int, itemsize: int = 4) -> int:
    """Bytes standard attention moves: read Q, K, V, write and re-read S and P (Nq x Nk each), write O."""
    D = int(head_dim)
    return int(itemsize) * ((Nq + 2 * Nk) * D + 4 * Nq * Nk + Nq * D)
