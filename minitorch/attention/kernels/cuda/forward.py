"""Flash attention forward kernels in Numba CUDA: Q-major (FlashAttention 2) and K-major (FlashAttention 1).

Both kernels run the same per-tile step, :func:`make_attend_tile`'s ``attend_tile``: for one ``R x C`` tile of
queries and keys it computes the scores ``s = scale * Q K^T + bias``, masks them, and folds them into the running
softmax state of each query row (``m`` the running max, ``l`` the running sum of ``exp(s - m)``, ``O`` the running
sum of ``exp(s - m) V``)::

    m_new = max(m, rowmax(s));  P = exp(s - m_new)
    l     = exp(m - m_new) * l + rowsum(P)
    O     = exp(m - m_new) * O + dropout(P) @ V;  m = m_new

* Q-major (:func:`make_forward_q_major`): one block per (query tile, b*h). ``O``, ``m``, ``l`` stay in registers
  while the block streams the key/value tiles of its row; at the end ``out = O / l`` and ``lse = m + log(l)``.
* K-major (:func:`make_forward_k_major`): FlashAttention 1, Algorithm 1. The launcher loops over key/value tiles
  (one launch per key tile); a block per (query tile, b*h) reads the partial ``O_i, l_i, m_i`` from global memory,
  runs the same step and writes them back (``O_i`` normalized, as in the paper).

Tiles come from the :class:`~minitorch.attention.tiling.TileSchedule` through ``spec.tile_types`` (per batch row):
SKIP tiles are never loaded, DENSE tiles skip the per-element mask, TRIANGLE tiles test every pair with the
visibility rule of docs/internals.md. A kernel tile may be a sub-tile of the schedule's tile (the launcher halves
tiles that would not fit 48 KB of shared memory); it takes the type of the tile that contains it.

Threads: a block of ``TY x TX`` threads covers an ``R x C`` score tile; thread ``(ty, tx)`` owns the rows
``ty + r*TY`` (``r < RM``) and the columns ``tx + c*TX`` (``c < RN``), a small register tile, and for products
with ``V`` the head-dim columns ``tx + e*TX`` (``e < DPT``). Row reductions (max, sum) go through shared memory.

Everything that shapes an array or a loop is a compile-time constant captured by the factories, which are cached
per ``(TileShape, dtype, flags)``; the same factory serves float32 and float64 (constants are typed with ``dt``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from ...dropout import build_dropout_hash
from ...tiling import TileType

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

MAX_THREADS = (4, 4) if SIMULATOR else (16, 16)
"""Largest ``(TY, TX)`` thread grid of a block. The simulator runs one Python thread per CUDA thread: keep it small."""

SMEM_LIMIT = 48 * 1024
"""Static shared memory a block may use (bytes)."""

NEG = -1e30
"""Finite sentinel for masked scores and the initial running max (no -inf arithmetic in the online softmax)."""
NEG_HALF = -5e29
"""Scores at or below this are masked: their probability is exactly zero."""
BIG = 1e30

SKIP = int(TileType.SKIP)
DENSE = int(TileType.DENSE)

_DEVICE_OPTS: Dict[str, Any] = {} if SIMULATOR else {"forceinline": True}


def device(fn: Callable) -> Callable:
    """Compile ``fn`` as a CUDA device function (force-inlined on the GPU, so local arrays stay in registers)."""
    return cuda.jit(device=True, **_DEVICE_OPTS)(fn)


dropout_hash = build_dropout_hash(cuda.jit(device=True))
"""The counter-based dropout hash, bit-identical to :func:`minitorch.attention.dropout.dropout_mask`."""


@cuda.jit(device=True)
def visible(qp, kp, causal, window, sinks):  # type: ignore[no-untyped-def]
    """May a query at position ``qp`` see a key at position ``kp``? (docs/internals.md; -1 = empty)."""
    if qp < 0 or kp < 0:
        return False
    if causal and kp > qp:
        return False
    if window >= 0 and kp >= sinks:
        diff = qp - kp
        if not causal and diff < 0:
            diff = -diff
        if diff >= window:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


def _divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
    for t in range(max(1, min(cap, n)), 0, -1):
        if n % t == 0:
            return t
    return 1


@dataclass(frozen=True)
class TileShape:
    """Compile-time geometry of a kernel: an ``R x C`` score tile, ``TY x TX`` threads, head dim padded to ``DP``.

    Thread ``(ty, tx)`` owns score rows ``ty + r*TY`` (r < RM), columns ``tx + c*TX`` (c < RN) and head-dim
    columns ``tx + e*TX`` (e < DPT). Shared tiles with the head dim along axis 1 are ``DP1 = DP + 1`` wide, so
    that threads reading different rows of the same column hit different banks.
    """

    R: int
    C: int
    DP: int
    TY: int
    TX: int

    @property
    def RM(self) -> int:
        return self.R // self.TY

    @property
    def RN(self) -> int:
        return self.C // self.TX

    @property
    def DPT(self) -> int:
        return self.DP // self.TX

    @property
    def DP1(self) -> int:
        return self.DP + 1

    @property
    def threads(self) -> int:
        return self.TY * self.TX

    @staticmethod
    def make(R: int, C: int, D: int, max_threads: Tuple[int, int] = MAX_THREADS) -> "TileShape":
        """Threads from the tile: the largest divisors of ``R`` and ``C`` up to ``max_threads``, so a 64 x 32 tile
        gives each of 16 x 16 threads a 4 x 2 register tile, and tiny tiles mean few threads (the simulator)."""
        TY = _divisor_at_most(R, max_threads[0])
        TX = _divisor_at_most(C, max_threads[1])
        DP = -(-D // TX) * TX
        return TileShape(int(R), int(C), int(DP), int(TY), int(TX))


def numba_type(dtype: Any) -> Any:
    """numba scalar type of a float NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return numba.float32
    if dtype == np.float64:
        return numba.float64
    raise TypeError(f"CUDA attention supports float32 and float64, got {dtype}")


