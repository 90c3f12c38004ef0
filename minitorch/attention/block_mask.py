"""A ``mask_mod`` as tiles: which (query tile, key tile) pairs it lets through entirely, in part, or not at all.

FlexAttention's ``BlockMask`` for this engine. A ``mask_mod(b, h, q_pos, k_pos) -> bool`` (:mod:`.mods`) is
evaluated once, vectorized over the positions, one query tile at a time, and every tile gets a
:class:`~.tiling.TileType`:

* ``SKIP``: no pair visible (FlexAttention: an empty block). Never loaded.
* ``DENSE``: every pair visible (a full block). The kernels run the plain inner step, no test.
* ``TRIANGLE``: some pairs visible (a partial block). Its ``block_q x block_k`` bits are kept, and the kernels read
  them as one more visibility input in that tile (ANDed with the positions' rule, padding and segments).

Nothing is compiled: a new mask costs one vectorized evaluation per call (``O(B H Nq Nk)`` elements at most, fewer
when the mask ignores the batch row or the head: NumPy's broadcasting shows it, and the mask is stored once for
all of them), and ``block_mask_from`` lets a caller build it once and reuse it across calls (pass the
:class:`BlockMask` as ``mask_mod=``), as FlexAttention's ``create_block_mask``. Memory: one byte per pair of the
partial tiles only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from .mods import check_function, evaluate_mask
from .tiling import TileType, default_positions


@dataclass(frozen=True, eq=False)
class BlockMask:
    """The tiles of a ``mask_mod`` (see the module docstring); made by :func:`block_mask_from`.

    ``types int8 (Bm, Hm, Tr, Tc)`` and ``index int32 (Bm, Hm, Tr, Tc)`` with ``Bm in {1, B}``, ``Hm in {1, H}``
    (1 when the mask does not depend on the batch row / the head); ``index`` is the slot of a TRIANGLE tile's bits in
    ``bits uint8 (n_partial, block_q, block_k)`` (1 = visible; rows and columns past the sequence are 0), ``-1``
    for the other tiles. Batch row ``b``, head ``h`` read ``[b % Bm, h % Hm]``.
    """

    mask_mod: Callable[..., Any]
    B: int
    H: int
    Nq: int
    Nk: int
    block_q: int
    block_k: int
    q_pos: np.ndarray
    k_pos: np.ndarray
    types: np.ndarray
    index: np.ndarray
    bits: np.ndarray

    @property
    def Tr(self) -> int:
        return -(-self.Nq // self.block_q)

    @property
    def Tc(self) -> int:
        return -(-self.Nk // self.block_k)

    def counts(self) -> Dict[str, int]:
        """Tiles of each type, over every (batch row, head) the mask distinguishes."""
        return {t.name: int(np.sum(self.types == t)) for t in TileType}

    def skip_fraction(self) -> float:
        """Fraction of the ``(Nq, Nk)`` pairs (averaged over the stored batch rows and heads) in SKIP tiles."""
        if self.Nq * self.Nk == 0:
            return 0.0
        rows = np.minimum(self.block_q, self.Nq - self.block_q * np.arange(self.Tr))
        cols = np.minimum(self.block_k, self.Nk - self.block_k * np.arange(self.Tc))
        area = rows[:, None] * cols[None, :]
        skipped = (self.types == TileType.SKIP) * area
        return float(skipped.sum() / (self.types.shape[0] * self.types.shape[1] * self.Nq * self.Nk))

    def visible(self, b: int = 0, h: int = 0) -> np.ndarray:
        """The mask of batch row ``b``, head ``h`` as a dense ``(Nq, Nk)`` bool array, rebuilt from the tiles and
        bits (what the kernels see)."""
        bm, hm = b % self.types.shape[0], h % self.types.shape[1]
        full = np.zeros((self.Tr * self.block_q, self.Tc * self.block_k), dtype=bool)
        grid = full.reshape(self.Tr, self.block_q, self.Tc, self.block_k)
        dense = self.types[bm, hm] == TileType.DENSE
        grid[:] |= dense[:, None, :, None]
        for tq, tk in zip(*np.nonzero(self.index[bm, hm] >= 0)):
            grid[tq, :, tk, :] = self.bits[self.index[bm, hm, tq, tk]] != 0
        return full[: self.Nq, : self.Nk]

    def to_text(self, b: int = 0, h: int = 0) -> str:
        """The tiles of batch row ``b``, head ``h``: ``#`` DENSE, ``/`` TRIANGLE, ``.`` SKIP."""
        sym = {TileType.DENSE: "#", TileType.TRIANGLE: "/", TileType.SKIP: "."}
        types = self.types[b % self.types.shape[0], h % self.types.shape[1]]
        return "\n".join("".join(sym[TileType(int(t))] for t in row) for row in types)

    def check_fits(self, Nq: int, Nk: int, block_q: int, block_k: int, q_pos: np.ndarray, k_pos: np.ndarray,
                   B: Optional[int] = None, H: Optional[int] = None) -> None:
        """Raise ``ValueError`` unless this block mask was built for a call of these sizes, tiles and positions. A
        block mask built for ``B = 1`` (``H = 1``) serves every batch row (head), as FlexAttention's does."""
        mine = (self.B, self.H, self.Nq, self.Nk, self.block_q, self.block_k)
        call = (self.B if B is None or self.B == 1 else B, self.H if H is None or self.H == 1 else H, Nq, Nk,
                block_q, block_k)
        if mine != call:
            raise ValueError(f"the block mask was built for (B, H, Nq, Nk, block_q, block_k) = {mine}, but the call "
                             f"has {call}: build it with block_mask_from for this call (or leave block_q/block_k "
                             "unset: the call then takes the block mask's)")
        if not (np.array_equal(self.q_pos, q_pos) and np.array_equal(self.k_pos, k_pos)):
            raise ValueError("the block mask was built for other q_positions / k_positions than the call's")

    def __repr__(self) -> str:
        c = self.counts()
        return (f"BlockMask(B={self.B}, H={self.H}, Nq={self.Nq}, Nk={self.Nk}, block_q={self.block_q}, "
                f"block_k={self.block_k}, per batch/head {self.types.shape[:2]}, DENSE={c['DENSE']}, "
                f"TRIANGLE={c['TRIANGLE']}, SKIP={c['SKIP']})")


