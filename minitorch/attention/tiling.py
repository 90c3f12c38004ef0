"""Which tiles of the attention matrix exist, what kind they are, and in which order they are visited.

Flash attention never builds the ``(Nq, Nk)`` score matrix. It cuts the queries into ``Tr`` tiles of ``Br`` rows
and the keys into ``Tc`` tiles of ``Bc`` columns and visits the ``Tr x Tc`` tile pairs one at a time. Masks make
many pairs uninteresting:

* ``SKIP``: every (query, key) pair in the tile is masked. The tile is never loaded.
* ``DENSE``: every pair is visible. The kernel runs the plain inner loop with no per-element test.
* ``TRIANGLE``: some pairs are masked (the causal diagonal, a window's edge, an empty slot): masked per element.

:class:`TileSchedule` is the single source of truth for this classification. The CPU and CUDA kernels, the tests
and the visualizer all take their tiles from it, so what a student sees is what the kernels do.

Positions, not indices, define the masks (docs/api.md): query row ``i`` sits at position ``q_pos[i]``,
key slot ``j`` at ``k_pos[j]``; ``-1`` marks an empty slot. A ring buffer's rotated slots therefore need no
reordering: the schedule simply sees non-monotone positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numba
import numpy as np

from .masks import visible


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


def default_positions(Nq: int, Nk: int, q_positions: Optional[Sequence[int]] = None,
                      k_positions: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(q_pos, k_pos)``, int64, validated: the given positions, or the defaults, keys ``0..Nk-1`` and queries
    bottom-right aligned (the last query at the last key), both shifted up by ``max(0, Nq - Nk)`` so that no
    position is negative (``-1`` means "empty")."""
    shift = max(0, Nq - Nk)
    k_pos = _as_positions(k_positions, Nk, shift, "k_positions")
    q_pos = _as_positions(q_positions, Nq, shift + Nk - Nq, "q_positions")
    return q_pos, k_pos


def combine_types(*types: np.ndarray) -> np.ndarray:
    """Tile types of several masks that must all let a pair through (AND), broadcast together: SKIP if one
    skips the tile, DENSE if every one is dense, else TRIANGLE."""
    out = types[0]
    for t in types[1:]:
        out = np.where((out == TileType.SKIP) | (t == TileType.SKIP), TileType.SKIP, np.maximum(out, t))
    return np.asarray(out, dtype=np.int8)


