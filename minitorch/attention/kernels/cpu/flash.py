"""Fused flash attention on the CPU: the FastTensorBackend's engine, as Numba kernels on raw NumPy arrays.

The two functions of every engine (:mod:`minitorch.attention.engine`)::

    forward(q, k, v, bias, spec) -> (out, lse)
    backward(q, k, v, bias, out, lse, dout, spec, dlse=None) -> (dq, dk, dv, dbias)

Shapes: ``q, out, dout, dq`` are ``(B, H, Nq, D)``; ``k, v, dk, dv`` are ``(B, Hkv, Nk, D)``; ``lse`` is ``(B, H, Nq)``;
``bias, dbias`` are ``(Bb, Hb, Nqb, Nk)`` or ``None``. Query head ``h`` reads kv head ``g = h // group`` in place.

The algorithm is FlashAttention's (Dao et al. 2022, 2023). The ``Nq x Nk`` score matrix never exists: queries are
cut into ``Tr`` tiles of ``Br`` rows, keys into ``Tc`` tiles of ``Bc`` columns, and every visited ``(i, j)`` tile pair
computes a ``Br x Bc`` score tile ``S_ij``, folds it into an *online softmax* (running row max ``m``, running row sum
``l``) and forgets it. Which tile pairs exist, and whether they need masking, comes from ``spec.kernel_tiles()``:
``SKIP`` tiles are never loaded, ``DENSE`` tiles run the inner step without any mask test, ``TRIANGLE`` tiles test
every element with the one visibility rule of :mod:`minitorch.attention.masks`.

**One inner step per direction**, configured by the spec (:class:`Config`), used by every kernel below:

* :func:`_key_rows` and :func:`_gather`: the *key source*, key tile ``tk`` as contiguous rows or read through a
  key list (DMA's compacted keys), each row stored in the batch row's own keys or in a page pool read through a
  block table (a paged KV cache);
* :func:`_score_tile`: the *score modification*, ``+ bias``, a user's ``score_mod`` (through its row function,
  :mod:`.mods`), softcap, ALiBi (:func:`_modify_tile`), the visibility rule on positions, segment ids and a
  ``mask_mod``'s bits, DMA's top-k keep rule;
* :func:`_fwd_step`: ``S_ij``, online softmax, ``O_i += P_ij V_j`` (FA2 Algorithm 1 lines 8-10);
* :func:`_bwd_step`: recompute ``P_ij`` and ``dS_ij`` (FA2 Algorithm 2 lines 11-14).

Kernels (programs launched as grids by :func:`~.launch.launch`):

* forward, ``TileOrder.Q_MAJOR`` (FlashAttention-2): one program per (batch, head, query tile, split) keeps ``O_i,
  m_i, l_i`` in local buffers and streams the key tiles of its split (``spec.num_splits``, split-K, merged by lse);
* forward, ``TileOrder.K_MAJOR`` (FlashAttention-1, Algorithm 1): per (batch, head), the outer loop runs over key
  tiles; for every query tile the partial ``O_i, l_i, m_i`` are read from the full output arrays, updated and
  written back;
* backward: preprocess ``delta``; a dQ kernel, one program per (batch, head, query tile), which also sums each row
  of ``dS``; a dK/dV kernel, one program per (batch, kv head, key tile), looping over the query heads of its group
  and the query tiles, with ``delta`` refined by those sums (docs/internals.md). ``P`` is recomputed from ``lse``.

Each product of the algorithm is one small matmul ``C (+)= A @ B`` (:func:`~.simd.matmul`), written with explicit
SIMD vectors. float64 inputs run in float64; float32 inputs accumulate in float32, as FlashAttention does. A key
that a query does not see is never read for it: in a TRIANGLE tile whose inputs hold NaN or Inf the products skip
the masked pairs (:func:`~.simd.matmul_visible`).
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from typing import Dict, Optional, Tuple

import numba
import numpy as np

from ...dropout import build_dropout_hash
from ...masks import build_kept, build_same_segment, build_visible
from ...merge import merge_partials
from ...sinks import sink_probs
from ...spec import AttentionSpec, check_backward
from ...tiling import TileOrder, TileType
from .launch import FM_REDUCE, as_input, helper, kernel, launch, program, rounds
from .mods import call_row, row_function
from .simd import (exp, exp_rows, matmul, matmul_visible, rows_max, vfma, vfma_vec, vhsum, vload, vstore, vwidth,
                   vzeros)

# Tile types as plain ints (Numba freezes module-level ints into the compiled code).
SKIP = int(TileType.SKIP)
DENSE = int(TileType.DENSE)
TRIANGLE = int(TileType.TRIANGLE)

_inline = numba.njit(inline="always")
_visible = build_visible(_inline)
_same_segment = build_same_segment(_inline)
_kept = build_kept(_inline)
_dropout_hash = build_dropout_hash(_inline)

Config = namedtuple(
    "Config",
    "q_pos_b k_pos_b causal window num_sinks "
    "bias has_bias bias_head_div "
    "kidx counts has_list "
    "block_table page_size lengths has_pages "
    "thr_val thr_idx has_topk "
    "has_dropout seed drop_threshold inv_keep "
    "q_seg k_seg has_segments bm_index bm_bits has_block_mask "
    "has_mods score_mod has_score_mod softcap alibi has_alibi sinks has_sinks",
)
"""The spec, as the kernels read it (one typed named tuple; absent features hold small dummy arrays):

* masks: ``q_pos_b (B, Nq)``, ``k_pos_b (B, Nk)`` int64 positions (-1: empty), ``causal``, ``window`` (-1: none),
  ``num_sinks``; packed sequences: segment ids ``q_seg (B, Nq)``, ``k_seg (B, Nk)``; a ``mask_mod``: tile
  ``(tq, tk)`` of (b, h) holds its bits at ``bm_bits[bm_index[b % Bm, h % Hm, tq, tk]]`` (``-1``: none to test);
* the modification after the bias (``has_mods``): ``score_mod``, the address of the user's row function
  (:mod:`.mods`); ``softcap`` (0: off); ALiBi ``alibi (H,)``;
