"""Dynamic Mask Attention's top-k selection on the CPU: the heap sweep and the list's tile types as Numba kernels.

The same Python source as :func:`minitorch.attention.selection.select_numpy` (the heap sweep of
:func:`~minitorch.attention.selection.build_selection`, the classification of
:func:`~minitorch.attention.tiling.build_list_classifier`), compiled with ``numba.njit`` and launched as grids:
one program per (batch, kv head) for the sweep, one per (batch, kv head, query tile) for the tile types.
"""

from __future__ import annotations

import numba
import numpy as np

from ...selection import Selection, alloc_selection, build_selection, build_tile_list, empty_threshold
from ...tiling import build_list_classifier
from .launch import kernel, launch, program, rounds

_select_head = build_selection(numba.njit(inline="always"))
_list_tile_types = build_list_classifier(numba.njit(inline="always"))
_tile_list = build_tile_list(numba.njit(inline="always"))


@kernel()
def _select(worker, n_workers, z, k_pos_b, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx, kidx, counts, compact, big):  # type: ignore[no-untyped-def]
    """The heap sweep. Grid: one program per (batch, kv head)."""
    B, Hkv = z.shape[0], z.shape[1]
    for r in range(rounds(B * Hkv, n_workers)):
        p = program(worker, n_workers, r)
        if p >= B * Hkv:
            continue
        _select_head(z, k_pos_b, p // Hkv, p % Hkv, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx,
                     kidx, counts, compact, big)


@kernel()
def _tile_types(worker, n_workers, kidx, counts, evict, Br, Bc, causal, off, Nq, types):  # type: ignore[no-untyped-def]
    """The list's tile types. Grid: one program per (batch, kv head, query tile)."""
    B, Hkv, Tr = types.shape[0], types.shape[1], types.shape[2]
    for r in range(rounds(B * Hkv * Tr, n_workers)):
        p = program(worker, n_workers, r)
        if p >= B * Hkv * Tr:
            continue
        _list_tile_types(kidx, counts, evict, p // (Hkv * Tr), (p // Tr) % Hkv, p % Tr, Br, Bc, causal, off, Nq,
                         types)


@kernel()
def _tile_lists(worker, n_workers, kidx, counts, evict, Br, Bc, off, Nq, out_kidx, out_counts, out_types):  # type: ignore[no-untyped-def]
    """Each query tile's own key list and its tile types. Grid: one program per (batch, kv head, query tile)."""
    B, Hkv, Tr = out_types.shape[0], out_types.shape[1], out_types.shape[2]
    for r in range(rounds(B * Hkv * Tr, n_workers)):
        p = program(worker, n_workers, r)
        if p >= B * Hkv * Tr:
            continue
        _tile_list(kidx, counts, evict, p // (Hkv * Tr), (p // Tr) % Hkv, p % Tr, Br, Bc, off, Nq, out_kidx,
                   out_counts, out_types)


def select(z: np.ndarray, dspec) -> Selection:  # type: ignore[no-untyped-def]
    """Thresholds, lifetimes, the compacted key list and its tile types (``O(B Hkv (Nk log k + Tr count))``)."""
    B, Hkv, Nq, Nk = dspec.B, dspec.Hkv, dspec.Nq, dspec.Nk
    Br, Bc = dspec.block_q, dspec.block_k
    z = np.ascontiguousarray(z)
    cap = max(1, min(dspec.keep, Nk))
    hv, hi = np.empty((B, Hkv, cap), z.dtype), np.empty((B, Hkv, cap), np.int64)
    victim = np.empty((B, Hkv, Nk), np.int64)
    sel = alloc_selection(B, Hkv, Nq, Nk, Br, Bc, z.dtype)
    kpb = np.ascontiguousarray(dspec.attn.k_pos_b, dtype=np.int64)
    if B * Hkv > 0:
        launch(_select, B * Hkv, z, kpb, np.int64(dspec.keep), bool(dspec.causal), np.int64(dspec.off), hv, hi,
               sel.evict, victim, sel.thr_val, sel.thr_idx, sel.kidx, sel.counts, bool(dspec.compact),
               empty_threshold(z.dtype))
        launch(_tile_types, B * Hkv * sel.types.shape[2], sel.kidx, sel.counts, sel.evict, np.int64(Br),
               np.int64(Bc), bool(dspec.causal), np.int64(dspec.off), np.int64(Nq), sel.types)
        if dspec.causal and dspec.compact:  # the top-k changes from row to row: one list per query tile
            Tr, L = sel.types.shape[2], max(1, int(sel.counts.max()))
            per_tile = (np.zeros((B, Hkv, Tr, L), np.int64), np.zeros((B, Hkv, Tr), np.int64),
                        np.zeros((B, Hkv, Tr, -(-L // Bc)), np.int8))
            launch(_tile_lists, B * Hkv * Tr, sel.kidx, sel.counts, sel.evict, np.int64(Br), np.int64(Bc),
                   np.int64(dspec.off), np.int64(Nq), *per_tile)
            sel.per_tile = per_tile
    return sel
