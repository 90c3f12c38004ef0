"""Flash attention backward kernels in Numba CUDA: preprocess, dK/dV, dQ (and dBias), deterministic.

With ``P = exp(s - lse)`` recomputed tile by tile from the saved ``lse``, ``keep`` the dropout mask and
``Z = P * keep / (1 - p)`` (the probabilities that multiplied V)::

    delta = rowsum(dO * O)                        (preprocess: equals rowsum(dP * P), dropout included)
    dV    = Z^T dO
    dP    = (dO V^T) * keep / (1 - p)
    dS    = P * (dP - delta)                      (= dBias, summed over the broadcast dims)
    dQ    = scale * dS K,    dK = scale * dS^T Q

* :func:`make_preprocess`: one thread per row computes ``delta``.
* :func:`make_dkdv`: one block per (key tile, b, kv head). ``dK``, ``dV`` of the key tile stay in registers while
  the block loops over the query heads of its group and over the query tiles (SKIP tiles never loaded). The score
  tile is transposed here (``R`` = keys, ``C`` = queries), so the same register-tile helpers serve.
* :func:`make_dq`: one block per (query tile, b, h), ``dQ`` in registers, looping over the key tiles.

No float atomics: every output element is written by exactly one thread. dBias is accumulated in the dK/dV kernel,
which owns key columns ``j`` and visits every query row of every head of its group: it sums over the group (a
``(B|1, Hkv, ., Nk)`` bias shared by a group) and, for a bias broadcast over query rows, over the rows, in a
fixed order, into a buffer ``dbi (B, Hi, Nqb, Nk)`` (``Hi = H`` for a per-head bias, else ``Hkv``). What remains,
the sums over the batch or over the kv heads for biases broadcast along those, is a small separate kernel
(:func:`make_dbias_reduce`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from .forward import (
    BIG,
    DENSE,
    NEG_HALF,
    SKIP,
    TileShape,
    dropout_hash,
    numba_type,
    tile_ops,
    visible,
)

_KERNELS: Dict[Tuple[Any, ...], Any] = {}

DBIAS_NONE, DBIAS_ROWS, DBIAS_ROWSUM = 0, 1, 2
"""dBias modes of the dK/dV kernel: no bias; bias with a query-row axis; bias broadcast over query rows."""


def dkdv_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """dK/dV kernel (``R`` keys x ``C`` queries): K, V, Q, dO tiles, Z and dS, lse/delta, query positions."""
    s = shape
    return itemsize * (2 * s.R * s.DP1 + 2 * s.C * s.DP1 + s.R * s.C + s.R * (s.C + 1) + 2 * s.C) + 8 * s.C


def dq_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """dQ kernel (``R`` queries x ``C`` keys): Q, dO, K, V tiles, dS, key positions."""
    s = shape
    return itemsize * (2 * s.R * s.DP1 + 2 * s.C * s.DP1 + s.R * s.C) + 8 * s.C


def make_preprocess(dtype: Any) -> Any:
    """``kernel(out, dout, delta)``: one thread per row, ``delta[b, h, i] = sum_d out * dout``."""
    key = ("pre", np.dtype(dtype).name)
    if key in _KERNELS:
        return _KERNELS[key]
    ZERO = np.dtype(dtype).type(0.0)

    def preprocess(out, dout, delta):  # type: ignore[no-untyped-def]
        row = cuda.grid(1)
        B, H, Nq, D = out.shape
        if row < B * H * Nq:
            b = row // (H * Nq)
            h = (row // Nq) % H
            i = row % Nq
            acc = ZERO
            for d in range(D):
                acc += out[b, h, i, d] * dout[b, h, i, d]
            delta[b, h, i] = acc

    _KERNELS[key] = cuda.jit(preprocess)
    return _KERNELS[key]


def make_dkdv(shape: TileShape, dtype: Any, has_bias: bool, has_dropout: bool, dbias_mode: int) -> Any:
    """dK/dV (and dBias) kernel: grid ``(Tc, B*Hkv)``, block ``(TX, TY)``; ``shape.R`` keys x ``shape.C`` queries.

    ``kernel(q, k, v, bias, dout, lse, delta, dk, dv, dbi, q_pos, k_pos_b, tile_types, block_q, block_k, scale,
    causal, window, sinks, seed, thr, rp)``. ``dbi`` must be zero-filled for ``DBIAS_ROWS``; it is ignored for
    ``DBIAS_NONE`` (pass a dummy).
    """
    key = ("dkdv", shape, np.dtype(dtype).name, bool(has_bias), bool(has_dropout), int(dbias_mode))
    if key in _KERNELS:
        return _KERNELS[key]
    ops = tile_ops(shape, dtype)
    load_rows, dot_tile, acc_tile = ops.load_rows, ops.dot_tile, ops.acc_tile
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, BIG_, NEG_HALF_ = npdt(0.0), npdt(BIG), npdt(NEG_HALF)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    C1 = C + 1
    RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
    NCOL = -(-R // NT)  # key columns per thread for the row-summed dBias
    HAS_BIAS, HAS_DROPOUT, MODE = bool(has_bias), bool(has_dropout), int(dbias_mode)

    def dkdv(q, k, v, bias, dout, lse, delta, dk, dv, dbi, q_pos, k_pos_b, tile_types,  # type: ignore[no-untyped-def]
             block_q, block_k, scale, causal, window, sinks, seed, thr, rp):
        Ks = cuda.shared.array((R, DP1), dt)
        Vs = cuda.shared.array((R, DP1), dt)
        Qs = cuda.shared.array((C, DP1), dt)
        dOs = cuda.shared.array((C, DP1), dt)
        Zs = cuda.shared.array((R, C), dt)
        dSs = cuda.shared.array((R, C1), dt)
        lse_s = cuda.shared.array(C, dt)
        del_s = cuda.shared.array(C, dt)
        qps = cuda.shared.array(C, numba.int64)
        kpos = cuda.local.array(RM, numba.int64)
        dk_acc = cuda.local.array((RM, DPT), dt)
        dv_acc = cuda.local.array((RM, DPT), dt)
        s = cuda.local.array((RM, RN), dt)
        dp = cuda.local.array((RM, RN), dt)
        colacc = cuda.local.array(NCOL, dt)

        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * TX + tx
        H = q.shape[1]
        Hkv = k.shape[1]
        group = H // Hkv
        b = cuda.blockIdx.y // Hkv
        g = cuda.blockIdx.y - b * Hkv
        Nq = q.shape[2]
        Nk = k.shape[2]
        D = q.shape[3]
        k0 = cuda.blockIdx.x * R
        tk_s = k0 // block_k
        per_head = MODE != 0 and dbi.shape[1] == H  # else the dBias buffer sums the group

        load_rows(Ks, k, b, g, k0, Nk, D, R)
        load_rows(Vs, v, b, g, k0, Nk, D, R)
        for a in range(RM):
            j = k0 + ty + a * TY
            kpos[a] = k_pos_b[b, j] if j < Nk else -1
            for e in range(DPT):
                dk_acc[a, e] = ZERO
                dv_acc[a, e] = ZERO
        for n in range(NCOL):
            colacc[n] = ZERO

        for hh in range(group):
            h = g * group + hh
            bb = 0
            hb = 0
            if HAS_BIAS:
                bb = b if bias.shape[0] > 1 else 0
                hb = h // (H // bias.shape[1])
            for tq in range((Nq + C - 1) // C):
                q0 = tq * C
                t = tile_types[b, q0 // block_q, tk_s]
                if t == SKIP:
                    continue
                masked = t != DENSE
                cuda.syncthreads()  # everyone is done with the previous Q, dO, Z, dS
                load_rows(Qs, q, b, h, q0, Nq, D, C)
                load_rows(dOs, dout, b, h, q0, Nq, D, C)
                for cc in range(tid, C, NT):
                    i = q0 + cc
                    if i < Nq:
                        li = lse[b, h, i]
                        lse_s[cc] = li if li > NEG_HALF_ else BIG_  # a row that sees no key: P = 0
                        del_s[cc] = delta[b, h, i]
                        qps[cc] = q_pos[i]
                    else:
                        lse_s[cc] = BIG_
                        del_s[cc] = ZERO
                        qps[cc] = -1
                cuda.syncthreads()

                # S^T = K Q^T and dP^T = V dO^T for this (key tile, query tile)
                dot_tile(s, Ks, Qs)
                dot_tile(dp, Vs, dOs)
                for a in range(RM):
                    kr = ty + a * TY
                    j = k0 + kr
                    for c in range(RN):
                        col = tx + c * TX
                        i = q0 + col
                        ok = j < Nk and i < Nq
                        x = s[a, c] * scale
                        if HAS_BIAS and ok:
                            x += bias[bb, hb, i if bias.shape[2] > 1 else 0, j]
                        if masked and ok:
                            ok = visible(qps[col], kpos[a], causal, window, sinks)
                        p = ZERO
                        if ok and x > NEG_HALF_:
                            p = math.exp(x - lse_s[col])
                        z = p
                        dpv = dp[a, c]
                        if HAS_DROPOUT:
                            if dropout_hash(seed, b, h, i, j) >= thr:
                                z = p * rp
                                dpv = dpv * rp
                            else:
                                z = ZERO
                                dpv = ZERO
                        Zs[kr, col] = z
                        dSs[kr, col] = p * (dpv - del_s[col])
                cuda.syncthreads()

                acc_tile(dv_acc, Zs, dOs)  # dV += Z^T dO
                acc_tile(dk_acc, dSs, Qs)  # dK += dS^T Q (times scale at the end)
                if MODE == 1:  # dBias rows: coalesced along keys, each element always by the same thread
                    hi = h if per_head else g
                    for idx in range(tid, R * C, NT):
                        ii = idx // R
                        jj = idx - ii * R
                        i = q0 + ii
                        j = k0 + jj
                        if i < Nq and j < Nk:
                            dbi[b, hi, i, j] += dSs[jj, ii]
                if MODE == 2:  # dBias summed over the query rows, in registers
                    for n in range(NCOL):
                        jj = tid + n * NT
                        if jj < R:
                            acc = colacc[n]
                            for ii in range(C):
                                acc += dSs[jj, ii]
                            colacc[n] = acc
            if MODE == 2 and per_head:
                for n in range(NCOL):
                    j = k0 + tid + n * NT
                    if tid + n * NT < R and j < Nk:
                        dbi[b, h, 0, j] = colacc[n]
                    colacc[n] = ZERO
        if MODE == 2 and not per_head:
            for n in range(NCOL):
                j = k0 + tid + n * NT
                if tid + n * NT < R and j < Nk:
                    dbi[b, g, 0, j] = colacc[n]

        for a in range(RM):
            j = k0 + ty + a * TY
            if j < Nk:
                for e in range(DPT):
                    d = tx + e * TX
                    if d < D:
                        dk[b, g, j, d] = dk_acc[a, e] * scale
                        dv[b, g, j, d] = dv_acc[a, e]

    _KERNELS[key] = cuda.jit(dkdv)
    return _KERNELS[key]


def make_dq(shape: TileShape, dtype: Any, has_bias: bool, has_dropout: bool) -> Any:
    """dQ kernel: grid ``(Tr, B*H)``, block ``(TX, TY)``; ``shape.R`` queries x ``shape.C`` keys.

    ``kernel(q, k, v, bias, dout, lse, delta, dq, q_pos, k_pos_b, tile_types, block_q, block_k, scale, causal,
    window, sinks, seed, thr, rp)``.
    """
    key = ("dq", shape, np.dtype(dtype).name, bool(has_bias), bool(has_dropout))
    if key in _KERNELS:
        return _KERNELS[key]
    ops = tile_ops(shape, dtype)
    load_rows, dot_tile, acc_tile = ops.load_rows, ops.dot_tile, ops.acc_tile
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, BIG_, NEG_HALF_ = npdt(0.0), npdt(BIG), npdt(NEG_HALF)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
    HAS_BIAS, HAS_DROPOUT = bool(has_bias), bool(has_dropout)

    def dq_kernel(q, k, v, bias, dout, lse, delta, dq, q_pos, k_pos_b, tile_types,  # type: ignore[no-untyped-def]
                  block_q, block_k, scale, causal, window, sinks, seed, thr, rp):
        Qs = cuda.shared.array((R, DP1), dt)
        dOs = cuda.shared.array((R, DP1), dt)
        Ks = cuda.shared.array((C, DP1), dt)
        Vs = cuda.shared.array((C, DP1), dt)
        dSs = cuda.shared.array((R, C), dt)
        kps = cuda.shared.array(C, numba.int64)
        qpos = cuda.local.array(RM, numba.int64)
        brow = cuda.local.array(RM, numba.int64)
        lse_r = cuda.local.array(RM, dt)
        del_r = cuda.local.array(RM, dt)
        acc = cuda.local.array((RM, DPT), dt)
        s = cuda.local.array((RM, RN), dt)
        dp = cuda.local.array((RM, RN), dt)

        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * TX + tx
        H = q.shape[1]
        b = cuda.blockIdx.y // H
        h = cuda.blockIdx.y - b * H
        hk = h // (H // k.shape[1])
        Nq = q.shape[2]
        Nk = k.shape[2]
        D = q.shape[3]
        q0 = cuda.blockIdx.x * R
        tq_s = q0 // block_q
        bb = 0
        hb = 0
        if HAS_BIAS:
            bb = b if bias.shape[0] > 1 else 0
            hb = h // (H // bias.shape[1])

        load_rows(Qs, q, b, h, q0, Nq, D, R)
        load_rows(dOs, dout, b, h, q0, Nq, D, R)
        for r in range(RM):
            i = q0 + ty + r * TY
            if i < Nq:
                qpos[r] = q_pos[i]
                li = lse[b, h, i]
                lse_r[r] = li if li > NEG_HALF_ else BIG_
                del_r[r] = delta[b, h, i]
            else:
                qpos[r] = -1
                lse_r[r] = BIG_
                del_r[r] = ZERO
            brow[r] = min(i, Nq - 1) if (HAS_BIAS and bias.shape[2] > 1) else 0
            for e in range(DPT):
                acc[r, e] = ZERO

        for tk in range((Nk + C - 1) // C):
            k0 = tk * C
            t = tile_types[b, tq_s, k0 // block_k]
            if t == SKIP:
                continue
            masked = t != DENSE
            cuda.syncthreads()  # everyone is done with the previous K, V, dS
            load_rows(Ks, k, b, hk, k0, Nk, D, C)
            load_rows(Vs, v, b, hk, k0, Nk, D, C)
            for jj in range(tid, C, NT):
                j = k0 + jj
                kps[jj] = k_pos_b[b, j] if j < Nk else -1
            cuda.syncthreads()

            dot_tile(s, Qs, Ks)
            dot_tile(dp, dOs, Vs)
            for r in range(RM):
                row = ty + r * TY
                i = q0 + row
                for c in range(RN):
                    col = tx + c * TX
                    j = k0 + col
                    ok = j < Nk and i < Nq
                    x = s[r, c] * scale
                    if HAS_BIAS and ok:
                        x += bias[bb, hb, brow[r], j]
                    if masked and ok:
                        ok = visible(qpos[r], kps[col], causal, window, sinks)
                    p = ZERO
                    if ok and x > NEG_HALF_:
                        p = math.exp(x - lse_r[r])
                    dpv = dp[r, c]
                    if HAS_DROPOUT:
                        if dropout_hash(seed, b, h, i, j) >= thr:
                            dpv = dpv * rp
                        else:
                            dpv = ZERO
                    dSs[row, col] = p * (dpv - del_r[r])
            cuda.syncthreads()
            acc_tile(acc, dSs, Ks)  # dQ += dS K (times scale at the end)

        for r in range(RM):
            i = q0 + ty + r * TY
            if i < Nq:
                for e in range(DPT):
                    d = tx + e * TX
                    if d < D:
                        dq[b, h, i, d] = acc[r, e] * scale

    _KERNELS[key] = cuda.jit(dq_kernel)
    return _KERNELS[key]


def make_dbias_reduce(dtype: Any) -> Any:
    """``kernel(dbi, dbias)``: sum ``dbi (B, Hi, Nqb, Nk)`` over the batch and head axes that ``dbias`` broadcasts.

    One thread per ``dbias`` element, fixed summation order (deterministic). ``dbias.shape[1]`` is ``Hi`` or 1.
    """
    key = ("dbias_reduce", np.dtype(dtype).name)
    if key in _KERNELS:
        return _KERNELS[key]
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

    _KERNELS[key] = cuda.jit(dbias_reduce)
    return _KERNELS[key]


def make_zero4(dtype: Any) -> Any:
    """``kernel(a)``: zero a 4-D array, one thread per element."""
    key = ("zero4", np.dtype(dtype).name)
    if key in _KERNELS:
        return _KERNELS[key]
    ZERO = np.dtype(dtype).type(0.0)

    def zero4(a):  # type: ignore[no-untyped-def]
        idx = cuda.grid(1)
        n0, n1, n2, n3 = a.shape
        if idx < n0 * n1 * n2 * n3:
            a[idx // (n1 * n2 * n3), (idx // (n2 * n3)) % n1, (idx // n3) % n2, idx % n3] = ZERO

    _KERNELS[key] = cuda.jit(zero4)
    return _KERNELS[key]
