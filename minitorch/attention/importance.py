"""Dynamic Mask Attention's importance ``z`` of every key, and its gradient, in NumPy (Simple and Fast backends).

For ``v (B, Hkv, Nk, D)``, ``dt_proj (Hkv, Hkv*D)``, ``a_coef (Hkv,)``::

    x[b, j]    = concat_heads(v)[b, j] = v[b, :, j, :].reshape(Hkv * D)
    u[b, g, j] = x[b, j] @ dt_proj[g]
    z[b, g, j] = exp(a_coef[g] * softplus(u[b, g, j]))       (log_space=True: z = a_coef[g] * softplus(u))

``O(B Nk Hkv D)`` work and memory, vectorized. The CPU engine computes the two products with kernels of its own
(:mod:`minitorch.attention.kernels.cpu.importance`, which says why) and the rest with :func:`gate` and
:func:`gate_grads`; the CUDA engine has kernels for the same formulas.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def concat_heads(v: np.ndarray) -> np.ndarray:
    """``(B, Hkv, Nk, D) -> (B, Nk, Hkv*D)``: each key's values of all kv heads side by side."""
    B, Hkv, Nk, D = v.shape
    return np.ascontiguousarray(np.transpose(v, (0, 2, 1, 3))).reshape(B, Nk, Hkv * D)


def softplus(u: np.ndarray) -> np.ndarray:
    """``log(1 + exp(u))`` without overflow (dtype kept)."""
    return np.logaddexp(u.dtype.type(0), u)


def sigmoid(u: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-u))`` without overflow (dtype kept); the derivative of softplus."""
    half = u.dtype.type(0.5)
    return half + half * np.tanh(half * u)


def gate(u: np.ndarray, a_coef: np.ndarray, log_space: bool) -> np.ndarray:
    """``z = exp(a_coef[g] softplus(u))`` (``log_space``: ``a_coef[g] softplus(u)``) for ``u (B, Hkv, Nk)``, in
    ``u``'s dtype."""
    g = a_coef.reshape(1, -1, 1).astype(u.dtype, copy=False) * softplus(u)
    return np.ascontiguousarray(g if log_space else np.exp(g), dtype=u.dtype)


def gate_grads(dz: np.ndarray, a_coef: np.ndarray, z: np.ndarray, u: np.ndarray, log_space: bool
               ) -> Tuple[np.ndarray, np.ndarray]:
    """``(du, da)``, both ``(B, Hkv, Nk)``: ``dz`` through :func:`gate`, ``dz/du = z a sigmoid(u)`` and ``dz/da = z
    softplus(u)`` (log space: ``a sigmoid(u)`` and ``softplus(u)``); ``da`` still to be summed over ``b, j``."""
    a = a_coef.reshape(1, -1, 1)
    sp, sig = softplus(u), sigmoid(u)
    if log_space:
        return dz * a * sig, dz * sp
    return dz * z * a * sig, dz * z * sp


def importance(v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, log_space: bool) -> Tuple[np.ndarray, np.ndarray]:
    """``(z, u)``, both ``(B, Hkv, Nk)`` in the dtype of ``v``; ``u`` is the pre-activation (kept for backward)."""
    x = concat_heads(v)
    u = np.ascontiguousarray(np.transpose(x @ dt_proj.T, (0, 2, 1)))  # (B, Hkv, Nk)
    return gate(u, a_coef, log_space).astype(v.dtype, copy=False), u


def importance_backward(
    dz: np.ndarray, v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, z: np.ndarray, u: np.ndarray,
    log_space: bool, dv: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chain ``dz`` through the importance: returns ``(dv + d concat_heads^-1(dx), d_dt_proj, d_a_coef)``
    (:func:`gate_grads`, then the two products with ``x`` and ``dt_proj``). ``O(B Nk Hkv D)`` memory.
    """
    B, Hkv, Nk, D = v.shape
    du, da = gate_grads(dz, a_coef, z, u, log_space)
    x = concat_heads(v)  # (B, Nk, Hkv*D)
    d_dt = np.einsum("bgj,bjc->gc", du, x, optimize=True)
    dx = np.matmul(np.transpose(du, (0, 2, 1)), dt_proj)  # (B, Nk, Hkv*D)
    dv = dv + np.transpose(dx.reshape(B, Nk, Hkv, D), (0, 2, 1, 3))
    return np.ascontiguousarray(dv, dtype=v.dtype), d_dt.astype(v.dtype), da.sum(axis=(0, 2)).astype(v.dtype)