def forward_smem_bytes(shape: TileShape, itemsize: int) -> int:
    """Shared memory of the forward kernels: Q tile, one K/V tile, P, two row-reduction buffers, key positions."""
    s = shape
    return itemsize * (s.R * s.DP1 + s.C * s.DP1 + s.R * s.C + 2 * s.R * s.TX) + 8 * s.C


# ---------------------------------------------------------------------------------------------------------------------
# Tile helpers (device functions), shared with the backward kernels
# ---------------------------------------------------------------------------------------------------------------------

_TILE_OPS: Dict[Tuple[TileShape, str], Any] = {}


class TileOps:
    """Device functions of one :class:`TileShape` and dtype.

    * ``load_rows(dst, src, b, h, start, n, D, rows)``: ``dst[r, d] = src[b, h, start + r, d]``, zero outside
      ``start + r < n``, ``d < D`` (cooperative, coalesced along d).
    * ``dot_tile(s, A, Bm)``: ``s[r, c] = sum_d A[ty + r*TY, d] * Bm[tx + c*TX, d]`` (``A @ Bm^T``, register tile).
    * ``acc_tile(acc, P, V)``: ``acc[r, e] += sum_j P[ty + r*TY, j] * V[j, tx + e*TX]`` over ``j < C``.
    """

    def __init__(self, shape: TileShape, dtype: Any) -> None:
        dt = numba_type(dtype)
        ZERO = np.dtype(dtype).type(0.0)
        R, C, DP, TY, TX = shape.R, shape.C, shape.DP, shape.TY, shape.TX
        RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads

        def load_rows(dst, src, b, h, start, n, D, rows):  # type: ignore[no-untyped-def]
            tid = cuda.threadIdx.y * TX + cuda.threadIdx.x
            for idx in range(tid, rows * DP, NT):
                r = idx // DP
                d = idx - r * DP
                i = start + r
                if i < n and d < D:
                    dst[r, d] = src[b, h, i, d]
                else:
                    dst[r, d] = ZERO

        def dot_tile(s, A, Bm):  # type: ignore[no-untyped-def]
            ty = cuda.threadIdx.y
            tx = cuda.threadIdx.x
            a = cuda.local.array(RM, dt)
            bv = cuda.local.array(RN, dt)
            for r in range(RM):
                for c in range(RN):
                    s[r, c] = ZERO
            for d in range(DP):
                for r in range(RM):
                    a[r] = A[ty + r * TY, d]
                for c in range(RN):
                    bv[c] = Bm[tx + c * TX, d]
                for r in range(RM):
                    for c in range(RN):
                        s[r, c] += a[r] * bv[c]

        def acc_tile(acc, P, V):  # type: ignore[no-untyped-def]
            ty = cuda.threadIdx.y
            tx = cuda.threadIdx.x
            a = cuda.local.array(RM, dt)
            vv = cuda.local.array(DPT, dt)
            for j in range(C):
                for r in range(RM):
                    a[r] = P[ty + r * TY, j]
                for e in range(DPT):
                    vv[e] = V[j, tx + e * TX]
                for r in range(RM):
                    for e in range(DPT):
                        acc[r, e] += a[r] * vv[e]

        self.shape = shape
        self.load_rows = device(load_rows)
        self.dot_tile = device(dot_tile)
        self.acc_tile = device(acc_tile)


