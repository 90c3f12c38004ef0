"""Split-K decode attention over the slots of a ring-buffer KV cache (Numba CUDA), plus the slot-write kernels.

One decode query reads every slot of the cache. A grid of one block per (batch row, head tile) would leave most of
a GPU idle, so the slots are split (FlashDecoding): the cache's ``C`` slots are cut into splits of ``split`` slots
(the cache's ``block_size``), and block ``(s, program)`` of the grid computes, for its program's ``head_tile``
query heads and every query row, the attention over split ``s`` only:

* **partial kernel**: the block's ``tile`` threads walk the split ``tile`` slots at a time; thread ``t`` scores slot
  ``j0 + t`` against the query row (held in shared memory), a shared-memory tree reduction gives the tile's max and
  sum, and every thread updates the output dims it owns (``d = t, t + tile, ...``) with the online-softmax rescale.
  It writes the split's normalized partial output ``o_s`` and its log-sum-exp ``lse_s = m_s + log(l_s)``.
  A split whose slots are all invisible (tile type ``SKIP``, from the host's :func:`slot_tile_types`) writes an
  empty partial without reading the slots; a ``DENSE`` split runs with no per-slot mask test.
* **merge kernel**: one thread per output element combines the splits by their log-sum-exp:
  ``lse = M + log(sum_s exp(lse_s - M))`` with ``M = max_s lse_s``, ``out = sum_s exp(lse_s - lse) o_s``.

Sizes (head dim, split, tile, head tile) are compile-time constants captured by :func:`make_decode_kernels`, so the
shared and local arrays have static sizes. Every floating-point constant is typed with the kernel's dtype (a bare
Python float would make Numba compute in float64), and ``-inf`` never enters the arithmetic: an empty running max is
the finite sentinel ``NEG`` (``exp(NEG - m)`` underflows to exactly 0), and only the final ``lse`` of a row that
sees no key is written as ``-inf``. The kernels run unchanged in Numba's CUDA simulator (tests use tiny sizes).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Optional, Tuple

import numba
import numpy as np
from numba import cuda

from ..attention.decode import DENSE, SKIP, slot_tile_types
from ..attention.dropout import build_dropout_hash, drop_threshold

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
DEFAULT_TILE = 4 if SIMULATOR else 32
"""Threads per block (slots scored at once) when the caller does not choose: a warp on the GPU."""


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@lru_cache(maxsize=None)
def make_decode_kernels(head_dim: int, split: int, tile: int, head_tile: int, dtype: Any) -> Tuple[Any, Any]:
    """Build ``(partial_kernel, merge_kernel)`` for these compile-time sizes and dtype.

    ``partial_kernel[(n_splits, B * n_head_tiles), tile](q, k, v, k_pos_b, q_pos, tile_types, part_o, part_lse,
    scale, causal, window, num_sinks, seed, threshold, keep_scale)`` with ``part_o (B, H, T, n_splits, D)`` and
    ``part_lse (B, H, T, n_splits)``; ``merge_kernel[blocks, threads](part_o, part_lse, out, lse)``.
    """
    if not _is_pow2(tile):
        raise ValueError(f"decode tile (threads per block) must be a power of two, got {tile}")
    if split < 1 or head_tile < 1 or head_dim < 1:
        raise ValueError(f"split, head_tile and head_dim must be >= 1, got {split}, {head_tile}, {head_dim}")
    D, SPLIT, TILE, HT = int(head_dim), int(split), int(tile), int(head_tile)
    ND = -(-D // TILE)  # output dims per thread
    np_dt = np.dtype(dtype)
    nb_dt = numba.from_dtype(np_dt)
    f = np_dt.type
    ZERO, ONE, NEG, NEG_INF = f(0.0), f(1.0), f(-1e30), f(-np.inf)
    HALF_NEG = f(-5e29)
    hash_fn = build_dropout_hash(cuda.jit(device=True))

    @cuda.jit(device=True)
    def visible(qp: int, kp: int, causal: bool, window: int, num_sinks: int) -> bool:
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

    @cuda.jit
    def partial_kernel(q, k, v, k_pos_b, q_pos, tile_types, part_o, part_lse,
                       scale, causal, window, num_sinks, seed, threshold, keep_scale):  # type: ignore[no-untyped-def]
        sq = cuda.shared.array(D, nb_dt)  # the query row
        red = cuda.shared.array(TILE, nb_dt)  # reduction scratch
        sp = cuda.shared.array(TILE, nb_dt)  # the tile's (dropped) probabilities
        acc = cuda.local.array(ND, nb_dt)
        tx = cuda.threadIdx.x
        sidx = cuda.blockIdx.x
        prog = cuda.blockIdx.y
        H = q.shape[1]
        T = q.shape[2]
        G = H // k.shape[1]
        C = k.shape[2]
        n_ht = (H + HT - 1) // HT
        b = prog // n_ht
        h0 = (prog % n_ht) * HT
        j_start = sidx * SPLIT
        j_end = min(j_start + SPLIT, C)
        tt = tile_types[b, sidx]
        # Every branch below depends only on block-wide values: the syncthreads are reached by all threads.
        for hh in range(HT):
            h = h0 + hh
            if h < H:
                g = h // G
                for i in range(T):
                    qp = q_pos[i]
                    m = NEG
                    l = ZERO
                    for e in range(ND):
                        acc[e] = ZERO
                    if tt != SKIP:
                        for d in range(tx, D, TILE):
                            sq[d] = q[b, h, i, d]
                        cuda.syncthreads()
                        for j0 in range(j_start, j_end, TILE):
                            j = j0 + tx
                            ok = j < j_end
                            if ok and tt != DENSE:
                                ok = visible(qp, k_pos_b[b, j], causal, window, num_sinks)
                            sc = NEG
                            if ok:
                                dot = ZERO
                                for d in range(D):
                                    dot += sq[d] * k[b, g, j, d]
                                sc = dot * scale
                            # tile max
                            red[tx] = sc
                            cuda.syncthreads()
                            half = TILE // 2
                            while half > 0:
                                if tx < half:
                                    red[tx] = max(red[tx], red[tx + half])
                                cuda.syncthreads()
                                half //= 2
                            m_new = max(m, red[0])
                            cuda.syncthreads()
                            p = ZERO
                            if ok:
                                p = math.exp(sc - m_new)
                            # tile sum (of the undropped probabilities: lse ignores dropout)
                            red[tx] = p
                            cuda.syncthreads()
                            half = TILE // 2
                            while half > 0:
                                if tx < half:
                                    red[tx] = red[tx] + red[tx + half]
                                cuda.syncthreads()
                                half //= 2
                            alpha = math.exp(m - m_new)
                            l = l * alpha + red[0]
                            if threshold > 0 and ok:
                                if hash_fn(seed, b, h, i, j) < threshold:
                                    p = ZERO
                                else:
                                    p = p * keep_scale
                            sp[tx] = p if ok else NEG  # NEG marks a slot that must not be read
                            cuda.syncthreads()
                            n = min(TILE, j_end - j0)
                            for e in range(ND):
                                d = tx + e * TILE
                                if d < D:
                                    a = acc[e] * alpha
                                    for t in range(n):
                                        pt = sp[t]
                                        if pt > ZERO:
                                            a += pt * v[b, g, j0 + t, d]
                                    acc[e] = a
                            m = m_new
                            cuda.syncthreads()
                    for e in range(ND):
                        d = tx + e * TILE
                        if d < D:
                            part_o[b, h, i, sidx, d] = acc[e] / l if l > ZERO else ZERO
                    if tx == 0:
                        part_lse[b, h, i, sidx] = m + math.log(l) if l > ZERO else NEG

    @cuda.jit
    def merge_kernel(part_o, part_lse, out, lse):  # type: ignore[no-untyped-def]
        B, H, T, S, _ = part_o.shape
        idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if idx >= B * H * T * D:
            return
        d = idx % D
        r = idx // D
        i = r % T
        r //= T
        h = r % H
        b = r // H
        mx = NEG
        for s in range(S):
            mx = max(mx, part_lse[b, h, i, s])
        if mx < HALF_NEG:  # no split saw a key
            out[b, h, i, d] = ZERO
            if d == 0:
                lse[b, h, i] = NEG_INF
            return
        den = ZERO
        num = ZERO
        for s in range(S):
            w = math.exp(part_lse[b, h, i, s] - mx)
            den += w
            if w > ZERO:
                num += w * part_o[b, h, i, s, d]
        out[b, h, i, d] = num / den
        if d == 0:
            lse[b, h, i] = mx + math.log(den)

    return partial_kernel, merge_kernel


def decode_attention_cuda(
    q: Any,
    k: Any,
    v: Any,
    k_pos_b: Any,
    q_pos: np.ndarray,
    *,
    k_pos_host: Optional[np.ndarray] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    window: int = -1,
    num_sinks: int = 0,
    block: int = 128,
    tile: Optional[int] = None,
    head_tile: int = 4,
    dropout: float = 0.0,
    seed: int = 0,
) -> Tuple[Any, Any]:
    """Split-K decode attention on device arrays: ``q (B, H, T, D)``, ``k, v (B, Hkv, C, D)``, ``k_pos_b (B, C)``.

    ``k_pos_b`` may be a device array (then pass its host copy as ``k_pos_host`` for the tile classification) or a
    NumPy array. ``block`` is the split (slots per CUDA block), ``tile`` the threads per block (a power of two).
    Returns device arrays ``(out (B, H, T, D), lse (B, H, T))``.
    """
    B, H, T, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or H % Hkv != 0 or tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"q {q.shape} does not match the cache storage k {k.shape}, v {v.shape}")
    dt = np.dtype(q.dtype)
    tile = DEFAULT_TILE if tile is None else int(tile)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q_pos = np.ascontiguousarray(q_pos, dtype=np.int64)
    if k_pos_host is None:
        k_pos_host = np.asarray(k_pos_b if isinstance(k_pos_b, np.ndarray) else k_pos_b.copy_to_host(), dtype=np.int64)
    if isinstance(k_pos_b, np.ndarray):
        k_pos_b = cuda.to_device(np.ascontiguousarray(k_pos_b, dtype=np.int64))
    types = slot_tile_types(q_pos, k_pos_host, block, causal, window, num_sinks)
    S = types.shape[1]
    partial_kernel, merge_kernel = make_decode_kernels(D, int(block), tile, int(head_tile), dt)
    n_ht = -(-H // head_tile)
    part_o = cuda.device_array((B, H, T, S, D), dtype=dt)
    part_lse = cuda.device_array((B, H, T, S), dtype=dt)
    out = cuda.device_array((B, H, T, D), dtype=dt)
    lse = cuda.device_array((B, H, T), dtype=dt)
    if B * H * T == 0 or S == 0:
        return out, lse
    f = dt.type
    partial_kernel[(S, B * n_ht), tile](
        q, k, v, k_pos_b, cuda.to_device(q_pos), cuda.to_device(types), part_o, part_lse,
        f(scale), bool(causal), int(window), int(num_sinks),
        np.uint64(seed & 0xFFFFFFFF), np.uint64(drop_threshold(dropout)), f(1.0 / (1.0 - dropout)),
    )
    n = B * H * T * D
    threads = 32 if SIMULATOR else 128
    merge_kernel[-(-n // threads), threads](part_o, part_lse, out, lse)
    return out, lse


# ---------------------------------------------------------------------------------------------------------------------
# Writing into the slots
# ---------------------------------------------------------------------------------------------------------------------


@cuda.jit
def _scatter_rows(dst, src, slots, rows):  # type: ignore[no-untyped-def]
    """``dst[b, h, slots[n], :] = src[b, h, rows[n], :]`` for every n; one thread per element."""
    B, Hkv, _, D = dst.shape
    N = slots.shape[0]
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx >= B * Hkv * N * D:
        return
    d = idx % D
    r = idx // D
    n = r % N
    r //= N
    h = r % Hkv
    b = r // Hkv
    dst[b, h, slots[n], d] = src[b, h, rows[n], d]


@cuda.jit
def _scatter_positions(dst, values, slots):  # type: ignore[no-untyped-def]
    """``dst[b, slots[n]] = values[b, n]``; one thread per element."""
    B = dst.shape[0]
    N = slots.shape[0]
    idx = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if idx < B * N:
        dst[idx // N, slots[idx % N]] = values[idx // N, idx % N]


def write_slots(dst: Any, src: Any, slots: np.ndarray, rows: np.ndarray) -> None:
    """Copy rows ``rows`` of the device array ``src (B, Hkv, T, D)`` into slots ``slots`` of ``dst (B, Hkv, C, D)``."""
    B, Hkv, _, D = dst.shape
    n = B * Hkv * len(slots) * D
    if n == 0:
        return
    threads = 32 if SIMULATOR else 256
    _scatter_rows[-(-n // threads), threads](
        dst, src, cuda.to_device(np.ascontiguousarray(slots, dtype=np.int64)),
        cuda.to_device(np.ascontiguousarray(rows, dtype=np.int64)),
    )


def write_positions(dst: Any, values: np.ndarray, slots: np.ndarray) -> None:
    """``dst[b, slots[n]] = values[b, n]`` on the device (``dst`` an int64 ``(B, C)`` device array)."""
    n = dst.shape[0] * len(slots)
    if n == 0:
        return
    threads = 32 if SIMULATOR else 256
    _scatter_positions[-(-n // threads), threads](
        dst, cuda.to_device(np.ascontiguousarray(values, dtype=np.int64)),
        cuda.to_device(np.ascontiguousarray(slots, dtype=np.int64)),
    )
