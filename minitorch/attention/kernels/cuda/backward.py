"""The CUDA backward: one tile step that recomputes ``P_ij`` and ``dS_ij``, and the kernels that configure it.

FlashAttention-2's Algorithm 2, split as in Triton's tutorial, deterministic (no float atomics). With ``P_ij =
exp(S_ij - lse_i)`` recomputed from the saved ``lse``, ``Z_ij = P_ij * keep / (1 - p)`` (what multiplied ``V``)::

    delta_i = rowsum(dO_i * O_i) - dlse_i            preprocess (line 4)
    dP_ij   = (dO_i V_j^T) * keep / (1 - p)           line 13
    dS_ij   = P_ij * (dP_ij - delta_i)                line 14 (exactly 0 where the pair is masked)
    dQ_i   += scale dS_ij K_j                         line 15 (dQ kernel)
    dV_j   += Z_ij^T dO_i,  dK_j += scale dS_ij^T Q_i  lines 12, 16 (dK/dV kernel)

:func:`make_bwd_step` builds ``bwd_step`` (lines 11-14 for one register tile), used by both kernels:

* :func:`make_dq`: one block per (query tile, b, h), ``dQ_i`` in registers, looping over the key tiles; it also
  sums every row of ``dS`` (``rs``) and writes the refined ``delta_kv = delta + rs - dlse`` for the dK/dV pass, so
  that the rows of ``dS`` there sum to ``dlse`` (what a bias broadcast over the keys' rows, like DMA's ``z``,
  needs; see :func:`minitorch.attention.kernels.simple.flash.backward`).
* :func:`make_dkdv`: one block per (key tile, b, kv head); the tile is transposed (``R`` keys x ``C`` queries),
  ``dK_j, dV_j`` stay in registers while the block loops over the query heads of its group and their query tiles.
  It also accumulates dBias (:data:`DBIAS_ROWS`: ``dS`` itself; :data:`DBIAS_ROWSUM`: ``dS`` summed over the query
  rows, DMA's ``dz``), written at the key rows of the key source. Biases broadcast over the batch or over heads are
  summed afterwards by :func:`make_dbias_reduce`.

As in the forward, a TRIANGLE tile records its visible pairs, and when an operand of a product (``K_j``; ``Q_i``
or ``dO_i``) holds NaN or Inf the product leaves the masked pairs out.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from .tiles import (
    QF_DELTA,
    QF_LSE,
    SKIP,
    TRIANGLE,
    Flags,
    TileShape,
    cached,
    device,
    dropout_hash,
    flags_key,
    kernel,
    numba_type,
    tile_ops,
    u32,
)

_KERNELS: Dict[Tuple[Any, ...], Any] = {}

DBIAS_NONE, DBIAS_ROWS, DBIAS_ROWSUM = 0, 1, 2
"""dBias modes of the dK/dV kernel: no bias; a bias with a query-row axis; a bias broadcast over query rows."""


def dq_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """dQ kernel (``R`` queries x ``C`` keys): ``Q_i, dO_i, K_j, V_j``, ``dS`` and ``dP`` (padded), three row values
    (floats); the visible pairs (bytes); three row values, key rows and positions (int64)."""
    s = shape
    return (itemsize * (2 * s.R * s.DP1 + 2 * s.C * s.DP1 + 2 * s.R * s.CP + 3 * s.R) + s.R * s.CP
            + 8 * (3 * s.R + 2 * s.C))


def dkdv_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """dK/dV kernel (``R`` keys x ``C`` queries): ``K_j, V_j, Q_i, dO_i``, ``Z``, ``dS``, three query values
    (floats); the visible pairs (bytes); three query values, key rows and positions (int64)."""
    s = shape
    return (itemsize * (2 * s.R * s.DP1 + 2 * s.C * s.DP1 + 2 * s.R * s.CP + 3 * s.C) + s.R * s.CP
            + 8 * (3 * s.C + 2 * s.R))


def _key(name: str, shape: Any, dtype: Any, flags: Flags, *extra: Any) -> Tuple[Any, ...]:
    return (name, shape, np.dtype(dtype).name, flags_key(flags)) + extra


# ---------------------------------------------------------------------------------------------------------------------
# The backward tile step
# ---------------------------------------------------------------------------------------------------------------------


def make_bwd_step(shape: TileShape, dtype: Any, flags: Flags, key_rows: bool) -> Callable:
    """``bwd_step(s, dp, Ts, dSs, vis, rsum, qf, qn, jt, kps, b, h, bb, hb, q0, masked, Nq, cfg)``: FA2
    Algorithm 2, lines 11-14, for the thread's register tile.

    In: ``s = Q_i K_j^T`` and ``dp = dO_i V_j^T`` (register tiles ``(RM, RN)``; transposed when ``key_rows``: the
    register rows are keys, the dK/dV kernel). The query tile's values are its query table ``qf, qn`` (with
    ``lse`` and ``delta``), the key tile's rows and positions ``jt, kps``. Out, at the tile's ``(row, col)``:
    ``dSs = dT_ij`` (``dS_ij`` through the score modification: the gradient of ``scale Q K^T + bias``), ``Ts = Z_ij``
    (``key_rows``) or ``dS_ij`` (before the modification), ``vis`` (TRIANGLE tiles); ``rsum[r] +=`` the sum of the
    thread's values in register row ``r``: of ``dS`` for query rows (delta's refinement), of ``dT`` for key rows
    (the bias gradient). The per-pair work runs on the shared tiles ``dSs`` (``S``, then ``dT``) and ``Ts`` (``dP``,
    then ``Z`` or ``dS``), as in the forward: a loop the compiler may leave rolled for a long score modification.
    """
    ops = tile_ops(shape, dtype, flags)
    score = ops.score
    ZERO = np.dtype(dtype).type(0.0)
    TY, TX, RM, RN = shape.TY, shape.TX, shape.RM, shape.RN
    HAS_DROPOUT, KEY_ROWS = bool(flags.has_dropout), bool(key_rows)

    def bwd_step(s, dp, Ts, dSs, vis, rsum, qf, qn, jt, kps, b, h, bb, hb, q0, masked, Nq, cfg):  # type: ignore[no-untyped-def]
        ty = u32(cuda.threadIdx.y)
        tx = u32(cuda.threadIdx.x)
        for a in range(RM):  # the register tiles into the shared ones
            for c in range(RN):
                dSs[ty + u32(a * TY), tx + u32(c * TX)] = s[a, c] * cfg.scale
                Ts[ty + u32(a * TY), tx + u32(c * TX)] = dp[a, c]
        for a in range(RM):
            row = ty + u32(a * TY)
            for c in range(RN):
                col = tx + u32(c * TX)
                qi = col if KEY_ROWS else row  # the pair's place in the query tile and in the key tile
                kc = row if KEY_ROWS else col
                j = jt[kc]
                # line 11: S_ij, modified and masked exactly as in the forward; line 12: P_ij = exp(S_ij - lse_i)
                x, ok, dsdt = score(dSs[row, col], qi, j, kps[kc], qf, qn, q0, masked, b, h, bb, hb, Nq, cfg)
                p = math.exp(x - qf[QF_LSE, qi]) if ok else ZERO
                # line 13: dP_ij (dropout regenerated from the hash); line 14: dS_ij = P_ij (dP_ij - delta_i)
                z = p
                dpv = Ts[row, col]
                if HAS_DROPOUT:
                    if dropout_hash(cfg.seed, b, h, q0 + qi, j) >= cfg.drop_threshold:
                        z = p * cfg.inv_keep
                        dpv = dpv * cfg.inv_keep
                    else:
                        z = ZERO
                        dpv = ZERO
                ds = p * (dpv - qf[QF_DELTA, qi]) if ok else ZERO  # a masked pair: 0, whatever V holds there
                dSs[row, col] = ds * dsdt if ok else ZERO  # dT: through score_mod and softcap
                Ts[row, col] = z if KEY_ROWS else ds
                if masked:
                    vis[row, col] = 1 if ok else 0
        for a in range(RM):  # the row sums: of dT for key rows, of dS for query rows
            for c in range(RN):
                if KEY_ROWS:
                    rsum[a] += dSs[ty + u32(a * TY), tx + u32(c * TX)]
                else:
                    rsum[a] += Ts[ty + u32(a * TY), tx + u32(c * TX)]

    return device(bwd_step)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------


def make_preprocess(dtype: Any) -> Any:
    """``kernel(out, dout, dlse, has_dlse, delta)``, one thread per row: ``delta = rowsum(dO * O) - dlse`` (FA2
    Algorithm 2, line 4; ``dlse`` is read only when ``has_dlse``)."""

    def build() -> Any:
        ZERO = np.dtype(dtype).type(0.0)

        def preprocess(out, dout, dlse, has_dlse, delta):  # type: ignore[no-untyped-def]
            row = cuda.grid(1)
            B, H, Nq, D = out.shape
            if row < B * H * Nq:
                b = row // (H * Nq)
                h = (row // Nq) % H
                i = row % Nq
                acc = ZERO
                for d in range(D):
                    acc += out[b, h, i, d] * dout[b, h, i, d]
                if has_dlse:
                    acc -= dlse[b, h, i]
                delta[b, h, i] = acc

        return cuda.jit(preprocess)

    return cached(_KERNELS, ("pre", np.dtype(dtype).name), build)


def make_dq(shape: TileShape, dtype: Any, flags: Flags) -> Any:
    """dQ kernel: grid ``(Tr, B*H)``, block ``(TX, TY)``; ``shape.R`` queries x ``shape.C`` keys.

    ``kernel(q, k, v, dout, lse, delta, dlse, has_dlse, dq, delta_kv, tile_types, block_q, block_k, cfg)``: writes
    ``dq`` and ``delta_kv = delta + rowsum(dS) - dlse`` (the delta of the dK/dV pass).
    """

    def build() -> Any:
        ops = tile_ops(shape, dtype, flags)
        load_rows, n_keys, load_keys, gather_rows = ops.load_rows, ops.n_keys, ops.load_keys, ops.gather_rows
        dot_tile, acc_tile, load_queries, row_sum = ops.dot_tile, ops.acc_tile, ops.load_queries, ops.row_sum
        step = make_bwd_step(shape, dtype, flags, key_rows=False)
        dt = numba_type(dtype)
        ZERO = np.dtype(dtype).type(0.0)
        R, C, CP, DP1, TY, TX = shape.R, shape.C, shape.CP, shape.DP1, shape.TY, shape.TX
        RM, RN, DPT = shape.RM, shape.RN, shape.DPT
        HAS_BIAS, HAS_SINKS = bool(flags.has_bias), bool(flags.has_sinks)

        def dq_kernel(q, k, v, dout, lse, delta, dlse, has_dlse, dq, delta_kv, tile_types, block_q, block_k, cfg):  # type: ignore[no-untyped-def]
            # the query tile (fixed for the block), the key tile (streamed), the (query, key) tiles
            Qs = cuda.shared.array((R, DP1), dt)
            dOs = cuda.shared.array((R, DP1), dt)
            qf = cuda.shared.array((3, R), dt)
            qn = cuda.shared.array((3, R), numba.int64)
            Ks = cuda.shared.array((C, DP1), dt)
            Vs = cuda.shared.array((C, DP1), dt)
            jt = cuda.shared.array(C, numba.int64)
            kps = cuda.shared.array(C, numba.int64)
            dSs = cuda.shared.array((R, CP), dt)
            Ts = cuda.shared.array((R, CP), dt)  # dP, then dS before the score modification
            vis = cuda.shared.array((R, CP), numba.uint8)
            acc = cuda.local.array((RM, DPT), dt)
            rsum = cuda.local.array(RM, dt)
            s = cuda.local.array((RM, RN), dt)
            dp = cuda.local.array((RM, RN), dt)

            ty = cuda.threadIdx.y
            tx = cuda.threadIdx.x
            H = q.shape[1]
            b = cuda.blockIdx.y // H
            h = cuda.blockIdx.y - b * H
            g = h // (H // k.shape[1])
            Nq = q.shape[2]
            D = q.shape[3]
            q0 = cuda.blockIdx.x * R
            bb = 0
            hb = 0
            if HAS_BIAS:
                bb = b if cfg.bias.shape[0] > 1 else 0
                hb = h // (H // cfg.bias.shape[1])

            # load Q_i, dO_i, lse_i, delta_i; dQ_i = 0
            load_rows(Qs, q, b, h, q0, Nq, D, R)
            load_rows(dOs, dout, b, h, q0, Nq, D, R)
            load_queries(qf, qn, b, h, g, q0, R, Nq, lse, delta, cfg, True)
            for r in range(RM):
                rsum[r] = ZERO
                for e in range(DPT):
                    acc[r, e] = ZERO

            n = n_keys(b, g, k.shape[2], cfg)
            gt = h // (H // tile_types.shape[1])  # the tile types of this head
            for tk in range((n + C - 1) // C):  # every key tile this query tile sees
                c0 = tk * C
                t = tile_types[b, gt, q0 // block_q, c0 // block_k]
                if t == SKIP:
                    continue
                masked = t == TRIANGLE
                # load K_j, V_j through the key source (once everyone is done with the previous ones and dS)
                cuda.syncthreads()
                load_keys(jt, kps, b, g, c0, n, cfg)
                k_bad = gather_rows(Ks, k, b, g, c0, n, D, C, cfg)
                gather_rows(Vs, v, b, g, c0, n, D, C, cfg)
                bad = cuda.syncthreads_or(k_bad)
                # lines 11-14: S_ij, dP_ij, then P_ij and dS_ij
                dot_tile(s, Qs, Ks)
                dot_tile(dp, dOs, Vs)
                step(s, dp, Ts, dSs, vis, rsum, qf, qn, jt, kps, b, h, bb, hb, q0, masked, Nq, cfg)
                cuda.syncthreads()
                # line 15: dQ_i += dS_ij K_j (times scale, below)
                acc_tile(acc, dSs, Ks, vis, masked and bad != 0)

            for r in range(RM):
                i = q0 + ty + r * TY
                if i < Nq:
                    for e in range(DPT):
                        d = tx + e * TX
                        if d < D:
                            dq[b, h, i, d] = acc[r, e] * cfg.scale
            # rs_i = rowsum(dS_i): the partial sums of the row's TX threads (warp shuffles, a fixed order)
            for r in range(RM):
                rs = row_sum(rsum[r])
                row = ty + r * TY
                i = q0 + row
                if tx == 0 and i < Nq:
                    refined = qf[QF_DELTA, row] + rs
                    if HAS_SINKS:  # the sink's column of dS, -P_sink delta (P_sink = 0 for lse = -inf: MAX)
                        refined -= qf[QF_DELTA, row] * math.exp(cfg.sinks[h] - qf[QF_LSE, row])
                    if has_dlse:
                        refined -= dlse[b, h, i]
                    delta_kv[b, h, i] = refined

        return kernel(dq_kernel, shape)

    return cached(_KERNELS, _key("dq", shape, dtype, flags), build)


def make_dkdv(shape: TileShape, dtype: Any, flags: Flags, dbias_mode: int) -> Any:
    """dK/dV (and dBias) kernel: grid ``(Tc, B*Hkv)``, block ``(TX, TY)``; ``shape.R`` keys x ``shape.C`` queries.

    ``kernel(q, k, v, dout, lse, delta_kv, dk, dv, dbi, tile_types, block_q, block_k, cfg)``. ``dbi (B, Hi, Nqb,
    Nk)`` (``Hi = H`` for a per-head bias, else ``Hkv``: the group's heads summed) must be zero-filled for
    :data:`DBIAS_ROWS` and with a key list (keys in no list keep 0, as do ``dk``, ``dv``); a dummy without a bias.
    Every element is written by one thread, summed in a fixed order.
    """

    def build() -> Any:
        ops = tile_ops(shape, dtype, flags)
        load_rows, n_keys, load_keys, gather_rows = ops.load_rows, ops.n_keys, ops.load_keys, ops.gather_rows
        dot_tile, acc_tile, load_queries, row_sum = ops.dot_tile, ops.acc_tile, ops.load_queries, ops.row_sum
        step = make_bwd_step(shape, dtype, flags, key_rows=True)
        dt = numba_type(dtype)
        ZERO = np.dtype(dtype).type(0.0)
        R, C, CP, DP1, TY, TX = shape.R, shape.C, shape.CP, shape.DP1, shape.TY, shape.TX
        RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
        HAS_BIAS, MODE = bool(flags.has_bias), int(dbias_mode)

        @device
        def write_rowsum(rsum, jt, dbi, b, hi):  # type: ignore[no-untyped-def]
            """dBias of a bias broadcast over query rows: ``dbi[b, hi, 0, j] = sum_i dS_ij``, the partial sums of
            the key row's TX threads (warp shuffles, a fixed order); the partials restart from 0."""
            for a in range(RM):
                acc = row_sum(rsum[a])
                rsum[a] = ZERO
                j = jt[cuda.threadIdx.y + a * TY]
                if cuda.threadIdx.x == 0 and j >= 0:
                    dbi[b, hi, 0, j] = acc

        def dkdv(q, k, v, dout, lse, delta_kv, dk, dv, dbi, tile_types, block_q, block_k, cfg):  # type: ignore[no-untyped-def]
            H = q.shape[1]
            Hkv = k.shape[1]
            group = H // Hkv
            b = cuda.blockIdx.y // Hkv
            g = cuda.blockIdx.y - b * Hkv
            c0 = cuda.blockIdx.x * R
            n = n_keys(b, g, k.shape[2], cfg)
            if c0 >= n:  # uniform over the block: this (b, g) has fewer key tiles
                return

            # the key tile (fixed for the block), the query tile (streamed), the (key, query) tiles
            Ks = cuda.shared.array((R, DP1), dt)
            Vs = cuda.shared.array((R, DP1), dt)
            jt = cuda.shared.array(R, numba.int64)
            kps = cuda.shared.array(R, numba.int64)
            Qs = cuda.shared.array((C, DP1), dt)
            dOs = cuda.shared.array((C, DP1), dt)
            qf = cuda.shared.array((3, C), dt)
            qn = cuda.shared.array((3, C), numba.int64)
            Zs = cuda.shared.array((R, CP), dt)
            dSs = cuda.shared.array((R, CP), dt)
            vis = cuda.shared.array((R, CP), numba.uint8)
            dk_acc = cuda.local.array((RM, DPT), dt)
            dv_acc = cuda.local.array((RM, DPT), dt)
            rsum = cuda.local.array(RM, dt)
            s = cuda.local.array((RM, RN), dt)
            dp = cuda.local.array((RM, RN), dt)

            ty = cuda.threadIdx.y
            tx = cuda.threadIdx.x
            tid = ty * TX + tx
            Nq = q.shape[2]
            D = q.shape[3]
            per_head = MODE != 0 and dbi.shape[1] == H  # else the dBias buffer sums the group's heads

            # lines 6-7: load K_j, V_j through the key source; dK_j = dV_j = 0
            load_keys(jt, kps, b, g, c0, n, cfg)
            gather_rows(Ks, k, b, g, c0, n, D, R, cfg)
            gather_rows(Vs, v, b, g, c0, n, D, R, cfg)
            cuda.syncthreads()
            for a in range(RM):
                rsum[a] = ZERO
                for e in range(DPT):
                    dk_acc[a, e] = ZERO
                    dv_acc[a, e] = ZERO

            for hh in range(group):  # the query heads that read kv head g
                h = g * group + hh
                gt = h // (H // tile_types.shape[1])  # the tile types of this head
                bb = 0
                hb = 0
                if HAS_BIAS:
                    bb = b if cfg.bias.shape[0] > 1 else 0
                    hb = h // (H // cfg.bias.shape[1])
                for tq in range((Nq + C - 1) // C):  # line 8: for each query tile that sees K_j
                    q0 = tq * C
                    t = tile_types[b, gt, q0 // block_q, c0 // block_k]
                    if t == SKIP:
                        continue
                    masked = t == TRIANGLE
                    # line 9: load Q_i, dO_i, lse_i, delta_i (once everyone is done with the previous ones)
                    cuda.syncthreads()
                    q_bad = load_rows(Qs, q, b, h, q0, Nq, D, C)
                    q_bad |= load_rows(dOs, dout, b, h, q0, Nq, D, C)
                    load_queries(qf, qn, b, h, g, q0, C, Nq, lse, delta_kv, cfg, True)
                    bad = cuda.syncthreads_or(q_bad)
                    # lines 11-14, transposed: S^T = K_j Q_i^T, dP^T = V_j dO_i^T, then Z and dS
                    dot_tile(s, Ks, Qs)
                    dot_tile(dp, Vs, dOs)
                    step(s, dp, Zs, dSs, vis, rsum, qf, qn, jt, kps, b, h, bb, hb, q0, masked, Nq, cfg)
                    cuda.syncthreads()
                    careful = masked and bad != 0
                    acc_tile(dv_acc, Zs, dOs, vis, careful)  # line 12: dV_j += Z_ij^T dO_i
                    acc_tile(dk_acc, dSs, Qs, vis, careful)  # line 16: dK_j += dS_ij^T Q_i (times scale below)
                    if MODE == DBIAS_ROWS:  # dBias = dS: coalesced along keys, each element always by one thread
                        hi = h if per_head else g
                        for idx in range(tid, R * C, NT):
                            ii = idx // R
                            jj = idx - ii * R
                            i = q0 + ii
                            j = jt[jj]
                            if i < Nq and j >= 0:
                                dbi[b, hi, i, j] += dSs[jj, ii]
                if MODE == DBIAS_ROWSUM and per_head:
                    write_rowsum(rsum, jt, dbi, b, h)
            if MODE == DBIAS_ROWSUM and not per_head:
                write_rowsum(rsum, jt, dbi, b, g)

            # line 18: write dK_j, dV_j at the key rows
            for a in range(RM):
                j = jt[ty + a * TY]
                if j >= 0:
                    for e in range(DPT):
                        d = tx + e * TX
                        if d < D:
                            dk[b, g, j, d] = dk_acc[a, e] * cfg.scale
                            dv[b, g, j, d] = dv_acc[a, e]

        return kernel(dkdv, shape)

    return cached(_KERNELS, _key("dkdv", shape, dtype, flags, int(dbias_mode)), build)


def make_dbias_reduce(dtype: Any) -> Any:
    """``kernel(dbi, dbias)``: sum ``dbi (B, Hi, Nqb, Nk)`` over the batch and head axes that ``dbias`` broadcasts
    (``dbias.shape[1]`` is ``Hi`` or 1). One thread per ``dbias`` element, fixed order (deterministic)."""

    def build() -> Any:
        ZERO = np.dtype(dtype).type(0.0)

        def dbias_reduce(dbi, dbias):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            Bb, Hb, Nqb, Nk = dbias.shape
            if idx < Bb * Hb * Nqb * Nk:
                j = idx % Nk
                i = (idx // Nk) % Nqb
                hb = (idx // (Nk * Nqb)) % Hb
                bb = idx // (Nk * Nqb * Hb)
                nb = dbi.shape[0] if Bb == 1 else 1
                nh = dbi.shape[1] if Hb == 1 else 1
                acc = ZERO
                for x in range(nb):
                    for y in range(nh):
                        acc += dbi[bb + x, hb + y, i, j]
                dbias[bb, hb, i, j] = acc

        return cuda.jit(dbias_reduce)

    return cached(_KERNELS, ("dbias_reduce", np.dtype(dtype).name), build)


def make_sinks_backward(dtype: Any) -> Any:
    """``kernel(out, dout, lse, dlse, has_dlse, sinks, dsinks)``, one thread per head ``h``: ``dsinks[h] =
    -sum_(b, i) exp(sinks[h] - lse[b, h, i]) (rowsum(dO O) - dlse)`` (:mod:`minitorch.attention.sinks`), in a fixed
    order."""

    def build() -> Any:
        ZERO = np.dtype(dtype).type(0.0)

        def sinks_backward(out, dout, lse, dlse, has_dlse, sinks, dsinks):  # type: ignore[no-untyped-def]
            h = cuda.grid(1)
            B, H, Nq, D = out.shape
            if h < H:
                acc = ZERO
                for b in range(B):
                    for i in range(Nq):
                        delta = ZERO
                        for d in range(D):
                            delta += dout[b, h, i, d] * out[b, h, i, d]
                        if has_dlse:
                            delta -= dlse[b, h, i]
                        acc += math.exp(sinks[h] - lse[b, h, i]) * delta
                dsinks[h] = -acc

        return cuda.jit(sinks_backward)

    return cached(_KERNELS, ("sinks_bwd", np.dtype(dtype).name), build)
