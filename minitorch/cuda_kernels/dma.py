"""Dynamic mask attention in Numba CUDA: importance, selection and the fused forward / backward kernels.

The six functions of every DMA implementation (:mod:`minitorch.attention.dma`), on numba device arrays::

    importance(v, dt_proj, a_coef, log_space) -> (z, u)
    importance_backward(dz, v, dt_proj, a_coef, z, u, log_space, dv) -> (dv, d_dt_proj, d_a_coef)   (dv in place)
    select(z, spec) -> Selection
    forward(q, k, v, z, sel, spec) -> (out, lse)
    backward(q, k, v, z, sel, out, lse, dout, spec) -> (dq, dk, dv, dz)

Kernels:

* importance: one thread per ``(b, g, j)`` (``u``, ``z``); backward: ``du`` per ``(b, g, j)``, ``d_dt_proj`` per
  ``(g, c)`` and ``d_a_coef`` per ``g`` (each a fixed-order sum over ``b, j``: deterministic), ``dv += dx`` per
  ``(b, kv head, j, d)``.
* selection: one thread per ``(b, g)`` runs :func:`~minitorch.attention.dma.build_selection`'s heap sweep (the
  same source the CPU runs), the heap in a global scratch array; the tile flags: one thread per query tile.
* forward (grid ``(Tr, B*H)``), dQ (grid ``(Tr, B*H)``, run first: its row sums of dS refine ``delta``) and
  dK/dV/dz (grid ``(Tc, B*Hkv)``): flash attention's
  kernels (:mod:`.flash_forward`, :mod:`.flash_backward`, whose register-tile helpers they reuse) over the tiles of
  the compacted key list: K/V rows are gathered through ``kidx``, ``z`` is added to the scores, TRIANGLE tiles
  test membership with the row thresholds, SKIP tiles are never loaded. dz is the row sum of the dK/dV block's
  ``dS^T`` tile, summed in a fixed order; no atomics anywhere.

Written for a real GPU: sizes that shape arrays are compile-time constants captured by the factories, constants
are typed with the kernel's dtype, masked scores use a finite sentinel, shared memory stays within 48 KB. In the
simulator (tests) tiles and thread blocks are tiny.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from ..attention.dma import DMASpec, Selection, build_selection, empty_threshold
from .flash_backward import make_preprocess, make_zero4
from .flash_forward import (
    BIG,
    DENSE,
    NEG,
    NEG_HALF,
    SKIP,
    SMEM_LIMIT,
    TileShape,
    device,
    dropout_hash,
    numba_type,
    tile_ops,
)

DeviceArray = Any
ROW_THREADS = 128
"""Threads per block of the one-thread-per-element kernels."""

_KERNELS: Dict[Tuple[Any, ...], Any] = {}

_select_head, _tile_flags = build_selection(cuda.jit(device=True))


def _kept(zj, j, qp, causal, tv, ti):  # type: ignore[no-untyped-def]
    """Does the row that sees keys ``<= qp`` (with causal) and has threshold ``(tv, ti)`` keep key ``j`` of
    importance ``zj``?"""
    if causal and j > qp:
        return False
    return zj > tv or (zj == tv and j <= ti)


kept = device(_kept)


def _tile_kept(zj, j, qp, causal, tv, ti, t):  # type: ignore[no-untyped-def]
    """Is list entry ``j`` (``-1``: past the end of the list) a key the row keeps, in a tile of type ``t`` (DENSE:
    every listed key is kept, no per-element test)?"""
    if j < 0:
        return False
    if t == DENSE:
        return True
    return kept(zj, j, qp, causal, tv, ti)


tile_kept = device(_tile_kept)


def _grid1(n: int) -> Tuple[int, int]:
    return (max(1, -(-n // ROW_THREADS)), ROW_THREADS)


def _cached(key: Tuple[Any, ...], build: Any) -> Any:
    if key not in _KERNELS:
        _KERNELS[key] = build()
    return _KERNELS[key]


# ---------------------------------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------------------------------


def make_importance(dtype: Any, log_space: bool) -> Any:
    """``kernel(v, dt_proj, a_coef, z, u)``, one thread per ``(b, g, j)``: ``u = concat_heads(v)[b, j] . dt_proj[g]``,
    ``z = exp(a softplus(u))`` (log space: ``a softplus(u)``)."""
    npdt = np.dtype(dtype).type
    ZERO = npdt(0.0)
    LOG = bool(log_space)

    def build() -> Any:
        def importance_kernel(v, dt, a, z, u):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            B, Hkv, Nk, D = v.shape
            if idx < B * Hkv * Nk:
                b = idx // (Hkv * Nk)
                g = (idx // Nk) % Hkv
                j = idx % Nk
                acc = ZERO
                for hk in range(Hkv):
                    for d in range(D):
                        acc += v[b, hk, j, d] * dt[g, hk * D + d]
                u[b, g, j] = acc
                sp = max(acc, ZERO) + math.log1p(math.exp(-abs(acc)))
                gate = a[g] * sp
                z[b, g, j] = gate if LOG else math.exp(gate)

        return cuda.jit(importance_kernel)

    return _cached(("importance", np.dtype(dtype).name, LOG), build)


def make_importance_du(dtype: Any, log_space: bool) -> Any:
    """``kernel(dz, z, u, a_coef, du, dza)`` per ``(b, g, j)``: ``du = dz dz/du``, ``dza = dz dz/da``."""
    npdt = np.dtype(dtype).type
    ZERO, ONE = npdt(0.0), npdt(1.0)
    LOG = bool(log_space)

    def build() -> Any:
        def du_kernel(dz, z, u, a, du, dza):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            B, Hkv, Nk = dz.shape
            if idx < B * Hkv * Nk:
                b = idx // (Hkv * Nk)
                g = (idx // Nk) % Hkv
                j = idx % Nk
                x = u[b, g, j]
                sp = max(x, ZERO) + math.log1p(math.exp(-abs(x)))
                sig = ONE / (ONE + math.exp(-x))
                d = dz[b, g, j]
                if LOG:
                    du[b, g, j] = d * a[g] * sig
                    dza[b, g, j] = d * sp
                else:
                    zz = z[b, g, j]
                    du[b, g, j] = d * zz * a[g] * sig
                    dza[b, g, j] = d * zz * sp

        return cuda.jit(du_kernel)

    return _cached(("importance_du", np.dtype(dtype).name, LOG), build)


def make_importance_grads(dtype: Any) -> Tuple[Any, Any, Any]:
    """``(d_dt_kernel(du, v, d_dt), d_a_kernel(dza, d_a), dx_kernel(du, dt_proj, dv))``: fixed-order sums."""
    ZERO = np.dtype(dtype).type(0.0)

    def build() -> Tuple[Any, Any, Any]:
        def d_dt_kernel(du, v, d_dt):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)  # one thread per (g, c)
            B, Hkv, Nk, D = v.shape
            if idx < Hkv * Hkv * D:
                g = idx // (Hkv * D)
                c = idx % (Hkv * D)
                hk = c // D
                d = c % D
                acc = ZERO
                for b in range(B):
                    for j in range(Nk):
                        acc += du[b, g, j] * v[b, hk, j, d]
                d_dt[g, c] = acc

        def d_a_kernel(dza, d_a):  # type: ignore[no-untyped-def]
            g = cuda.grid(1)
            B, Hkv, Nk = dza.shape
            if g < Hkv:
                acc = ZERO
                for b in range(B):
                    for j in range(Nk):
                        acc += dza[b, g, j]
                d_a[g] = acc

        def dx_kernel(du, dt, dv):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)  # one thread per (b, kv head, j, d): dv += d concat_heads^-1(du @ dt_proj)
            B, Hkv, Nk, D = dv.shape
            if idx < B * Hkv * Nk * D:
                b = idx // (Hkv * Nk * D)
                hk = (idx // (Nk * D)) % Hkv
                j = (idx // D) % Nk
                d = idx % D
                acc = ZERO
                for g in range(Hkv):
                    acc += du[b, g, j] * dt[g, hk * D + d]
                dv[b, hk, j, d] += acc

        return cuda.jit(d_dt_kernel), cuda.jit(d_a_kernel), cuda.jit(dx_kernel)

    return _cached(("importance_grads", np.dtype(dtype).name), build)


def importance(v: DeviceArray, dt_proj: DeviceArray, a_coef: DeviceArray, log_space: bool
               ) -> Tuple[DeviceArray, DeviceArray]:
    """``(z, u)``, ``(B, Hkv, Nk)`` device arrays."""
    dtype = np.dtype(v.dtype)
    B, Hkv, Nk, _ = v.shape
    z = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    u = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    if B * Hkv * Nk > 0:
        blocks, threads = _grid1(B * Hkv * Nk)
        make_importance(dtype, log_space)[blocks, threads](v, dt_proj, a_coef, z, u)
    return z, u


def importance_backward(dz: DeviceArray, v: DeviceArray, dt_proj: DeviceArray, a_coef: DeviceArray, z: DeviceArray,
                        u: DeviceArray, log_space: bool, dv: DeviceArray) -> Tuple[DeviceArray, DeviceArray, DeviceArray]:
    """Chain ``dz`` into ``(dv (updated in place), d_dt_proj, d_a_coef)``."""
    dtype = np.dtype(v.dtype)
    B, Hkv, Nk, D = v.shape
    du = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    dza = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    d_dt = cuda.device_array((Hkv, Hkv * D), dtype=dtype)
    d_a = cuda.device_array((Hkv,), dtype=dtype)
    if B * Hkv * Nk > 0:
        blocks, threads = _grid1(B * Hkv * Nk)
        make_importance_du(dtype, log_space)[blocks, threads](dz, z, u, a_coef, du, dza)
    d_dt_k, d_a_k, dx_k = make_importance_grads(dtype)
    blocks, threads = _grid1(Hkv * Hkv * D)
    d_dt_k[blocks, threads](du, v, d_dt)
    d_a_k[1, max(1, Hkv)](dza, d_a)
    if B * Hkv * Nk * D > 0:
        blocks, threads = _grid1(B * Hkv * Nk * D)
        dx_k[blocks, threads](du, dt_proj, dv)
    return dv, d_dt, d_a


# ---------------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------------


@cuda.jit
def select_kernel(z, k_pos_b, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx, kidx, counts, compact, big):  # type: ignore[no-untyped-def]
    """One thread per (batch, kv head): the heap sweep (thresholds, lifetimes, compacted key list)."""
    p = cuda.grid(1)
    Hkv = z.shape[1]
    if p < z.shape[0] * Hkv:
        _select_head(z, k_pos_b, p // Hkv, p % Hkv, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx,
                     kidx, counts, compact, big)


@cuda.jit
def flags_kernel(kidx, counts, evict, Br, Bc, causal, off, Nq, types):  # type: ignore[no-untyped-def]
    """One thread per (batch, kv head, query tile): the tile flags."""
    p = cuda.grid(1)
    B, Hkv, Tr = types.shape[0], types.shape[1], types.shape[2]
    if p < B * Hkv * Tr:
        _tile_flags(kidx, counts, evict, p // (Hkv * Tr), (p // Tr) % Hkv, p % Tr, Br, Bc, causal, off, Nq, types)


def _fits(Br: int, Bc: int, D: int, itemsize: int) -> bool:
    return (forward_smem_bytes(TileShape.make(Br, Bc, D), itemsize) <= SMEM_LIMIT
            and dq_smem_bytes(TileShape.make(Br, Bc, D), itemsize) <= SMEM_LIMIT
            and dkdv_smem_bytes(TileShape.make(Bc, Br, D), itemsize) <= SMEM_LIMIT)


def dma_tiles(spec: DMASpec, itemsize: int) -> Tuple[int, int]:
    """``(Br, Bc)`` of all DMA kernels: the spec's blocks (``default_block_sizes(D, "cuda")`` unless the call gave
    others), halved while larger than the sequence (or the number of
    kept keys) or while a kernel's shared memory exceeds 48 KB."""
    Br, Bc = spec.block_q, spec.block_k
    n_keys = max(1, min(spec.Nk, spec.keep if spec.compact and not spec.causal else spec.Nk))
    while Br % 2 == 0 and Br // 2 >= max(spec.Nq, 1):
        Br //= 2
    while Bc % 2 == 0 and Bc // 2 >= n_keys:
        Bc //= 2
    while not _fits(Br, Bc, spec.D, itemsize):
        if Br % 2 == 0 and (Br >= Bc or Bc % 2 != 0):
            Br //= 2
        elif Bc % 2 == 0:
            Bc //= 2
        else:
            raise ValueError(f"CUDA DMA: head_dim={spec.D} does not fit {SMEM_LIMIT} bytes of shared memory; "
                             "pass smaller block_q/block_k")
    return Br, Bc


