"""Dynamic Mask Attention's importance on the CPU: its two matrix products as kernels on the engine's threads.

The formulas are :mod:`minitorch.attention.importance`'s (the NumPy version the Simple backend runs); only the
products change hands. With ``x[b, j] = concat_heads(v)[b, j]`` (``v[b, :, j, :]`` flattened, ``Hkv D`` numbers)::

    forward   u[b, g, j]   = x[b, j] . dt_proj[g]                        (:func:`_project`)
    backward  dv[b, :, j] += sum_g du[b, g, j] dt_proj[g]   (as (Hkv, D)) (:func:`_project_back`)
              d_dt[g]      = sum_(b, j) du[b, g, j] x[b, j]                (:func:`_dt_grad`)

Why not ``x @ dt_proj.T`` in NumPy: a BLAS product wakes the BLAS library's own threads, and OpenBLAS's threads
busy-wait for a while after every call. The attention kernel that runs right after the importance then shares
the cores with them: measured at N = 4096 on 2 cores, the DMA forward ran 1.5x slower after a NumPy importance
than back to back. These kernels read ``v`` in place (no ``concat_heads`` copy), run on the same threads as the
attention, accumulate in float64 and sum in a fixed order (deterministic, whatever the thread count).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ... import importance as formulas
from .launch import as_input, kernel, launch, program, rounds

CHUNK = 256
"""Keys per program of the key-parallel kernels."""


@kernel()
def _project(worker, n_workers, v, dt, u):  # type: ignore[no-untyped-def]
    """``u[b, g, j] = sum_(hk, d) v[b, hk, j, d] dt[g, hk D + d]``. Grid: (batch, chunk of :data:`CHUNK` keys)."""
    B, Hkv, Nk, D = v.shape
    G = dt.shape[0]
    n_chunks = (Nk + CHUNK - 1) // CHUNK
    for r in range(rounds(B * n_chunks, n_workers)):
        p = program(worker, n_workers, r)
        if p >= B * n_chunks:
            continue
        b, c = p // n_chunks, p % n_chunks
        for j in range(c * CHUNK, min(Nk, (c + 1) * CHUNK)):
            for g in range(G):
                acc = 0.0
                for hk in range(Hkv):
                    for d in range(D):
                        acc += np.float64(v[b, hk, j, d]) * np.float64(dt[g, hk * D + d])
                u[b, g, j] = acc


@kernel()
def _project_back(worker, n_workers, du, dt, dv_in, dv_out):  # type: ignore[no-untyped-def]
    """``dv_out[b, hk, j, d] = dv_in[b, hk, j, d] + sum_g du[b, g, j] dt[g, hk D + d]``. Grid: (batch, kv head,
    chunk of :data:`CHUNK` keys)."""
    B, Hkv, Nk, D = dv_in.shape
    G = dt.shape[0]
    n_chunks = (Nk + CHUNK - 1) // CHUNK
    n = B * Hkv * n_chunks
    for r in range(rounds(n, n_workers)):
        p = program(worker, n_workers, r)
        if p >= n:
            continue
        b, hk, c = p // (Hkv * n_chunks), (p // n_chunks) % Hkv, p % n_chunks
        for j in range(c * CHUNK, min(Nk, (c + 1) * CHUNK)):
            for d in range(D):
                acc = np.float64(dv_in[b, hk, j, d])
                for g in range(G):
                    acc += np.float64(du[b, g, j]) * np.float64(dt[g, hk * D + d])
                dv_out[b, hk, j, d] = acc


@kernel()
def _dt_grad(worker, n_workers, du, v, d_dt):  # type: ignore[no-untyped-def]
    """``d_dt[g, hk D + d] = sum_(b, j) du[b, g, j] v[b, hk, j, d]``, summed over ``b`` then ``j`` in increasing
    order. Grid: (importance head g, kv head hk)."""
    B, Hkv, Nk, D = v.shape
    G = du.shape[1]
    acc = np.zeros(D, np.float64)
    for r in range(rounds(G * Hkv, n_workers)):
        p = program(worker, n_workers, r)
        if p >= G * Hkv:
            continue
        g, hk = p // Hkv, p % Hkv
        acc[:] = 0.0
        for b in range(B):
            for j in range(Nk):
                x = np.float64(du[b, g, j])
                for d in range(D):
                    acc[d] += x * np.float64(v[b, hk, j, d])
        for d in range(D):
            d_dt[g, hk * D + d] = acc[d]


def importance(v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, log_space: bool
               ) -> Tuple[np.ndarray, np.ndarray]:
    """``(z, u)``, both ``(B, Hkv, Nk)`` in ``v``'s dtype: :func:`minitorch.attention.importance.importance` with
    the product ``u`` computed by :func:`_project`."""
    v = as_input(v, v.dtype)
    B, Hkv, Nk, _ = v.shape
    u = np.empty((B, dt_proj.shape[0], Nk), v.dtype)
    launch(_project, B * -(-Nk // CHUNK), v, as_input(dt_proj, v.dtype), u)
    return formulas.gate(u, as_input(a_coef, v.dtype), log_space), u


def importance_backward(
    dz: np.ndarray, v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, z: np.ndarray, u: np.ndarray,
    log_space: bool, dv: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`minitorch.attention.importance.importance_backward` with its two products as kernels: returns ``(dv +
    the importance's share of dv, d_dt_proj, d_a_coef)``."""
    T = v.dtype
    v, dt = as_input(v, T), as_input(dt_proj, T)
    B, Hkv, Nk, D = v.shape
    du, da = formulas.gate_grads(dz, as_input(a_coef, T), z, u, log_space)
    du = as_input(du, T)
    dv_out = np.empty((B, Hkv, Nk, D), T)
    launch(_project_back, B * Hkv * -(-Nk // CHUNK), du, dt, as_input(dv, T), dv_out)
    d_dt = np.empty(dt.shape, T)
    launch(_dt_grad, dt.shape[0] * Hkv, du, v, d_dt)
    return dv_out, d_dt, da.sum(axis=(0, 2)).astype(T)
