"""Dynamic Mask Attention's top-k selection in O(N) memory (never the ``(Nq, Nk)`` mask).

``z`` depends only on the key, so query i keeps the top-k of its visible prefix. One sweep over the keys of each
(batch, kv head) with a size-k min-heap (:func:`build_selection`, ``O(Nk log k)``) gives, for every query row:

* a **threshold** ``(thr_val, thr_idx)``: the worst kept key. Key j is kept by row i iff it is visible and
  :func:`~.masks.kept` holds: ``z_j > thr_val or (z_j == thr_val and j <= thr_idx)``. Kernels test membership on
  the fly with it (the engine's :class:`~.spec.TopK`).
* each key's **lifetime**: key j enters the heap at step j and is evicted at step ``evict[j]`` (``Nk`` if never),
  so with causal it is kept exactly by the rows with ``j <= p_i < evict[j]`` (the top-k of a growing prefix never
  takes a key back). Without ``causal`` every row keeps the final heap.

A random top-k is scattered: with 20% of the keys kept, a 64-key tile holds no kept key with probability
``0.8**64 ~ 1e-6``, so skipping empty tiles of the key sequence saves nothing. The kernels therefore tile a
per-(batch, kv head) list ``kidx`` of the keys that some row keeps (``count`` of them): without ``causal`` exactly
the k selected keys, with ``causal`` the final top-k (by index) followed by the evicted keys, latest eviction
first. It is the engine's :class:`~.spec.KeyList`; its tiles are classified by
:func:`~.tiling.build_list_classifier` from the lifetimes. ``compact=False`` lists the key sequence itself (the
textbook block-sparse scheme, kept for comparison).

The same Python source runs on NumPy arrays (SimpleBackend) and compiled with ``numba.njit`` (FastTensorBackend):
scalars and array indexing only, so both agree. A GPU would run the sweep in one thread per (batch, kv head), so
CudaBackend computes the same arrays from their definition instead, every key in parallel
(:func:`minitorch.attention.kernels.cuda.select.make_select`); the tests hold it to this sweep, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .masks import kept
from .tiling import build_list_classifier


def _worse(va, ia, vb, ib):  # type: ignore[no-untyped-def]
    """Does key ``(va, ia)`` rank below key ``(vb, ib)``? (smaller z; equal z and larger index)."""
    return va < vb or (va == vb and ia > ib)


def build_selection(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """Return ``select_head`` compiled with ``jit`` (identity: plain Python on NumPy arrays; ``numba.njit``).
    Scalars and array indexing only, so both agree.

    ``select_head(z, k_pos_b, b, g, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx, kidx, counts,
    compact, big)`` sweeps the keys of (batch ``b``, kv head ``g``) in index order with a min-heap (root = worst
    kept key) held in ``hv, hi (B, Hkv, cap)``. Query row i sits at position ``off + i`` (``off = Nk - Nq``).
    With causal, row i keeps keys ``j <= off + i`` only. Writes ``evict, victim (B, Hkv, Nk)`` (key j is kept by rows at positions ``[j, evict[j])``; ``victim[s]`` is
    the key evicted at step s or -1), the thresholds ``thr_val, thr_idx (B, Hkv, Nq)`` (``(big, -1)``: keep
    nothing), the compacted key list ``kidx (B, Hkv, Nk)`` and its length ``counts[b, g]``.
    """
    worse = jit(_worse)

    def swap(hv, hi, b, g, i, j):  # type: ignore[no-untyped-def]
        tv = hv[b, g, i]
        ti = hi[b, g, i]
        hv[b, g, i] = hv[b, g, j]
        hi[b, g, i] = hi[b, g, j]
        hv[b, g, j] = tv
        hi[b, g, j] = ti

    swap_j = jit(swap)

    def sift_up(hv, hi, b, g, pos):  # type: ignore[no-untyped-def]
        while pos > 0:
            parent = (pos - 1) // 2
            if not worse(hv[b, g, pos], hi[b, g, pos], hv[b, g, parent], hi[b, g, parent]):
                break
            swap_j(hv, hi, b, g, pos, parent)
            pos = parent

    def sift_down(hv, hi, b, g, size, pos):  # type: ignore[no-untyped-def]
        while 2 * pos + 1 < size:
            c = 2 * pos + 1
            if c + 1 < size and worse(hv[b, g, c + 1], hi[b, g, c + 1], hv[b, g, c], hi[b, g, c]):
                c = c + 1
            if not worse(hv[b, g, c], hi[b, g, c], hv[b, g, pos], hi[b, g, pos]):
                break
            swap_j(hv, hi, b, g, c, pos)
            pos = c

    sift_up_j = jit(sift_up)
    sift_down_j = jit(sift_down)

    def select_head(z, k_pos_b, b, g, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx,  # type: ignore[no-untyped-def]
                    kidx, counts, compact, big):
        Nk = z.shape[2]
        Nq = thr_val.shape[2]
        never = Nk
        for j in range(Nk):
            evict[b, g, j] = j  # empty lifetime: never kept
            victim[b, g, j] = -1
        for i in range(Nq):
            thr_val[b, g, i] = big
            thr_idx[b, g, i] = -1
        # BEGIN SOLUTION task5_6: sweep keys j in order: heap of the keep best (root = worst), evict/victim, thresholds
        size = 0
        for j in range(Nk):
            if k_pos_b[b, j] >= 0:  # not padding
                zj = z[b, g, j]
                if size < keep:
                    hv[b, g, size] = zj
                    hi[b, g, size] = j
                    sift_up_j(hv, hi, b, g, size)
                    size += 1
                    evict[b, g, j] = never
                elif zj > hv[b, g, 0]:  # j has the largest index so far: on a tie it loses
                    old = hi[b, g, 0]
                    evict[b, g, old] = j
                    victim[b, g, j] = old
                    hv[b, g, 0] = zj
                    hi[b, g, 0] = j
                    sift_down_j(hv, hi, b, g, size, 0)
                    evict[b, g, j] = never
            i = j - off  # the row at position j sees exactly the keys swept so far
            if causal and i >= 0 and i < Nq and size > 0:
                thr_val[b, g, i] = hv[b, g, 0]
                thr_idx[b, g, i] = hi[b, g, 0]
        if not causal and size > 0:  # every row keeps the final heap
            for i in range(Nq):
                thr_val[b, g, i] = hv[b, g, 0]
                thr_idx[b, g, i] = hi[b, g, 0]
        # END SOLUTION
        # the compacted key list: every key some row keeps
        count = 0
        if not compact:
            for j in range(Nk):
                kidx[b, g, j] = j
            count = Nk
        elif Nq > 0:
            lo = off if off > 0 else 0  # causal: position of the first row that sees anything
            for j in range(Nk):  # the final top-k, by index (kept by the last rows; by all rows without causal)
                if evict[b, g, j] == never:
                    kidx[b, g, count] = j
                    count += 1
            if causal:  # then the evicted keys, latest eviction first (alive at [key, s) with s > lo)
                for s in range(Nk - 1, lo, -1):
                    old = victim[b, g, s]
                    if old >= 0:
                        kidx[b, g, count] = old
                        count += 1
        counts[b, g] = count

    return jit(select_head)


@dataclass
class Selection:
    """Output of ``select``: arrays on the device of the backend (NumPy for Simple/Fast, device arrays for CUDA).

    ``thr_val (B, Hkv, Nq)`` (dtype of z), ``thr_idx (B, Hkv, Nq)`` int64: row i keeps key j iff visible and
    ``z_j > thr_val or (z_j == thr_val and j <= thr_idx)``. ``evict (B, Hkv, Nk)`` int64: key j is kept by rows
    at positions ``[j, evict[j])`` (causal). ``kidx (B, Hkv, Nk)`` int64, ``counts (B, Hkv)``: the compacted key
    list. ``types (B, Hkv, Tr, Tc)`` int8: the flags of (query tile of ``block_q`` rows, ``block_k``-key tile of the
    list). ``block_q, block_k``: the tile sizes the flags were computed for.
    """

    thr_val: Any
    thr_idx: Any
    evict: Any
    kidx: Any
    counts: Any
    types: Any
    block_q: int
    block_k: int
    per_tile: Any = None
    """Optionally ``(kidx (B, Hkv, Tr, L), counts (B, Hkv, Tr), types (B, Hkv, Tr, Tc'))``: one list per query tile
    (:func:`build_tile_list`; the CPU engine's causal selection)."""

    def host(self) -> "Selection":
        """A copy with NumPy arrays (for tests and the probabilities)."""
        conv = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)  # noqa: E731
        return Selection(*(conv(getattr(self, n)) for n in ("thr_val", "thr_idx", "evict", "kidx", "counts", "types")),
                         self.block_q, self.block_k)


def build_tile_list(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """Return ``tile_list`` compiled with ``jit`` (like :func:`build_selection`).

    ``tile_list(kidx, counts, evict, b, g, tq, Br, Bc, off, Nq, out_kidx, out_counts, out_types)`` writes query tile
    ``tq``'s own list of (batch ``b``, kv head ``g``), causal: the keys of the compacted list ``kidx[b, g,
    :counts[b, g]]`` that some row of the tile keeps (rows at positions ``p`` in ``[off + tq Br, off + (tq + 1) Br)``;
    key ``j`` is kept by the rows at ``[j, evict[b, g, j])``), first those *every* row of the tile keeps, then the
    others; and the types of its tiles of ``Bc`` entries: DENSE while all entries are of the first kind, TRIANGLE
    from the first tile holding one of the others, SKIP past the end. The list is a subset of the compacted list,
    so ``L = max(counts)`` entries suffice. Each query tile then visits about the ``k`` keys its rows keep (plus the
    keys that enter or leave the top-k within the tile), not every key some row of the sequence keeps.
    """

    def tile_list(kidx, counts, evict, b, g, tq, Br, Bc, off, Nq, out_kidx, out_counts, out_types):  # type: ignore[no-untyped-def]
        p0 = off + tq * Br
        p1 = off + min(Nq, (tq + 1) * Br) - 1
        n = 0
        n_full = 0
        if p1 >= 0:
            count = counts[b, g]
            if p0 >= 0:  # every row of the tile keeps j: alive at p0 and still at p1
                for c in range(count):
                    j = kidx[b, g, c]
                    if j <= p0 and evict[b, g, j] > p1:
                        out_kidx[b, g, tq, n] = j
                        n += 1
            n_full = n
            lo = p0 if p0 > 0 else 0
            for c in range(count):  # some row keeps j, not all of them
                j = kidx[b, g, c]
                end = evict[b, g, j]
                full = p0 >= 0 and j <= p0 and end > p1
                if j < end and j <= p1 and end > lo and not full:
                    out_kidx[b, g, tq, n] = j
                    n += 1
        out_counts[b, g, tq] = n
        for tc in range(out_types.shape[3]):
            c0 = tc * Bc
            t = 0  # SKIP
            if c0 < n:
                t = 1 if min(n, c0 + Bc) <= n_full else 2  # DENSE : TRIANGLE
            out_types[b, g, tq, tc] = t

    return jit(tile_list)


def empty_threshold(dtype: Any) -> Any:
    """The threshold of a row that keeps nothing: ``(finfo.max, -1)``."""
    return np.dtype(dtype).type(np.finfo(dtype).max)


def kept_dense(sel: Selection, z: np.ndarray, dspec: Any) -> np.ndarray:
    """The boolean ``(B, Hkv, Nq, Nk)`` keep-mask that ``sel``'s thresholds describe, visibility included (tests and
    probabilities only: ``O(Nq Nk)``)."""
    sel = sel.host()
    z = np.asarray(z)
    j = np.arange(dspec.Nk)
    qp = dspec.off + np.arange(dspec.Nq)
    keep = kept(z[:, :, None, :], j, sel.thr_val[..., None], sel.thr_idx[..., None])
    vis = (j[None, :] <= qp[:, None]) | (not dspec.causal)
    vis = vis[None, None] & (dspec.attn.k_pos_b >= 0)[:, None, None, :]
    return keep & vis


def alloc_selection(B: int, Hkv: int, Nq: int, Nk: int, Br: int, Bc: int, dtype: Any) -> Selection:
    """Host arrays for a selection at tiles ``(Br, Bc)``."""
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    return Selection(
        np.empty((B, Hkv, Nq), dtype), np.empty((B, Hkv, Nq), np.int64), np.empty((B, Hkv, Nk), np.int64),
        np.zeros((B, Hkv, Nk), np.int64), np.zeros((B, Hkv), np.int64), np.zeros((B, Hkv, Tr, Tc), np.int8), Br, Bc,
    )


_select_head_py = build_selection()
_list_tile_types_py = build_list_classifier()


def select_numpy(z: np.ndarray, dspec: Any) -> Selection:
    """The selection in plain Python on NumPy arrays (SimpleBackend): the heap sweep of every (b, g), then the
    tile types of every query tile, at the spec's tiles."""
    B, Hkv, Nq, Nk = dspec.B, dspec.Hkv, dspec.Nq, dspec.Nk
    Br, Bc = dspec.block_q, dspec.block_k
    cap = max(1, min(dspec.keep, Nk))
    hv, hi = np.empty((B, Hkv, cap), z.dtype), np.empty((B, Hkv, cap), np.int64)
    victim = np.empty((B, Hkv, Nk), np.int64)
    sel = alloc_selection(B, Hkv, Nq, Nk, Br, Bc, z.dtype)
    kpb = np.ascontiguousarray(dspec.attn.k_pos_b, dtype=np.int64)
    big = empty_threshold(z.dtype)
    for b in range(B):
        for g in range(Hkv):
            _select_head_py(z, kpb, b, g, dspec.keep, dspec.causal, dspec.off, hv, hi, sel.evict, victim,
                            sel.thr_val, sel.thr_idx, sel.kidx, sel.counts, dspec.compact, big)
            for tq in range(sel.types.shape[2]):
                _list_tile_types_py(sel.kidx, sel.counts, sel.evict, b, g, tq, Br, Bc, dspec.causal, dspec.off, Nq,
                                    sel.types)
    return sel
