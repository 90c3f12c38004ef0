"""Dynamic Mask Attention's data-dependent parts on the GPU: the importance ``z`` (and its gradient), and the top-k
selection (thresholds, lifetimes, the compacted key list and its tile types).

The attention itself is the engine's flash attention configured with the selection (a key list and the top-k rule,
:func:`minitorch.attention.functions.dma_attend`); these kernels only produce what configures it:

* importance: one thread per ``(b, g, j)`` (``u``, ``z``); backward: ``du`` per ``(b, g, j)``, ``d_dt_proj`` per
  ``(g, c)`` and ``d_a_coef`` per ``g`` (each a fixed-order sum over ``b, j``: deterministic), ``dv += dx`` per
  ``(b, kv head, j, d)``;
* selection: one thread per ``(b, g)`` runs the heap sweep of :func:`~minitorch.attention.selection.build_selection`
  (the same source the CPU runs), the heap in a global scratch array; the list's tile types
  (:func:`~minitorch.attention.tiling.build_list_classifier`): one thread per ``(b, g, query tile)``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import numpy as np
from numba import cuda

from ...selection import Selection, build_selection, empty_threshold
from ...tiling import build_list_classifier
from .tiles import ROW_THREADS, cached, device

DeviceArray = Any
_KERNELS: Dict[Tuple[Any, ...], Any] = {}

_select_head = build_selection(device)
_list_tile_types = build_list_classifier(device)


def _grid1(n: int) -> Tuple[int, int]:
    return (max(1, -(-n // ROW_THREADS)), ROW_THREADS)


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
    lifetimes, the compacted list and its tile types, ``O(B Hkv (Nk log k + Tr count))``. ``k_pos_b (B, Nk)`` the
    key positions on the device (-1: padding)."""
    dtype = np.dtype(z.dtype)
    B, Hkv, Nq, Nk = dspec.B, dspec.Hkv, dspec.Nq, dspec.Nk
    Br, Bc = selection_blocks(dspec)
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    cap = max(1, min(dspec.keep, Nk))
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
        z, k_pos_b, np.int64(dspec.keep), bool(dspec.causal), np.int64(dspec.off), hv, hi, sel.evict, victim,
        sel.thr_val, sel.thr_idx, sel.kidx, sel.counts, bool(dspec.compact), empty_threshold(dtype))
    if B * Hkv * Tr * Tc > 0:
        blocks, threads = _grid1(B * Hkv * Tr)
        tile_types_kernel[blocks, threads](sel.kidx, sel.counts, sel.evict, np.int64(Br), np.int64(Bc),
                                           bool(dspec.causal), np.int64(dspec.off), np.int64(Nq), sel.types)
    return sel