def _k_pos_b(spec: DMASpec) -> DeviceArray:
    if "cuda_k_pos_b" not in spec.extra:
        spec.extra["cuda_k_pos_b"] = cuda.to_device(np.ascontiguousarray(spec.attn.k_pos_b, dtype=np.int64))
    return spec.extra["cuda_k_pos_b"]


def select(z: DeviceArray, spec: DMASpec) -> Selection:
    """The selection on the device (thresholds, lifetimes, compacted list, tile flags at the kernels' tiles)."""
    dtype = np.dtype(z.dtype)
    B, Hkv, Nq, Nk = spec.B, spec.Hkv, spec.Nq, spec.Nk
    Br, Bc = dma_tiles(spec, dtype.itemsize)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    cap = max(1, min(spec.keep, Nk))
    sel = Selection(
        cuda.device_array((B, Hkv, Nq), dtype=dtype), cuda.device_array((B, Hkv, Nq), dtype=np.int64),
        cuda.device_array((B, Hkv, Nk), dtype=np.int64), cuda.device_array((B, Hkv, Nk), dtype=np.int64),
        cuda.device_array((B, Hkv), dtype=np.int64), cuda.device_array((B, Hkv, Tr, Tc), dtype=np.int8), Br, Bc,
    )
    if B * Hkv == 0:
        return sel
    hv = cuda.device_array((B, Hkv, cap), dtype=dtype)
    hi = cuda.device_array((B, Hkv, cap), dtype=np.int64)
    victim = cuda.device_array((B, Hkv, max(Nk, 1)), dtype=np.int64)
    threads = min(ROW_THREADS, 32)
    select_kernel[-(-B * Hkv // threads), threads](
        z, _k_pos_b(spec), np.int64(spec.keep), bool(spec.causal), np.int64(spec.off), hv, hi, sel.evict, victim,
        sel.thr_val, sel.thr_idx, sel.kidx, sel.counts, bool(spec.compact), empty_threshold(dtype))
    if B * Hkv * Tr * Tc > 0:
        blocks, threads = _grid1(B * Hkv * Tr)
        flags_kernel[blocks, threads](sel.kidx, sel.counts, sel.evict, np.int64(Br), np.int64(Bc), bool(spec.causal),
                                      np.int64(spec.off), np.int64(Nq), sel.types)
    return sel


# ---------------------------------------------------------------------------------------------------------------------
# Shared memory
# ---------------------------------------------------------------------------------------------------------------------


def forward_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """Forward: Q tile, one K/V tile, P, two row-reduction buffers, z of the key tile; key indices (int64)."""
    s = shape
    return itemsize * (s.R * s.DP1 + s.C * s.DP1 + s.R * s.C + 2 * s.R * s.TX + s.C) + 8 * s.C


def dq_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """dQ (``R`` queries x ``C`` keys): Q, dO, K, V tiles, dS, z, the row-sum reduction buffer; key indices."""
    s = shape
    return itemsize * (2 * s.R * s.DP1 + 2 * s.C * s.DP1 + s.R * s.C + s.C + s.R * s.TX) + 8 * s.C


def dkdv_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """dK/dV (``R`` keys x ``C`` queries): K, V, Q, dO tiles, Z, dS, lse/delta/threshold values; positions and
    threshold indices of the queries (int64)."""
    s = shape
    return itemsize * (2 * s.R * s.DP1 + 2 * s.C * s.DP1 + s.R * s.C + s.R * (s.C + 1) + 3 * s.C) + 16 * s.C


# ---------------------------------------------------------------------------------------------------------------------
# Fused kernels
# ---------------------------------------------------------------------------------------------------------------------


def make_gather_rows(shape: TileShape, dtype: Any, rows: int) -> Any:
    """``gather_rows(dst, src, b, g, kidx, c0, count, D)``: ``dst[r, d] = src[b, g, kidx[b, g, c0 + r], d]`` for
    ``c0 + r < count`` and ``d < D``, zero elsewhere (``rows`` rows; cooperative over the block)."""
    ZERO = np.dtype(dtype).type(0.0)
    DP, TX, NT = shape.DP, shape.TX, shape.threads
    ROWS = int(rows)

    def gather_rows(dst, src, b, g, kidx, c0, count, D):  # type: ignore[no-untyped-def]
        tid = cuda.threadIdx.y * TX + cuda.threadIdx.x
        for idx in range(tid, ROWS * DP, NT):
            r = idx // DP
            d = idx - r * DP
            c = c0 + r
            if c < count and d < D:
                dst[r, d] = src[b, g, kidx[b, g, c], d]
            else:
                dst[r, d] = ZERO

    return device(gather_rows)


def make_load_keys(shape: TileShape, dtype: Any) -> Any:
    """``load_keys(kjs, zs, z, kidx, b, g, c0, count)``: ``kjs[jj] = kidx[b, g, c0 + jj]`` and
    ``zs[jj] = z[b, g, kjs[jj]]`` for ``c0 + jj < count``, ``-1`` and zero elsewhere (``C`` entries; cooperative)."""
    ZERO = np.dtype(dtype).type(0.0)
    C, TX, NT = shape.C, shape.TX, shape.threads

    def load_keys(kjs, zs, z, kidx, b, g, c0, count):  # type: ignore[no-untyped-def]
        tid = cuda.threadIdx.y * TX + cuda.threadIdx.x
        for jj in range(tid, C, NT):
            c = c0 + jj
            if c < count:
                j = kidx[b, g, c]
                kjs[jj] = j
                zs[jj] = z[b, g, j]
            else:
                kjs[jj] = -1
                zs[jj] = ZERO

    return device(load_keys)


def make_load_thresholds(shape: TileShape, dtype: Any) -> Any:
    """``load_thresholds(qpos, tv, ti, thr_val, thr_idx, b, g, q0, Nq, off)``: the position and the threshold of
    each of the thread's ``RM`` query rows (``-1``, zero, ``-1`` past ``Nq``)."""
    ZERO = np.dtype(dtype).type(0.0)
    RM, TY = shape.RM, shape.TY

    def load_thresholds(qpos, tv, ti, thr_val, thr_idx, b, g, q0, Nq, off):  # type: ignore[no-untyped-def]
        ty = cuda.threadIdx.y
        for r in range(RM):
            i = q0 + ty + r * TY
            qpos[r] = -1
            tv[r] = ZERO
            ti[r] = -1
            if i < Nq:
                qpos[r] = off + i
                tv[r] = thr_val[b, g, i]
                ti[r] = thr_idx[b, g, i]

    return device(load_thresholds)


def make_grad_element(dtype: Any, has_dropout: bool) -> Any:
    """``grad_element(sv, zj, j, qp, tv, ti, t, valid, lse_i, delta_i, dpv, causal, scale, seed, b, h, i, thr, rp)
    -> (pz, ds)`` of both backward kernels: the recomputed probability ``p = exp(scale sv + zj - lse_i)`` (0 where
    the row does not keep the key), ``pz = p Z`` (dropped out) and ``dS = p (dP Z - delta_i)``."""
    npdt = np.dtype(dtype).type
    ZERO, NEG_HALF_ = npdt(0.0), npdt(NEG_HALF)
    HAS_DROPOUT = bool(has_dropout)

    def grad_element(sv, zj, j, qp, tv, ti, t, valid, lse_i, delta_i, dpv,  # type: ignore[no-untyped-def]
                     causal, scale, seed, b, h, i, thr, rp):
        ok = valid and tile_kept(zj, j, qp, causal, tv, ti, t)
        x = sv * scale + zj
        p = ZERO
        if ok and x > NEG_HALF_:
            p = math.exp(x - lse_i)
        pz = p
        if HAS_DROPOUT:
            if ok and dropout_hash(seed, b, h, i, j) >= thr:
                pz = p * rp
                dpv = dpv * rp
            else:
                pz = ZERO
                dpv = ZERO
        return pz, p * (dpv - delta_i)

    return device(grad_element)


def make_forward(shape: TileShape, dtype: Any, has_dropout: bool) -> Any:
    """Fused DMA forward, grid ``(Tr, B*H)``, block ``(TX, TY)``: ``R`` queries x ``C`` keys of the list.

    ``kernel(q, k, v, z, kidx, counts, types, thr_val, thr_idx, out, lse, causal, off, scale, seed, thr, rp)``.
    """
    key = ("dma_fwd", shape, np.dtype(dtype).name, bool(has_dropout))
    if key in _KERNELS:
        return _KERNELS[key]
    ops = tile_ops(shape, dtype)
    load_rows, dot_tile, acc_tile = ops.load_rows, ops.dot_tile, ops.acc_tile
    gather_rows = make_gather_rows(shape, dtype, shape.C)
    load_keys = make_load_keys(shape, dtype)
    load_thresholds = make_load_thresholds(shape, dtype)
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, ONE, NEG_, NEG_HALF_, NEG_INF = npdt(0.0), npdt(1.0), npdt(NEG), npdt(NEG_HALF), npdt(-np.inf)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
    HAS_DROPOUT = bool(has_dropout)

    def dma_forward(q, k, v, z, kidx, counts, types, thr_val, thr_idx, out, lse,  # type: ignore[no-untyped-def]
                    causal, off, scale, seed, thr, rp):
        Qs = cuda.shared.array((R, DP1), dt)
        KVs = cuda.shared.array((C, DP1), dt)
        Ps = cuda.shared.array((R, C), dt)
        red_m = cuda.shared.array((R, TX), dt)
        red_l = cuda.shared.array((R, TX), dt)
        zs = cuda.shared.array(C, dt)
        kjs = cuda.shared.array(C, numba.int64)
        qpos = cuda.local.array(RM, numba.int64)
        tv = cuda.local.array(RM, dt)
        ti = cuda.local.array(RM, numba.int64)
        o = cuda.local.array((RM, DPT), dt)
        m_i = cuda.local.array(RM, dt)
        l_i = cuda.local.array(RM, dt)
        s = cuda.local.array((RM, RN), dt)
        m_new = cuda.local.array(RM, dt)

        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * TX + tx
        tq = cuda.blockIdx.x
        H = q.shape[1]
        b = cuda.blockIdx.y // H
        h = cuda.blockIdx.y - b * H
        g = h // (H // k.shape[1])
        Nq = q.shape[2]
        D = q.shape[3]
        q0 = tq * R
        load_thresholds(qpos, tv, ti, thr_val, thr_idx, b, g, q0, Nq, off)
        for r in range(RM):
            m_i[r] = NEG_
            l_i[r] = ZERO
            for e in range(DPT):
                o[r, e] = ZERO
        load_rows(Qs, q, b, h, q0, Nq, D, R)

        count = counts[b, g]
        for tc in range((count + C - 1) // C):
            t = types[b, g, tq, tc]
            if t == SKIP:  # uniform over the block: never loaded
                continue
            c0 = tc * C
            # 1. gather K_j, z_j and the key indices (after everyone is done with the previous V_j and P)
            cuda.syncthreads()
            gather_rows(KVs, k, b, g, kidx, c0, count, D)
            load_keys(kjs, zs, z, kidx, b, g, c0, count)
            cuda.syncthreads()
            # 2. s = scale Q K^T + z, masked where the row does not keep the key; row max partials
            dot_tile(s, Qs, KVs)
            for r in range(RM):
                row = ty + r * TY
                mx = NEG_
                for cc in range(RN):
                    col = tx + cc * TX
                    x = s[r, cc] * scale + zs[col]
                    if not tile_kept(zs[col], kjs[col], qpos[r], causal, tv[r], ti[r], t):
                        x = NEG_
                    s[r, cc] = x
                    mx = max(mx, x)
                red_m[row, tx] = mx
            cuda.syncthreads()
            # 3. P = exp(s - m_new) (dropped out into Ps), row sums; V_j replaces K_j
            for r in range(RM):
                row = ty + r * TY
                mt = m_i[r]
                for tt in range(TX):
                    mt = max(mt, red_m[row, tt])
                m_new[r] = mt
                rs = ZERO
                for cc in range(RN):
                    col = tx + cc * TX
                    x = s[r, cc]
                    p = ZERO
                    if x > NEG_HALF_:
                        p = math.exp(x - mt)
                    rs += p
                    if HAS_DROPOUT:
                        if dropout_hash(seed, b, h, q0 + row, kjs[col]) >= thr:
                            p = p * rp
                        else:
                            p = ZERO
                    Ps[row, col] = p
                red_l[row, tx] = rs
            gather_rows(KVs, v, b, g, kidx, c0, count, D)
            cuda.syncthreads()
            # 4. l = alpha l + rowsum(P), O = alpha O + P V
            for r in range(RM):
                row = ty + r * TY
                alpha = math.exp(m_i[r] - m_new[r])
                ls = ZERO
                for tt in range(TX):
                    ls += red_l[row, tt]
                l_i[r] = l_i[r] * alpha + ls
                m_i[r] = m_new[r]
                for e in range(DPT):
                    o[r, e] *= alpha
            acc_tile(o, Ps, KVs)

        for r in range(RM):
            i = q0 + ty + r * TY
            if i < Nq:
                li = l_i[r]
                inv = ONE / li if li > ZERO else ZERO
                for e in range(DPT):
                    d = tx + e * TX
                    if d < D:
                        out[b, h, i, d] = o[r, e] * inv
                if tx == 0:
                    lse[b, h, i] = m_i[r] + math.log(li) if li > ZERO else NEG_INF

    _KERNELS[key] = cuda.jit(dma_forward)
    return _KERNELS[key]


def make_dkdv(shape: TileShape, dtype: Any, has_dropout: bool) -> Any:
    """Fused DMA dK/dV/dz, grid ``(Tc, B*Hkv)``, block ``(TX, TY)``: ``R`` keys of the list x ``C`` queries.

    ``kernel(q, k, v, z, kidx, counts, types, thr_val, thr_idx, dout, lse, delta, rs, dk, dv, dz, causal, off,
    scale, seed, thr, rp)`` (``delta + rs`` is the refined delta); ``dk, dv, dz`` must be zero-filled (keys no
    query keeps are not written).
    """
    key = ("dma_dkdv", shape, np.dtype(dtype).name, bool(has_dropout))
    if key in _KERNELS:
        return _KERNELS[key]
    ops = tile_ops(shape, dtype)
    load_rows, dot_tile, acc_tile = ops.load_rows, ops.dot_tile, ops.acc_tile
    gather_rows = make_gather_rows(shape, dtype, shape.R)
    grad_element = make_grad_element(dtype, has_dropout)
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, BIG_, NEG_HALF_ = npdt(0.0), npdt(BIG), npdt(NEG_HALF)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    C1 = C + 1
    RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
    NCOL = -(-R // NT)  # key rows per thread for dz

    def dma_dkdv(q, k, v, z, kidx, counts, types, thr_val, thr_idx, dout, lse, delta, rs, dk, dv, dz,  # type: ignore[no-untyped-def]
                 causal, off, scale, seed, thr, rp):
        Ks = cuda.shared.array((R, DP1), dt)
        Vs = cuda.shared.array((R, DP1), dt)
        Qs = cuda.shared.array((C, DP1), dt)
        dOs = cuda.shared.array((C, DP1), dt)
        Zs = cuda.shared.array((R, C), dt)
        dSs = cuda.shared.array((R, C1), dt)
        lse_s = cuda.shared.array(C, dt)
        del_s = cuda.shared.array(C, dt)
        tv_s = cuda.shared.array(C, dt)
        qps = cuda.shared.array(C, numba.int64)
        ti_s = cuda.shared.array(C, numba.int64)
        kj = cuda.local.array(RM, numba.int64)
        kz = cuda.local.array(RM, dt)
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
        D = q.shape[3]
        tc = cuda.blockIdx.x
        k0 = tc * R
        count = counts[b, g]
        if k0 >= count:  # uniform over the block
            return

        gather_rows(Ks, k, b, g, kidx, k0, count, D)
        gather_rows(Vs, v, b, g, kidx, k0, count, D)
        for a in range(RM):
            c = k0 + ty + a * TY
            kj[a] = -1
            kz[a] = ZERO
            if c < count:
                kj[a] = kidx[b, g, c]
                kz[a] = z[b, g, kj[a]]
            for e in range(DPT):
                dk_acc[a, e] = ZERO
                dv_acc[a, e] = ZERO
        for n in range(NCOL):
            colacc[n] = ZERO

        for hh in range(group):
            h = g * group + hh
            for tq in range((Nq + C - 1) // C):
                t = types[b, g, tq, tc]
                if t == SKIP:
                    continue
                q0 = tq * C
                cuda.syncthreads()  # everyone is done with the previous Q, dO, Z, dS
                load_rows(Qs, q, b, h, q0, Nq, D, C)
                load_rows(dOs, dout, b, h, q0, Nq, D, C)
                for cc in range(tid, C, NT):
                    i = q0 + cc
                    if i < Nq:
                        li = lse[b, h, i]
                        lse_s[cc] = li if li > NEG_HALF_ else BIG_  # a row that keeps no key: P = 0
                        del_s[cc] = delta[b, h, i] + rs[b, h, i]
                        qps[cc] = off + i
                        tv_s[cc] = thr_val[b, g, i]
                        ti_s[cc] = thr_idx[b, g, i]
                    else:
                        lse_s[cc] = BIG_
                        del_s[cc] = ZERO
                        qps[cc] = -1
                        tv_s[cc] = ZERO
                        ti_s[cc] = -1
                cuda.syncthreads()

                # S^T = K Q^T, dP^T = V dO^T for this (key tile, query tile)
                dot_tile(s, Ks, Qs)
                dot_tile(dp, Vs, dOs)
                for a in range(RM):
                    kr = ty + a * TY
                    for cc in range(RN):
                        col = tx + cc * TX
                        i = q0 + col
                        zz, ds = grad_element(s[a, cc], kz[a], kj[a], qps[col], tv_s[col], ti_s[col], t, i < Nq,
                                              lse_s[col], del_s[col], dp[a, cc], causal, scale, seed, b, h, i, thr, rp)
                        Zs[kr, col] = zz
                        dSs[kr, col] = ds
                cuda.syncthreads()

                acc_tile(dv_acc, Zs, dOs)  # dV += Z^T dO
                acc_tile(dk_acc, dSs, Qs)  # dK += dS^T Q (times scale at the end)
                for n in range(NCOL):  # dz += rowsum(dS^T), each key row always by the same thread
                    jj = tid + n * NT
                    if jj < R:
                        acc = colacc[n]
                        for ii in range(C):
                            acc += dSs[jj, ii]
                        colacc[n] = acc

        for a in range(RM):
            if kj[a] >= 0:
                for e in range(DPT):
                    d = tx + e * TX
                    if d < D:
                        dk[b, g, kj[a], d] = dk_acc[a, e] * scale
                        dv[b, g, kj[a], d] = dv_acc[a, e]
        for n in range(NCOL):
            jj = tid + n * NT
            if jj < R and k0 + jj < count:
                dz[b, g, kidx[b, g, k0 + jj]] = colacc[n]

    _KERNELS[key] = cuda.jit(dma_dkdv)
    return _KERNELS[key]


def make_dq(shape: TileShape, dtype: Any, has_dropout: bool) -> Any:
    """Fused DMA dQ, grid ``(Tr, B*H)``, block ``(TX, TY)``: ``R`` queries x ``C`` keys of the list.

    ``kernel(q, k, v, z, kidx, counts, types, thr_val, thr_idx, dout, lse, delta, dq, rs, causal, off, scale, seed,
    thr, rp)``; also writes ``rs (B, H, Nq)``, the row sums of dS (see :func:`backward`).
    """
    key = ("dma_dq", shape, np.dtype(dtype).name, bool(has_dropout))
    if key in _KERNELS:
        return _KERNELS[key]
    ops = tile_ops(shape, dtype)
    load_rows, dot_tile, acc_tile = ops.load_rows, ops.dot_tile, ops.acc_tile
    gather_rows = make_gather_rows(shape, dtype, shape.C)
    load_keys = make_load_keys(shape, dtype)
    load_thresholds = make_load_thresholds(shape, dtype)
    grad_element = make_grad_element(dtype, has_dropout)
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, BIG_, NEG_HALF_ = npdt(0.0), npdt(BIG), npdt(NEG_HALF)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads

    def dma_dq(q, k, v, z, kidx, counts, types, thr_val, thr_idx, dout, lse, delta, dq, rs,  # type: ignore[no-untyped-def]
               causal, off, scale, seed, thr, rp):
        Qs = cuda.shared.array((R, DP1), dt)
        dOs = cuda.shared.array((R, DP1), dt)
        Ks = cuda.shared.array((C, DP1), dt)
        Vs = cuda.shared.array((C, DP1), dt)
        dSs = cuda.shared.array((R, C), dt)
        zs = cuda.shared.array(C, dt)
        kjs = cuda.shared.array(C, numba.int64)
        red = cuda.shared.array((R, TX), dt)
        qpos = cuda.local.array(RM, numba.int64)
        tv = cuda.local.array(RM, dt)
        ti = cuda.local.array(RM, numba.int64)
        rsum = cuda.local.array(RM, dt)
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
        g = h // (H // k.shape[1])
        Nq = q.shape[2]
        D = q.shape[3]
        tq = cuda.blockIdx.x
        q0 = tq * R

        load_rows(Qs, q, b, h, q0, Nq, D, R)
        load_rows(dOs, dout, b, h, q0, Nq, D, R)
        load_thresholds(qpos, tv, ti, thr_val, thr_idx, b, g, q0, Nq, off)
        for r in range(RM):
            i = q0 + ty + r * TY
            lse_r[r] = BIG_
            del_r[r] = ZERO
            rsum[r] = ZERO
            if i < Nq:
                li = lse[b, h, i]
                lse_r[r] = li if li > NEG_HALF_ else BIG_
                del_r[r] = delta[b, h, i]
            for e in range(DPT):
                acc[r, e] = ZERO

        count = counts[b, g]
        for tc in range((count + C - 1) // C):
            t = types[b, g, tq, tc]
            if t == SKIP:
                continue
            c0 = tc * C
            cuda.syncthreads()  # everyone is done with the previous K, V, dS
            gather_rows(Ks, k, b, g, kidx, c0, count, D)
            gather_rows(Vs, v, b, g, kidx, c0, count, D)
            load_keys(kjs, zs, z, kidx, b, g, c0, count)
            cuda.syncthreads()

            dot_tile(s, Qs, Ks)
            dot_tile(dp, dOs, Vs)
            for r in range(RM):
                row = ty + r * TY
                i = q0 + row
                for cc in range(RN):
                    col = tx + cc * TX
                    _, x = grad_element(s[r, cc], zs[col], kjs[col], qpos[r], tv[r], ti[r], t, i < Nq, lse_r[r],
                                        del_r[r], dp[r, cc], causal, scale, seed, b, h, i, thr, rp)
                    dSs[row, col] = x
                    rsum[r] += x
            cuda.syncthreads()
            acc_tile(acc, dSs, Ks)  # dQ += dS K (times scale at the end)

        for r in range(RM):
            row = ty + r * TY
            i = q0 + row
            red[row, tx] = rsum[r]
            if i < Nq:
                for e in range(DPT):
                    d = tx + e * TX
                    if d < D:
                        dq[b, h, i, d] = acc[r, e] * scale
        cuda.syncthreads()
        for r in range(RM):
            row = ty + r * TY
            i = q0 + row
            if tx == 0 and i < Nq:
                acc_rs = ZERO
                for tt in range(TX):
                    acc_rs += red[row, tt]
                rs[b, h, i] = acc_rs

    _KERNELS[key] = cuda.jit(dma_dq)
    return _KERNELS[key]


def make_zero3(dtype: Any) -> Any:
    """``kernel(a)``: zero a 3-D array, one thread per element."""
    ZERO = np.dtype(dtype).type(0.0)

    def build() -> Any:
        def zero3(a):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            n0, n1, n2 = a.shape
            if idx < n0 * n1 * n2:
                a[idx // (n1 * n2), (idx // n2) % n1, idx % n2] = ZERO

        return cuda.jit(zero3)

    return _cached(("zero3", np.dtype(dtype).name), build)


# ---------------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------------


def _scalars(spec: DMASpec, dtype: np.dtype) -> Tuple[Any, ...]:
    """``causal, off, scale, seed, thr, rp``, typed (no float64 or mixed signed/unsigned math by accident)."""
    t = dtype.type
    rp = 1.0 / (1.0 - spec.dropout) if spec.dropout > 0 else 1.0
    return (bool(spec.causal), np.int64(spec.off), t(spec.scale), np.uint64(spec.seed & 0xFFFFFFFF),
            np.uint64(spec.drop_threshold), t(rp))


def _sel_args(z: DeviceArray, sel: Selection) -> Tuple[Any, ...]:
    return (z, sel.kidx, sel.counts, sel.types, sel.thr_val, sel.thr_idx)


def forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, z: DeviceArray, sel: Selection, spec: DMASpec
            ) -> Tuple[DeviceArray, DeviceArray]:
    """Fused DMA forward on the GPU: ``(out (B, H, Nq, D), lse (B, H, Nq))``."""
    dtype = np.dtype(q.dtype)
    B, H, Nq, D = spec.B, spec.H, spec.Nq, spec.D
    out = cuda.device_array((B, H, Nq, D), dtype=dtype)
    lse = cuda.device_array((B, H, Nq), dtype=dtype)
    if B * H * Nq == 0:
        return out, lse
    shape = TileShape.make(sel.block_q, sel.block_k, D)
    kernel = make_forward(shape, dtype, spec.dropout > 0)
    kernel[(-(-Nq // shape.R), B * H), (shape.TX, shape.TY)](q, k, v, *_sel_args(z, sel), out, lse,
                                                            *_scalars(spec, dtype))
    return out, lse


def backward(q: DeviceArray, k: DeviceArray, v: DeviceArray, z: DeviceArray, sel: Selection, out: DeviceArray,
             lse: DeviceArray, dout: DeviceArray, spec: DMASpec
             ) -> Tuple[DeviceArray, DeviceArray, DeviceArray, DeviceArray]:
    """Fused DMA backward on the GPU: preprocess (``delta``), dQ (and the row sums of dS), dK/dV/dz;
    deterministic."""
    dtype = np.dtype(q.dtype)
    B, H, Hkv, Nq, Nk, D = spec.B, spec.H, spec.Hkv, spec.Nq, spec.Nk, spec.D
    dq = cuda.device_array((B, H, Nq, D), dtype=dtype)
    dk = cuda.device_array((B, Hkv, Nk, D), dtype=dtype)
    dv = cuda.device_array((B, Hkv, Nk, D), dtype=dtype)
    dz = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    for a, zero in ((dk, make_zero4(dtype)), (dv, make_zero4(dtype)), (dz, make_zero3(dtype))):
        if a.size > 0:
            blocks, threads = _grid1(a.size)
            zero[blocks, threads](a)
    if B * H * Nq == 0 or Nk == 0:
        return dq, dk, dv, dz
    delta = cuda.device_array((B, H, Nq), dtype=dtype)
    blocks, threads = _grid1(B * H * Nq)
    make_preprocess(dtype)[blocks, threads](out, dout, delta)
    args = _scalars(spec, dtype)
    has_dropout = spec.dropout > 0
    # dQ first: the row sums rs of its dS refine delta for dK/dV/dz (see dma_cpu's docstring)
    rs = cuda.device_array((B, H, Nq), dtype=dtype)
    qs = TileShape.make(sel.block_q, sel.block_k, D)
    make_dq(qs, dtype, has_dropout)[(-(-Nq // qs.R), B * H), (qs.TX, qs.TY)](
        q, k, v, *_sel_args(z, sel), dout, lse, delta, dq, rs, *args)
    kv = TileShape.make(sel.block_k, sel.block_q, D)
    make_dkdv(kv, dtype, has_dropout)[(-(-Nk // kv.R), B * Hkv), (kv.TX, kv.TY)](
        q, k, v, *_sel_args(z, sel), dout, lse, delta, rs, dk, dv, dz, *args)
    return dq, dk, dv, dz
