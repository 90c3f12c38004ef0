"""The CUDA forward: one tile step of the online softmax, and the kernels that configure it.

:func:`make_fwd_step` builds ``fwd_step``, FlashAttention-2's Algorithm 1 lines 6-10 for one ``R x C`` tile: load
the key tile ``K_j`` through the key source, ``S_ij = scale Q_i K_j^T`` modified by the spec (bias, the visibility
rule in TRIANGLE tiles, DMA's top-k rule, dropout), and fold it into each query row's running state::

    m_new = max(m_i, rowmax(S_ij))                       (m: running row max, a finite sentinel until a key is seen)
    P_ij  = exp(S_ij - m_new)
    l_i   = exp(m_i - m_new) l_i + rowsum(P_ij)          (l: running row sum; of the undropped P, so lse ignores dropout)
    O_i   = exp(m_i - m_new) O_i + dropout(P_ij) V_j     (O: unnormalized output, registers)

Every forward kernel is this step in a loop:

* :func:`make_forward_q_major` (FlashAttention-2): grid ``(Tr * S, B*H)``; block ``(tq, split sp)`` keeps ``O_i,
  m_i, l_i`` of query tile ``tq`` in registers and streams the key tiles ``[sp Tsp, (sp + 1) Tsp)`` of its split
  (``Tsp = ceil(Tc / S)``), writing a normalized partial ``(O, lse)``; :func:`make_merge` combines the ``S``
  partials by their lse (split-K). ``S = 1`` is plain FA2. A decode step (ring or paged cache) is this kernel at
  one query row with one split per key tile, its tile in the split layout (:mod:`.tiles`): 128 threads on a GPU,
  4 lanes per key over ``d`` (consecutive lanes, consecutive ``d``), 32 groups of keys each with its own running
  ``(m, l, O)``, merged at the end of the block.
* :func:`make_forward_k_major` (FlashAttention-1, Algorithm 1): the outer loop over key tiles is a loop of
  launches; for key tile ``j`` a block per query tile reads ``O_i, l_i, m_i`` from global memory, runs the same
  step and writes them back. :func:`make_k_major_init` / :func:`make_k_major_finish` set up and finish.

SKIP tiles are never loaded, DENSE tiles skip the per-pair tests, TRIANGLE tiles record which pairs are visible
(``vis``); when such a tile's ``V_j`` holds NaN or Inf the product ``P_ij V_j`` leaves the masked pairs out, so a
key a query does not see is never read for it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from .tiles import (
    SKIP,
    TRIANGLE,
    Flags,
    TileShape,
    cached,
    device,
    dropout_hash,
    flags_key,
    kernel,
    nan_max,
    numba_type,
    sentinels,
    tile_ops,
    u32,
)

_KERNELS: Dict[Tuple[Any, ...], Any] = {}


def forward_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """Shared memory of the forward kernels: ``Q_i``, ``K_j`` and ``V_j`` (one buffer with ``shape.one_kv``),
    ``P_ij`` (padded), the query table (floats and int64); the visibility of the tile's pairs (bytes); key rows and
    positions (int64); in the split layout the groups' ``(m, l, O)`` for their merge."""
    s = shape
    floats = s.R * s.DP1 + (1 if s.one_kv else 2) * s.C * s.DP1 + s.R * s.CP + 3 * s.R
    if s.split:
        floats += s.R * s.TX * (s.DP + 2)
    return itemsize * floats + s.R * s.CP + 8 * (2 * s.C + 3 * s.R)


def _key(name: str, shape: Any, dtype: Any, flags: Flags) -> Tuple[Any, ...]:
    return (name, shape, np.dtype(dtype).name, flags_key(flags))


# ---------------------------------------------------------------------------------------------------------------------
# The forward tile step
# ---------------------------------------------------------------------------------------------------------------------


