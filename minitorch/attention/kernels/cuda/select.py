"""Dynamic Mask Attention's data-dependent parts on the GPU: the importance ``z`` (and its gradient), and the top-k
selection (thresholds, lifetimes, the compacted key list and its tile types).

The attention itself is the engine's flash attention configured with the selection (a key list and the top-k rule,
:func:`minitorch.attention.functions.dma_attend`); these kernels only produce what configures it:

* importance: one thread per ``(b, g, j)`` (``u``, ``z``); backward: ``du`` per ``(b, g, j)``, ``d_dt_proj`` per
  ``(g, c)`` and ``d_a_coef`` per ``g`` (each a fixed-order sum over ``b, j``: deterministic), ``dv += dx`` per
  ``(b, kv head, j, d)``;
* selection (:func:`make_select`): what the CPU's serial heap sweep
  (:func:`~minitorch.attention.selection.build_selection`) computes, taken from its definition with one thread per
  key (how many keys rank above it, hence when it enters and leaves the top-k and for which steps it is the worst
  kept key), then a block per ``(b, g)`` for the thresholds and the compacted list (prefix sums); the list's tile
  types (:func:`~minitorch.attention.tiling.build_list_classifier`): one thread per ``(b, g, query tile)``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numba
import numpy as np
from numba import cuda

from ...selection import Selection, empty_threshold
from ...tiling import build_list_classifier
from .memory import scratch
from .launch import fill
from .tiles import SIMULATOR, cached, device, grid1, numba_type, u32

DeviceArray = Any
_KERNELS: Dict[Tuple[Any, ...], Any] = {}

_list_tile_types = build_list_classifier(device)


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

    return cached(_KERNELS, ("importance", np.dtype(dtype).name, LOG), build)


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

    return cached(_KERNELS, ("importance_du", np.dtype(dtype).name, LOG), build)


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

    return cached(_KERNELS, ("importance_grads", np.dtype(dtype).name), build)


def importance(v: DeviceArray, dt_proj: DeviceArray, a_coef: DeviceArray, log_space: bool
               ) -> Tuple[DeviceArray, DeviceArray]:
    """``(z, u)``, ``(B, Hkv, Nk)`` device arrays."""
    dtype = np.dtype(v.dtype)
    B, Hkv, Nk, _ = v.shape
    z = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    u = cuda.device_array((B, Hkv, Nk), dtype=dtype)
    if B * Hkv * Nk > 0:
        blocks, threads = grid1(B * Hkv * Nk)
        make_importance(dtype, log_space)[blocks, threads](v, dt_proj, a_coef, z, u)
    return z, u


def importance_backward(dz: DeviceArray, v: DeviceArray, dt_proj: DeviceArray, a_coef: DeviceArray, z: DeviceArray,
                        u: DeviceArray, log_space: bool, dv: DeviceArray) -> Tuple[DeviceArray, DeviceArray, DeviceArray]:
    """Chain ``dz`` into ``(dv (updated in place), d_dt_proj, d_a_coef)``."""
    dtype = np.dtype(v.dtype)
    B, Hkv, Nk, D = v.shape
    du = scratch("du", (B, Hkv, Nk), dtype)
    dza = scratch("dza", (B, Hkv, Nk), dtype)
    d_dt = cuda.device_array((Hkv, Hkv * D), dtype=dtype)
    d_a = cuda.device_array((Hkv,), dtype=dtype)
    if B * Hkv * Nk > 0:
        blocks, threads = grid1(B * Hkv * Nk)
        make_importance_du(dtype, log_space)[blocks, threads](dz, z, u, a_coef, du, dza)
    d_dt_k, d_a_k, dx_k = make_importance_grads(dtype)
    blocks, threads = grid1(Hkv * Hkv * D)
    d_dt_k[blocks, threads](du, v, d_dt)
    d_a_k[1, max(1, Hkv)](dza, d_a)
    if B * Hkv * Nk * D > 0:
        blocks, threads = grid1(B * Hkv * Nk * D)
        dx_k[blocks, threads](du, dt_proj, dv)
    return dv, d_dt, d_a


# ---------------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------------

SELECT_THREADS = 8 if SIMULATOR else 128
"""Threads per block of the selection kernels (a power of two; the simulator runs a Python thread per thread)."""
SELECT_CHUNK = 32 if SIMULATOR else 512
"""Importances the scan stages in shared memory at a time (a multiple of :data:`SELECT_THREADS`)."""


def make_select(dtype: Any, threads: int = SELECT_THREADS, chunk: int = SELECT_CHUNK) -> Tuple[Any, Any]:
    """``(scan, finish)``: the top-k selection, every key in parallel. What the heap sweep of
    :func:`~minitorch.attention.selection.build_selection` computes, taken from its definition:

    Sweep the keys of (b, g) in index order; after step ``p`` the kept keys are the ``k`` best of the swept keys
    (padding is never swept; ties: the lower index wins, ``_worse``). Let ``above_j(p)`` be how many swept keys rank
    above key ``j``. Then

    * ``j`` is kept after step ``p >= j`` iff ``above_j(p) < k``: it enters at step ``j`` unless ``k`` keys before
      it beat it, and leaves (``evict[j]``) at the step that sweeps the ``k``-th key above it (``victim`` of that
      step), or never (``Nk``);
    * the worst kept key after step ``p`` (the heap's root: row ``p - off``'s threshold with causal) is the kept key
      ``j <= p`` with no swept key below it (the heap is not full yet) or ``k - 1`` above it (it is).

    The kernels:

    * (before them, ``victim`` and ``root_at`` are filled with -1: :func:`~.launch.fill`);
    * ``scan(z, k_pos_b, keep, evict, victim, root_at)``, grid ``(ceil(Nk / threads), B Hkv)``: thread ``j``
      sweeps the keys in order, ``z`` staged through shared memory ``chunk`` keys at a time (padding as NaN: it
      ranks neither above nor below), counting ``above_j`` until ``k`` keys beat it or the keys end; it writes
      ``evict[j]``, ``victim[evict[j]] = j`` and ``root_at[p] = j`` for the steps ``p`` at which it is the worst
      kept key. A block stops once all its keys are decided.
    * ``finish(z, root_at, evict, victim, causal, off, compact, big, thr_val, thr_idx, kidx, counts)``, a block per
      ``(b, g)``: the thresholds (row ``i`` reads ``root_at`` at its own position ``off + i`` with causal, at the
      last step without), and the compacted list: the never-evicted keys in index order, then (causal) the evicted
      ones, latest eviction first (``victim`` read backwards), each thread a contiguous range of the candidates
      placed by one block-wide prefix sum of the counts.

    Cost: key ``j`` sweeps until it leaves the top-k, to the end if it never does. A warp runs until its last key
    is decided, and the final top-k of an unsorted ``z`` lies all over the sequence, so most warps sweep every key:
    about ``Nk / 32`` warps x ``Nk`` steps per (b, g) (``O(Nk^2)`` comparisons; about 20 instructions a step in
    the report's SASS), spread over ``ceil(Nk / threads)`` blocks, each step reading shared memory. The serial
    heap does ``O(Nk log k)`` work, but as a chain of dependent global-memory steps in one thread. Exact: only
    comparisons, so the result is the sweep's bit for bit (for ``z`` without NaN, where the ranking is an order).
    """
    NT, CH = int(threads), int(chunk)
    assert NT & (NT - 1) == 0 and CH % NT == 0
    LOG_NT = NT.bit_length() - 1

    def build() -> Tuple[Any, Any]:
        dt = numba_type(dtype)
        ZERO, NAN = np.dtype(dtype).type(0.0), np.dtype(dtype).type(np.nan)
        i32 = numba.int32

        def select_scan(z, k_pos_b, keep, evict, victim, root_at):  # type: ignore[no-untyped-def]
            zs = cuda.shared.array(CH, dt)
            tid = u32(cuda.threadIdx.x)
            Hkv = z.shape[1]
            b = cuda.blockIdx.y // Hkv
            g = cuda.blockIdx.y - b * Hkv
            Nk = u32(z.shape[2])
            K = u32(min(keep, z.shape[2]))  # keep >= Nk: no key is ever evicted
            j = u32(u32(cuda.blockIdx.x) * u32(NT) + tid)  # this thread's key
            mine = j < Nk and k_pos_b[b, j] >= 0
            zj = z[b, g, j] if mine else ZERO
            if j < Nk:
                evict[b, g, j] = j  # the empty lifetime [j, j): j is never kept (padding, or k keys before beat it)
            searching = mine
            above = u32(0)  # swept keys that rank above j
            below = False  # has a swept key ranked below j? (until one has, j is the worst kept key)
            for c0 in range(u32(0), Nk, u32(CH)):
                if not cuda.syncthreads_or(i32(1) if searching else i32(0)):  # every key of the block is decided
                    break
                for t in range(tid, u32(CH), u32(NT)):  # stage keys [c0, c0 + CH) once all are done with the last
                    i = u32(c0 + t)
                    zs[t] = z[b, g, i] if (i < Nk and k_pos_b[b, i] >= 0) else NAN  # padding: ranks nowhere
                cuda.syncthreads()
                c1 = u32(min(u32(c0 + u32(CH)), Nk))
                # steps i < j: i ranks above j iff z_i >= z_j (a tie goes to the lower index)
                i = c0
                while searching and i < c1 and i < j:
                    x = zs[u32(i - c0)]
                    if x >= zj:
                        above = u32(above + u32(1))
                        searching = above < K  # k keys before j beat it: j never enters
                    elif x < zj:
                        below = True
                    i = u32(i + u32(1))
                # step j: j enters (it is the worst kept key if none below it, or k - 1 above it)
                if searching and i == j and j < c1:
                    if not below or u32(above + u32(1)) == K:
                        root_at[b, g, j] = i32(j)
                    i = u32(i + u32(1))
                # steps i > j: i ranks above j iff z_i > z_j; the k-th one evicts j
                while searching and i < c1:
                    x = zs[u32(i - c0)]
                    if x > zj:
                        above = u32(above + u32(1))
                        if above == K:
                            evict[b, g, j] = i
                            victim[b, g, i] = i32(j)
                            searching = False
                    elif x <= zj:
                        below = True
                    if searching and (not below or u32(above + u32(1)) == K):  # j: the worst kept key after step i
                        root_at[b, g, i] = i32(j)
                    i = u32(i + u32(1))
                if searching and c1 == Nk:  # swept every key: j stays to the end
                    evict[b, g, j] = Nk

        def block_scan(buf, x):  # type: ignore[no-untyped-def]
            """``(sum of x over the threads before this one, sum over the block)``: Hillis-Steele in ``buf``."""
            tid = cuda.threadIdx.x
            cuda.syncthreads()  # the last call's readers are done with buf
            buf[tid] = x
            cuda.syncthreads()
            for s in range(LOG_NT):
                d = 1 << s
                y = buf[tid - d] if tid >= d else i32(0)
                cuda.syncthreads()
                buf[tid] += y
                cuda.syncthreads()
            return buf[tid] - x, buf[NT - 1]

        block_scan_d = device(block_scan)

        def list_part(evict, victim, b, g, part, n, top, lo, kidx, start, buf):  # type: ignore[no-untyped-def]
            """Append the ``n`` candidates of ``part`` that pass to ``kidx[b, g, start:]``, in order; return how many
            did. Part 0: key ``e`` if never evicted (``evict[e] == top``); part 1: the key evicted at step
            ``top - e`` (latest eviction first), for steps above ``lo``. Thread t takes candidates
            ``[t L, (t + 1) L)``: it counts its own, one prefix sum over the block places them."""
            tid = cuda.threadIdx.x
            L = (n + NT - 1) // NT
            e0 = min(n, tid * L)
            e1 = min(n, e0 + L)
            mine = i32(0)
            for e in range(e0, e1):
                if part == 0:
                    mine += i32(1) if evict[b, g, e] == top else i32(0)
                else:
                    mine += i32(1) if (top - e > lo and victim[b, g, top - e] >= 0) else i32(0)
            at, total = block_scan_d(buf, mine)
            c = start + at
            for e in range(e0, e1):
                if part == 0:
                    if evict[b, g, e] == top:
                        kidx[b, g, c] = e
                        c += 1
                elif top - e > lo and victim[b, g, top - e] >= 0:
                    kidx[b, g, c] = victim[b, g, top - e]
                    c += 1
            return total

        list_part_d = device(list_part)

        def select_finish(z, root_at, evict, victim, causal, off, compact, big, thr_val, thr_idx, kidx, counts):  # type: ignore[no-untyped-def]
            buf = cuda.shared.array(NT, numba.int32)
            tid = cuda.threadIdx.x
            Hkv = z.shape[1]
            b = cuda.blockIdx.x // Hkv
            g = cuda.blockIdx.x - b * Hkv
            Nk = z.shape[2]
            Nq = thr_val.shape[2]
            # the thresholds: row i keeps what the heap holds after the step of its own position (causal) or the last
            for i in range(tid, Nq, NT):
                p = off + i if causal else Nk - 1
                r = root_at[b, g, p] if (p >= 0 and p < Nk) else -1
                thr_val[b, g, i] = z[b, g, r] if r >= 0 else big  # (big, -1): keep nothing
                thr_idx[b, g, i] = r
            # the compacted key list: every key some row keeps
            count = 0
            if not compact:
                for j in range(tid, Nk, NT):
                    kidx[b, g, j] = j
                count = Nk
            elif Nq > 0:
                lo = off if (causal and off > 0) else 0
                count = list_part_d(evict, victim, b, g, 0, Nk, Nk, lo, kidx, 0, buf)  # the final top-k, by index
                if causal:  # then the evicted keys, latest eviction first: steps s = Nk - 1 down to lo + 1
                    count += list_part_d(evict, victim, b, g, 1, Nk, Nk - 1, lo, kidx, count, buf)
            if tid == 0:
                counts[b, g] = count

        return cuda.jit(select_scan), cuda.jit(select_finish)

    return cached(_KERNELS, ("select", np.dtype(dtype).name, NT, CH), build)


@cuda.jit
def tile_types_kernel(kidx, counts, evict, Br, Bc, causal, off, Nq, types):  # type: ignore[no-untyped-def]
    """One thread per (batch, kv head, query tile): the types of the list's tiles."""
    p = cuda.grid(1)
    B, Hkv, Tr = types.shape[0], types.shape[1], types.shape[2]
    if p < B * Hkv * Tr:
        _list_tile_types(kidx, counts, evict, p // (Hkv * Tr), (p // Tr) % Hkv, p % Tr, Br, Bc, causal, off, Nq,
                         types)


def selection_blocks(dspec: Any) -> Tuple[int, int]:
    """``(Br, Bc)`` of the selection's tiles: the call's blocks, with ``Bc`` halved while the list (at most
    ``keep`` keys without causal) would fill less than half a tile. The kernels may run sub-tiles of these
    (:func:`~.launch.fit_shape`); each takes the type of the tile that contains it."""
    Br, Bc = dspec.block_q, dspec.block_k
    n_keys = max(1, min(dspec.Nk, dspec.keep if dspec.compact and not dspec.causal else dspec.Nk))
    while Bc % 2 == 0 and Bc // 2 >= n_keys:
        Bc //= 2
    return int(Br), int(Bc)


def select(z: DeviceArray, dspec: Any, k_pos_b: DeviceArray) -> Selection:
    """The selection of a DMA call (:class:`~minitorch.attention.spec.DMASpec`) on the device: thresholds,
    lifetimes, the compacted list (:func:`make_select`: ``O(Nk^2)`` comparisons per (b, g), every key in parallel)
    and its tile types (one thread per query tile, ``O(count)`` each). ``k_pos_b (B, Nk)`` the key positions on the
    device (-1: padding)."""
    dtype = np.dtype(z.dtype)
    B, Hkv, Nq, Nk = dspec.B, dspec.Hkv, dspec.Nq, dspec.Nk
    Br, Bc = selection_blocks(dspec)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    sel = Selection(
        cuda.device_array((B, Hkv, Nq), dtype=dtype), cuda.device_array((B, Hkv, Nq), dtype=np.int64),
        cuda.device_array((B, Hkv, Nk), dtype=np.int64), cuda.device_array((B, Hkv, Nk), dtype=np.int64),
        cuda.device_array((B, Hkv), dtype=np.int64), cuda.device_array((B, Hkv, Tr, Tc), dtype=np.int8), Br, Bc,
    )
    if B * Hkv == 0:
        return sel
    scan, finish = make_select(dtype)
    victim = scratch("victim", (B, Hkv, max(Nk, 1)), np.int32)  # the key evicted at step s, or -1
    root_at = scratch("root_at", (B, Hkv, max(Nk, 1)), np.int32)  # the worst kept key after step s, or -1
    if Nk > 0:
        fill(victim, -1)
        fill(root_at, -1)
        scan[(-(-Nk // SELECT_THREADS), B * Hkv), SELECT_THREADS](z, k_pos_b, np.int64(dspec.keep), sel.evict,
                                                                   victim, root_at)
    finish[B * Hkv, SELECT_THREADS](z, root_at, sel.evict, victim, bool(dspec.causal), np.int64(dspec.off),
                                    bool(dspec.compact), empty_threshold(dtype), sel.thr_val, sel.thr_idx, sel.kidx,
                                    sel.counts)
    if B * Hkv * Tr * Tc > 0:
        blocks, threads = grid1(B * Hkv * Tr)
        tile_types_kernel[blocks, threads](sel.kidx, sel.counts, sel.evict, np.int64(Br), np.int64(Bc),
                                           bool(dspec.causal), np.int64(dspec.off), np.int64(Nq), sel.types)
    return sel
