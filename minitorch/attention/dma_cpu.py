"""Fused dynamic mask attention on the CPU: the FastTensorBackend's DMA, as Numba kernels on raw NumPy arrays.

The six functions of every DMA implementation (see :mod:`.dma`)::

    importance(v, dt_proj, a_coef, log_space) -> (z, u)          (vectorized NumPy, shared with SimpleBackend)
    importance_backward(dz, v, dt_proj, a_coef, z, u, log_space, dv) -> (dv, d_dt_proj, d_a_coef)
    select(z, spec) -> Selection                                 (heap sweep per (b, kv head), tile flags)
    forward(q, k, v, z, sel, spec) -> (out, lse)
    backward(q, k, v, z, sel, out, lse, dout, spec) -> (dq, dk, dv, dz)

The kernels are flash attention's (:mod:`.cpu`, FlashAttention-2, same program structure and buffer layouts) with
three changes. They reuse :mod:`.cpu`'s building blocks (the explicit-SIMD tile steps ``_matmul``: ``C (+)= A B``,
``_rows_max``, ``_exp_rows``; the float32 ``exp``; the query-tile loads; the padded tile shapes; the dropout hash;
the grid launcher), so that the benchmark compares the same micro-kernels; only the DMA-specific steps are local:

* the key tiles are tiles of the compacted key list ``sel.kidx[b, g]`` (the keys some query keeps): K and V rows
  are *gathered* through it, and a tile is visited only if ``sel.types[b, g, tq, tc]`` is not SKIP;
* every score gets ``+ z_j``; in TRIANGLE tiles a score is masked unless the row keeps the key
  (``z_j > thr_val or (z_j == thr_val and j <= thr_idx)``, and ``j <= position`` with causal);
* the dK/dV kernel also sums ``dS`` over its column into ``dz``.

Backward runs dQ first. Flash attention's ``delta = rowsum(dO * O)`` equals ``rowsum(P * dP)`` only up to
rounding, and ``dS = P (dP - delta)`` inherits a per-row residue ``P_ij e_i``. dQ and dK shrug it off, but ``dz``
feeds ``d a_coef = sum_j dz_j z_j softplus(u_j)``, a sum that cancels almost exactly (``sum_j dS_ij = 0``), so in
float32 the residue, weighted by z, dominated it (about 30x the error of naive float32 attention). The dQ kernel
therefore also returns the row sums ``rs`` of dS (free: the dS tile is in registers) and dK/dV/dz use
``delta + rs``, whose dS rows sum to zero as the textbook formula's do.

Programs (launched as grids by :func:`_launch`: ``nogil`` kernels on a thread pool, worker ``w`` taking programs
``w, w + n, ...``; no ``parallel=True``, which roughly doubles compile time): forward and dQ over (batch, head, query tile); dK/dV/dz over (batch, kv head, key tile
of the list), each writing the disjoint rows of the keys it owns (a key appears once in the list). No atomics; fixed
summation order: bitwise reproducible. The selection runs one program per (batch, kv head), the flags one per
(batch, kv head, query tile).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Tuple

import numba
import numpy as np

# flash attention's CPU building blocks (same contracts, same compiled micro-kernels): the explicit-SIMD tile
# steps, the float32 exp, the loads, the padded tile shapes, the dropout hash and the grid launcher
from .cpu import (
    _FM_REDUCE,
    DropoutArg,
    _as_input,
    _dropout_hash,
    _exp_rows,
    _helper,
    _kernel,
    _launch,
    _load_query_tile,
    _load_rows,
    _masked_value,
    _matmul,
    _rows_max,
    _tile_shapes,
    exp,
)
from .dma import (
    DMASpec,
    Selection,
    SKIP,
    TRIANGLE,
    _alloc_selection,
    build_selection,
    empty_threshold,
    importance,
    importance_backward,
)

__all__ = ["importance", "importance_backward", "select", "forward", "backward"]

Rows = namedtuple("Rows", "causal off")
"""``causal``: query row i sees the keys ``j <= off + i``."""


@_helper(fastmath=_FM_REDUCE)
def _row_sum(x, i, n):  # type: ignore[no-untyped-def]
    """``sum(x[i, :n])``."""
    acc = x.dtype.type(0)
    for j in range(n):
        acc += x[i, j]
    return acc


_select_head, _tile_flags = build_selection(numba.njit(inline="always"))


# ------------------------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------------------------


@_kernel()
def _select(worker, n_workers, z, k_pos_b, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx, kidx, counts, compact, big):  # type: ignore[no-untyped-def]
    """The heap sweep of :func:`.dma.build_selection`. Grid: one program per (batch, kv head)."""
    B, Hkv = z.shape[0], z.shape[1]
    for p in range(worker, B * Hkv, n_workers):
        _select_head(z, k_pos_b, p // Hkv, p % Hkv, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx,
                     kidx, counts, compact, big)


@_kernel()
def _flags(worker, n_workers, kidx, counts, evict, Br, Bc, causal, off, Nq, types):  # type: ignore[no-untyped-def]
    """Tile flags. Grid: one program per (batch, kv head, query tile)."""
    B, Hkv, Tr = types.shape[0], types.shape[1], types.shape[2]
    for p in range(worker, B * Hkv * Tr, n_workers):
        _tile_flags(kidx, counts, evict, p // (Hkv * Tr), (p // Tr) % Hkv, p % Tr, Br, Bc, causal, off, Nq, types)


def select(z: np.ndarray, spec: DMASpec) -> Selection:
    """Thresholds, lifetimes, the compacted key list and the tile flags (``O(B Hkv (Nk log k + Tr count))``)."""
    B, Hkv, Nq, Nk = spec.B, spec.Hkv, spec.Nq, spec.Nk
    Br, Bc = spec.block_q, spec.block_k
    z = np.ascontiguousarray(z)
    cap = max(1, min(spec.keep, Nk))
    hv, hi = np.empty((B, Hkv, cap), z.dtype), np.empty((B, Hkv, cap), np.int64)
    victim = np.empty((B, Hkv, Nk), np.int64)
    sel = _alloc_selection(B, Hkv, Nq, Nk, Br, Bc, z.dtype)
    kpb = np.ascontiguousarray(spec.attn.k_pos_b, dtype=np.int64)
    if B * Hkv > 0:
        _launch(_select, B * Hkv, z, kpb, np.int64(spec.keep), bool(spec.causal), np.int64(spec.off), hv, hi,
                sel.evict, victim, sel.thr_val, sel.thr_idx, sel.kidx, sel.counts, bool(spec.compact),
                empty_threshold(z.dtype))
        _launch(_flags, B * Hkv * sel.types.shape[2], sel.kidx, sel.counts, sel.evict, np.int64(Br), np.int64(Bc),
                bool(spec.causal), np.int64(spec.off), np.int64(Nq), sel.types)
    return sel


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------


@_helper(inline="always")
def _kept(zj, j, qp, causal, tv, ti):  # type: ignore[no-untyped-def]
    """Does the row that sees keys ``<= qp`` (with causal) and has threshold ``(tv, ti)`` keep key ``j`` of
    importance ``zj``? Branch-free (bitwise ``&``/``|`` on booleans), so that the masking loop vectorizes."""
    return ((zj > tv) | ((zj == tv) & (j <= ti))) & ((not causal) | (j <= qp))


@_helper()
def _gather(k2, v2, z1, kidx1, cs, n, kT, v_rows, v_t, zt, jt):  # type: ignore[no-untyped-def]
    """Load key tile ``cs:cs+n`` of the compacted list: ``kT[:, r] = K[kidx[cs+r]]`` (transposed), V into
    ``v_rows[r]`` and/or ``v_t[:, r]`` (arrays of size 1 are skipped), ``zt[r] = z[j]``, ``jt[r] = j``."""
    D = k2.shape[1]
    rows, trans = v_rows.shape[0] > 1, v_t.shape[0] > 1
    for r in range(n):
        j = kidx1[cs + r]
        jt[r] = j
        zt[r] = z1[j]
        for d in range(D):
            kT[d, r] = k2[j, d]
            if rows:
                v_rows[r, d] = v2[j, d]
            if trans:
                v_t[d, r] = v2[j, d]


@_helper()
def _add_z_and_mask(s, nr, nc, qs, zt, jt, thr_v, thr_i, masked, rows):  # type: ignore[no-untyped-def]
    """``S += z`` and, in a TRIANGLE tile, ``S = MASKED`` where the row does not keep the key."""
    sentinel = _masked_value(s)
    causal = rows.causal
    for i in range(nr):
        if masked:
            qp = rows.off + qs + i
            tv = thr_v[qs + i]
            ti = thr_i[qs + i]
            for c in range(nc):
                s[i, c] = s[i, c] + zt[c] if _kept(zt[c], jt[c], qp, causal, tv, ti) else sentinel
        else:
            for c in range(nc):
                s[i, c] += zt[c]


@_helper()
def _dropout_row(p, i, nc, b, h, qi, jt, drop):  # type: ignore[no-untyped-def]
    """``p[i, :nc] *= keep / (1 - dropout)``; the hash of the *original* key index ``jt[c]`` (flash's mask)."""
    zero = p.dtype.type(0)
    for c in range(nc):
        keep = _dropout_hash(drop.seed, b, h, qi, jt[c]) >= drop.threshold
        p[i, c] = p[i, c] * drop.inv_keep if keep else zero


@_helper()
def _transpose(src, nr, nc, dst):  # type: ignore[no-untyped-def]
    """``dst[:nc, :nr] = src[:nr, :nc].T``."""
    for i in range(nr):
        for j in range(nc):
            dst[j, i] = src[i, j]


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------


@_helper(fastmath=_FM_REDUCE)
def _dma_fwd_inner(acc, m, l, stats, qt, kT, vj, zt, jt, s, nr, nc, D, qs, b, h, masked, thr_v, thr_i, rows, drop):  # type: ignore[no-untyped-def]
    """Fold one key tile of the list into the query tile: ``S = Q K^T + z`` (masked), online softmax, ``O += P V``.

    ``qt (R4, D) = scale Q_i``, ``kT (D, Bcp) = K^T``, ``vj (Bc, Dp) = V`` of the gathered keys; ``s (R4, Bcp)`` and
    ``stats (3, R4)``: scratch. Updated in place: ``acc (R4, Dp)`` (unnormalized O), ``m, l (R4,)``."""
    m_new, alpha, rowsum = stats[0], stats[1], stats[2]
    sentinel = _masked_value(s)
    _matmul(qt, kT, s, nr, nc, D, False)
    _add_z_and_mask(s, nr, nc, qs, zt, jt, thr_v, thr_i, masked, rows)
    # m_new = max(m, rowmax(S)); a row that has kept no key yet keeps the sentinel: shifting by +max gives P = 0
    _rows_max(s, nr, nc, m, m_new)
    for i in range(nr):
        alpha[i] = exp(m[i] - m_new[i])
        m[i] = m_new[i]
        if m_new[i] == sentinel:
            m_new[i] = np.finfo(s.dtype).max
    # P = exp(S - m_new);  l = e^(m - m_new) l + rowsum(P);  O = e^(m - m_new) O (+ P V below)
    _exp_rows(s, nr, nc, m_new, rowsum)
    for i in range(nr):
        l[i] = alpha[i] * l[i] + rowsum[i]
        a = alpha[i]
        for d in range(D):
            acc[i, d] *= a
        if drop.present:
            _dropout_row(s, i, nc, b, h, qs + i, jt, drop)
    _matmul(s, vj, acc, nr, D, nc, True)


@_kernel()
def _dma_fwd(worker, n_workers, q, k, v, z, kidx, counts, types, thr_val, thr_idx, out, lse, Br, Bc, scale, rows, drop):  # type: ignore[no-untyped-def]
    """Grid: one program per (batch, head, query tile), streaming the visited key tiles of the compacted list;
    programs write disjoint rows of ``out`` and ``lse``."""
    B, H, Nq, D = q.shape
    T = q.dtype
    group = H // k.shape[1]
    Tr = (Nq + Br - 1) // Br
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt = np.zeros((R4, D), T)
    acc = np.zeros((R4, Dp), T)
    m = np.zeros(R4, T)
    l = np.zeros(R4, T)
    stats = np.zeros((3, R4), T)
    kT = np.zeros((D, Bcp), T)
    vj = np.zeros((Bc, Dp), T)
    none = np.zeros((1, 1), T)
    zt = np.zeros(Bcp, T)
    jt = np.zeros(Bcp, np.int64)
    s = np.zeros((R4, Bcp), T)
    for prog in range(worker, B * H * Tr, n_workers):
        b, h, tq = prog // (H * Tr), (prog // Tr) % H, prog % Tr
        g = h // group
        qs = tq * Br
        nr = min(Br, Nq - qs)
        _load_rows(q[b, h], qs, nr, qt, scale)
        acc[:] = 0
        l[:] = 0
        m[:] = _masked_value(m)
        count = counts[b, g]
        for tc in range((count + Bc - 1) // Bc):
            tile = types[b, g, tq, tc]
            if tile == SKIP:
                continue
            cs = tc * Bc
            nc = min(Bc, count - cs)
            _gather(k[b, g], v[b, g], z[b, g], kidx[b, g], cs, nc, kT, vj, none, zt, jt)
            _dma_fwd_inner(acc, m, l, stats, qt, kT, vj, zt, jt, s, nr, nc, D, qs, b, h, tile == TRIANGLE, thr_val[b, g],
                           thr_idx[b, g], rows, drop)
        for i in range(nr):  # O = diag(l)^-1 O, lse = m + log(l); a row that kept no key: O = 0, lse = -inf
            inv = T.type(1) / l[i] if l[i] > 0 else T.type(0)
            for d in range(D):
                out[b, h, qs + i, d] = acc[i, d] * inv
            lse[b, h, qs + i] = m[i] + np.log(l[i]) if l[i] > 0 else -np.inf


# ------------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------------


@_helper(fastmath=_FM_REDUCE)
def _dma_bwd_tile(qt, doi, kT, vT, zt, jt, lse_t, delta_t, s, dp, scratch, nr, nc, D, qs, b, h, masked, thr_v, thr_i, rows, drop):  # type: ignore[no-untyped-def]
    """Recompute one tile for both backward kernels: ``s <- P = exp(Q K^T + z - lse)`` (masked) and
    ``dp <- dS = P (dP - delta)`` with ``dP = (dO V^T) Z`` (``Z = keep / (1 - p)`` under dropout)."""
    _matmul(qt, kT, s, nr, nc, D, False)
    _add_z_and_mask(s, nr, nc, qs, zt, jt, thr_v, thr_i, masked, rows)
    _exp_rows(s, nr, nc, lse_t, scratch)
    _matmul(doi, vT, dp, nr, nc, D, False)
    for i in range(nr):
        if drop.present:
            _dropout_row(dp, i, nc, b, h, qs + i, jt, drop)
        di = delta_t[i]
        for c in range(nc):
            dp[i, c] = s[i, c] * (dp[i, c] - di)


@_helper()
def _bwd_buffers(like, R4, Bcp, D, Dp):  # type: ignore[no-untyped-def]
    """The tile buffers of both backward kernels: ``qt (R4, Dp)`` (scale Q_i: A of S = Q K^T, B of dK = dS^T
    (scale Q)), ``doi (R4, Dp)`` (dO_i), ``lse_t, delta_t, scratch (R4,)``, ``kT, vT (D, Bcp)``, ``none (1, 1)``,
    ``zt (Bcp,)``, ``jt (Bcp,)`` int64, ``s, dp (R4, Bcp)``."""
    T = like.dtype
    return (np.zeros((R4, Dp), T), np.zeros((R4, Dp), T), np.zeros(R4, T), np.zeros(R4, T), np.zeros(R4, T),
            np.zeros((D, Bcp), T), np.zeros((D, Bcp), T), np.zeros((1, 1), T), np.zeros(Bcp, T),
            np.zeros(Bcp, np.int64), np.zeros((R4, Bcp), T), np.zeros((R4, Bcp), T))


@_kernel()
def _dma_dq(worker, n_workers, q, k, v, z, kidx, counts, types, thr_val, thr_idx, dout, lse, delta, dq, rs, Br, Bc, scale, rows, drop):  # type: ignore[no-untyped-def]
    """dQ and the row sums ``rs`` of dS. Grid: one program per (batch, head, query tile); disjoint rows."""
    B, H, Nq, D = q.shape
    T = q.dtype
    group = H // k.shape[1]
    Tr = (Nq + Br - 1) // Br
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt, doi, lse_t, delta_t, scratch, kT, vT, none, zt, jt, s, dp = _bwd_buffers(q, R4, Bcp, D, Dp)
    kj = np.zeros((Bc, Dp), T)
    dq_acc = np.zeros((R4, Dp), T)
    rsum = np.zeros(R4, T)
    for prog in range(worker, B * H * Tr, n_workers):
        b, h, tq = prog // (H * Tr), (prog // Tr) % H, prog % Tr
        g = h // group
        qs = tq * Br
        nr = min(Br, Nq - qs)
        _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t)
        dq_acc[:] = 0
        rsum[:] = 0
        count = counts[b, g]
        for tc in range((count + Bc - 1) // Bc):
            tile = types[b, g, tq, tc]
            if tile == SKIP:
                continue
            cs = tc * Bc
            nc = min(Bc, count - cs)
            _gather(k[b, g], v[b, g], z[b, g], kidx[b, g], cs, nc, kT, none, vT, zt, jt)
            for r in range(nc):  # and K_j by rows, the B of dQ = dS K
                for d in range(D):
                    kj[r, d] = k[b, g, jt[r], d]
            _dma_bwd_tile(qt, doi, kT, vT, zt, jt, lse_t, delta_t, s, dp, scratch, nr, nc, D, qs, b, h, tile == TRIANGLE,
                          thr_val[b, g], thr_idx[b, g], rows, drop)
            for i in range(nr):
                rsum[i] += _row_sum(dp, i, nc)
            _matmul(dp, kj, dq_acc, nr, D, nc, True)  # dQ += dS (scale K): scale applied at the end
        for i in range(nr):
            rs[b, h, qs + i] = rsum[i]
            for d in range(D):
                dq[b, h, qs + i, d] = dq_acc[i, d] * scale


@_kernel()
def _dma_dkdv(worker, n_workers, q, k, v, z, kidx, counts, types, thr_val, thr_idx, dout, lse, delta, dk, dv, dz, Br, Bc, scale, rows, drop):  # type: ignore[no-untyped-def]
    """dK, dV, dz of one key tile of the compacted list, looping over the group's query heads and the visited
    query tiles. Grid: one program per (batch, kv head, key tile); each owns the rows of its keys."""
    B, Hkv = k.shape[0], k.shape[1]
    Nq, D = q.shape[2], q.shape[3]
    T = q.dtype
    group = q.shape[1] // Hkv
    Tr, Tc = types.shape[2], types.shape[3]
    R4, C4, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt, doi, lse_t, delta_t, scratch, kT, vT, none, zt, jt, s, dp = _bwd_buffers(q, R4, Bcp, D, Dp)
    pT = np.zeros((C4, R4), T)
    dsT = np.zeros((C4, R4), T)
    dk_acc = np.zeros((C4, Dp), T)
    dv_acc = np.zeros((C4, Dp), T)
    dz_acc = np.zeros(Bcp, T)
    for prog in range(worker, B * Hkv * Tc, n_workers):
        b, g, tc = prog // (Hkv * Tc), (prog // Tc) % Hkv, prog % Tc
        count = counts[b, g]
        cs = tc * Bc
        if cs >= count:
            continue
        nc = min(Bc, count - cs)
        _gather(k[b, g], v[b, g], z[b, g], kidx[b, g], cs, nc, kT, none, vT, zt, jt)
        dk_acc[:] = 0
        dv_acc[:] = 0
        dz_acc[:] = 0
        for h in range(g * group, (g + 1) * group):  # the query heads that read kv head g
            for tq in range(Tr):
                tile = types[b, g, tq, tc]
                if tile == SKIP:
                    continue
                qs = tq * Br
                nr = min(Br, Nq - qs)
                _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t)
                _dma_bwd_tile(qt, doi, kT, vT, zt, jt, lse_t, delta_t, s, dp, scratch, nr, nc, D, qs, b, h, tile == TRIANGLE,
                              thr_val[b, g], thr_idx[b, g], rows, drop)
                for i in range(nr):  # dz += column sums of dS (rows in order: deterministic)
                    for c in range(nc):
                        dz_acc[c] += dp[i, c]
                if drop.present:  # dV uses the dropped-out probabilities P Z
                    for i in range(nr):
                        _dropout_row(s, i, nc, b, h, qs + i, jt, drop)
                _transpose(s, nr, nc, pT)
                _matmul(pT, doi, dv_acc, nc, D, nr, True)  # dV += (P Z)^T dO
                _transpose(dp, nr, nc, dsT)
                _matmul(dsT, qt, dk_acc, nc, D, nr, True)  # dK += dS^T (scale Q)
        for c in range(nc):
            j = jt[c]
            dz[b, g, j] = dz_acc[c]
            for d in range(D):
                dk[b, g, j, d] = dk_acc[c, d]
                dv[b, g, j, d] = dv_acc[c, d]


# ------------------------------------------------------------------------------------------------------------------
# Python entry points
# ------------------------------------------------------------------------------------------------------------------


def _dtype(q: np.ndarray) -> np.dtype:
    dtype = np.dtype(q.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"dynamic mask attention on the CPU needs float32 or float64 arrays, got q of dtype {dtype}")
    return dtype


def _options(spec: DMASpec, dtype: np.dtype) -> Tuple[Rows, DropoutArg]:
    rows = Rows(bool(spec.causal), np.int64(spec.off))
    drop = DropoutArg(spec.dropout > 0, np.uint64(spec.seed & 0xFFFFFFFF), np.uint64(spec.drop_threshold),
                      dtype.type(1.0 / (1.0 - spec.dropout)))
    return rows, drop


def _sel_arrays(sel: Selection, z: np.ndarray, dtype: np.dtype) -> Tuple[np.ndarray, ...]:
    return (_as_input(z, dtype), sel.kidx, sel.counts, sel.types, _as_input(sel.thr_val, dtype), sel.thr_idx)


def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, z: np.ndarray, sel: Selection, spec: DMASpec
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Fused DMA forward: ``out (B, H, Nq, D)``, ``lse (B, H, Nq)`` (``-inf`` for rows that keep no key)."""
    dtype = _dtype(q)
    q, k, v = (_as_input(x, dtype) for x in (q, k, v))
    B, H, Nq, D = q.shape
    out = np.zeros((B, H, Nq, D), dtype)
    lse = np.full((B, H, Nq), -np.inf, dtype)
    rows, drop = _options(spec, dtype)
    if B * H * Nq > 0:
        Tr = -(-Nq // sel.block_q)
        _launch(_dma_fwd, B * H * Tr, q, k, v, *_sel_arrays(sel, z, dtype), out, lse, np.int64(sel.block_q),
                np.int64(sel.block_k), dtype.type(spec.scale), rows, drop)
    return out, lse


def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, z: np.ndarray, sel: Selection, out: np.ndarray,
             lse: np.ndarray, dout: np.ndarray, spec: DMASpec) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fused DMA backward: ``(dq, dk, dv, dz)``; keys no query keeps get zero gradients."""
    dtype = _dtype(q)
    q, k, v, out, dout, lse = (_as_input(x, dtype) for x in (q, k, v, out, dout, lse))
    B, H, Nq, D = q.shape
    dq = np.zeros_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    dz = np.zeros(k.shape[:3], dtype)
    if B * H * Nq == 0 or k.shape[2] == 0:
        return dq, dk, dv, dz
    rows, drop = _options(spec, dtype)
    delta = np.einsum("bhid,bhid->bhi", dout, out)  # rowsum(dO * O)
    args = _sel_arrays(sel, z, dtype)
    Br, Bc, scale = np.int64(sel.block_q), np.int64(sel.block_k), dtype.type(spec.scale)
    Tr, Tc = sel.types.shape[2], sel.types.shape[3]
    # dQ first: its row sums of dS, rs = rowsum(P dP) - delta (0 up to rounding), refine delta for dK/dV/dz
    rs = np.empty((B, H, Nq), dtype)
    _launch(_dma_dq, B * H * Tr, q, k, v, *args, dout, lse, delta, dq, rs, Br, Bc, scale, rows, drop)
    delta += rs
    _launch(_dma_dkdv, B * k.shape[1] * Tc, q, k, v, *args, dout, lse, delta, dk, dv, dz, Br, Bc, scale, rows, drop)
    return dq, dk, dv, dz