def make_fwd_step(shape: TileShape, dtype: Any, flags: Flags) -> Callable:
    """``fwd_step(Qs, qf, qn, o, m_i, l_i, k, v, b, h, g, bb, hb, q0, c0, n, masked, Nq, D, cfg)``: fold the key
    tile of entries ``[c0, c0 + C)`` into ``(o, m_i, l_i)`` (FA2 Algorithm 1, lines 6-10; the module docstring).

    From the caller: ``Qs (R, DP1)`` the query tile and ``qf, qn`` its query table (shared); per thread ``o (RM,
    DPT)``, ``m_i, l_i (RM,)`` the state. ``n``: entries of the key sequence; ``masked``: a TRIANGLE tile. The
    step's own shared scratch: ``Ks, Vs (C, DP1)`` (one buffer with ``shape.one_kv``: ``V_j`` replaces ``K_j``),
    ``Ps (R, CP)`` the (dropped-out) probabilities, ``vis (R, CP)`` the visible pairs, ``jt, kps (C,)`` the key rows
    and positions. Row max and row sum are warp shuffles among the ``TX`` threads of a row: three barriers per key
    tile (four with one K/V buffer). In the split layout (one query row, :class:`~.tiles.TileShape` ``TD > 1``)
    each group of ``TD`` lanes is a row of its own over its key columns: the same lines, with no row reduction
    (``row_max``, ``row_sum`` return their argument) and ``O_i`` of the group's own keys; the kernel merges the
    groups at the end (``merge``).
    """
    ops = tile_ops(shape, dtype, flags)
    load_keys, gather_rows, score = ops.load_keys, ops.gather_rows, ops.score
    dot_tile, acc_tile, row_max, row_sum = ops.dot_tile, ops.acc_tile, ops.row_max, ops.row_sum
    dt = numba_type(dtype)
    ZERO = np.dtype(dtype).type(0.0)
    MIN, _ = sentinels(dtype)
    R, C, CP, DP1, TY, TX = shape.R, shape.C, shape.CP, shape.DP1, shape.TY, shape.TX
    RM, RN, DPT = shape.RM, shape.RN, shape.DPT
    HAS_DROPOUT, ONE_KV = bool(flags.has_dropout), bool(shape.one_kv)
    TD = shape.TD

    def fwd_step(Qs, qf, qn, o, m_i, l_i, k, v, b, h, g, bb, hb, q0, c0, n, masked, Nq, D, cfg):  # type: ignore[no-untyped-def]
        Ks = cuda.shared.array((C, DP1), dt)
        Vs = Ks if ONE_KV else cuda.shared.array((C, DP1), dt)
        Ps = cuda.shared.array((R, CP), dt)
        vis = cuda.shared.array((R, CP), numba.uint8)
        jt = cuda.shared.array(C, numba.int64)
        kps = cuda.shared.array(C, numba.int64)
        ty = u32(cuda.threadIdx.y)
        tx = u32(u32(cuda.threadIdx.x) // u32(TD)) if TD > 1 else u32(cuda.threadIdx.x)  # (split: its lane group)

        # line 6: load K_j, V_j through the key source (once every thread is done with the previous ones and P_ij);
        # the barrier also tells every thread whether V_j holds a NaN or Inf
        cuda.syncthreads()
        load_keys(jt, kps, b, g, c0, n, cfg)
        gather_rows(Ks, k, b, g, c0, n, D, C, cfg)
        bad = 0
        if ONE_KV:
            cuda.syncthreads()
        else:
            bad = cuda.syncthreads_or(gather_rows(Vs, v, b, g, c0, n, D, C, cfg))

        # line 8: S_ij = scale Q_i K_j^T (the register tile, then in Ps)
        s = cuda.local.array((RM, RN), dt)
        m_new = cuda.local.array(RM, dt)
        dot_tile(s, Qs, Ks)
        for r in range(RM):
            for c in range(RN):
                Ps[ty + u32(r * TY), tx + u32(c * TX)] = s[r, c] * cfg.scale
        # ... modified pair by pair in Ps (bias, score mods, visibility, top-k; masked pairs hold MIN). The per-pair
        # code can be long (a variant, the top-k rule): this loop touches only shared memory, so that the compiler
        # may leave it rolled without moving the register tiles to local memory
        for r in range(RM):
            row = ty + u32(r * TY)
            for c in range(RN):
                col = tx + u32(c * TX)
                x, ok, _ = score(Ps[row, col], row, jt[col], kps[col], qf, qn, q0, masked, b, h, bb, hb, Nq, cfg)
                if masked:
                    vis[row, col] = 1 if ok else 0
                Ps[row, col] = x if ok else MIN
        # line 9: m_new = max(m_i, rowmax(S_ij)) (the row's TX threads: warp shuffles)
        # BEGIN SOLUTION task5_4: per register row: m_new (nan_max, row_max), P = exp(S - m_new) in Ps, l_i, o rescaled
        for r in range(RM):
            mx = MIN
            for c in range(RN):
                x = Ps[ty + u32(r * TY), tx + u32(c * TX)]
                s[r, c] = x
                mx = nan_max(mx, x)
            m_new[r] = nan_max(m_i[r], row_max(mx))

        # line 9: P_ij = exp(S_ij - m_new) into Ps; line 10: l_i = e^{m_i - m_new} l_i + rowsum(P_ij),
        # O_i = diag(e^{m_i - m_new}) O_i (+ P_ij V_j below)
        for r in range(RM):
            row = ty + u32(r * TY)
            mt = m_new[r]
            seen = mt != MIN  # a row that has seen no key yet (every score masked or -inf): every P is 0
            rs = ZERO
            for c in range(RN):
                p = math.exp(s[r, c] - mt) if seen else ZERO
                rs += p
                Ps[row, tx + u32(c * TX)] = p
            alpha = math.exp(m_i[r] - mt)
            l_i[r] = l_i[r] * alpha + row_sum(rs)
            m_i[r] = mt
            for e in range(DPT):
                o[r, e] *= alpha
        # END SOLUTION
        if HAS_DROPOUT:  # what multiplies V_j: the kept probabilities over (1 - p) (l_i is of the undropped P)
            for r in range(RM):
                row = ty + u32(r * TY)
                for c in range(RN):
                    col = tx + u32(c * TX)
                    keep = dropout_hash(cfg.seed, b, h, q0 + row, jt[col]) >= cfg.drop_threshold
                    Ps[row, col] = Ps[row, col] * cfg.inv_keep if keep else ZERO
        cuda.syncthreads()  # P_ij complete (and, with one buffer, K_j no longer read: V_j replaces it)
        if ONE_KV:
            bad = cuda.syncthreads_or(gather_rows(Vs, v, b, g, c0, n, D, C, cfg))
        acc_tile(o, Ps, Vs, vis, masked and bad != 0)

    return device(fwd_step)


def _block_parts(shape: TileShape, dtype: Any, flags: Flags) -> Tuple[Callable, Callable]:
    """The two ends of a forward block, shared by both orders:

    * ``begin(Qs, qf, qn, q, b, h, g, q0, cfg) -> (bb, hb)``: load ``Q_i`` and its query table (line 4); the
      bias's batch and head for (b, h);
    * ``normalize(o, l_i, out2, q0, Nq, D)``: ``out2[i] = O_i / l_i`` for the block's rows of ``out2 (Nq, D)``, 0
      for a row that saw no key (line 12). Split layout: after ``merge``, the first group writes.
    """
    ops = tile_ops(shape, dtype, flags)
    load_rows, load_queries = ops.load_rows, ops.load_queries
    ft = np.dtype(dtype).type
    ZERO, ONE = ft(0.0), ft(1.0)
    R, TY, TX, RM, DPT = shape.R, shape.TY, shape.TX, shape.RM, shape.DPT
    TD, SPLIT = shape.TD, shape.split
    HAS_BIAS = bool(flags.has_bias)

    def begin(Qs, qf, qn, q, b, h, g, q0, cfg):  # type: ignore[no-untyped-def]
        Nq = q.shape[2]
        load_rows(Qs, q, b, h, q0, Nq, q.shape[3], R)  # visible to all after the step's first barrier
        load_queries(qf, qn, b, h, g, q0, R, Nq, cfg.thr_val, cfg.thr_val, cfg, False)  # (no lse, delta)
        bb = 0
        hb = 0
        if HAS_BIAS:
            bb = b if cfg.bias.shape[0] > 1 else 0
            hb = h // (q.shape[1] // cfg.bias.shape[1])
        return bb, hb

    def normalize(o, l_i, out2, q0, Nq, D):  # type: ignore[no-untyped-def]
        if SPLIT and cuda.threadIdx.x >= TD:  # split layout: every group holds the merged row; the first writes
            return
        for r in range(RM):
            i = q0 + cuda.threadIdx.y + r * TY
            if i < Nq:
                li = l_i[r]
                inv = ONE / li if li != ZERO else ZERO
                for e in range(DPT):
                    d = cuda.threadIdx.x + e * (TD if SPLIT else TX)
                    if d < D:
                        out2[i, d] = o[r, e] * inv

    return device(begin), device(normalize)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


def make_forward_q_major(shape: TileShape, dtype: Any, flags: Flags) -> Any:
    """FlashAttention-2 forward with split-K: grid ``(Tr * S, B*H)``, block ``(TX, TY)``.

    ``kernel(q, k, v, out, lse, tile_types, block_q, block_k, S, cfg)``: ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk,
    D)``, ``tile_types (B, 1 or Hkv, Tr, Tc)`` at tiles ``(block_q, block_k)``; writes the partial results of the
    ``S`` splits, ``out (B, H, S, Nq, D)`` (normalized) and ``lse (B, H, S, Nq)`` (``-inf``: the split saw no key).
    """

    def build() -> Any:
        step = make_fwd_step(shape, dtype, flags)
        begin, normalize = _block_parts(shape, dtype, flags)
        n_keys, merge = tile_ops(shape, dtype, flags).n_keys, tile_ops(shape, dtype, flags).merge
        dt = numba_type(dtype)
        ft = np.dtype(dtype).type
        ZERO, ONE, NEG_INF = ft(0.0), ft(1.0), ft(-np.inf)
        MIN, _ = sentinels(dtype)
        R, C, DP1, TY, RM, DPT = shape.R, shape.C, shape.DP1, shape.TY, shape.RM, shape.DPT
        TD = shape.TD
        HAS_SINKS = bool(flags.has_sinks)

        def forward_q_major(q, k, v, out, lse, tile_types, block_q, block_k, S, cfg):  # type: ignore[no-untyped-def]
            Qs = cuda.shared.array((R, DP1), dt)
            qf = cuda.shared.array((3, R), dt)
            qn = cuda.shared.array((3, R), numba.int64)
            o = cuda.local.array((RM, DPT), dt)
            m_i = cuda.local.array(RM, dt)
            l_i = cuda.local.array(RM, dt)
            tq = cuda.blockIdx.x // S
            sp = cuda.blockIdx.x - tq * S
            H = q.shape[1]
            b = cuda.blockIdx.y // H
            h = cuda.blockIdx.y - b * H
            g = h // (H // k.shape[1])  # GQA / MQA: the kv head this query head reads, in place
            Nq = q.shape[2]
            q0 = tq * R

            # line 4: load Q_i; O_i = 0, l_i = 0, m_i = MIN (the finite stand-in for -inf); with learnable sinks the
            # first split starts from the sink's term instead, m_i = sinks[h], l_i = 1 (a sink has no value; in the
            # split layout the first group's)
            bb, hb = begin(Qs, qf, qn, q, b, h, g, q0, cfg)
            with_sink = HAS_SINKS and sp == 0 and (TD == 1 or cuda.threadIdx.x < TD)
            for r in range(RM):
                m_i[r] = cfg.sinks[h] if with_sink else MIN
                l_i[r] = ONE if with_sink else ZERO
                for e in range(DPT):
                    o[r, e] = ZERO

            # line 5: for each key tile of this split, [sp Tsp, (sp + 1) Tsp) (SKIP tiles are never loaded)
            n = n_keys(b, g, k.shape[2], cfg)
            Tc = (n + C - 1) // C
            per = (Tc + S - 1) // S
            gt = h // (H // tile_types.shape[1])  # the tile types of this head (per batch row, kv head or head)
            for tk in range(sp * per, min(Tc, (sp + 1) * per)):
                c0 = tk * C
                t = tile_types[b, gt, q0 // block_q, c0 // block_k]
                if t != SKIP:
                    step(Qs, qf, qn, o, m_i, l_i, k, v, b, h, g, bb, hb, q0, c0, n, t == TRIANGLE, Nq, q.shape[3],
                         cfg)

            # lines 12-13: O_i = diag(l_i)^-1 O_i, lse_i = m_i + log(l_i); a row that saw no key: 0 and -inf
            merge(o, m_i, l_i)  # (split layout: the groups' rows as one)
            normalize(o, l_i, out[b, h, sp], q0, Nq, q.shape[3])
            for r in range(RM):
                i = q0 + cuda.threadIdx.y + r * TY
                if cuda.threadIdx.x == 0 and i < Nq:
                    li = l_i[r]
                    lse[b, h, sp, i] = m_i[r] + math.log(li) if li != ZERO else NEG_INF

        return kernel(forward_q_major, shape)

    return cached(_KERNELS, _key("fwd_q", shape, dtype, flags), build)


def make_forward_k_major(shape: TileShape, dtype: Any, flags: Flags) -> Any:
    """FlashAttention-1 (Algorithm 1) for ONE key tile ``tk``: grid ``(Tr, B*H)``, block ``(TX, TY)``.

    ``kernel(q, k, v, out, m_buf, l_buf, tile_types, block_q, block_k, tk, cfg)``; the launcher runs it for every
    key tile in order (the algorithm's outer loop). Each block reads ``O_i`` (normalized, in ``out``), ``m_i`` and
    ``l_i`` ("HBM"), folds key tile ``tk`` in with the same step as Q-major, and writes them back.
    """

    if shape.split:
        raise ValueError("the K-major forward keeps one state per row in global memory: no split layout")

    def build() -> Any:
        step = make_fwd_step(shape, dtype, flags)
        begin, normalize = _block_parts(shape, dtype, flags)
        n_keys = tile_ops(shape, dtype, flags).n_keys
        dt = numba_type(dtype)
        ZERO = np.dtype(dtype).type(0.0)
        R, C, DP1, TY, TX, RM, DPT = shape.R, shape.C, shape.DP1, shape.TY, shape.TX, shape.RM, shape.DPT

        def forward_k_major(q, k, v, out, m_buf, l_buf, tile_types, block_q, block_k, tk, cfg):  # type: ignore[no-untyped-def]
            tq = cuda.blockIdx.x
            H = q.shape[1]
            b = cuda.blockIdx.y // H
            h = cuda.blockIdx.y - b * H
            g = h // (H // k.shape[1])
            q0 = tq * R
            c0 = tk * C
            n = n_keys(b, g, k.shape[2], cfg)
            if c0 >= n:  # uniform over the block: this (b, g) has fewer key tiles
                return
            t = tile_types[b, h // (H // tile_types.shape[1]), q0 // block_q, c0 // block_k]
            if t == SKIP:  # uniform over the block: the tile is never loaded
                return
            Qs = cuda.shared.array((R, DP1), dt)
            qf = cuda.shared.array((3, R), dt)
            qn = cuda.shared.array((3, R), numba.int64)
            o = cuda.local.array((RM, DPT), dt)
            m_i = cuda.local.array(RM, dt)
            l_i = cuda.local.array(RM, dt)
            Nq = q.shape[2]
            D = q.shape[3]

            # line 8: load Q_i, O_i, l_i, m_i; keep diag(l_i) O_i, the unnormalized output
            bb, hb = begin(Qs, qf, qn, q, b, h, g, q0, cfg)
            for r in range(RM):
                ir = min(q0 + cuda.threadIdx.y + r * TY, Nq - 1)
                m_i[r] = m_buf[b, h, ir]
                l_i[r] = l_buf[b, h, ir]
                for e in range(DPT):
                    d = cuda.threadIdx.x + e * TX
                    o[r, e] = out[b, h, ir, d] * l_i[r] if d < D else ZERO

            # lines 9-11: the online-softmax step
            step(Qs, qf, qn, o, m_i, l_i, k, v, b, h, g, bb, hb, q0, c0, n, t == TRIANGLE, Nq, D, cfg)

            # lines 12-13: write O_i = diag(l_i^new)^-1 (...), l_i, m_i back
            normalize(o, l_i, out[b, h], q0, Nq, D)
            for r in range(RM):
                i = q0 + cuda.threadIdx.y + r * TY
                if cuda.threadIdx.x == 0 and i < Nq:
                    m_buf[b, h, i] = m_i[r]
                    l_buf[b, h, i] = l_i[r]

        return kernel(forward_k_major, shape)

    return cached(_KERNELS, _key("fwd_k", shape, dtype, flags), build)


def make_k_major_init(dtype: Any) -> Any:
    """``kernel(out, m_buf, l_buf, sinks, has_sinks)``, one thread per query row: ``O = 0``, ``m = MIN``, ``l = 0``
    (Algorithm 1, line 2), or with learnable sinks ``m = sinks[h]``, ``l = 1``."""

    def build() -> Any:
        ZERO, ONE = np.dtype(dtype).type(0.0), np.dtype(dtype).type(1.0)
        MIN, _ = sentinels(dtype)

        def k_major_init(out, m_buf, l_buf, sinks, has_sinks):  # type: ignore[no-untyped-def]
            row = cuda.grid(1)
            B, H, Nq, D = out.shape
            if row < B * H * Nq:
                b = row // (H * Nq)
                h = (row // Nq) % H
                i = row % Nq
                m_buf[b, h, i] = sinks[h] if has_sinks else MIN
                l_buf[b, h, i] = ONE if has_sinks else ZERO
                for d in range(D):
                    out[b, h, i, d] = ZERO

        return cuda.jit(k_major_init)

    return cached(_KERNELS, ("fwd_k_init", np.dtype(dtype).name), build)


def make_k_major_finish(dtype: Any) -> Any:
    """``kernel(lse, m_buf, l_buf)``, one thread per row: ``lse = m + log(l)`` (``-inf`` where ``l == 0``)."""

    def build() -> Any:
        ft = np.dtype(dtype).type
        ZERO, NEG_INF = ft(0.0), ft(-np.inf)

        def k_major_finish(lse, m_buf, l_buf):  # type: ignore[no-untyped-def]
            row = cuda.grid(1)
            B, H, Nq = lse.shape
            if row < B * H * Nq:
                b = row // (H * Nq)
                h = (row // Nq) % H
                i = row % Nq
                li = l_buf[b, h, i]
                lse[b, h, i] = m_buf[b, h, i] + math.log(li) if li != ZERO else NEG_INF

        return cuda.jit(k_major_finish)

    return cached(_KERNELS, ("fwd_k_finish", np.dtype(dtype).name), build)


def make_merge(dtype: Any) -> Any:
    """``kernel(out_p, lse_p, out, lse)``, one thread per output element: merge ``S`` split partials by their lse
    (:mod:`minitorch.attention.merge`)::

        M = max_s lse_s;  lse = M + log(sum_s exp(lse_s - M));  out = sum_s exp(lse_s - M) out_s / sum_s exp(...)

    ``out_p (B, H, S, Nq, D)``, ``lse_p (B, H, S, Nq)``. A split that saw no key (``lse_s = -inf``) has weight 0 and
    is never read; a row that no split saw gets 0 and ``-inf``; a NaN partial makes the row NaN.
    """

    def build() -> Any:
        ft = np.dtype(dtype).type
        ZERO, NEG_INF = ft(0.0), ft(-np.inf)
        MIN, _ = sentinels(dtype)

        def merge(out_p, lse_p, out, lse):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            B, H, S, Nq, D = out_p.shape
            if idx >= B * H * Nq * D:
                return
            d = idx % D
            i = (idx // D) % Nq
            h = (idx // (D * Nq)) % H
            b = idx // (D * Nq * H)
            M = MIN
            seen = False
            nan = ZERO  # x - x: 0 for every finite lse_s, NaN if one is NaN
            for s in range(S):
                x = lse_p[b, h, s, i]
                if x != NEG_INF:
                    seen = True
                    M = max(M, x)
                    nan += x - x
            if not seen:
                out[b, h, i, d] = ZERO
                if d == 0:
                    lse[b, h, i] = NEG_INF
                return
            den = ZERO
            num = ZERO
            for s in range(S):
                x = lse_p[b, h, s, i]
                if x != NEG_INF:
                    w = math.exp(x - M)
                    den += w
                    if w != ZERO:
                        num += w * out_p[b, h, s, i, d]
            out[b, h, i, d] = num / den + nan
            if d == 0:
                lse[b, h, i] = M + math.log(den) + nan

        return cuda.jit(merge)

    return cached(_KERNELS, ("merge", np.dtype(dtype).name), build)