* learnable sinks ``sinks (H,)``: the online softmax starts from ``(m, l) = (sinks[h], 1)``;
* bias: ``bias (Bb, Hb, Nqb, Nk)``; query head ``h`` reads bias head ``h // bias_head_div``;
* key source: with ``has_list``, key tile entries ``c`` are key rows ``kidx[b, g, c]`` (``counts[b, g]`` of them);
  with ``has_pages``, ``k, v`` are page pools and batch row b's key row ``j < lengths[b]`` is stored in page
  ``block_table[b, j // page_size]`` at offset ``j % page_size``;
* DMA's top-k: row ``i`` keeps key ``j`` iff ``kept(bias[b, g, 0, j], j, thr_val[b, g, i], thr_idx[b, g, i])``;
* dropout: keep iff ``dropout_hash(seed, b, h, i, j) >= drop_threshold``; kept probabilities times ``inv_keep``.
"""


# ------------------------------------------------------------------------------------------------------------------
# Building blocks of the two steps
# ------------------------------------------------------------------------------------------------------------------


@helper()
def _masked_value(x):  # type: ignore[no-untyped-def]
    """The finite sentinel that stands for a masked score, and for 'no key seen yet' in the running max."""
    return x.dtype.type(np.finfo(x.dtype).min)


@helper()
def _round_up(n, k):  # type: ignore[no-untyped-def]
    return (n + k - 1) // k * k


@helper()
def _tile_shapes(Br, Bc, D, like):  # type: ignore[no-untyped-def]
    """Padded tile sizes: rows of a matmul's A and C to a multiple of 4, columns of its B and C to 2 vectors."""
    W2 = 2 * vwidth(like)
    return _round_up(Br, 4), _round_up(Bc, 4), _round_up(Bc, W2), _round_up(D, W2)


@helper()
def _load_rows(src, start, n, dst, scale):  # type: ignore[no-untyped-def]
    """``dst[:n] = scale * src[start:start + n]`` for 2-D ``(rows, D)`` arrays: a tile copied to a local buffer."""
    for r in range(n):
        for d in range(src.shape[1]):
            dst[r, d] = src[start + r, d] * scale


@helper()
def _finite(a, n0, n1):  # type: ignore[no-untyped-def]
    """Is every value of ``a[:n0, :n1]`` finite? (NaN fails every comparison; the OR of integers vectorizes, with
    no float reassociation that could fold a NaN away). Asked only in TRIANGLE tiles, where a masked pair must not
    read a non-finite operand."""
    big = np.finfo(a.dtype).max
    bad = 0
    for i in range(n0):
        for j in range(n1):
            bad |= not (abs(a[i, j]) <= big)
    return bad == 0


@helper()
def _tile_count(cfg, b, g, tq, Nk, Bc):  # type: ignore[no-untyped-def]
    """The number of key tiles of (b, kv head g) for query tile ``tq``: of the key rows (a paged sequence's own
    length), or of the entries of the key list (one list for all query tiles, or each query tile's own)."""
    n = Nk
    if cfg.has_list:
        n = cfg.counts[b % cfg.counts.shape[0], g % cfg.counts.shape[1], tq % cfg.counts.shape[2]]
    elif cfg.has_pages:
        n = cfg.lengths[b]
    return (n + Bc - 1) // Bc, n


@helper()
def _key_rows(cfg, b, g, tq, start, n, jt, kpt):  # type: ignore[no-untyped-def]
    """The key source: ``jt[c]`` = the key row of entry ``start + c`` of (b, kv head g), for ``c < n``: the row
    itself (contiguous keys) or ``kidx[b, g, tq, start + c]`` (a key list: ``kidx (B, Hkv, 1 or Tr, L)``, one list,
    or one per query tile); ``kpt[c]`` its position in batch row b."""
    for c in range(n):
        j = start + c
        if cfg.has_list:
            j = cfg.kidx[b % cfg.kidx.shape[0], g % cfg.kidx.shape[1], tq % cfg.kidx.shape[2], start + c]
        jt[c] = j
        kpt[c] = cfg.k_pos_b[b, j]


@_inline
def _row_address(b, j, cfg):  # type: ignore[no-untyped-def]
    """Where key row ``j`` of batch row ``b`` is stored: ``(b, j)`` (``src[b, g, j]``), or in a paged batch ``(page,
    j % page_size)`` with ``page = block_table[b, j // page_size]`` (``src`` the pool: read in place)."""
    if cfg.has_pages:
        return cfg.block_table[b, j // cfg.page_size], j % cfg.page_size
    return b, j


@helper()
def _gather(src, b, g, jt, n, dst, transposed, cfg):  # type: ignore[no-untyped-def]
    """Load the key rows ``jt[:n]`` of (b, kv head g) of ``src`` (keys or values, 4-D) on chip: ``dst[c]`` = row
    ``jt[c]`` (stored where :func:`_row_address` says), or ``dst[:, c]`` when ``transposed`` (a product that reduces
    over the keys then reads contiguous memory)."""
    D = src.shape[3]
    if transposed:
        for c in range(n):
            sb, sj = _row_address(b, jt[c], cfg)
            for d in range(D):
                dst[d, c] = src[sb, g, sj, d]
    else:
        for c in range(n):
            sb, sj = _row_address(b, jt[c], cfg)
            for d in range(D):
                dst[c, d] = src[sb, g, sj, d]


@helper()
def _score_tile(s, vis, dsdt, nr, nc, qs, b, h, g, jt, kpt, masked, want_grad, cfg, bias2):  # type: ignore[no-untyped-def]
    """The score modification of a ``(query, key)`` tile: ``S += bias``; the modification after it
    (:func:`_modify_tile`; with ``want_grad`` its derivative into ``dsdt``); then, in a TRIANGLE tile, ``S = MASKED``
    where the pair is not visible (the rule of :mod:`...masks` on the positions ``q_pos_b`` and ``kpt``; with segment
    ids or a ``mask_mod``, :func:`_mask_tile`; with DMA also the top-k keep rule), and ``vis[i, c]`` records it.
    ``bias2`` is the bias's ``(Nqb, Nk)`` slab for this (b, h). (Helpers take ``cfg`` once per tile, not per row:
    it is a large struct.)"""
    sentinel = _masked_value(s)
    causal, window, num_sinks = cfg.causal, cfg.window, cfg.num_sinks
    if cfg.has_bias:
        if bias2.shape[0] == 1:  # one row for all queries (DMA's z): read it once per tile, add it to every row
            row = np.empty(nc, s.dtype)
            for c in range(nc):
                row[c] = bias2[0, jt[c]]
            for i in range(nr):
                for c in range(nc):
                    s[i, c] += row[c]
        else:
            for i in range(nr):
                for c in range(nc):
                    s[i, c] += bias2[qs + i, jt[c]]
    if cfg.has_mods:
        _modify_tile(s, dsdt, nr, nc, qs, b, h, kpt, want_grad, cfg)
    if not masked:
        return
    if cfg.has_segments or cfg.has_block_mask:
        _mask_tile(s, vis, nr, nc, qs, b, h, jt, kpt, cfg)
        return
    for i in range(nr):
        qp = cfg.q_pos_b[b, qs + i]
        if cfg.has_topk:
            tv, ti = cfg.thr_val[b, g, qs + i], cfg.thr_idx[b, g, qs + i]
            for c in range(nc):
                ok = _visible(qp, kpt[c], causal, window, num_sinks) & _kept(bias2[0, jt[c]], jt[c], tv, ti)
                vis[i, c] = ok
                s[i, c] = s[i, c] if ok else sentinel
        else:
            for c in range(nc):
                ok = _visible(qp, kpt[c], causal, window, num_sinks)
                vis[i, c] = ok
                s[i, c] = s[i, c] if ok else sentinel


@helper()
def _modify_tile(s, dsdt, nr, nc, qs, b, h, kpt, want_grad, cfg):  # type: ignore[no-untyped-def]
    """The score modification after the bias, row by row (query position ``q_pos_b[b, qs + i]``, key positions
    ``kpt``), in the order of the public API: the user's ``score_mod`` (its compiled row function, called through
    its address), ``softcap tanh(s / softcap)``, ALiBi's ``- alibi[h] |qp - kp|``. With ``want_grad``, ``dsdt`` gets
    the derivative of the result by the input (backward chains ``dS`` through it)."""
    T = s.dtype.type
    cap = cfg.softcap
    inv = T(1) / cap if cap > 0 else T(0)
    slope = cfg.alibi[h] if cfg.has_alibi else T(0)
    for i in range(nr):
        qp = cfg.q_pos_b[b, qs + i]
        if want_grad:
            for c in range(nc):
                dsdt[i, c] = T(1)
        if cfg.has_score_mod:  # s = score_mod(s), and dsdt = score_mod_grad(s) first when want_grad
            call_row(cfg.score_mod, s[i], dsdt[i], kpt, nc, b, h, qp, want_grad)
        if cap > 0:
            for c in range(nc):
                t = np.tanh(s[i, c] * inv)
                if want_grad:
                    dsdt[i, c] *= T(1) - t * t
                s[i, c] = cap * t
        if cfg.has_alibi:
            for c in range(nc):
                s[i, c] -= slope * T(abs(qp - kpt[c]))


@helper()
def _mask_tile(s, vis, nr, nc, qs, b, h, jt, kpt, cfg):  # type: ignore[no-untyped-def]
    """The masks of a TRIANGLE tile (query rows ``qs ..``, key rows ``jt`` at positions ``kpt``) when there is more
    than the positions' rule: packed sequences (:func:`...masks.same_segment`) and a ``mask_mod``'s bits. A block
    mask's tiles are the kernel's (contiguous keys): row ``i``'s bits are ``bm_bits[slot, (qs + i) % bq, :]`` from
    the tile's first key on (``slot = -1``: the block mask lets the whole tile through)."""
    sentinel = _masked_value(s)
    causal, window, num_sinks = cfg.causal, cfg.window, cfg.num_sinks
    bq, bk = cfg.bm_bits.shape[1], cfg.bm_bits.shape[2]
    slot = -1
    if cfg.has_block_mask:
        slot = cfg.bm_index[b % cfg.bm_index.shape[0], h % cfg.bm_index.shape[1], qs // bq, jt[0] // bk]
    c0 = jt[0] % bk
    segments = cfg.has_segments and not _one_segment(cfg.q_seg[b], cfg.k_seg[b], qs, nr, jt, nc)
    for i in range(nr):
        qi = qs + i
        qp = cfg.q_pos_b[b, qi]
        bits = cfg.bm_bits[max(slot, 0), qi % bq]
        if not segments:  # one loop: positions and bits
            for c in range(nc):
                ok = _visible(qp, kpt[c], causal, window, num_sinks)
                if slot >= 0:
                    ok = ok & (bits[c0 + c] != 0)
                vis[i, c] = ok
                s[i, c] = s[i, c] if ok else sentinel
            continue
        qsg = cfg.q_seg[b, qi]
        for c in range(nc):
            ok = _visible(qp, kpt[c], causal, window, num_sinks) & _same_segment(qsg, cfg.k_seg[b, jt[c]])
            if slot >= 0:
                ok = ok & (bits[c0 + c] != 0)
            vis[i, c] = ok
            s[i, c] = s[i, c] if ok else sentinel


@helper()
def _one_segment(q_seg, k_seg, qs, nr, jt, nc):  # type: ignore[no-untyped-def]
    """Do the query rows ``qs ..`` and the key rows ``jt`` all belong to one segment (no padding)? Then the tile
    needs no segment test (a packed document's causal diagonal tile): ``O(nr + nc)`` to save ``O(nr nc)``."""
    seg = q_seg[qs]
    if seg < 0:
        return False
    for i in range(nr):
        if q_seg[qs + i] != seg:
            return False
    for c in range(nc):
        if k_seg[jt[c]] != seg:
            return False
    return True


@helper()
def _dropout_row(p, i, nc, b, h, qi, jt, cfg):  # type: ignore[no-untyped-def]
    """``p[i, :nc] *= keep / (1 - dropout)`` for query row ``qi``: the mask is re-hashed from ``(seed, b, h, qi, j)``
    with ``j`` the key row, never stored."""
    zero = p.dtype.type(0)
    for c in range(nc):
        keep = _dropout_hash(cfg.seed, b, h, qi, jt[c]) >= cfg.drop_threshold
        p[i, c] = p[i, c] * cfg.inv_keep if keep else zero


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------


@helper(fastmath=FM_REDUCE)
def _dots_by_rows(qt, k, b, g, jt, nc, s, nr, D, cfg):  # type: ignore[no-untyped-def]
    """``s[i, c] = qt[i] . K[row jt[c]]`` for the ``nr < 4`` rows of a decode step: each key row is read in place
    (where :func:`_row_address` says) and used for every query row while it is in registers. No copy, no
    transpose: a decode step streams its keys at memory speed."""
    W = vwidth(s)
    Dv = D - D % W
    for c in range(nc):
        sb, sj = _row_address(b, jt[c], cfg)
        k2 = k[sb, g]
        for i in range(nr):
            vacc = vzeros(s)
            for d in range(0, Dv, W):
                vacc = vfma_vec(vload(qt, i, d), vload(k2, sj, d), vacc)
            acc = vhsum(vacc)
            for d in range(Dv, D):
                acc += qt[i, d] * k2[sj, d]
            s[i, c] = acc


@helper(fastmath=FM_REDUCE)
def _accumulate_by_rows(p, v, b, g, jt, nc, acc, nr, D, vis, masked, cfg):  # type: ignore[no-untyped-def]
    """``acc[i] += sum_c p[i, c] V[row jt[c]]`` for the ``nr < 4`` rows of a decode step, each value row read in
    place once; in a TRIANGLE tile a pair the row does not see is left out (its value row may hold NaN)."""
    W = vwidth(acc)
    Dv = D - D % W
    for c in range(nc):
        sb, sj = _row_address(b, jt[c], cfg)
        v2 = v[sb, g]
        for i in range(nr):
            if masked and vis[i, c] == 0:
                continue
            x = p[i, c]
            for d in range(0, Dv, W):
                vstore(acc, i, d, vfma(x, vload(v2, sj, d), vload(acc, i, d)))
            for d in range(Dv, D):
                acc[i, d] += x * v2[sj, d]


@helper(fastmath=FM_REDUCE)
def _fwd_step(acc, m, l, qt, kT, vj, s, vis, stats, nr, nc, D, qs, b, h, g, jt, kpt, masked, cfg, bias2, k, v, by_rows):  # type: ignore[no-untyped-def]
    """One step of the online softmax: fold key tile ``j`` into query tile ``i`` (FA2 Algorithm 1, lines 8-10).

    ``qt (R4, D)``: ``scale * Q_i``; ``kT (D, Bcp)``: ``K_j^T``; ``vj (Bc, Dp)``: ``V_j``; ``s, vis (R4, Bcp)`` and
    ``stats (3, R4)``: scratch. Updated in place: ``acc (R4, Dp)``, the unnormalized ``O_i``; ``m, l (R4,)``, the
    running row max and row sum. ``masked`` is True for a TRIANGLE tile (test every element), False for DENSE.
    With ``by_rows`` (a decode step: fewer than 4 query rows) the two products read the key and value rows of
    ``k, v`` in place instead (:func:`_dots_by_rows`, :func:`_accumulate_by_rows`; ``kT``, ``vj`` unused).
    """
    m_new, alpha, rowsum = stats[0], stats[1], stats[2]
    sentinel = _masked_value(s)
    # S_ij = Q_i K_j^T (scale already folded into Q_i) + bias, masked
    if by_rows:
        _dots_by_rows(qt, k, b, g, jt, nc, s, nr, D, cfg)
    else:
        matmul(qt, kT, s, nr, nc, D, False)
    if masked or cfg.has_bias or cfg.has_mods:  # (no derivative wanted: s stands in for dsdt)
        _score_tile(s, vis, s, nr, nc, qs, b, h, g, jt, kpt, masked, False, cfg, bias2)
    # m_i^new = max(m_i, rowmax(S_ij)); a row that has seen no visible key yet keeps the sentinel, and shifting
    # by +max then makes its P_ij exactly 0 (l_i stays 0, alpha = 1)
    # BEGIN SOLUTION task5_2: m_new (rows_max), alpha = exp(m - m_new), P = exp(S - m_new) (exp_rows), l, acc rescaled
    rows_max(s, nr, nc, m, m_new)
    for i in range(nr):
        alpha[i] = exp(m[i] - m_new[i])
        m[i] = m_new[i]
        if m_new[i] == sentinel:
            m_new[i] = np.finfo(s.dtype).max
    # P_ij = exp(S_ij - m_i^new);  l_i = exp(m_i - m_i^new) l_i + rowsum(P_ij)
    exp_rows(s, nr, nc, m_new, rowsum)
    for i in range(nr):
        l[i] = alpha[i] * l[i] + rowsum[i]
        # O_i = diag(exp(m_i - m_i^new)) O_i   (the "+ P_ij V_j" follows, as one matmul for the whole tile)
        a = alpha[i]
        for d in range(D):
            acc[i, d] *= a
        # dropout acts on P in the product with V only (l, hence lse, are of the undropped scores)
        if cfg.has_dropout:
            _dropout_row(s, i, nc, b, h, qs + i, jt, cfg)
    # END SOLUTION
    # O_i += P_ij V_j  (leaving out the masked pairs where V_j holds NaN or Inf)
    if by_rows:
        _accumulate_by_rows(s, v, b, g, jt, nc, acc, nr, D, vis, masked, cfg)
    elif masked and not _finite(vj, nc, D):
        matmul_visible(s, vj, acc, vis, nr, D, nc)
    else:
        matmul(s, vj, acc, nr, D, nc, True)


@helper()
def _start(m, l, h, with_sink, cfg):  # type: ignore[no-untyped-def]
    """The online softmax's starting point for the rows of ``m, l``: nothing seen (``m = MASKED``, ``l = 0``), or,
    with learnable sinks (``with_sink``: the first split holds them), the sink's term already folded in: ``m =
    sinks[h]``, ``l = 1`` (``exp(sinks[h] - m)``), and nothing in ``O`` (a sink has no value)."""
    if cfg.has_sinks and with_sink:
        m[:] = cfg.sinks[h]
        l[:] = 1
    else:
        m[:] = _masked_value(m)
        l[:] = 0


@helper()
def _fwd_buffers(q, Br, Bc):  # type: ignore[no-untyped-def]
    """The on-chip buffers of a forward program: ``qt (R4, D)`` (scale Q_i), ``acc (R4, Dp)`` (unnormalized O_i),
    ``m, l (R4,)``, ``kT (D, Bcp)`` (K_j^T), ``vj (Bc, Dp)`` (V_j), ``jt, kpt (Bcp,)`` (key rows and positions),
    ``s (R4, Bcp)`` (S_ij, then P_ij), ``vis (R4, Bcp)`` (visible pairs), ``stats (3, R4)`` (scratch)."""
    T, D = q.dtype, q.shape[3]
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    return (np.zeros((R4, D), T), np.zeros((R4, Dp), T), np.zeros(R4, T), np.zeros(R4, T), np.zeros((D, Bcp), T),
            np.zeros((Bc, Dp), T), np.zeros(Bcp, np.int64), np.zeros(Bcp, np.int64), np.zeros((R4, Bcp), T),
            np.zeros((R4, Bcp), np.uint8), np.zeros((3, R4), T))


@helper()
def _write_rows(acc, m, l, nr, D, out2, lse1, qs):  # type: ignore[no-untyped-def]
    """FA2 Algorithm 1 lines 12-13: ``O_i = diag(l_i)^-1 O_i`` and ``lse_i = m_i + log(l_i)`` into the rows
    ``qs ..`` of ``out2 (Nq, D)``, ``lse1 (Nq,)``; a row that saw no key gets 0 and ``-inf`` (NaN stays NaN)."""
    T = acc.dtype
    for i in range(nr):
        seen = l[i] != 0
        inv = T.type(1) / l[i] if seen else T.type(0)
        for d in range(D):
            out2[qs + i, d] = acc[i, d] * inv
        lse1[qs + i] = m[i] + np.log(l[i]) if seen else -np.inf


@kernel()
def _fwd_q_major(worker, n_workers, q, k, v, out, lse, Br, Bc, n_splits, tile_types, scale, cfg):  # type: ignore[no-untyped-def]
    """Q-major forward, FlashAttention-2 Algorithm 1. Grid: one program per (batch, head, query tile, split).

    Split ``sp`` of ``n_splits`` runs the key tiles ``[sp Tsp, (sp + 1) Tsp)``, ``Tsp = ceil(Tc / n_splits)``, and
    writes its partial ``(O, lse)`` to ``out[b, h, sp]``, ``lse[b, h, sp]`` (``out (B, H, S, Nq, D)``, ``lse (B, H,
    S, Nq)``); with one split that is the result.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    Tr, Gt = tile_types.shape[2], tile_types.shape[1]
    # on-chip buffers (allocated once per worker, reused by its programs)
    qt, acc, m, l, kT, vj, jt, kpt, s, vis, stats = _fwd_buffers(q, Br, Bc)
    for r in range(rounds(B * H * Tr * n_splits, n_workers)):
        prog = program(worker, n_workers, r)
        if prog >= B * H * Tr * n_splits:
            continue
        b, h = prog // (H * Tr * n_splits), (prog // (Tr * n_splits)) % H
        tq, sp = (prog // n_splits) % Tr, prog % n_splits
        g = h // group  # GQA / MQA: the kv head this query head reads, in place
        bias2 = cfg.bias[b % cfg.bias.shape[0], h // cfg.bias_head_div]
        qs = tq * Br
        nr = min(Br, Nq - qs)
        Tc, n_keys = _tile_count(cfg, b, g, tq, Nk, Bc)
        per = (Tc + n_splits - 1) // n_splits
        by_rows = nr < 4  # a decode step: stream the key and value rows instead of loading tiles
        # line 4: load Q_i (scale folded in); O_i = 0, l_i = 0, m_i = -inf (a finite sentinel)
        _load_rows(q[b, h], qs, nr, qt, scale)
        acc[:] = 0
        _start(m, l, h, sp == 0, cfg)
        # line 5: for each key tile j of this split (SKIP tiles are never loaded)
        for tk in range(sp * per, min(Tc, (sp + 1) * per)):
            tile = tile_types[b, h // (H // Gt), tq, tk]
            if tile == SKIP:
                continue
            ks = tk * Bc
            nc = min(Bc, n_keys - ks)
            # line 6: load K_j (transposed: S_ij = Q_i K_j^T reads it by rows), V_j, through the key source (a
            # decode step with fewer than 4 query rows reads them in place instead)
            _key_rows(cfg, b, g, tq, ks, nc, jt, kpt)
            if not by_rows:
                _gather(k, b, g, jt, nc, kT, True, cfg)
                _gather(v, b, g, jt, nc, vj, False, cfg)
            # lines 8-10: S_ij, online softmax, O_i update
            _fwd_step(acc, m, l, qt, kT, vj, s, vis, stats, nr, nc, D, qs, b, h, g, jt, kpt, tile == TRIANGLE, cfg, bias2,
                      k, v, by_rows)
        # lines 12-13: O_i = diag(l_i)^-1 O_i, lse_i = m_i + log(l_i)
        _write_rows(acc, m, l, nr, D, out[b, h, sp], lse[b, h, sp], qs)


@kernel()
def _fwd_k_major(worker, n_workers, q, k, v, out, lse, m_hbm, l_hbm, Br, Bc, tile_types, scale, cfg):  # type: ignore[no-untyped-def]
    """K-major forward, FlashAttention-1 Algorithm 1. Grid: one program per (batch, head).

    ``out``, ``m_hbm``, ``l_hbm`` play the role of HBM: every visited tile reads ``O_i, l_i, m_i`` from them and
    writes them back. ``lse`` is filled at the end.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    group = H // k.shape[1]
    Tr, Gt = tile_types.shape[2], tile_types.shape[1]
    qt, acc, m, l, kT, vj, jt, kpt, s, vis, stats = _fwd_buffers(q, Br, Bc)
    for r in range(rounds(B * H, n_workers)):
        prog = program(worker, n_workers, r)
        if prog >= B * H:
            continue
        b, h = prog // H, prog % H
        g = h // group
        bias2 = cfg.bias[b % cfg.bias.shape[0], h // cfg.bias_head_div]
        # line 2: O = 0, l = 0, m = -inf (a finite sentinel), in "HBM"
        out[b, h] = 0
        _start(m_hbm[b, h], l_hbm[b, h], h, True, cfg)
        # line 5: outer loop over key tiles j; line 6: load K_j, V_j once
        Tc, n_keys = _tile_count(cfg, b, g, 0, Nk, Bc)  # (one key list for every query tile)
        for tk in range(Tc):
            ks = tk * Bc
            nc = min(Bc, n_keys - ks)
            _key_rows(cfg, b, g, 0, ks, nc, jt, kpt)
            _gather(k, b, g, jt, nc, kT, True, cfg)
            _gather(v, b, g, jt, nc, vj, False, cfg)
            # line 7: inner loop over query tiles i
            for tq in range(Tr):
                tile = tile_types[b, h // (H // Gt), tq, tk]
                if tile == SKIP:
                    continue
                qs = tq * Br
                nr = min(Br, Nq - qs)
                # line 8: load Q_i, O_i, l_i, m_i; keep diag(l_i) O_i, the unnormalized output
                _load_rows(q[b, h], qs, nr, qt, scale)
                for i in range(nr):
                    m[i] = m_hbm[b, h, qs + i]
                    l[i] = l_hbm[b, h, qs + i]
                    for d in range(D):
                        acc[i, d] = out[b, h, qs + i, d] * l[i]
                # lines 9-11: S_ij, m_ij, P_ij, l_ij and diag(l_i) e^{m_i - m_new} O_i + e^{m_ij - m_new} P_ij V_j
                _fwd_step(acc, m, l, qt, kT, vj, s, vis, stats, nr, nc, D, qs, b, h, g, jt, kpt, tile == TRIANGLE, cfg,
                          bias2, k, v, False)
                # lines 12-13: write O_i = diag(l_i^new)^-1 (...), l_i, m_i back
                _write_rows(acc, m, l, nr, D, out[b, h], lse[b, h], qs)
                for i in range(nr):
                    m_hbm[b, h, qs + i] = m[i]
                    l_hbm[b, h, qs + i] = l[i]
        for i in range(Nq):
            li = l_hbm[b, h, i]
            lse[b, h, i] = m_hbm[b, h, i] + np.log(li) if li != 0 else -np.inf


# ------------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------------


@kernel()
def _bwd_preprocess(worker, n_workers, out, dout, dlse, delta):  # type: ignore[no-untyped-def]
    """``delta_i = rowsum(dO_i * O_i) - dlse_i`` (FA2 Algorithm 2, line 4). Grid: one program per (batch, head)."""
    B, H, Nq, D = out.shape
    for r in range(rounds(B * H, n_workers)):
        prog = program(worker, n_workers, r)
        if prog >= B * H:
            continue
        b, h = prog // H, prog % H
        for i in range(Nq):
            acc = out.dtype.type(0)
            for d in range(D):
                acc += dout[b, h, i, d] * out[b, h, i, d]
            delta[b, h, i] = acc - dlse[b, h, i]


@helper()
def _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t):  # type: ignore[no-untyped-def]
    """Load ``scale * Q_i``, ``dO_i``, ``lse_i``, ``delta_i`` of a query tile. A row that saw no key
    (``lse = -inf``) gets ``lse = +max`` so that ``exp(S - lse)`` is exactly 0."""
    _load_rows(q[b, h], qs, nr, qt, scale)
    _load_rows(dout[b, h], qs, nr, doi, q.dtype.type(1))
    for i in range(nr):
        x = lse[b, h, qs + i]
        lse_t[i] = x if x != -np.inf else np.finfo(lse_t.dtype).max
        delta_t[i] = delta[b, h, qs + i]


@helper(fastmath=FM_REDUCE)
def _bwd_step(qt, doi, kT, vT, lse_t, delta_t, s, dp, vis, dsdt, scratch, nr, nc, D, qs, b, h, g, jt, kpt, masked, cfg, bias2):  # type: ignore[no-untyped-def]
    """Recompute one tile of the backward pass (FA2 Algorithm 2, lines 11-14), for both kernels:

    ``s <- P_ij = exp(Q_i K_j^T + bias - lse_i)`` (masked) and ``dp <- dS_ij = P_ij * (dP_ij - delta_i)`` with
    ``dP_ij = (dO_i V_j^T) * Z`` (``Z = keep / (1 - p)`` under dropout, else 1); ``dS`` is exactly 0 where masked.
    With a score modification, ``dsdt`` gets its derivative (:func:`_chain` then turns ``dS`` into the gradient of
    ``Q K^T + bias``). ``qt = scale * Q_i``, ``doi``: ``(R4, >= D)``; ``kT, vT``: ``K_j^T, V_j^T (D, Bcp)``; ``s,
    dp, vis, dsdt: (R4, Bcp)``; ``scratch (R4,)``.
    """
    # S_ij = Q_i K_j^T (+ bias, masked);  P_ij = exp(S_ij - lse_i)
    matmul(qt, kT, s, nr, nc, D, False)
    if masked or cfg.has_bias or cfg.has_mods:
        _score_tile(s, vis, dsdt, nr, nc, qs, b, h, g, jt, kpt, masked, True, cfg, bias2)
    exp_rows(s, nr, nc, lse_t, scratch)  # (the row sums land in scratch, unused)
    # dP_ij = dO_i V_j^T (times Z);  dS_ij = P_ij * (dP_ij - delta_i)
    matmul(doi, vT, dp, nr, nc, D, False)
    zero = dp.dtype.type(0)
    # BEGIN SOLUTION task5_3: per row: dropout on dP, dS = P (dP - delta_i); where masked (vis 0) both dS and P are 0
    for i in range(nr):
        if cfg.has_dropout:
            _dropout_row(dp, i, nc, b, h, qs + i, jt, cfg)
        for c in range(nc):
            dp[i, c] = s[i, c] * (dp[i, c] - delta_t[i])
        if masked:
            for c in range(nc):
                if vis[i, c] == 0:
                    dp[i, c] = zero  # a masked pair has no gradient, whatever V holds there,
                    s[i, c] = zero  # and no probability, whatever the row's lse (NaN for a row that sees a NaN)
    # END SOLUTION


@helper()
def _chain(dp, dsdt, vis, nr, nc, masked):  # type: ignore[no-untyped-def]
    """``dS *= ds/dt``: the gradient of the final scores into the gradient of ``T = scale Q K^T + bias``, through
    the score modification (0 where masked: the modification of a masked pair may be anything, even NaN)."""
    zero = dp.dtype.type(0)
    for i in range(nr):
        for c in range(nc):
            dp[i, c] = dp[i, c] * dsdt[i, c] if (not masked or vis[i, c] != 0) else zero


@kernel()
def _bwd_dq(worker, n_workers, q, k, v, dout, lse, delta, dq, rs, Br, Bc, tile_types, scale, cfg):  # type: ignore[no-untyped-def]
    """dQ and the row sums ``rs`` of dS (FA2 Algorithm 2's dQ half as its own kernel, no atomics). Grid: one program
    per (batch, head, query tile)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    T = q.dtype
    group = H // k.shape[1]
    Tr, Gt = tile_types.shape[2], tile_types.shape[1]
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt = np.zeros((R4, D), T)
    doi = np.zeros((R4, D), T)
    lse_t = np.zeros(R4, T)
    delta_t = np.zeros(R4, T)
    scratch = np.zeros(R4, T)
    kT = np.zeros((D, Bcp), T)
    vT = np.zeros((D, Bcp), T)
    kj = np.zeros((Bc, Dp), T)
    jt = np.zeros(Bcp, np.int64)
    kpt = np.zeros(Bcp, np.int64)
    s = np.zeros((R4, Bcp), T)
    dp = np.zeros((R4, Bcp), T)
    vis = np.zeros((R4, Bcp), np.uint8)
    dsdt = np.zeros((R4, Bcp), T)
    dq_acc = np.zeros((R4, Dp), T)
    rsum = np.zeros(R4, T)
    for r in range(rounds(B * H * Tr, n_workers)):
        prog = program(worker, n_workers, r)
        if prog >= B * H * Tr:
            continue
        b, h, tq = prog // (H * Tr), (prog // Tr) % H, prog % Tr
        g = h // group
        bias2 = cfg.bias[b % cfg.bias.shape[0], h // cfg.bias_head_div]
        qs = tq * Br
        nr = min(Br, Nq - qs)
        # load Q_i, dO_i, lse_i, delta_i; dQ_i = 0
        _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t)
        dq_acc[:] = 0
        rsum[:] = 0
        Tc, n_keys = _tile_count(cfg, b, g, tq, Nk, Bc)
        for tk in range(Tc):
            tile = tile_types[b, h // (H // Gt), tq, tk]
            if tile == SKIP:
                continue
            ks = tk * Bc
            nc = min(Bc, n_keys - ks)
            # load K_j (transposed for S = Q K^T, by rows for dS K) and V_j (transposed for dP = dO V^T)
            _key_rows(cfg, b, g, tq, ks, nc, jt, kpt)
            _gather(k, b, g, jt, nc, kT, True, cfg)
            _gather(k, b, g, jt, nc, kj, False, cfg)
            _gather(v, b, g, jt, nc, vT, True, cfg)
            # s = P_ij, dp = dS_ij
            _bwd_step(qt, doi, kT, vT, lse_t, delta_t, s, dp, vis, dsdt, scratch, nr, nc, D, qs, b, h, g, jt, kpt,
                      tile == TRIANGLE, cfg, bias2)
            # rs_i += rowsum(dS_ij);  dQ_i += dT_ij K_j   (times scale, below; dT = dS without a modification)
            for i in range(nr):
                for c in range(nc):
                    rsum[i] += dp[i, c]
            if cfg.has_mods:
                _chain(dp, dsdt, vis, nr, nc, tile == TRIANGLE)
            if tile == TRIANGLE and not _finite(kj, nc, D):
                matmul_visible(dp, kj, dq_acc, vis, nr, D, nc)
            else:
                matmul(dp, kj, dq_acc, nr, D, nc, True)
        for i in range(nr):
            rs[b, h, qs + i] = rsum[i]
            for d in range(D):
                dq[b, h, qs + i, d] = dq_acc[i, d] * scale


@kernel()
def _bwd_dkdv(worker, n_workers, q, k, v, dout, lse, delta, dk, dv, dbias, dq_parts, with_dq, n_chunks, Br, Bc, nb, nh, tile_types, scale, cfg):  # type: ignore[no-untyped-def]
    """dK, dV (and dBias), FA2 Algorithm 2's outer loop over key tiles; with ``with_dq`` also dQ (the fused
    backward: one pass, 5 tile products per tile pair instead of 8). Grid: (chunk, batch, kv head).

    Chunk ``c`` of ``n_chunks`` runs the key tiles ``c, c + n_chunks, ...`` (interleaved, so that causal chunks
    balance). For each key tile the program loops over the ``group`` query heads that read its kv head and over
    their query tiles, accumulating ``dK_j, dV_j`` in local buffers, and adds ``dS_ij`` into ``dbias``. With
    ``with_dq`` it also adds ``dT_ij K_j`` into its chunk's own partial ``dq_parts[c] (B, H, Nq, D)`` (unscaled; the
    caller sums the chunks in order and scales): no two programs write one partial row, and every row of it is
    summed over the key tiles in increasing order. A bias broadcast over the batch (or the heads) is shared by
    several (batch, kv head) pairs: then the caller passes ``nb = 1`` (or ``nh = 1``) and one program runs all
    batch rows (kv heads) of its key tiles one after the other, so that it is the only writer of its ``dbias``
    columns. A key appears once per key tile of (b, g) (a key list holds it at most once). No races, and every sum
    in a fixed order that does not depend on the number of threads.
    """
    B, Hkv = k.shape[0], k.shape[1]
    H, Nq, D = q.shape[1], q.shape[2], q.shape[3]
    Nk = k.shape[2]
    T = q.dtype
    group = H // Hkv
    Tr, Gt, Tc_max = tile_types.shape[2], tile_types.shape[1], tile_types.shape[3]
    R4, C4, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt = np.zeros((R4, Dp), T)  # scale * Q_i: A of S = Q K^T, and B of dK = dS^T (scale Q)
    doi = np.zeros((R4, Dp), T)  # dO_i: A of dP = dO V^T, and B of dV = P^T dO
    lse_t = np.zeros(R4, T)
    delta_t = np.zeros(R4, T)
    scratch = np.zeros(R4, T)
    kT = np.zeros((D, Bcp), T)
    vT = np.zeros((D, Bcp), T)
    kj = np.zeros((C4, Dp), T)  # K_j by rows: B of dQ = dS K
    jt = np.zeros(Bcp, np.int64)
    kpt = np.zeros(Bcp, np.int64)
    s = np.zeros((R4, Bcp), T)
    dp = np.zeros((R4, Bcp), T)
    vis = np.zeros((R4, Bcp), np.uint8)
    dsdt = np.zeros((R4, Bcp), T)
    dk_acc = np.zeros((C4, Dp), T)
    dv_acc = np.zeros((C4, Dp), T)
    dq_t = np.zeros((R4, Dp), T)
    for r in range(rounds(n_chunks * nb * nh, n_workers)):
        prog = program(worker, n_workers, r)
        if prog >= n_chunks * nb * nh:
            continue
        chunk, pb, ph = prog // (nb * nh), (prog // nh) % nb, prog % nh
        b_lo, b_hi = (pb, pb + 1) if nb == B else (0, B)
        h_lo, h_hi = (ph, ph + 1) if nh == Hkv else (0, Hkv)
        for tk in range(chunk, Tc_max, n_chunks):
            for b in range(b_lo, b_hi):
                for g in range(h_lo, h_hi):
                    Tc, n_keys = _tile_count(cfg, b, g, 0, Nk, Bc)  # (one key list for every query tile)
                    if tk >= Tc:
                        continue
                    ks = tk * Bc
                    nc = min(Bc, n_keys - ks)
                    # load K_j, V_j (transposed, for the products with Q_i and dO_i; K_j by rows for dQ)
                    _key_rows(cfg, b, g, 0, ks, nc, jt, kpt)
                    _gather(k, b, g, jt, nc, kT, True, cfg)
                    _gather(v, b, g, jt, nc, vT, True, cfg)
                    k_finite = True
                    if with_dq:
                        _gather(k, b, g, jt, nc, kj, False, cfg)
                        k_finite = _finite(kj, nc, D)
                    dk_acc[:] = 0
                    dv_acc[:] = 0
                    for h in range(g * group, (g + 1) * group):  # the query heads that read kv head g
                        dq2 = dq_parts[chunk % dq_parts.shape[0], b % dq_parts.shape[1], h % dq_parts.shape[2]]
                        _bwd_key_tile(q, dout, lse, delta, dbias, dq2, with_dq, k_finite, Br, b,
                                      h, g, tk, nc, Tr, Gt, tile_types, scale, cfg, qt, doi, lse_t, delta_t, scratch,
                                      kT, vT, kj, jt, kpt, s, dp, vis, dsdt, dk_acc, dv_acc, dq_t)
                    # write dK_j, dV_j
                    for c in range(nc):
                        j = jt[c]
                        for d in range(D):
                            dk[b, g, j, d] = dk_acc[c, d]
                            dv[b, g, j, d] = dv_acc[c, d]


@helper(fastmath=FM_REDUCE)
def _bwd_key_tile(q, dout, lse, delta, dbias, dq2, with_dq, k_finite, Br, b, h, g, tk, nc, Tr, Gt, tile_types, scale, cfg, qt, doi, lse_t, delta_t, scratch, kT, vT, kj, jt, kpt, s, dp, vis, dsdt, dk_acc, dv_acc, dq_t):  # type: ignore[no-untyped-def]
    """One query head's part of a key tile's backward: for every query tile ``i`` that sees key tile ``j``, the
    backward step and its products ``dV_j += Z_ij^T dO_i``, ``dK_j += dT_ij^T (scale Q_i)``, ``dBias += dT_ij``
    and, with ``with_dq``, ``dq2[rows of i] += dT_ij K_j`` (``dq2 (Nq, D)``: this program's partial dQ of (b, h))."""
    H, Nq, D = q.shape[1], q.shape[2], q.shape[3]
    bias2 = cfg.bias[b % cfg.bias.shape[0], h // cfg.bias_head_div]
    dbias2 = dbias[b % dbias.shape[0], h // cfg.bias_head_div]
    for tq in range(Tr):
        tile = tile_types[b, h // (H // Gt), tq, tk]
        if tile == SKIP:
            continue
        masked = tile == TRIANGLE
        qs = tq * Br
        nr = min(Br, Nq - qs)
        # load Q_i, dO_i, lse_i, delta_i
        _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t)
        # s = P_ij, dp = dS_ij
        _bwd_step(qt, doi, kT, vT, lse_t, delta_t, s, dp, vis, dsdt, scratch, nr, nc, D, qs, b, h, g, jt, kpt,
                  masked, cfg, bias2)
        if cfg.has_mods:  # dp = dT_ij, the gradient of scale Q K^T + bias
            _chain(dp, dsdt, vis, nr, nc, masked)
        # dBias += dT_ij, summed over the dims the bias was broadcast along, in this fixed order
        if cfg.has_bias:
            for i in range(nr):
                brow = qs + i if dbias2.shape[0] > 1 else 0
                for c in range(nc):
                    dbias2[brow, jt[c]] += dp[i, c]
        # dQ_i += dT_ij K_j   (times scale, by the caller)
        if with_dq:
            if masked and not k_finite:
                dq_t[:] = 0
                matmul_visible(dp, kj, dq_t, vis, nr, D, nc)
            else:
                matmul(dp, kj, dq_t, nr, D, nc, False)
            for i in range(nr):
                for d in range(D):
                    dq2[qs + i, d] += dq_t[i, d]
        # dV_j += (P_ij * Z)^T dO_i   (``s.T`` is a transposed view: no copy)
        if cfg.has_dropout:
            for i in range(nr):
                _dropout_row(s, i, nc, b, h, qs + i, jt, cfg)
        if masked and not _finite(doi, nr, D):
            matmul_visible(s.T, doi, dv_acc, vis.T, nc, D, nr)
        else:
            matmul(s.T, doi, dv_acc, nc, D, nr, True)
        # dK_j += dS_ij^T (scale Q_i)
        if masked and not _finite(qt, nr, D):
            matmul_visible(dp.T, qt, dk_acc, vis.T, nc, D, nr)
        else:
            matmul(dp.T, qt, dk_acc, nc, D, nr, True)


# ------------------------------------------------------------------------------------------------------------------
# The Python entry points: the spec as a Config, and the launches
# ------------------------------------------------------------------------------------------------------------------


def _check_dtype(q: np.ndarray) -> np.dtype:
    dtype = np.dtype(q.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"flash attention on the CPU needs float32 or float64 arrays, got q of dtype {dtype}")
    return dtype


_CONFIGS: "weakref.WeakKeyDictionary[AttentionSpec, Dict[np.dtype, Tuple[Config, np.ndarray]]]" = (
    weakref.WeakKeyDictionary())
"""The Config and tile types of each live spec and dtype: a spec reused from call to call (a training loop's, see
:func:`...spec.cached_spec`) is converted once."""


def _config(bias: Optional[np.ndarray], spec: AttentionSpec, dtype: np.dtype, by_query_tile: bool = False
            ) -> Tuple[Config, np.ndarray]:
    """The spec as a :class:`Config` (dummy arrays for absent features, so that one compiled kernel serves all
    configurations), and the kernels' tile types ``(B, 1 or Hkv, Tr, Tc)``. The bias is the call's data: it goes
    into a copy of the spec's cached Config. ``by_query_tile``: for a kernel that runs one query tile at a time
    (Q-major forward, dQ), the key list's per-query-tile lists where it has them (:class:`...spec.KeyList`)."""
    by_query_tile = by_query_tile and spec.keys is not None and spec.keys.per_tile is not None
    per_dtype = _CONFIGS.get(spec)
    if per_dtype is None:
        per_dtype = _CONFIGS.setdefault(spec, {})
    entry = per_dtype.get((dtype, by_query_tile))
    if entry is None:
        entry = per_dtype[(dtype, by_query_tile)] = _spec_config(spec, dtype, by_query_tile)
    cfg, tile_types = entry
    if bias is not None:
        shape = spec.bias_shape if spec.bias_shape is not None else np.shape(bias)
        bias_arr = as_input(np.reshape(bias, shape), dtype)
        Hb = bias_arr.shape[1]
        head_div = 1 if Hb == spec.H else (spec.group if Hb == spec.Hkv else spec.H)
        cfg = cfg._replace(bias=bias_arr, has_bias=True, bias_head_div=int(head_div))
    return cfg, tile_types


def _spec_config(spec: AttentionSpec, dtype: np.dtype, by_query_tile: bool) -> Tuple[Config, np.ndarray]:
    """:func:`_config` without a bias."""
    i64 = np.dtype(np.int64)
    bias_arr, head_div = np.zeros((1, 1, 1, 1), dtype), 1
    keys, pages, topk = spec.keys, spec.pages, spec.topk
    if keys is not None and by_query_tile:
        keys = keys.per_tile
    kidx, counts = np.zeros((1, 1, 1, 1), i64), np.zeros((1, 1, 1), i64)
    if keys is not None:  # one list: (B, Hkv, 1, L) and (B, Hkv, 1); per query tile: (B, Hkv, Tr, L), (B, Hkv, Tr)
        kidx, counts = as_input(keys.kidx, i64), as_input(keys.counts, i64)
        if kidx.ndim == 3:
            kidx, counts = kidx[:, :, None], counts[:, :, None]
    block_table = as_input(pages.block_table, i64) if pages is not None else np.zeros((1, 1), i64)
    lengths = as_input(pages.lengths, i64) if pages is not None else np.zeros(1, i64)
    thr_val = as_input(topk.thr_val, dtype) if topk is not None else np.zeros((1, 1, 1), dtype)
    thr_idx = as_input(topk.thr_idx, i64) if topk is not None else np.zeros((1, 1, 1), i64)
    segs = (spec.q_seg, spec.k_seg) if spec.q_seg is not None else (np.zeros((1, 1), i64),) * 2
    bm = spec.block_mask
    bm_index = as_input(bm.index, np.int32) if bm is not None else np.full((1, 1, 1, 1), -1, np.int32)
    bm_bits = np.zeros((1, 1, 1), np.uint8)  # (its shape gives the block mask's tiles: at least one slot)
    if bm is not None:
        bm_bits = as_input(bm.bits, np.uint8) if bm.bits.size else np.zeros((1, bm.block_q, bm.block_k), np.uint8)
    per_head = lambda x: as_input(x, dtype) if x is not None else np.zeros(1, dtype)  # noqa: E731
    cfg = Config(
        as_input(spec.q_pos_b, i64), as_input(spec.k_pos_b, i64), bool(spec.causal), int(spec.window),
        int(spec.num_sinks),
        bias_arr, False, int(head_div),
        kidx, counts, keys is not None,
        block_table, int(pages.page_size) if pages is not None else 1, lengths, pages is not None,
        thr_val, thr_idx, topk is not None,
        spec.dropout > 0, np.uint64(spec.seed), np.uint64(spec.drop_threshold), dtype.type(1.0 / (1.0 - spec.dropout)),
        as_input(segs[0], i64), as_input(segs[1], i64), spec.q_seg is not None, bm_index, bm_bits, bm is not None,
        spec.has_mods, row_function(spec.score_mod, dtype) if spec.score_mod is not None else 0,
        spec.score_mod is not None, dtype.type(spec.softcap), per_head(spec.alibi), spec.alibi is not None,
        per_head(spec.sinks), spec.sinks is not None,
    )
    tiles = keys.tile_types if keys is not None else spec.kernel_tiles()
    return cfg, as_input(tiles, np.dtype(np.int8))


def forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray], spec: AttentionSpec
) -> Tuple[np.ndarray, np.ndarray]:
    """Flash attention forward: ``out (B, H, Nq, D)`` and ``lse (B, H, Nq)`` (natural log, ``-inf`` for empty rows).

    ``spec.order`` picks the Q-major (FlashAttention-2) or K-major (FlashAttention-1) loop order; Q-major with
    ``spec.num_splits > 1`` runs split-K and merges the partial results by their lse. With ``spec.pages``, ``k, v``
    are the page pools ``(num_pages, Hkv, page_size, D)``.
    """
    dtype = _check_dtype(q)
    q, k, v = (as_input(x, dtype) for x in (q, k, v))
    k_major = spec.order == TileOrder.K_MAJOR
    cfg, tile_types = _config(bias, spec, dtype, by_query_tile=not k_major)
    B, H, Nq, D = q.shape
    scale = dtype.type(spec.scale)
    Tr = tile_types.shape[2]
    if k_major:
        out = np.empty((B, H, Nq, D), dtype)
        lse = np.empty((B, H, Nq), dtype)
        m_hbm = np.empty((B, H, Nq), dtype)
        l_hbm = np.empty((B, H, Nq), dtype)
        launch(_fwd_k_major, B * H, q, k, v, out, lse, m_hbm, l_hbm, spec.block_q, spec.block_k, tile_types, scale,
               cfg)
        return out, lse
    S = spec.num_splits
    out_parts = np.empty((B, H, S, Nq, D), dtype)
    lse_parts = np.empty((B, H, S, Nq), dtype)
    launch(_fwd_q_major, B * H * Tr * S, q, k, v, out_parts, lse_parts, spec.block_q, spec.block_k, S, tile_types,
           scale, cfg)
    if S == 1:
        return out_parts.reshape(B, H, Nq, D), lse_parts.reshape(B, H, Nq)
    return merge_partials(np.moveaxis(out_parts, 2, 3), np.moveaxis(lse_parts, 2, 3))


def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray, lse: np.ndarray,
             dout: np.ndarray, spec: AttentionSpec, dlse: Optional[np.ndarray] = None
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Flash attention backward: ``(dq, dk, dv, dbias)``; ``dbias`` has the bias's shape (``None`` without a bias).

    Preprocess ``delta``, dQ (with the row sums ``rs`` of dS), ``delta += rs - dlse``, then dK/dV/dBias.
    """
    check_backward(spec)
    dtype = _check_dtype(q)
    q, k, v, out, dout, lse = (as_input(x, dtype) for x in (q, k, v, out, dout, lse))
    dlse = np.zeros(lse.shape, dtype) if dlse is None else as_input(dlse, dtype)
    cfg, tile_types = _config(bias, spec, dtype)
    B, H, Nq, D = q.shape
    Hkv = k.shape[1]
    Tr, Tc = tile_types.shape[2], tile_types.shape[3]
    scale = dtype.type(spec.scale)
    # preprocess: delta = rowsum(dO * O) - dlse
    delta = np.empty((B, H, Nq), dtype)
    launch(_bwd_preprocess, B * H, out, dout, dlse, delta)
    # a bias shared across batch rows / heads makes one dK/dV program own all of them
    nb = 1 if (cfg.has_bias and cfg.bias.shape[0] == 1) else B
    nh = 1 if (cfg.has_bias and cfg.bias.shape[1] == 1) else Hkv
    fused = not spec.refine_delta
    if fused:  # one pass: dQ in per-chunk partials, summed in chunk order
        n_chunks = fused_chunks(nb * nh, Tc, q.nbytes)
        dq_parts = np.zeros((n_chunks, B, H, Nq, D), dtype)
    else:  # dQ and the row sums of dS, which refine delta for the dK/dV pass
        dq = np.empty_like(q)
        rs = np.empty((B, H, Nq), dtype)
        cfg_q, tiles_q = _config(bias, spec, dtype, by_query_tile=True)
        launch(_bwd_dq, B * H * Tr, q, k, v, dout, lse, delta, dq, rs, spec.block_q, spec.block_k, tiles_q, scale,
               cfg_q)
        # every row of dS (with the sink's column) now sums to dlse
        delta = delta * (1 - sink_probs(lse, spec.sinks)) + rs - dlse
        n_chunks, dq_parts = Tc, np.zeros((1, 1, 1, 1, 1), dtype)
    # dK, dV (and dBias; dQ when fused)
    zeros_needed = spec.keys is not None  # a key list leaves the keys nobody keeps untouched: their gradient is 0
    dk = np.zeros_like(k) if zeros_needed else np.empty_like(k)
    dv = np.zeros_like(v) if zeros_needed else np.empty_like(v)
    dbias_arr = np.zeros(cfg.bias.shape, dtype)
    launch(_bwd_dkdv, n_chunks * nb * nh, q, k, v, dout, lse, delta, dk, dv, dbias_arr, dq_parts, fused, n_chunks,
           spec.block_q, spec.block_k, nb, nh, tile_types, scale, cfg)
    if fused:
        dq = dq_parts[0]
        for c in range(1, n_chunks):
            dq += dq_parts[c]
        dq *= scale
        if n_chunks > 1:
            dq = dq.copy()  # (not a view that keeps the other partials alive)
    dbias = None if bias is None else dbias_arr.reshape(np.shape(bias))
    return dq, dk, dv, dbias


FUSED_MIN_PROGRAMS = 8
"""The fused backward cuts each (batch, kv head)'s key tiles into chunks until there are at least this many
programs (so that a few heads still keep every thread busy). Chosen from the shape, never from the thread count:
the order of dQ's sums, hence its bits, does not depend on how many threads run."""
FUSED_PARTIALS_BYTES = 8 * 2**20
"""...but the dQ partials beyond the first stay within this many bytes: a long sequence has key tiles enough to
keep the threads busy, and flash attention's memory should stay about that of its inputs (one chunk: its partial
is the result itself)."""


def fused_chunks(n_pairs: int, n_tiles: int, dq_bytes: int = 0) -> int:
    """How many key-tile chunks (dQ partials) the fused backward runs for ``n_pairs`` (batch, kv head) programs of
    ``n_tiles`` key tiles and a dQ of ``dq_bytes``: enough for :data:`FUSED_MIN_PROGRAMS` programs, at most one per
    key tile, at most 1 + :data:`FUSED_PARTIALS_BYTES` / dq_bytes."""
    by_memory = 1 + FUSED_PARTIALS_BYTES // max(dq_bytes, 1)
    return max(1, min(n_tiles, -(-FUSED_MIN_PROGRAMS // max(n_pairs, 1)), by_memory))