def _check_size(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def block_mask_from(mask_mod: Callable[..., Any], B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                    q_positions: Optional[Sequence[int]] = None,
                    k_positions: Optional[Sequence[int]] = None) -> BlockMask:
    """Evaluate ``mask_mod(b, h, q_pos, k_pos)`` over a call's batch rows, heads and positions (the defaults of
    ``flash_attention`` when not given) and classify its ``(block_q, block_k)`` tiles (module docstring; tiles
    longer than the sequence are clamped to it, as ``flash_attention`` does).

    One query tile at a time, so memory stays ``O(B H block_q Nk)``. Raises ``TypeError`` naming the function when
    it cannot be evaluated on arrays or does not return booleans.
    """
    B, H, Nq, Nk = (_check_size(n, v, 0) for n, v in (("B", B), ("H", H), ("Nq", Nq), ("Nk", Nk)))
    # clamped to the sequence, as flash_attention clamps its tiles
    block_q, block_k = (min(_check_size(n, v, 1), max(N, 1)) for n, v, N in (("block_q", block_q, Nq),
                                                                             ("block_k", block_k, Nk)))
    check_function("mask_mod", mask_mod, "b, h, q_pos, k_pos")
    q_pos, k_pos = default_positions(Nq, Nk, q_positions, k_positions)
    bb = np.arange(B, dtype=np.int64).reshape(B, 1, 1, 1)
    hh = np.arange(H, dtype=np.int64).reshape(1, H, 1, 1)
    try:
        types, bits = _classify(mask_mod, bb, hh, q_pos, k_pos, block_q, block_k, None)
    except _Wider:  # the mask's batch / head extent changed between query tiles: store every (b, h)
        types, bits = _classify(mask_mod, bb, hh, q_pos, k_pos, block_q, block_k, (B, H))
    partial = types == TileType.TRIANGLE
    index = np.full(types.shape, -1, dtype=np.int32)
    index[partial] = np.arange(int(partial.sum()), dtype=np.int32)
    return BlockMask(mask_mod, B, H, Nq, Nk, block_q, block_k, q_pos, k_pos, types, index, bits)


class _Wider(Exception):
    pass


def _classify(mask_mod: Callable[..., Any], bb: np.ndarray, hh: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
              block_q: int, block_k: int, extent: Optional[tuple]) -> tuple:
    """``(types (Bm, Hm, Tr, Tc), bits (n, block_q, block_k))``, the bits of the TRIANGLE tiles in the order of
    ``types[types == TRIANGLE]``; ``(Bm, Hm)`` is ``extent``, or the first query tile's (``_Wider`` if a later
    one needs more)."""
    Nq, Nk = q_pos.shape[0], k_pos.shape[0]
    Tr, Tc = -(-Nq // block_q), -(-Nk // block_k)
    cols = np.minimum(block_k, Nk - block_k * np.arange(Tc))
    types_rows, bits_rows = [], []
    for tq in range(Tr):
        qs, qe = tq * block_q, min(Nq, (tq + 1) * block_q)
        m = evaluate_mask(mask_mod, bb, hh, q_pos[qs:qe].reshape(1, 1, -1, 1), k_pos.reshape(1, 1, 1, Nk))
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if extent is None:
            extent = m.shape[:2]
        try:
            m = np.broadcast_to(m, tuple(extent) + (qe - qs, Nk))
        except ValueError:
            raise _Wider() from None
        tile = np.zeros(tuple(extent) + (block_q, Tc * block_k), dtype=bool)  # zero-padded to whole tiles
        tile[:, :, : qe - qs, :Nk] = m
        tile = tile.reshape(tuple(extent) + (block_q, Tc, block_k)).transpose(0, 1, 3, 2, 4)  # (.., tk, row, col)
        count = tile.sum(axis=(3, 4))
        t = np.where(count == 0, TileType.SKIP, np.where(count == (qe - qs) * cols, TileType.DENSE, TileType.TRIANGLE))
        types_rows.append(t)
        bits_rows.append(tile[t == TileType.TRIANGLE])
    Bm, Hm = extent if extent is not None else (1, 1)
    types = np.stack(types_rows, axis=2) if types_rows else np.zeros((Bm, Hm, 0, Tc))
    # the bits in the order of types[types == TRIANGLE] (b, h, tq, tk): regroup the per-tile-row lists
    order = np.argsort(np.nonzero(types == TileType.TRIANGLE)[2], kind="stable")
    by_row = np.concatenate(bits_rows, axis=0) if bits_rows else np.zeros((0, block_q, block_k), bool)
    bits = np.empty_like(by_row)
    bits[order] = by_row
    return types.astype(np.int8), np.ascontiguousarray(bits, dtype=np.uint8)
