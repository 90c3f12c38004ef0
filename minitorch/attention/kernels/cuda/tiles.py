"""Register tiles of the CUDA attention kernels: geometry, compile-time configuration, and the tile helpers.

Every kernel of :mod:`.forward` and :mod:`.backward` works on an ``R x C`` tile of (query, key) pairs (the dK/dV
kernel on an ``R x C`` tile of (key, query) pairs) with a block of ``TY x TX`` threads. Thread ``(ty, tx)`` owns a
small *register tile*: the rows ``ty + r TY`` (``r < RM``), the columns ``tx + c TX`` (``c < RN``), and, for the
products with ``V`` (or ``K``, ``Q``, ``dO``), the head-dim columns ``tx + e TX`` (``e < DPT``) of the output rows
it owns. Tiles of ``D``-long rows sit in shared memory (``DP1 = DP + 1`` wide, so that threads reading one column of
different rows hit different banks).

A tile of one query row (decoding) has too few pairs for that: ``TX`` threads of one key each, every dot product a
serial ``D``-long loop. Its forward runs the *split* layout (``TD > 1``): a group of ``TD`` neighbouring lanes per
key column, lane ``td`` taking the head-dim columns ``td + e TD`` (consecutive lanes read consecutive ``d``), the
dot products summed over the group by warp shuffles; ``TX`` groups, each an online softmax of its own columns (its
own ``m, l, O``: no row reductions per tile), merged once at the end of the block (:class:`TileOps` ``merge``).

What the kernels are configured by comes in two kinds:

* compile-time :class:`Flags` (bias, key list, pages, top-k rule, dropout, segments, a block mask, sinks, softcap,
  ALiBi, a user's ``score_mod``) and the :class:`TileShape`: every factory of this package caches its kernels per
  ``(TileShape, dtype, Flags)``, so shapes of shared and local arrays and every branch on a flag are constants of
  the compiled code, and a ``score_mod`` is a device function inlined into them (one compilation per function);
* the run-time :class:`Config`: positions, mask parameters, the bias, the key list, the block table, the
  thresholds, the dropout seed, typed by the launcher (:func:`~.launch.make_config`) so that no kernel mixes
  float64 into float32 math.

Real-GPU hygiene: constants are typed with the kernel's dtype (``ft(...)``), masked scores hold the finite sentinel
``finfo.min`` (never ``-inf`` in arithmetic), and shared memory stays within :data:`SMEM_LIMIT` (the launcher
sub-tiles, :func:`~.launch.fit_shape`). In Numba's simulator (the tests) thread blocks are tiny.
"""

from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from ...dropout import build_dropout_hash
from ...masks import build_kept, build_same_segment, build_visible
from ...mods import ScoreMod
from ...tiling import TileType

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)

GPU_THREADS = (32, 32)
"""Largest ``(TY, TX)`` thread grid of a block on a GPU (and :data:`BLOCK_THREADS` threads in all)."""
MAX_THREADS = (4, 4) if SIMULATOR else GPU_THREADS
"""Largest ``(TY, TX)`` thread grid of a block here. The simulator runs one Python thread per CUDA thread: small."""
BLOCK_THREADS = 128
"""Most threads of a tile kernel's block: with about 46 KB of shared memory per block, 4 blocks of 128 threads fit
an SM (``launch_bounds`` asks for 2)."""

SMEM_LIMIT = 48 * 1024
"""Static shared memory a block may use (bytes)."""

ROW_THREADS = 32 if SIMULATOR else 128
"""Threads per block of the one-thread-per-element kernels (init, merge, preprocess, copies, reductions)."""