def tile_ops(shape: TileShape, dtype: Any) -> TileOps:
    """Cached :class:`TileOps` for ``(shape, dtype)``."""
    key = (shape, np.dtype(dtype).name)
    if key not in _TILE_OPS:
        _TILE_OPS[key] = TileOps(shape, dtype)
    return _TILE_OPS[key]


# ---------------------------------------------------------------------------------------------------------------------
# The per-tile step of the online softmax
# ---------------------------------------------------------------------------------------------------------------------


def make_attend_tile(shape: TileShape, dtype: Any, has_bias: bool, has_dropout: bool) -> Callable:
    """``attend_tile(...)``: fold the key/value tile starting at ``k0`` into ``(o, m_i, l_i)`` (see module doc).

    Shared arrays: ``Qs (R, DP1)`` holds the query tile (loaded by the caller), ``KVs (C, DP1)`` receives K then V,
    ``Ps (R, C)`` the (dropped-out) probabilities, ``red_m``/``red_l (R, TX)`` the row partials, ``kps (C,)`` the key
    positions. Per-thread arrays: ``qpos (RM,)`` query positions, ``brow (RM,)`` bias rows, ``o (RM, DPT)``,
    ``m_i, l_i (RM,)``. ``masked`` is False for DENSE tiles (no per-element test).
    """
    ops = tile_ops(shape, dtype)
    load_rows, dot_tile, acc_tile = ops.load_rows, ops.dot_tile, ops.acc_tile
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, NEG_, NEG_HALF_ = npdt(0.0), npdt(NEG), npdt(NEG_HALF)
    C, TY, TX = shape.C, shape.TY, shape.TX
    RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
    HAS_BIAS, HAS_DROPOUT = bool(has_bias), bool(has_dropout)

    def attend_tile(Qs, KVs, Ps, red_m, red_l, kps, qpos, brow, o, m_i, l_i,  # type: ignore[no-untyped-def]
                    k, v, bias, k_pos_b, b, h, hk, bb, hb, q0, k0, masked,
                    Nk, D, scale, causal, window, sinks, seed, thr, rp):
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * TX + tx

        # 1. load K_j and the key positions (after everyone is done with the previous V_j and P)
        cuda.syncthreads()
        load_rows(KVs, k, b, hk, k0, Nk, D, C)
        for jj in range(tid, C, NT):
            j = k0 + jj
            kps[jj] = k_pos_b[b, j] if j < Nk else -1
        cuda.syncthreads()

        # 2. scores s = scale * Q K^T + bias, masked, and the row max partials
        s = cuda.local.array((RM, RN), dt)
        dot_tile(s, Qs, KVs)
        for r in range(RM):
            row = ty + r * TY
            mx = NEG_
            for c in range(RN):
                col = tx + c * TX
                j = k0 + col
                x = s[r, c] * scale
                ok = j < Nk
                if HAS_BIAS and ok:
                    x += bias[bb, hb, brow[r], j]
                if masked and ok:
                    ok = visible(qpos[r], kps[col], causal, window, sinks)
                if not ok:
                    x = NEG_
                s[r, c] = x
                mx = max(mx, x)
            red_m[row, tx] = mx
        cuda.syncthreads()  # row max partials complete; K_j no longer read

        # 3. P = exp(s - m_new) (dropped out into Ps), row sum partials; V_j replaces K_j
        m_new = cuda.local.array(RM, dt)
        for r in range(RM):
            row = ty + r * TY
            mt = m_i[r]
            for t in range(TX):
                mt = max(mt, red_m[row, t])
            m_new[r] = mt
            rs = ZERO
            for c in range(RN):
                col = tx + c * TX
                x = s[r, c]
                p = ZERO
                if x > NEG_HALF_:
                    p = math.exp(x - mt)
                rs += p
                if HAS_DROPOUT:
                    if dropout_hash(seed, b, h, q0 + row, k0 + col) >= thr:
                        p = p * rp
                    else:
                        p = ZERO
                Ps[row, col] = p
            red_l[row, tx] = rs
        load_rows(KVs, v, b, hk, k0, Nk, D, C)
        cuda.syncthreads()

        # 4. rescale and accumulate: l = alpha l + rowsum(P), O = alpha O + P V
        for r in range(RM):
            row = ty + r * TY
            alpha = math.exp(m_i[r] - m_new[r])
            ls = ZERO
            for t in range(TX):
                ls += red_l[row, t]
            l_i[r] = l_i[r] * alpha + ls
            m_i[r] = m_new[r]
            for e in range(DPT):
                o[r, e] *= alpha
        acc_tile(o, Ps, KVs)

    return device(attend_tile)


