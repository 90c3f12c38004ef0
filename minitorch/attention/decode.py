"""Decode attention over the slots of a ring-buffer KV cache, on raw arrays (NumPy and Numba CPU).

Decoding produces one query per step. Its attention reads every slot of the cache once, so the work is
``O(capacity * D)`` per step instead of the ``O(capacity^2 * D)`` of recomputing attention over the window. The slots
are *rotated* (slot ``p % capacity`` holds position ``p``), but nothing is reordered: every mask is a function of
the slots' absolute positions (DESIGN.md section 3), and a softmax does not care in which order its terms arrive.

Two implementations with one contract:

* :func:`decode_attention_numpy`: readable NumPy, tile by tile (the SimpleBackend path).
* :func:`decode_attention_cpu`: a fused Numba kernel (the FastTensorBackend path). One *program* per
  ``(batch row, tile of head_tile query heads)``, run in parallel with ``prange``. A program walks the slots in
  tiles of ``block`` slots; a tile whose slots are all invisible (empty, outside the window) is skipped without
  reading it, a tile whose slots are all visible runs without per-slot tests. Within a tile all the program's heads
  and query rows are processed while the tile's keys and values are hot in the cache (grouped-query attention
  reuses a kv head's tile for the whole group). Online softmax across tiles: per row the running max ``m``, the
  running sum ``l`` and the unnormalized output are rescaled once per tile.

Both return ``(out (B, H, T, D), lse (B, H, T))``; a row that sees no key gets zeros and ``lse = -inf``. Empty slots
(position ``-1``) are never read, so whatever they hold (even NaN) cannot leak into the result.

Arguments shared by both:
    q: ``(B, H, T, D)``; k, v: ``(B, Hkv, C, D)`` slot storage; ``H % Hkv == 0``.
    k_pos_b: int64 ``(B, C)`` absolute position of every slot per batch row (``-1``: empty or padded).
    q_pos: int64 ``(T,)`` query positions.
    scale, causal, window (``-1`` none), num_sinks: the mask of DESIGN.md section 3.
    block: slots per tile; head_tile: query heads per program.
    dropout, seed: attention dropout with the counter-based hash, coordinates ``(seed, b, h, i, j)`` with ``i``
        the query row and ``j`` the slot: the same mask flash attention draws for ``(q, slot keys)``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numba
import numpy as np
from numba import prange

from .dropout import build_dropout_hash, drop_threshold, dropout_mask
from .tiling import TileType

SKIP, DENSE, TRIANGLE = int(TileType.SKIP), int(TileType.DENSE), int(TileType.TRIANGLE)


# ---------------------------------------------------------------------------------------------------------------------
# Which slot tiles a decode step visits
# ---------------------------------------------------------------------------------------------------------------------


def slot_tile_types(
    q_pos: np.ndarray,
    k_pos_b: np.ndarray,
    block: int,
    causal: bool = True,
    window: int = -1,
    num_sinks: int = 0,
) -> np.ndarray:
    """:class:`TileType` per ``(batch row, tile of block slots)`` for one tile of queries ``q_pos``: int8 ``(B, Tc)``.

    The same classification as :class:`~minitorch.attention.tiling.TileSchedule` with all queries in one tile
    (``block_q = T``), vectorized over the batch rows and the tiles, because a decoder calls it once per token:
    ``SKIP`` when no (query, slot) pair can be visible, ``DENSE`` when every pair is visible and no slot is empty,
    else ``TRIANGLE``. Only the extreme positions of a tile matter, because every mask is monotone in the distance.
    """
    k_pos_b = np.asarray(k_pos_b, dtype=np.int64)
    q_pos = np.asarray(q_pos, dtype=np.int64)
    B, C = k_pos_b.shape
    Tc = -(-C // block)
    if Tc == 0:
        return np.zeros((B, 0), dtype=np.int8)
    pad = Tc * block - C
    kp = np.pad(k_pos_b, ((0, 0), (0, pad)), mode="edge") if pad else k_pos_b
    kp = kp.reshape(B, Tc, block)
    valid = kp >= 0
    big = np.iinfo(np.int64).max
    klo = np.where(valid, kp, big).min(axis=2)
    khi = np.where(valid, kp, -1).max(axis=2)
    kempty = ~valid.all(axis=2)
    qv = q_pos[q_pos >= 0]
    if qv.size == 0:
        return np.full((B, Tc), SKIP, dtype=np.int8)
    qlo, qhi, qempty = int(qv.min()), int(qv.max()), qv.size < q_pos.size
    has_sink = klo < num_sinks
    all_sink = khi < num_sinks
    if causal:
        all_vis = khi <= qlo
        none_vis = klo > qhi
        if window >= 0:
            all_vis &= ((qhi - klo) < window) | all_sink
            none_vis |= ((qlo - khi) >= window) & ~has_sink
    else:
        all_vis = np.ones((B, Tc), dtype=bool)
        none_vis = np.zeros((B, Tc), dtype=bool)
        if window >= 0:
            all_vis = (((qhi - klo) < window) & ((khi - qlo) < window)) | all_sink
            none_vis = (((klo - qhi) >= window) | ((qlo - khi) >= window)) & ~has_sink
    types = np.full((B, Tc), TRIANGLE, dtype=np.int8)
    types[all_vis & ~kempty & (not qempty)] = DENSE
    types[none_vis | (khi < 0)] = SKIP
    return types


def _check(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_pos_b: np.ndarray, q_pos: np.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"decode attention needs q (B, H, T, D) and k, v (B, Hkv, C, D); got {q.shape}, {k.shape}, {v.shape}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1] != 0:
        raise ValueError(f"q {q.shape} does not match the cache storage {k.shape} (batch, head_dim, H % Hkv == 0)")
    if k_pos_b.shape != (B, k.shape[2]) or q_pos.shape != (T,):
        raise ValueError(f"positions: k_pos_b must be {(B, k.shape[2])}, q_pos {(T,)}; got {k_pos_b.shape}, {q_pos.shape}")


# ---------------------------------------------------------------------------------------------------------------------
# NumPy: the readable version
# ---------------------------------------------------------------------------------------------------------------------


def decode_attention_numpy(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_pos_b: np.ndarray,
    q_pos: np.ndarray,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: int = -1,
    num_sinks: int = 0,
    block: int = 128,
    head_tile: int = 4,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Tiled online-softmax attention of ``q`` over the slots, in NumPy (see the module docstring).

    ``head_tile`` is accepted for a uniform signature; NumPy processes all heads of a tile at once.
    """
    k_pos_b = np.asarray(k_pos_b, dtype=np.int64)
    q_pos = np.asarray(q_pos, dtype=np.int64)
    _check(q, k, v, k_pos_b, q_pos)
    B, H, T, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = H // Hkv
    dt = q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q.reshape(B, Hkv, G, T, D)
    m = np.full((B, Hkv, G, T), -np.inf, dtype=dt)
    l = np.zeros((B, Hkv, G, T), dtype=dt)
    acc = np.zeros((B, Hkv, G, T, D), dtype=dt)
    types = slot_tile_types(q_pos, k_pos_b, block, causal, window, num_sinks)
    keep_scale = dt.type(1.0 / (1.0 - dropout))
    keep_all = dropout_mask(seed, (B, H, T, C), dropout).reshape(B, Hkv, G, T, C) if dropout > 0 else None
    for t in range(types.shape[1]):
        j0, j1 = t * block, min((t + 1) * block, C)
        rows = np.nonzero(types[:, t] != SKIP)[0]  # batch rows that visit this tile
        if rows.size == 0:
            continue
        kp = k_pos_b[rows, j0:j1]  # (b, n)
        vis = _visible(q_pos[None, :, None], kp[:, None, :], causal, window, num_sinks)  # (b, T, n)
        vis = vis[:, None, None]  # (b, 1, 1, T, n)
        kt = np.where(kp[:, None, :, None] >= 0, k[rows, :, j0:j1], 0)  # empty slots are never read
        vt = np.where(kp[:, None, :, None] >= 0, v[rows, :, j0:j1], 0)
        s = scale * np.einsum("bkgtd,bknd->bkgtn", qg[rows], kt)
        s = np.where(vis, s, -np.inf)
        m_old = m[rows]
        m_new = np.maximum(m_old, s.max(axis=-1))
        m_safe = np.where(np.isfinite(m_new), m_new, 0)
        alpha = np.where(np.isfinite(m_old), np.exp(m_old - m_safe), 0)
        p = np.where(vis, np.exp(s - m_safe[..., None]), 0)
        l[rows] = alpha * l[rows] + p.sum(axis=-1)
        if keep_all is not None:
            p = p * keep_all[rows][..., j0:j1] * keep_scale
        acc[rows] = alpha[..., None] * acc[rows] + np.einsum("bkgtn,bknd->bkgtd", p, vt)
        m[rows] = m_new
    seen = l > 0
    out = np.where(seen[..., None], acc / np.where(seen, l, 1)[..., None], 0).astype(dt)
    with np.errstate(divide="ignore"):
        lse = np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf).astype(dt)
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)