def grid1(n: int) -> Tuple[int, int]:
    """``(blocks, threads)`` of a one-thread-per-element launch over ``n`` elements (at least one block)."""
    return (max(1, -(-n // ROW_THREADS)), ROW_THREADS)

SKIP = int(TileType.SKIP)
DENSE = int(TileType.DENSE)
TRIANGLE = int(TileType.TRIANGLE)

QF_LSE, QF_DELTA, QF_THR = 0, 1, 2
QN_POS, QN_BIAS_ROW, QN_THR = 0, 1, 2
"""Rows of a tile's *query table*, two shared arrays with one column per query row of the tile: ``qf`` (floats:
``lse`` (``MAX`` for ``-inf``), ``delta``, the top-k threshold value) and ``qn`` (int64: the position, -1 past
``Nq``; the bias row; the top-k threshold index). Loaded by ``TileOps.load_queries``, read by ``TileOps.score``."""

Flags = namedtuple(
    "Flags",
    "has_bias has_list has_pages has_topk has_dropout has_segments has_block_mask has_sinks has_softcap has_alibi "
    "score_mod",
    defaults=(False, False, False, False, False, None),
)
"""The compile-time configuration of a kernel: which parts of the score modification and key source exist.

* ``has_bias``: ``S += bias`` (``Config.bias`` is ``(Bb, Hb, Nqb, Nk)``);
* ``has_list``: key tile entries are read through ``Config.kidx`` (a :class:`~minitorch.attention.spec.KeyList`);
* ``has_pages``: ``k, v`` are page pools, key rows read through ``Config.block_table``
  (:class:`~minitorch.attention.spec.Pages`);
* ``has_topk``: DMA's keep rule on the bias value (:func:`~minitorch.attention.masks.kept`) in TRIANGLE tiles;
* ``has_dropout``: the counter-based dropout of :mod:`minitorch.attention.dropout`;
* ``has_segments``, ``has_block_mask``: packed sequences and a ``mask_mod``'s bits, tested in TRIANGLE tiles;
* ``has_sinks``: the online softmax starts from the learnable sinks;
* ``has_softcap``, ``has_alibi``, ``score_mod`` (a :class:`~minitorch.attention.mods.ScoreMod` or None): the
  modification of the score after the bias.
"""


def flags_key(flags: Flags) -> Tuple[Any, ...]:
    """``flags`` as a cache key: booleans, and a ``score_mod`` by identity (one compilation per function)."""
    return tuple(f if f is None or isinstance(f, ScoreMod) else bool(f) for f in flags)


Config = namedtuple(
    "Config",
    "q_pos_b k_pos_b causal window num_sinks bias kidx counts block_table page_size lengths thr_val thr_idx seed "
    "drop_threshold inv_keep scale q_seg k_seg bm_index bm_bits sinks alibi softcap",
)
"""The run-time configuration every attention kernel reads (absent features hold tiny dummy arrays):

* masks: ``q_pos_b (B, Nq)``, ``k_pos_b (B, Nk)`` int64 positions (-1: empty), ``causal``, ``window`` (-1: none),
  ``num_sinks`` (the rule of :mod:`minitorch.attention.masks`);
* ``bias (Bb, Hb, Nqb, Nk)``: query head ``h`` reads bias head ``h // (H // Hb)``, row ``i`` (or 0 when ``Nqb = 1``);
* key source: entry ``c`` of (b, kv head g) is key row ``kidx[b, g, c]``, ``counts[b, g]`` entries; in a paged
  batch, batch row b has ``lengths[b]`` key rows and row ``j`` is stored in page ``block_table[b, j // page_size]``
  at offset ``j % page_size`` of the pools ``k, v``;
* DMA's top-k: row ``i`` keeps key ``j`` iff ``kept(bias[b, g, 0, j], j, thr_val[b, g, i], thr_idx[b, g, i])``;
* dropout: keep iff ``dropout_hash(seed, b, h, i, j) >= drop_threshold``; kept probabilities times ``inv_keep``;
* ``scale``: of the scores, in the kernel's dtype;
* segment ids ``q_seg (B, Nq)``, ``k_seg (B, Nk)``; a ``mask_mod``'s tiles: tile ``(i // bq, j // bk)`` of (b, h)
  holds its bits at ``bm_bits[bm_index[b % Bm, h % Hm, i // bq, j // bk]]`` (``-1``: none), ``(bq, bk) =
  bm_bits.shape[1:]``;
* ``sinks (H,)``, ``alibi (H,)``, ``softcap`` (kernel dtype).
"""

_DEVICE_OPTS: Dict[str, Any] = {} if SIMULATOR else {"forceinline": True}


def device(fn: Callable) -> Callable:
    """Compile ``fn`` as a CUDA device function (force-inlined on the GPU, so local arrays stay in registers)."""
    return cuda.jit(device=True, **_DEVICE_OPTS)(fn)


def kernel(fn: Callable, shape: TileShape) -> Any:
    """Compile ``fn`` as a kernel of ``shape.threads`` threads per block; on a GPU with ``launch_bounds`` that ask
    for two resident blocks per SM (ptxas keeps the registers within what that allows)."""
    if SIMULATOR:
        return cuda.jit(fn)
    return cuda.jit(launch_bounds=(shape.threads, 2))(fn)


def lane_mask(threads: int) -> Callable:
    """``mask()``: the lanes of the calling thread's warp that exist in a block of ``threads`` threads (all 32
    unless the last warp is partial), for the ``*_sync`` warp intrinsics."""
    FULL = numba.uint32(0xFFFFFFFF)
    if threads % 32 == 0:
        return device(lambda: FULL)
    LAST = numba.uint32((1 << (threads % 32)) - 1)
    WARPS = threads // 32

    def mask():  # type: ignore[no-untyped-def]
        warp = (cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x) // 32
        return FULL if warp < WARPS else LAST

    return device(mask)


def shfl_xor_simulated(dtype: Any, threads: int) -> Callable:
    """``shfl(mask, x, lanes)``: ``cuda.shfl_xor_sync`` for Numba's simulator, which has no warp intrinsics: the
    value of the thread whose index in the block is ours XOR ``lanes``, exchanged through shared memory. Every
    thread of the block must call it (the kernels do: row reductions are block-uniform)."""
    dt = numba_type(dtype)

    def shfl(mask, x, lanes):  # type: ignore[no-untyped-def]
        buf = cuda.shared.array(threads, dt)
        tid = cuda.threadIdx.y * cuda.blockDim.x + cuda.threadIdx.x
        cuda.syncthreads()
        buf[tid] = x
        cuda.syncthreads()
        y = buf[tid ^ lanes]
        cuda.syncthreads()
        return y

    return device(shfl)


visible = build_visible(device)
"""The one visibility rule (:func:`minitorch.attention.masks.visible`), compiled for the GPU."""
kept = build_kept(device)
"""DMA's top-k keep rule (:func:`minitorch.attention.masks.kept`), compiled for the GPU."""
same_segment = build_same_segment(device)
"""Packed sequences' rule (:func:`minitorch.attention.masks.same_segment`), compiled for the GPU."""
dropout_hash = build_dropout_hash(device)
"""The counter-based dropout hash, bit-identical to :func:`minitorch.attention.dropout.dropout_mask`."""


@device
def nan_max(a, b):  # type: ignore[no-untyped-def]
    """``max(a, b)`` that keeps a NaN (the GPU's ``fmax`` drops it): a row whose scores are all NaN (a NaN query)
    must come out NaN, as on the CPU, not as a row that saw no key."""
    return a if (a >= b or a != a) else b


def numba_type(dtype: Any) -> Any:
    """numba scalar type of a float NumPy dtype (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return numba.float32
    if dtype == np.float64:
        return numba.float64
    raise TypeError(f"CUDA attention supports float32 and float64, got {dtype}")


def sentinels(dtype: Any) -> Tuple[Any, Any]:
    """``(MIN, MAX)``: the most negative and the largest finite value of ``dtype``, typed.

    ``MIN`` is a masked score and the running max of a row that has seen no key yet (whose probabilities are then
    all 0, never ``exp(MIN - MIN) = 1``); ``MAX`` stands for the ``lse`` of a row that saw no key (``-inf``), so
    that ``exp(S - lse)`` is 0 there."""
    info = np.finfo(dtype)
    return info.dtype.type(info.min), info.dtype.type(info.max)


# ---------------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------------


u32 = numba.uint32


def _unroll(n: int, most: int = 4) -> int:
    """Steps of a product's loop (over ``d`` or ``j``) unrolled at compile time: the largest divisor of ``n`` up to
    ``most``, so that the loop's own instructions (counter, compare, branch) are spread over that many steps (8 made
    the compiler leave part of the body rolled: a lower FMA share)."""
    return _divisor_at_most(n, most)


def _divisor_at_most(n: int, cap: int) -> int:
    """Largest divisor of ``n`` that is ``<= cap`` (at least 1)."""
    for t in range(max(1, min(cap, n)), 0, -1):
        if n % t == 0:
            return t
    return 1


@dataclass(frozen=True)
class TileShape:
    """Compile-time geometry of a kernel: an ``R x C`` score tile, ``TY x TX`` threads, head dim padded to ``DP``;
    ``one_kv``: the forward keeps ``K_j`` and ``V_j`` in one shared buffer, one after the other (one barrier more
    per key tile; chosen where two buffers would halve the tile, large ``D``)."""

    R: int
    C: int
    DP: int
    TY: int
    TX: int
    one_kv: bool = False
    TD: int = 1
    """Lanes per key column splitting the head dim (the split layout when ``> 1``; forward only, ``TY = 1``)."""

    @property
    def split(self) -> bool:
        """The split layout: ``TD`` lanes per (row, key) dot product, ``TX`` groups merged at the end."""
        return self.TD > 1

    @property
    def LX(self) -> int:
        """Threads along the block's x axis: ``TX`` groups of ``TD`` lanes (lane ``threadIdx.x = tx TD + td``)."""
        return self.TX * self.TD

    @property
    def RM(self) -> int:
        """Rows of a thread's register tile."""
        return self.R // self.TY

    @property
    def RN(self) -> int:
        """Columns of a thread's register tile."""
        return self.C // self.TX

    @property
    def DPT(self) -> int:
        """Head-dim columns of an output row a thread owns (``tx + e TX``; split: ``td + e TD``)."""
        return self.DP // (self.TD if self.split else self.TX)

    @property
    def DP1(self) -> int:
        """Row length of a shared ``(rows, D)`` tile: padded by ``TD`` (one lane group) against bank conflicts, so
        that the groups of a warp reading their rows at the same ``d`` hit different banks."""
        return self.DP + self.TD

    @property
    def CP(self) -> int:
        """Row length of a shared ``(R, C)`` tile (``P``, ``dS``): padded so that the threads of a warp, ``TX`` per
        row over ``32 / TX`` rows, hit 32 different banks when they write their ``(row, col)`` and different banks
        when they read one column of their rows."""
        W = max(1, min(32, self.threads) // self.TX)  # rows one warp covers
        for CP in range(self.C, self.C + 33):
            if len({(r * CP + t) % 32 for r in range(W) for t in range(self.TX)}) == W * self.TX:
                return CP
        return self.C + 1  # pragma: no cover - C + TX always works

    @property
    def threads(self) -> int:
        return self.TY * self.TX * self.TD

    @staticmethod
    def make(R: int, C: int, D: int, max_threads: Tuple[int, int] = MAX_THREADS, accs: int = 1,
             one_kv: bool = False, split: bool = False) -> "TileShape":
        """Threads from the tile (:func:`thread_grid`; one row with ``split``: :func:`split_grid`); the head dim
        padded to a multiple of ``TX`` (split: of ``TD``)."""
        if split and R == 1:
            TX, TD = split_grid(C, D, max_threads)
            return TileShape(1, int(C), int(-(-D // TD) * TD), 1, int(TX), bool(one_kv), int(TD))
        TY, TX = thread_grid(R, C, D, max_threads, accs)
        DP = -(-D // TX) * TX
        return TileShape(int(R), int(C), int(DP), int(TY), int(TX), bool(one_kv))


SPLIT_LANES = 4
"""Lanes per key in the split layout: each sums ``D / 4`` products (16 at D = 64) before two shuffle steps."""


def split_grid(C: int, D: int, max_threads: Tuple[int, int] = MAX_THREADS) -> Tuple[int, int]:
    """``(TX, TD)`` of a one-row tile of ``C`` keys in the split layout: ``TD = 4`` lanes per key (fewer for
    ``D < 4``), and as many groups ``TX`` as divide ``C`` within :data:`BLOCK_THREADS` threads in all (128 on a
    GPU: 32 groups; a 128-key tile gives each group 4 keys)."""
    TD = 1
    while TD < SPLIT_LANES and TD * 2 <= D:
        TD *= 2
    TD = max(TD, 2)
    cap = max(1, min(BLOCK_THREADS, max_threads[0] * max_threads[1]) // TD)
    return _divisor_at_most(C, cap), TD


def thread_grid(R: int, C: int, D: int, max_threads: Tuple[int, int] = MAX_THREADS, accs: int = 1) -> Tuple[int, int]:
    """``(TY, TX)`` for an ``R x C`` tile: ``TY`` divides ``R``, ``TX`` is a power of two dividing ``C`` (a row's
    threads are ``TX`` neighbouring lanes of one warp: its max and sum are warp shuffles), at most ``max_threads``
    per axis and :data:`BLOCK_THREADS` in all.

    The register tile is what makes the products fast: a thread's ``A B^T`` step reads ``RM + RN`` shared values
    for ``RM RN`` FMAs, its ``P V`` step ``RM + DPT`` for ``RM DPT``. Among the grids whose register tiles fit (live
    floats: ``accs`` accumulators of ``RM x DPT``, 2 in the dK/dV kernel, and two ``RM x RN`` score tiles, at most
    128) and that have at least 64 threads (or as many as the tile allows): the most threads that still give every
    thread at least a 4 x 4 tile (a 64 x 32 tile: 16 x 8 threads of 4 x 4), else the fewest shared loads per FMA.
    """
    cap = min(BLOCK_THREADS, max_threads[0] * max_threads[1])
    options, grids = [], []
    for TX in (1, 2, 4, 8, 16, 32):
        if C % TX or TX > max_threads[1]:
            continue
        DPT = -(-D // TX)
        for TY in range(1, min(R, max_threads[0]) + 1):
            RM, RN = R // TY, C // TX
            if R % TY or TY * TX > cap:
                continue
            floats = accs * RM * DPT + 2 * RM * RN
            grids.append((floats, -TY * TX, TY, TX))
            if floats > 128 and TY * TX < cap:
                continue
            loads = (RM + RN) / (RM * RN) + (RM + DPT) / (RM * DPT)
            options.append((TY * TX, loads, RM * RN >= 16, TY, TX))
    if not options:  # nothing fits (a large D): the grid with the fewest live floats
        return min(grids)[2], min(grids)[3]
    lo = min(64, max(o[0] for o in options))
    options = [o for o in options if o[0] >= lo]
    big = [o for o in options if o[2]]
    best = max(big, key=lambda o: (o[0], -o[1])) if big else min(options, key=lambda o: (o[1], -o[0]))
    return best[3], best[4]


# ---------------------------------------------------------------------------------------------------------------------
# Tile helpers (device functions)
# ---------------------------------------------------------------------------------------------------------------------

_TILE_OPS: Dict[Tuple[Any, ...], "TileOps"] = {}


class TileOps:
    """The device functions of one :class:`TileShape`, dtype and :class:`Flags`: loading tiles, the key source,
    the score modification, and the two register-tile products.

    * ``load_rows(dst, src, b, h, start, n, D, rows) -> bad``: ``dst[r] = src[b, h, start + r]`` (zero past ``n``
      and ``D``), cooperative and coalesced along ``d``;
    * ``n_keys(b, g, Nk, cfg)``: the length of the key sequence of (b, kv head g): ``Nk``, the list's count, or a
      paged sequence's length;
    * ``load_keys(jt, kps, b, g, c0, n, cfg)``: the key source: ``jt[c]`` = the key row of entry ``c0 + c``
      (``-1`` past ``n``), ``kps[c]`` its position;
    * ``gather_rows(dst, src, b, g, c0, n, D, rows, cfg) -> bad``: ``dst[c]`` = the key row of entry ``c0 + c``
      of ``src`` (at ``src[b, g, j]``, or in a paged batch in its page of the pool ``src``);
    * ``load_queries(qf, qn, b, h, g, q0, rows, Nq, lse, delta, cfg, stats)``: the query table of the rows
      ``q0 ..`` (:data:`QF_LSE` ...; ``lse`` and ``delta`` only with ``stats``, the backward), cooperative;
    * ``score(x, qi, j, kp, qf, qn, q0, masked, b, h, bb, hb, Nq, cfg) -> (s, ok, dsdt)``: the score modification
      of the pair (query ``qi`` of the tile, key row ``j`` at position ``kp``): ``s = modify(x + bias)`` (the
      user's ``score_mod``, softcap, ALiBi) and ``dsdt`` its derivative (1 without a modification); ``ok``: both
      exist and, in a TRIANGLE tile (``masked``), the pair is visible (positions, segment ids, the block mask's
      bits; kept, with DMA's top-k);
    * ``dot_tile(s, A, Bm)``: ``s[r, c] = sum_d A[row r, d] Bm[col c, d]`` (``A Bm^T`` into the register tile);
    * ``acc_tile(acc, P, V, vis, careful)``: ``acc[r, e] += sum_{j < C} P[row r, j] V[j, col e]``; ``careful`` leaves
      out the pairs with ``vis == 0`` (a TRIANGLE tile whose ``V`` holds NaN or Inf: ``0 * NaN`` is NaN). Split
      layout: ``s`` summed over the key's ``TD`` lanes by shuffles; ``acc`` over the group's own columns only;
    * ``merge(o, m_i, l_i)``: split layout, the groups' partial rows as one at the end of a block (else nothing).

    The loads return ``bad``, 1 if the thread loaded a NaN or Inf (``x - x != 0``); a caller turns it into a
    block-wide flag with ``cuda.syncthreads_or``, at a barrier it needs anyway.
    """

    def __init__(self, shape: TileShape, dtype: Any, flags: Flags) -> None:
        dt = numba_type(dtype)
        ft = np.dtype(dtype).type
        ZERO, ONE, NEG_INF = ft(0.0), ft(1.0), ft(-np.inf)
        _, MAX = sentinels(dtype)
        C, DP, TY, TX = shape.C, shape.DP, shape.TY, shape.TX
        RM, RN, DPT, NT = shape.RM, shape.RN, shape.DPT, shape.threads
        TD, LX, SPLIT = shape.TD, shape.LX, shape.split
        DPL = DP // TD  # head-dim columns of a dot product one lane sums
        UD, UC = _unroll(DPL), _unroll(C)
        MIN = sentinels(dtype)[0]
        HAS_BIAS, HAS_LIST, HAS_TOPK = bool(flags.has_bias), bool(flags.has_list), bool(flags.has_topk)
        HAS_PAGES = bool(flags.has_pages)
        HAS_SEG, HAS_BM = bool(flags.has_segments), bool(flags.has_block_mask)
        HAS_SOFTCAP, HAS_ALIBI = bool(flags.has_softcap), bool(flags.has_alibi)
        mod = flags.score_mod
        HAS_MOD, HAS_GRAD = mod is not None, mod is not None and mod.grad is not None
        score_mod = device(mod.fn) if HAS_MOD else None
        score_mod_grad = device(mod.grad) if HAS_GRAD else None
        HAS_MODS = HAS_MOD or HAS_SOFTCAP or HAS_ALIBI

        def load_rows(dst, src, b, h, start, n, D, rows):  # type: ignore[no-untyped-def]
            tid = cuda.threadIdx.y * LX + cuda.threadIdx.x
            bad = 0
            for idx in range(tid, rows * DP, NT):
                r = idx // DP
                d = idx - r * DP
                i = start + r
                x = ZERO
                if i < n and d < D:
                    x = src[b, h, i, d]
                    if x - x != ZERO:
                        bad = 1
                dst[r, d] = x
            return bad

        def n_keys(b, g, Nk, cfg):  # type: ignore[no-untyped-def]
            if HAS_LIST:
                return cfg.counts[b, g]
            if HAS_PAGES:
                return cfg.lengths[b]
            return Nk

        @device
        def key_row(b, g, e, n, cfg):  # type: ignore[no-untyped-def]
            """The key source: the key row of entry ``e`` of (b, g)'s key sequence of ``n`` entries (-1 past it)."""
            if e >= n:
                return -1
            if HAS_LIST:
                return cfg.kidx[b, g, e]
            return e

        def load_keys(jt, kps, b, g, c0, n, cfg):  # type: ignore[no-untyped-def]
            tid = cuda.threadIdx.y * LX + cuda.threadIdx.x
            for c in range(tid, jt.shape[0], NT):
                j = key_row(b, g, c0 + c, n, cfg)
                jt[c] = j
                kps[c] = cfg.k_pos_b[b, j] if j >= 0 else -1

        def gather_rows(dst, src, b, g, c0, n, D, rows, cfg):  # type: ignore[no-untyped-def]
            tid = cuda.threadIdx.y * LX + cuda.threadIdx.x
            bad = 0
            for idx in range(tid, rows * DP, NT):
                c = idx // DP
                d = idx - c * DP
                j = key_row(b, g, c0 + c, n, cfg)
                x = ZERO
                if j >= 0 and d < D:
                    if HAS_PAGES:  # row j of a paged sequence: in its page of the pool, read in place
                        x = src[cfg.block_table[b, j // cfg.page_size], g, j % cfg.page_size, d]
                    else:
                        x = src[b, g, j, d]
                    if x - x != ZERO:
                        bad = 1
                dst[c, d] = x
            return bad

        def load_queries(qf, qn, b, h, g, q0, rows, Nq, lse, delta, cfg, stats):  # type: ignore[no-untyped-def]
            tid = cuda.threadIdx.y * LX + cuda.threadIdx.x
            for c in range(tid, rows, NT):
                i = q0 + c
                ic = min(i, Nq - 1)
                qn[QN_POS, c] = cfg.q_pos_b[b, i] if i < Nq else -1
                qn[QN_BIAS_ROW, c] = ic if (HAS_BIAS and cfg.bias.shape[2] > 1) else 0
                qn[QN_THR, c] = cfg.thr_idx[b, g, ic] if HAS_TOPK else -1
                qf[QF_THR, c] = cfg.thr_val[b, g, ic] if HAS_TOPK else ZERO
                if stats:
                    x = lse[b, h, ic]
                    qf[QF_LSE, c] = MAX if x == NEG_INF else x
                    qf[QF_DELTA, c] = delta[b, h, ic]

        def score(x, qi, j, kp, qf, qn, q0, masked, b, h, bb, hb, Nq, cfg):  # type: ignore[no-untyped-def]
            ok = j >= 0 and q0 + qi < Nq
            if HAS_BIAS and ok:
                z = cfg.bias[bb, hb, qn[QN_BIAS_ROW, qi], j]
                x += z
                if HAS_TOPK and masked:  # DMA: the bias is the importance z, and the row keeps the top-k of it
                    ok = kept(z, j, qf[QF_THR, qi], qn[QN_THR, qi])
            dsdt = ONE
            if HAS_MODS and ok:  # in the order of the public API: score_mod, softcap, ALiBi
                qp = qn[QN_POS, qi]
                if HAS_GRAD:
                    dsdt = ft(score_mod_grad(x, b, h, qp, kp))
                if HAS_MOD:
                    x = ft(score_mod(x, b, h, qp, kp))
                if HAS_SOFTCAP:
                    t = math.tanh(x / cfg.softcap)
                    dsdt *= ONE - t * t
                    x = cfg.softcap * t
                if HAS_ALIBI:
                    x -= cfg.alibi[h] * ft(abs(qp - kp))
            if masked and ok:
                ok = visible(qn[QN_POS, qi], kp, cfg.causal, cfg.window, cfg.num_sinks)
                if HAS_SEG and ok:  # packed sequences: only within one segment
                    ok = same_segment(cfg.q_seg[b, q0 + qi], cfg.k_seg[b, j])
                if HAS_BM and ok:  # a mask_mod: its bits, in the tiles it masks in part
                    i = q0 + qi
                    bq, bk = cfg.bm_bits.shape[1], cfg.bm_bits.shape[2]
                    slot = cfg.bm_index[b % cfg.bm_index.shape[0], h % cfg.bm_index.shape[1], i // bq, j // bk]
                    if slot >= 0:
                        ok = cfg.bm_bits[slot, i % bq, j % bk] != 0
            return x, ok, dsdt

        mask = lane_mask(NT)
        shfl = shfl_xor_simulated(dtype, NT) if SIMULATOR else cuda.shfl_xor_sync
        STEPS = 0 if SPLIT else TX.bit_length() - 1  # log2(TX): the butterfly over a row's TX lanes (split: none,
        SPLIT_STEPS = TD.bit_length() - 1  # each group has its own partial row); log2(TD): over a key's TD lanes

        def row_max(x):  # type: ignore[no-untyped-def]
            m = mask()
            for k in range(STEPS):
                x = nan_max(x, shfl(m, x, TX >> (k + 1)))
            return x

        def row_sum(x):  # type: ignore[no-untyped-def]
            m = mask()
            for k in range(STEPS):
                x += shfl(m, x, TX >> (k + 1))
            return x

        def dot_tile(s, A, Bm):  # type: ignore[no-untyped-def]
            ty = u32(cuda.threadIdx.y)
            tx = u32(u32(cuda.threadIdx.x) // u32(TD)) if SPLIT else u32(cuda.threadIdx.x)
            td = u32(u32(cuda.threadIdx.x) % u32(TD)) if SPLIT else u32(0)
            a = cuda.local.array(RM, dt)
            bv = cuda.local.array(RN, dt)
            for r in range(RM):
                for c in range(RN):
                    s[r, c] = ZERO
            for k0 in range(u32(0), u32(DPL), u32(UD)):  # this lane's head-dim columns d = td + k TD
                for kk in range(UD):
                    d = td + u32((k0 + u32(kk)) * u32(TD)) if SPLIT else k0 + u32(kk)
                    for r in range(RM):
                        a[r] = A[ty + u32(r * TY), d]
                    for c in range(RN):
                        bv[c] = Bm[tx + u32(c * TX), d]
                    for r in range(RM):
                        for c in range(RN):
                            s[r, c] += a[r] * bv[c]
            if SPLIT:  # the TD lanes of a key each hold part of its dot product: sum them (every lane gets it)
                m = mask()
                for k in range(SPLIT_STEPS):
                    for r in range(RM):
                        for c in range(RN):
                            s[r, c] += shfl(m, s[r, c], 1 << k)

        def acc_tile(acc, P, V, vis, careful):  # type: ignore[no-untyped-def]
            ty = u32(cuda.threadIdx.y)
            tx = u32(u32(cuda.threadIdx.x) // u32(TD)) if SPLIT else u32(cuda.threadIdx.x)
            td = u32(u32(cuda.threadIdx.x) % u32(TD)) if SPLIT else u32(0)
            a = cuda.local.array(RM, dt)
            vv = cuda.local.array(DPT, dt)
            if SPLIT:  # a group sums over its own key columns tx + c TX, into the columns d = td + e TD
                for c in range(RN):
                    j = tx + u32(c * TX)
                    for r in range(RM):
                        a[r] = P[ty + u32(r * TY), j]
                    for e in range(DPT):
                        vv[e] = V[j, td + u32(e * TD)]
                    if careful:
                        for r in range(RM):
                            if vis[ty + u32(r * TY), j] != 0:
                                for e in range(DPT):
                                    acc[r, e] += a[r] * vv[e]
                    else:
                        for r in range(RM):
                            for e in range(DPT):
                                acc[r, e] += a[r] * vv[e]
                return
            for j0 in range(u32(0), u32(C), u32(UC)):
                for jj in range(UC):
                    j = j0 + u32(jj)
                    for r in range(RM):
                        a[r] = P[ty + u32(r * TY), j]
                    for e in range(DPT):
                        vv[e] = V[j, tx + u32(e * TX)]
                    if careful:  # rare: only the visible pairs, so that a NaN the row does not see stays out
                        for r in range(RM):
                            if vis[ty + u32(r * TY), j] != 0:
                                for e in range(DPT):
                                    acc[r, e] += a[r] * vv[e]
                    else:
                        for r in range(RM):
                            for e in range(DPT):
                                acc[r, e] += a[r] * vv[e]

        def merge(o, m_i, l_i):  # type: ignore[no-untyped-def]
            """Split layout: the TX groups' online softmaxes of one row, each over its own keys, as one (the
            split-K merge of :func:`~.forward.make_merge`, in shared memory): ``M = max m_g``, ``l = sum l_g
            e^(m_g - M)``, ``O = sum O_g e^(m_g - M)``. Every group ends with the row's state."""
            if SPLIT:
                mb = cuda.shared.array((RM, TX), dt)
                lb = cuda.shared.array((RM, TX), dt)
                ob = cuda.shared.array((RM, TX, DP), dt)
                tx = u32(cuda.threadIdx.x) // u32(TD)
                td = u32(cuda.threadIdx.x) % u32(TD)
                for r in range(RM):
                    if td == 0:
                        mb[r, tx] = m_i[r]
                        lb[r, tx] = l_i[r]
                    for e in range(DPT):
                        ob[r, tx, td + u32(e * TD)] = o[r, e]
                cuda.syncthreads()
                for r in range(RM):
                    M = MIN
                    for t in range(TX):
                        M = nan_max(M, mb[r, t])
                    L = ZERO
                    for e in range(DPT):
                        o[r, e] = ZERO
                    for t in range(TX):
                        w = math.exp(mb[r, t] - M)  # 0 for a group that saw no key while others did
                        L += lb[r, t] * w
                        for e in range(DPT):
                            o[r, e] += ob[r, t, td + u32(e * TD)] * w
                    m_i[r] = M
                    l_i[r] = L

        self.shape, self.flags = shape, flags
        self.load_rows = device(load_rows)
        self.n_keys = device(n_keys)
        self.load_keys = device(load_keys)
        self.gather_rows = device(gather_rows)
        self.load_queries = device(load_queries)
        self.score = device(score)
        self.row_max = device(row_max)
        self.row_sum = device(row_sum)
        self.dot_tile = device(dot_tile)
        self.acc_tile = device(acc_tile)
        self.merge = device(merge)


def tile_ops(shape: TileShape, dtype: Any, flags: Flags) -> TileOps:
    """Cached :class:`TileOps` for ``(shape, dtype, flags)``."""
    key = (shape, np.dtype(dtype).name, flags_key(flags))
    if key not in _TILE_OPS:
        _TILE_OPS[key] = TileOps(shape, dtype, Flags(*key[2]))
    return _TILE_OPS[key]


def cached(cache: Dict[Tuple[Any, ...], Any], key: Tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``cache[key]``, built by ``build()`` the first time (kernel factories memoize with it)."""
    if key not in cache:
        cache[key] = build()
    return cache[key]