# ---------------------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------------------

_KERNELS: Dict[Tuple[Any, ...], Any] = {}


def make_forward_q_major(shape: TileShape, dtype: Any, has_bias: bool, has_dropout: bool) -> Any:
    """FlashAttention 2 forward: grid ``(Tr, B*H)``, block ``(TX, TY)``; writes ``out`` and ``lse``.

    ``kernel(q, k, v, bias, out, lse, q_pos, k_pos_b, tile_types, block_q, block_k, scale, causal, window,
    sinks, seed, thr, rp)``; ``bias`` is a dummy ``(1, 1, 1, 1)`` array when ``has_bias`` is False.
    """
    key = ("fwd_q", shape, np.dtype(dtype).name, bool(has_bias), bool(has_dropout))
    if key in _KERNELS:
        return _KERNELS[key]
    attend_tile = make_attend_tile(shape, dtype, has_bias, has_dropout)
    load_rows = tile_ops(shape, dtype).load_rows
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, ONE, NEG_, NEG_INF = npdt(0.0), npdt(1.0), npdt(NEG), npdt(-np.inf)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    RM, DPT = shape.RM, shape.DPT
    HAS_BIAS = bool(has_bias)

    def forward_q_major(q, k, v, bias, out, lse, q_pos, k_pos_b, tile_types,  # type: ignore[no-untyped-def]
                        block_q, block_k, scale, causal, window, sinks, seed, thr, rp):
        Qs = cuda.shared.array((R, DP1), dt)
        KVs = cuda.shared.array((C, DP1), dt)
        Ps = cuda.shared.array((R, C), dt)
        red_m = cuda.shared.array((R, TX), dt)
        red_l = cuda.shared.array((R, TX), dt)
        kps = cuda.shared.array(C, numba.int64)
        qpos = cuda.local.array(RM, numba.int64)
        brow = cuda.local.array(RM, numba.int64)
        o = cuda.local.array((RM, DPT), dt)
        m_i = cuda.local.array(RM, dt)
        l_i = cuda.local.array(RM, dt)

        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tq = cuda.blockIdx.x
        H = q.shape[1]
        b = cuda.blockIdx.y // H
        h = cuda.blockIdx.y - b * H
        hk = h // (H // k.shape[1])
        Nq = q.shape[2]
        Nk = k.shape[2]
        D = q.shape[3]
        q0 = tq * R
        bb = 0
        hb = 0
        if HAS_BIAS:
            bb = b if bias.shape[0] > 1 else 0
            hb = h // (H // bias.shape[1])
        for r in range(RM):
            i = q0 + ty + r * TY
            qpos[r] = q_pos[i] if i < Nq else -1
            brow[r] = min(i, Nq - 1) if (HAS_BIAS and bias.shape[2] > 1) else 0
            m_i[r] = NEG_
            l_i[r] = ZERO
            for e in range(DPT):
                o[r, e] = ZERO

        load_rows(Qs, q, b, h, q0, Nq, D, R)  # made visible by the first sync in attend_tile
        tq_s = q0 // block_q
        for tk in range((Nk + C - 1) // C):
            k0 = tk * C
            t = tile_types[b, tq_s, k0 // block_k]
            if t == SKIP:
                continue
            attend_tile(Qs, KVs, Ps, red_m, red_l, kps, qpos, brow, o, m_i, l_i,
                        k, v, bias, k_pos_b, b, h, hk, bb, hb, q0, k0, t != DENSE,
                        Nk, D, scale, causal, window, sinks, seed, thr, rp)

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

    kernel = cuda.jit(forward_q_major)
    _KERNELS[key] = kernel
    return kernel


def make_forward_k_major(shape: TileShape, dtype: Any, has_bias: bool, has_dropout: bool) -> Any:
    """FlashAttention 1 (Algorithm 1) step for ONE key/value tile ``tk``: grid ``(Tr, B*H)``, block ``(TX, TY)``.

    The launcher calls it for ``tk = 0 .. Tc-1`` in order. Each block reads the partial ``O_i`` (normalized, in
    ``out``), ``m_i`` (kept in ``lse``) and ``l_i`` (``l_buf``), folds key tile ``tk`` in, and writes them back.
    :func:`make_k_major_init` and :func:`make_k_major_finish` prepare and finish the buffers.
    """
    key = ("fwd_k", shape, np.dtype(dtype).name, bool(has_bias), bool(has_dropout))
    if key in _KERNELS:
        return _KERNELS[key]
    attend_tile = make_attend_tile(shape, dtype, has_bias, has_dropout)
    load_rows = tile_ops(shape, dtype).load_rows
    dt = numba_type(dtype)
    npdt = np.dtype(dtype).type
    ZERO, ONE = npdt(0.0), npdt(1.0)
    R, C, DP1, TY, TX = shape.R, shape.C, shape.DP1, shape.TY, shape.TX
    RM, DPT = shape.RM, shape.DPT
    HAS_BIAS = bool(has_bias)

    def forward_k_major(q, k, v, bias, out, m_buf, l_buf, q_pos, k_pos_b, tile_types, tk,  # type: ignore[no-untyped-def]
                        block_q, block_k, scale, causal, window, sinks, seed, thr, rp):
        tq = cuda.blockIdx.x
        H = q.shape[1]
        b = cuda.blockIdx.y // H
        h = cuda.blockIdx.y - b * H
        q0 = tq * R
        k0 = tk * C
        t = tile_types[b, q0 // block_q, k0 // block_k]
        if t == SKIP:  # uniform over the block: the tile is never loaded
            return

        Qs = cuda.shared.array((R, DP1), dt)
        KVs = cuda.shared.array((C, DP1), dt)
        Ps = cuda.shared.array((R, C), dt)
        red_m = cuda.shared.array((R, TX), dt)
        red_l = cuda.shared.array((R, TX), dt)
        kps = cuda.shared.array(C, numba.int64)
        qpos = cuda.local.array(RM, numba.int64)
        brow = cuda.local.array(RM, numba.int64)
        o = cuda.local.array((RM, DPT), dt)
        m_i = cuda.local.array(RM, dt)
        l_i = cuda.local.array(RM, dt)

        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        hk = h // (H // k.shape[1])
        Nq = q.shape[2]
        Nk = k.shape[2]
        D = q.shape[3]
        bb = 0
        hb = 0
        if HAS_BIAS:
            bb = b if bias.shape[0] > 1 else 0
            hb = h // (H // bias.shape[1])

        # read the partial O_i, m_i, l_i (un-normalize O_i: the step accumulates l * O)
        for r in range(RM):
            i = q0 + ty + r * TY
            qpos[r] = q_pos[i] if i < Nq else -1
            brow[r] = min(i, Nq - 1) if (HAS_BIAS and bias.shape[2] > 1) else 0
            ir = min(i, Nq - 1)
            m_i[r] = m_buf[b, h, ir]
            l_i[r] = l_buf[b, h, ir]
            for e in range(DPT):
                d = tx + e * TX
                o[r, e] = out[b, h, ir, d] * l_i[r] if d < D else ZERO

        load_rows(Qs, q, b, h, q0, Nq, D, R)
        attend_tile(Qs, KVs, Ps, red_m, red_l, kps, qpos, brow, o, m_i, l_i,
                    k, v, bias, k_pos_b, b, h, hk, bb, hb, q0, k0, t != DENSE,
                    Nk, D, scale, causal, window, sinks, seed, thr, rp)

        # write O_i = diag(l_i)^-1 (...), m_i, l_i back
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
                    m_buf[b, h, i] = m_i[r]
                    l_buf[b, h, i] = li

    kernel = cuda.jit(forward_k_major)
    _KERNELS[key] = kernel
    return kernel


def make_k_major_init(dtype: Any) -> Any:
    """``kernel(out, m_buf, l_buf)``: one thread per row: ``O = 0``, ``m = NEG``, ``l = 0``."""
    key = ("fwd_k_init", np.dtype(dtype).name)
    if key in _KERNELS:
        return _KERNELS[key]
    npdt = np.dtype(dtype).type
    ZERO, NEG_ = npdt(0.0), npdt(NEG)

    def k_major_init(out, m_buf, l_buf):  # type: ignore[no-untyped-def]
        row = cuda.grid(1)
        B, H, Nq, D = out.shape
        if row < B * H * Nq:
            b = row // (H * Nq)
            h = (row // Nq) % H
            i = row % Nq
            m_buf[b, h, i] = NEG_
            l_buf[b, h, i] = ZERO
            for d in range(D):
                out[b, h, i, d] = ZERO

    kernel = cuda.jit(k_major_init)
    _KERNELS[key] = kernel
    return kernel


def make_k_major_finish(dtype: Any) -> Any:
    """``kernel(lse, l_buf)``: ``lse`` holds ``m``; turn it into ``m + log(l)`` (``-inf`` where ``l == 0``)."""
    key = ("fwd_k_finish", np.dtype(dtype).name)
    if key in _KERNELS:
        return _KERNELS[key]
    ZERO, NEG_INF = np.dtype(dtype).type(0.0), np.dtype(dtype).type(-np.inf)

    def k_major_finish(lse, l_buf):  # type: ignore[no-untyped-def]
        row = cuda.grid(1)
        B, H, Nq = lse.shape
        if row < B * H * Nq:
            b = row // (H * Nq)
            h = (row // Nq) % H
            i = row % Nq
            li = l_buf[b, h, i]
            lse[b, h, i] = lse[b, h, i] + math.log(li) if li > ZERO else NEG_INF

    kernel = cuda.jit(k_major_finish)
    _KERNELS[key] = kernel
    return kernel