def _visible(qp, kp, causal, window, num_sinks):  # type: ignore[no-untyped-def]
    """Elementwise visibility (NumPy broadcasting, or scalars inside the Numba kernel)."""
    ok = (qp >= 0) & (kp >= 0)
    if causal:
        ok = ok & (kp <= qp)
        if window >= 0:
            ok = ok & (((qp - kp) < window) | (kp < num_sinks))
    elif window >= 0:
        ok = ok & ((np.abs(qp - kp) < window) | (kp < num_sinks))
    return ok


# ---------------------------------------------------------------------------------------------------------------------
# Numba: the fused CPU kernel
# ---------------------------------------------------------------------------------------------------------------------

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}  # SIMD dot products; keeps inf/NaN semantics (masks use -inf)
_hash = build_dropout_hash(numba.njit(inline="always"))


@numba.njit(inline="always")
def _visible_scalar(qp: int, kp: int, causal: bool, window: int, num_sinks: int) -> bool:
    if qp < 0 or kp < 0:
        return False
    if causal:
        if kp > qp:
            return False
        if window >= 0 and kp >= num_sinks and qp - kp >= window:
            return False
    elif window >= 0 and kp >= num_sinks and abs(qp - kp) >= window:
        return False
    return True


@numba.njit(fastmath=_FASTMATH, cache=True)
def _decode_program(
    q, k, v, k_pos_b, q_pos, tile_types, out, lse, b, h0, nh,
    scale, causal, window, num_sinks, block, seed, threshold, keep_scale,
):  # type: ignore[no-untyped-def]
    """One program: batch row ``b``, query heads ``h0 .. h0 + nh - 1``, all query rows, every visited slot tile."""
    H, T, D = q.shape[1], q.shape[2], q.shape[3]
    G = H // k.shape[1]
    C = k.shape[2]
    n_tiles = tile_types.shape[1]
    zero = q.dtype.type(0.0)
    neg_inf = q.dtype.type(-np.inf)
    use_dropout = threshold > 0
    m = np.full((nh, T), neg_inf, dtype=q.dtype)
    l = np.zeros((nh, T), dtype=q.dtype)
    acc = np.zeros((nh, T, D), dtype=q.dtype)
    s = np.empty(block, dtype=q.dtype)
    for t in range(n_tiles):
        tt = tile_types[b, t]
        if tt == SKIP:
            continue  # no slot of this tile is visible: never loaded
        j0 = t * block
        n = min(block, C - j0)
        for hh in range(nh):  # the program's heads share the tile while it is hot
            h = h0 + hh
            kg = k[b, h // G]  # (C, D) views of the kv head of query head h
            vg = v[b, h // G]
            for i in range(T):
                qrow = q[b, h, i]
                arow = acc[hh, i]
                # scores of the tile, -inf where masked (a masked slot is never read)
                tile_max = neg_inf
                for jj in range(n):
                    if tt == TRIANGLE and not _visible_scalar(q_pos[i], k_pos_b[b, j0 + jj], causal, window, num_sinks):
                        s[jj] = neg_inf
                        continue
                    krow = kg[j0 + jj]
                    dot = zero
                    for d in range(D):
                        dot += qrow[d] * krow[d]
                    sc = dot * scale
                    s[jj] = sc
                    tile_max = max(tile_max, sc)
                if tile_max == neg_inf:
                    continue
                # online softmax: rescale the running sums once per tile
                m_old = m[hh, i]
                m_new = max(m_old, tile_max)
                alpha = math.exp(m_old - m_new) if m_old != neg_inf else zero
                lsum = l[hh, i] * alpha
                for d in range(D):
                    arow[d] *= alpha
                for jj in range(n):
                    if s[jj] == neg_inf:
                        continue
                    p = math.exp(s[jj] - m_new)
                    lsum += p  # the lse is of the undropped probabilities
                    if use_dropout:
                        if _hash(seed, b, h, i, j0 + jj) < threshold:
                            continue
                        p *= keep_scale
                    vrow = vg[j0 + jj]
                    for d in range(D):
                        arow[d] += p * vrow[d]
                l[hh, i] = lsum
                m[hh, i] = m_new
    for hh in range(nh):
        for i in range(T):
            li = l[hh, i]
            if li > zero:
                for d in range(D):
                    out[b, h0 + hh, i, d] = acc[hh, i, d] / li
                lse[b, h0 + hh, i] = m[hh, i] + math.log(li)
            else:
                for d in range(D):
                    out[b, h0 + hh, i, d] = zero
                lse[b, h0 + hh, i] = neg_inf


@numba.njit(parallel=True, cache=True)
def _decode_kernel(
    q, k, v, k_pos_b, q_pos, tile_types, out, lse,
    scale, causal, window, num_sinks, block, head_tile, seed, threshold, keep_scale,
):  # type: ignore[no-untyped-def]
    """All programs in parallel: one per (batch row, tile of ``head_tile`` query heads)."""
    B, H = q.shape[0], q.shape[1]
    n_ht = (H + head_tile - 1) // head_tile
    for prog in prange(B * n_ht):
        b = prog // n_ht
        h0 = (prog % n_ht) * head_tile
        _decode_program(
            q, k, v, k_pos_b, q_pos, tile_types, out, lse, b, h0, min(h0 + head_tile, H) - h0,
            scale, causal, window, num_sinks, block, seed, threshold, keep_scale,
        )


def decode_attention_cpu(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_pos_b: np.ndarray,
    q_pos: np.ndarray,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: int = -1,
    num_sinks: int = 0,
    block: int = 128,
    head_tile: int = 4,
    dropout: float = 0.0,
    seed: int = 0,
    tile_types: Optional[np.ndarray] = None,
    out: Optional[np.ndarray] = None,
    lse: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """The fused Numba decode kernel (see the module docstring). ``out``/``lse`` may be preallocated."""
    k_pos_b = np.ascontiguousarray(k_pos_b, dtype=np.int64)
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    _check(q, k, v, k_pos_b, q_pos)
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if block < 1 or head_tile < 1:
        raise ValueError(f"block and head_tile must be >= 1, got {block}, {head_tile}")
    B, H, T, D = q.shape
    dt = q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if tile_types is None:
        tile_types = slot_tile_types(q_pos, k_pos_b, block, causal, window, num_sinks)
    if out is None:
        out = np.empty((B, H, T, D), dtype=dt)
    if lse is None:
        lse = np.empty((B, H, T), dtype=dt)
    _decode_kernel(
        np.ascontiguousarray(q), k, v, k_pos_b, q_pos, np.ascontiguousarray(tile_types, dtype=np.int8), out, lse,
        dt.type(scale), bool(causal), int(window), int(num_sinks), int(block), int(head_tile),
        np.uint64(seed & 0xFFFFFFFF), np.uint64(drop_threshold(dropout)), dt.type(1.0 / (1.0 - dropout)),
    )
    return out, lse