def _segment_bounds(seg: np.ndarray, block: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per tile of ``block`` rows of ``seg (B, N)``: the lowest and highest segment id (``-1`` is padding, not a
    segment), whether it holds any segment, and whether it holds padding. Arrays ``(B, T)``."""
    B, N = seg.shape
    T = -(-N // block)
    padded = np.full((B, T * block), -1, dtype=np.int64)
    padded[:, :N] = seg
    padded = padded.reshape(B, T, block)
    present = (np.arange(T * block) < N).reshape(T, block)
    valid = padded >= 0
    big = np.iinfo(np.int64).max
    lo = np.where(valid, padded, big).min(axis=2, initial=big)
    hi = np.where(valid, padded, -1).max(axis=2, initial=-1)
    return lo, hi, valid.any(axis=2), (present & ~valid).any(axis=2)


def classify_segments(q_seg: np.ndarray, k_seg: np.ndarray, Br: int, Bc: int) -> np.ndarray:
    """Tile types ``int8 (B, Tr, Tc)`` of packed sequences (:func:`~.masks.same_segment`): a query sees a key only
    if both have the same segment id, ``>= 0``.

    Exact for the *ranges* of ids in a tile, like the positions' classifier: SKIP when the query tile's and the key
    tile's ranges do not meet (no pair can share an id), DENSE when both tiles hold one and the same id and no
    padding, else TRIANGLE (tested element by element). Packed sequences have sorted ids, so only the tiles that
    straddle a boundary between documents are TRIANGLE."""
    qlo, qhi, q_has, q_pad = _segment_bounds(q_seg, Br)
    klo, khi, k_has, k_pad = _segment_bounds(k_seg, Bc)
    some = (q_has[:, :, None] & k_has[:, None, :] & (qlo[:, :, None] <= khi[:, None, :])
            & (klo[:, None, :] <= qhi[:, :, None]))
    one_q, one_k = (qlo == qhi) & ~q_pad, (klo == khi) & ~k_pad  # one segment id, no padding
    every = one_q[:, :, None] & one_k[:, None, :] & (qlo[:, :, None] == klo[:, None, :])
    return np.where(~some, TileType.SKIP, np.where(every, TileType.DENSE, TileType.TRIANGLE)).astype(np.int8)


def _segments(ids: Any, B: Optional[int], n: int, name: str) -> np.ndarray:
    """``ids`` as an int64 ``(B, n)`` array of segment ids (``-1``: padding), validated."""
    arr = np.asarray(ids)
    if arr.ndim != 2 or arr.shape[1] != n or (B is not None and arr.shape[0] != B):
        want = f"({'B' if B is None else B}, {n})"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0))):
        raise TypeError(f"{name} must hold integers (segment ids, -1 for padding), got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < -1:
        raise ValueError(f"{name} must be >= 0, or -1 for padding; got min {arr.min()}")
    return arr


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


def build_tile_classifier(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """The classification of every tile by the one visibility rule of :mod:`.masks`, compiled with ``jit``.

    ``classify_tiles(q_pos_b, k_pos_b, Br, Bc, causal, window, num_sinks, types)`` fills ``types (B, Tr, Tc)`` for
    query positions ``q_pos_b (1 or B, Nq)`` (shared by the batch rows, or per row: a paged batch's sequences end at
    different positions) and key positions ``k_pos_b (B, Nk)`` (``-1``: empty or padded).

    Exact for the *boxes* of positions of the tiles, with the rule and no other. The rule sees a valid pair only
    through ``d = qp - kp`` and whether the key is a sink, and for either kind of key its visible ``d`` form an
    interval that contains 0. So, for the keys of one kind in a tile (a box of positions ``[qlo, qhi] x [klo, khi]``,
    i.e. differences ``[qlo - khi, qhi - klo]``):

    * every pair is visible iff the two extreme pairs ``(qlo, khi)`` and ``(qhi, klo)`` are;
    * some pair is visible iff the pair whose difference is closest to 0 is.

    A tile is SKIP when no pair of either kind is visible (or it holds no valid query or key), DENSE when every pair
    is and no row or slot of it is empty, else TRIANGLE (masked element by element). ``O(B (Nq + Nk) + B Tr Tc)``.
    """
    vis = jit(visible)

    def bounds(pos, start, end, lo_kind, hi_kind, out, t):  # type: ignore[no-untyped-def]
        """``out[:, t] = (lo, hi, has, empty)`` of the positions ``pos[start:end]`` in ``[lo_kind, hi_kind)``."""
        lo = hi = 0
        has = empty = 0
        for i in range(start, end):
            p = pos[i]
            if p < 0:
                empty = 1
            elif lo_kind <= p and p < hi_kind:
                if has == 0 or p < lo:
                    lo = p
                if has == 0 or p > hi:
                    hi = p
                has = 1
        out[0, t] = lo
        out[1, t] = hi
        out[2, t] = has
        out[3, t] = empty

    bounds_j = jit(bounds)

    def classify_tiles(q_pos_b, k_pos_b, Br, Bc, causal, window, num_sinks, types):  # type: ignore[no-untyped-def]
        B, Tr, Tc = types.shape[0], types.shape[1], types.shape[2]
        Nq, Nk = q_pos_b.shape[1], k_pos_b.shape[1]
        big = 1 << 62
        qb = np.zeros((4, Tr), np.int64)
        kb = np.zeros((2, 4, Tc), np.int64)  # the two kinds of keys: sinks, then the others
        for b in range(B):
            if b < q_pos_b.shape[0]:  # the query tiles' bounds: once if shared, per row if not
                for tq in range(Tr):
                    bounds_j(q_pos_b[b], tq * Br, min(Nq, (tq + 1) * Br), 0, big, qb, tq)
            kp = k_pos_b[b]
            for tk in range(Tc):
                ks, ke = tk * Bc, min(Nk, (tk + 1) * Bc)
                bounds_j(kp, ks, ke, 0, num_sinks, kb[0], tk)
                bounds_j(kp, ks, ke, num_sinks, big, kb[1], tk)
            # BEGIN SOLUTION task5_1: SKIP (0) if no pair is visible, DENSE (1) if every pair is, else TRIANGLE (2)
            for tq in range(Tr):
                qlo, qhi, q_has, q_empty = qb[0, tq], qb[1, tq], qb[2, tq], qb[3, tq]
                for tk in range(Tc):
                    every = q_has == 1 and q_empty == 0 and kb[0, 3, tk] == 0
                    some = False
                    for kind in range(2):
                        klo, khi, k_has = kb[kind, 0, tk], kb[kind, 1, tk], kb[kind, 2, tk]
                        if k_has == 0 or q_has == 0:
                            continue
                        # every pair of this kind visible iff both extreme pairs are
                        if not (vis(qlo, khi, causal, window, num_sinks) and vis(qhi, klo, causal, window, num_sinks)):
                            every = False
                        # some pair visible iff the pair whose difference is closest to 0 is
                        if qlo - khi >= 0:
                            qs, ks_ = qlo, khi
                        elif qhi - klo <= 0:
                            qs, ks_ = qhi, klo
                        else:
                            qs = ks_ = max(qlo, klo)  # a pair with difference 0
                        if vis(qs, ks_, causal, window, num_sinks):
                            some = True
                    types[b, tq, tk] = 0 if not some else (1 if every else 2)  # SKIP : DENSE : TRIANGLE
            # END SOLUTION

    return jit(classify_tiles)


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
        causal, window: the masks (window ``None`` for none; see docs/api.md).
        q_positions, k_positions: absolute positions (defaults: keys ``0..Nk-1``, queries bottom-right aligned
            ``Nk-Nq..Nk-1``); ``-1`` marks an empty slot.
        order: :class:`TileOrder`.
        num_sinks: keys at positions ``< num_sinks`` are exempt from the window (attention sinks).
        key_padding_mask: optional ``(B, Nk)`` booleans, True where the key is padding in that batch row.
        q_segment_ids, k_segment_ids: optional ``(B, Nq)``, ``(B, Nk)`` ints, packed sequences: a query sees a key
            only if their segment ids are equal (``-1``: padding); both or neither.
        block_mask: optional :class:`~.block_mask.BlockMask` of a ``mask_mod`` (same sizes, blocks and positions),
            combined with the other masks (AND).

    Attributes:
        Tr, Tc: number of query and key tiles.
        types: ``int8`` array ``(Tr, Tc)`` of :class:`TileType` values: of the positions (padding aside), the
            segments of batch row 0 and the block mask of batch row 0, head 0.
        batch_types: ``int8 (B, Tr, Tc)``: the types per batch row with its padding and segments (``B = 1`` without
            either).
        head_types: ``int8 (B, Ht, Tr, Tc)``: every mask, the block mask included (``Ht = H`` when it depends on the
            head, else 1): what the kernels read.
        q_pos, k_pos: the positions used; ``k_pos_b (B, Nk)``: ``k_pos`` with padded keys set to ``-1``.
        q_seg, k_seg: the segment ids ``(B, N)`` int64, or None.
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
        key_padding_mask: Optional[np.ndarray] = None,
        q_segment_ids: Any = None,
        k_segment_ids: Any = None,
        block_mask: Any = None,
    ) -> None:
        for name, val, lo in (("Nq", Nq, 0), ("Nk", Nk, 0), ("block_q", block_q, 1), ("block_k", block_k, 1),
                              ("num_sinks", num_sinks, 0)):
            if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")
        if window is not None and (isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer))
                                   or window < -1):
            raise ValueError(f"window must be None or an int >= 0, got {window!r}")
        self.Nq, self.Nk = int(Nq), int(Nk)
        self.block_q, self.block_k = int(block_q), int(block_k)
        self.causal = bool(causal)
        self.window = -1 if window is None else int(window)
        self.order = TileOrder(order)
        self.num_sinks = int(num_sinks)
        self.q_pos, self.k_pos = default_positions(self.Nq, self.Nk, q_positions, k_positions)
        self.Tr = -(-self.Nq // self.block_q)
        self.Tc = -(-self.Nk // self.block_k)
        # k_pos_b (B, Nk): the key positions of every batch row, -1 where the key is padding there
        if key_padding_mask is None:
            self.k_pos_b = self.k_pos[None, :]
        else:
            pad = np.asarray(key_padding_mask)
            if pad.ndim != 2 or pad.shape[1] != self.Nk:
                raise ValueError(f"key_padding_mask must have shape (B, Nk) with Nk={self.Nk}, got {pad.shape}")
            if pad.dtype != np.bool_:
                if not np.all((pad == 0) | (pad == 1)):
                    raise ValueError("key_padding_mask must hold booleans or 0/1 (True/1 means padding)")
                pad = pad.astype(bool)
            self.k_pos_b = np.where(pad, -1, self.k_pos[None, :])
        self.batch_types = self.classify(self.q_pos, self.k_pos_b)
        self._types = self.batch_types[0] if key_padding_mask is None else None
        self.q_seg = self.k_seg = None
        if (q_segment_ids is None) != (k_segment_ids is None):
            raise ValueError("q_segment_ids and k_segment_ids go together: pass both (or neither)")
        if q_segment_ids is not None:
            self.q_seg = _segments(q_segment_ids, None, self.Nq, "q_segment_ids")
            self.k_seg = _segments(k_segment_ids, self.q_seg.shape[0], self.Nk, "k_segment_ids")
            seg_types = classify_segments(self.q_seg, self.k_seg, self.block_q, self.block_k)
            self._check_batch(self.batch_types, seg_types, "q_segment_ids")
            self.batch_types = combine_types(self.batch_types, seg_types)
            self._types = combine_types(self.types, seg_types[0])
        self.block_mask = block_mask
        self.head_types = self.batch_types[:, None]
        if block_mask is not None:
            block_mask.check_fits(self.Nq, self.Nk, self.block_q, self.block_k, self.q_pos, self.k_pos)
            self._check_batch(self.batch_types, block_mask.types, "the block mask")
            self.head_types = combine_types(self.head_types, block_mask.types)
            self._types = combine_types(self.types, block_mask.types[0, 0])

    @staticmethod
    def _check_batch(a: np.ndarray, b: np.ndarray, name: str) -> None:
        if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(f"{name} has {b.shape[0]} batch rows where the other masks have {a.shape[0]}")

    @property
    def types(self) -> np.ndarray:
        """``int8 (Tr, Tc)``: the types of the positions (padding aside), of batch row 0's segments and of the
        block mask of batch row 0, head 0."""
        if self._types is None:
            self._types = self.classify(self.q_pos, self.k_pos[None])[0]
        return self._types

    # -- classification --------------------------------------------------------------------------------------
    def classify(self, q_pos: np.ndarray, k_pos_b: np.ndarray) -> np.ndarray:
        """:class:`TileType` of every tile, ``int8 (B, Tr, Tc)``, for query positions ``q_pos (Nq,)`` and key
        positions ``k_pos_b (B, Nk)`` (``-1``: empty or padded), with this schedule's tiles and masks."""
        return classify_tiles(np.asarray(q_pos)[None], k_pos_b, self.block_q, self.block_k, self.causal,
                              self.window, self.num_sinks)

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


def build_list_classifier(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """The tile classification of a *key list with lifetimes* (Dynamic Mask Attention's selection), compiled with
    ``jit`` like :func:`~.masks.build_visible` (NumPy callers pass the identity).

    ``list_tile_types(kidx, counts, evict, b, g, tq, Br, Bc, causal, off, Nq, types)`` fills
    ``types[b, g, tq, :]``: query tile ``tq`` (rows ``[tq Br, (tq + 1) Br)`` at positions ``off + i``) against every
    tile of ``Bc`` entries of the list ``kidx[b, g, :counts[b, g]]``. Key ``j`` is kept by the rows at positions
    ``[j, evict[b, g, j])`` (causal; ``evict = Nk``: never evicted), or by every row if never evicted (not causal).
    Exact, key by key: SKIP if no row keeps a key of the tile, DENSE if every row keeps every key, else TRIANGLE.
    """

    def list_tile_types(kidx, counts, evict, b, g, tq, Br, Bc, causal, off, Nq, types):  # type: ignore[no-untyped-def]
        Nk = evict.shape[2]
        never = Nk
        i0 = tq * Br
        i1 = min(Nq, i0 + Br)
        p_first = off + i0  # causal: the last key index the tile's first and last rows see
        p_last = off + i1 - 1
        rows_valid = p_first >= 0  # causal rows at p < 0 keep nothing
        if p_first < 0:
            p_first = 0
        if not causal:  # every row keeps the final heap: lifetimes are [0, Nk) or empty
            rows_valid = True
            p_first = 0
            p_last = 0
        count = counts[b, g]
        for tc in range(types.shape[3]):
            c0 = tc * Bc
            c1 = min(count, c0 + Bc)
            t = 0  # SKIP
            if p_last >= 0 and c0 < count:
                some = False
                every = rows_valid
                for c in range(c0, c1):
                    j = kidx[b, g, c]
                    start = j  # kept by rows at positions [start, end)
                    end = evict[b, g, j]
                    if not causal:
                        start = 0
                        if end != never:
                            end = 0
                    if start < end and start <= p_last and end > p_first:
                        some = True
                    if not (start <= p_first and end > p_last):
                        every = False
                if some:
                    t = 1 if every else 2  # DENSE : TRIANGLE
            types[b, g, tq, tc] = t

    return jit(list_tile_types)


_classify_tiles = build_tile_classifier(numba.njit(cache=True))
"""The classification TileSchedule runs (compiled: a decoder builds a schedule for every token)."""


def classify_tiles(q_pos_b: np.ndarray, k_pos_b: np.ndarray, block_q: int, block_k: int, causal: bool, window: int,
                   num_sinks: int) -> np.ndarray:
    """:class:`TileType` of every tile, ``int8 (B, Tr, Tc)``, for query positions ``q_pos_b (1 or B, Nq)`` and key
    positions ``k_pos_b (B, Nk)`` (``-1``: empty or padded) at tiles of ``block_q x block_k`` (``window = -1``: none),
    by the rule of :mod:`.masks` alone (:func:`build_tile_classifier`, compiled)."""
    q_pos_b = np.ascontiguousarray(q_pos_b, dtype=np.int64)
    k_pos_b = np.ascontiguousarray(k_pos_b, dtype=np.int64)
    Tr, Tc = -(-q_pos_b.shape[1] // block_q), -(-k_pos_b.shape[1] // block_k)
    types = np.empty((k_pos_b.shape[0], Tr, Tc), dtype=np.int8)
    _classify_tiles(q_pos_b, k_pos_b, int(block_q), int(block_k), bool(causal), int(window), int(num_sinks), types)
    return types
