"""Float64 NumPy reference attention: the oracle every kernel is tested against.

It is deliberately the *standard* algorithm: build the full ``(Nq, Nk)`` score matrix, mask it, take a softmax,
multiply by V. It shares no code with the kernels (it builds its own masks from the positions), so a bug in the
kernels' shared pieces cannot hide in it. ``O(N^2)`` memory: for tests and small inputs.

All functions take and return NumPy arrays: ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Tuple

import numpy as np

from .dropout import dropout_mask


def reference_mask(
    B: int,
    Nq: int,
    Nk: int,
    causal: bool = False,
    window: Optional[int] = None,
    q_positions: Optional[np.ndarray] = None,
    k_positions: Optional[np.ndarray] = None,
    key_padding_mask: Optional[np.ndarray] = None,
    num_sinks: int = 0,
) -> np.ndarray:
    """Boolean ``(B, Nq, Nk)``: True where query i may attend to key j (docs/api.md).

    Keys at positions ``< num_sinks`` are exempt from the window (attention sinks of the ring-buffer cache).
    """
    # Defaults: keys 0..Nk-1, queries bottom-right aligned; shifted up when Nq > Nk so none is negative.
    shift = max(0, Nq - Nk)
    kp = shift + np.arange(Nk) if k_positions is None else np.asarray(k_positions, dtype=np.int64)
    qp = shift + np.arange(Nk - Nq, Nk) if q_positions is None else np.asarray(q_positions, dtype=np.int64)
    diff = qp[:, None] - kp[None, :]  # q_pos - k_pos
    ok = (qp[:, None] >= 0) & (kp[None, :] >= 0)
    if causal:
        ok = ok & (diff >= 0)
    if window is not None:
        in_window = (diff < window) if causal else (np.abs(diff) < window)
        ok = ok & (in_window | (kp[None, :] < num_sinks))
    ok = np.broadcast_to(ok, (B, Nq, Nk)).copy()
    if key_padding_mask is not None:
        ok &= ~np.asarray(key_padding_mask, dtype=bool)[:, None, :]
    return ok


def _expand_kv(x: np.ndarray, H: int) -> np.ndarray:
    """Repeat kv heads so that query head h reads kv head h // (H // Hkv)."""
    return np.repeat(x, H // x.shape[1], axis=1)


def _full_bias(bias: Optional[np.ndarray], B: int, H: int, Nq: int, Nk: int) -> np.ndarray:
    if bias is None:
        return np.zeros((1, 1, 1, 1))
    b = np.asarray(bias, dtype=np.float64)
    b = b.reshape((1,) * (4 - b.ndim) + b.shape)
    if b.shape[1] not in (1, H):
        b = _expand_kv(b, H)
    return b


def attention_probs(
    q: np.ndarray,
    k: np.ndarray,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    key_padding_mask: Optional[np.ndarray] = None,
    attn_bias: Optional[np.ndarray] = None,
    q_positions: Optional[np.ndarray] = None,
    k_positions: Optional[np.ndarray] = None,
    num_sinks: int = 0,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax probabilities ``P (B, H, Nq, Nk)``, ``lse (B, H, Nq)`` and the mask, in float64."""
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv(np.asarray(k, dtype=np.float64), q.shape[1])
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = reference_mask(B, Nq, Nk, causal, window, q_positions, k_positions, key_padding_mask, num_sinks)[:, None]
    s = scale * np.einsum("bhid,bhjd->bhij", q, k) + _full_bias(attn_bias, B, H, Nq, Nk)
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)  # initial: Nk == 0 is legal
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m_safe), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = np.where(mask & (l != 0), e / np.where(l != 0, l, 1.0), 0.0)  # a masked pair: 0, also in a NaN row
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] != 0, m_safe[..., 0] + np.log(l[..., 0]), -np.inf)
    return p, lse, np.broadcast_to(mask, p.shape)


def reference_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    key_padding_mask: Optional[np.ndarray] = None,
    attn_bias: Optional[np.ndarray] = None,
    dropout: float = 0.0,
    seed: int = 0,
    q_positions: Optional[np.ndarray] = None,
    k_positions: Optional[np.ndarray] = None,
    num_sinks: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Standard attention in float64: returns ``(out (B, H, Nq, D), lse (B, H, Nq))``."""
    p, lse, _ = attention_probs(
        q, k, causal, scale, window, key_padding_mask, attn_bias, q_positions, k_positions, num_sinks
    )
    if dropout > 0:
        p = p * dropout_mask(seed, p.shape, dropout) / (1.0 - dropout)
    v64 = _expand_kv(np.asarray(v, dtype=np.float64), p.shape[1])
    return np.einsum("bhij,bhjd->bhid", p, v64), lse


def _sum_to(x: np.ndarray, shape: Tuple[int, ...], H: int) -> np.ndarray:
    """Reduce a ``(B, H, Nq, Nk)`` gradient to a bias's (broadcast) shape; kv-head biases sum their group."""
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    if shape4[1] not in (1, H):
        B, _, Nq, Nk = x.shape
        x = x.reshape(B, shape4[1], H // shape4[1], Nq, Nk).sum(axis=2)
    for ax in range(4):
        if shape4[ax] == 1 and x.shape[ax] != 1:
            x = x.sum(axis=ax, keepdims=True)
    return x.reshape(shape)


def reference_attention_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, **options: Any
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients ``(dq, dk, dv, dbias)`` of ``sum(out * dout)`` in float64, by the textbook formulas; ``options``
    are :func:`reference_attention`'s.

    With ``Z = P * keep / (1 - p)``: ``dV = Z^T dO``, ``dZ = dO V^T``, ``dP = dZ * keep / (1 - p)``,
    ``dS = P * (dP - rowsum(dP * P))``, ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dBias = dS`` summed to its shape.
    """
    unknown = sorted(set(options) - set(inspect.signature(reference_attention).parameters))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    dropout, seed, attn_bias = options.pop("dropout", 0.0), options.pop("seed", 0), options.get("attn_bias")
    q64 = np.asarray(q, dtype=np.float64)
    H, D = q64.shape[1], q64.shape[3]
    Hkv = k.shape[1]
    scale = options.get("scale")
    options["scale"] = scale = 1.0 / math.sqrt(D) if scale is None else scale
    p, _, _ = attention_probs(q, k, **options)
    do = np.asarray(dout, dtype=np.float64)
    k64 = _expand_kv(np.asarray(k, dtype=np.float64), H)
    v64 = _expand_kv(np.asarray(v, dtype=np.float64), H)
    keep = dropout_mask(seed, p.shape, dropout) / (1.0 - dropout) if dropout > 0 else 1.0
    z = p * keep
    dv_full = np.einsum("bhij,bhid->bhjd", z, do)
    dp = np.einsum("bhid,bhjd->bhij", do, v64) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhij,bhjd->bhid", ds, k64)
    dk_full = scale * np.einsum("bhij,bhid->bhjd", ds, q64)
    B, _, Nk, _ = dk_full.shape
    dk = dk_full.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dv = dv_full.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dbias = None if attn_bias is None else _sum_to(ds, np.shape(attn_bias), H)
    return dq, dk, dv, dbias


def naive_attention_float32(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, **options
) -> np.ndarray:
    """Standard attention computed in float32 (no float64 anywhere): the error baseline of FlashAttention's rule.

    The kernels' error against the float64 truth must be at most a small multiple of this one's.
    """
    q32, k32, v32 = (np.asarray(x, dtype=np.float32) for x in (q, k, v))
    H = q32.shape[1]
    D = q32.shape[3]
    scale = np.float32(1.0 / math.sqrt(D) if options.get("scale") is None else options["scale"])
    k32, v32 = _expand_kv(k32, H), _expand_kv(v32, H)
    B, _, Nq, _ = q32.shape
    Nk = k32.shape[2]
    mask = reference_mask(
        B, Nq, Nk, options.get("causal", False), options.get("window"), options.get("q_positions"),
        options.get("k_positions"), options.get("key_padding_mask"), options.get("num_sinks", 0),
    )[:, None]
    s = scale * np.matmul(q32, np.swapaxes(k32, -1, -2))
    if options.get("attn_bias") is not None:
        s = s + _full_bias(options["attn_bias"], B, H, Nq, Nk).astype(np.float32)
    s = np.where(mask, s, np.float32(-np.inf))
    m = s.max(axis=-1, keepdims=True, initial=np.float32(-np.inf))
    m = np.where(np.isfinite(m), m, np.float32(0))
    e = np.where(mask, np.exp(s - m), np.float32(0))
    l = e.sum(axis=-1, keepdims=True)
    p = np.where(l != 0, e / np.where(l != 0, l, np.float32(1)), np.float32(0))
    if options.get("dropout", 0.0) > 0:
        p = p * (dropout_mask(options.get("seed", 0), p.shape, options["dropout"]) / np.float32(1 - options["dropout"]))
    return np.matmul(p.astype(np.float32), v32)


# ----------------------------------------------------------------------------------------------------------------
# Dynamic Mask Attention (DMA) reference: dense mask by a direct stable argsort per query, float64
# ----------------------------------------------------------------------------------------------------------------


def reference_dma_importance(
    v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, log_space: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """``(z, u)`` of shape ``(B, Hkv, Nk)`` in float64: ``u = concat_heads(v) @ dt_proj^T``,
    ``z = exp(a * softplus(u))`` (``a * softplus(u)`` in log space)."""
    v = np.asarray(v, dtype=np.float64)
    B, Hkv, Nk, D = v.shape
    x = v.transpose(0, 2, 1, 3).reshape(B, Nk, Hkv * D)
    u = np.einsum("bjc,gc->bgj", x, np.asarray(dt_proj, dtype=np.float64))
    sp = np.maximum(u, 0.0) + np.log1p(np.exp(-np.abs(u)))
    gate = np.asarray(a_coef, dtype=np.float64)[None, :, None] * sp
    return (gate if log_space else np.exp(gate)), u


def reference_dma_mask(
    z: np.ndarray, Nq: int, keep_window_size: int, causal: bool = False, key_padding_mask: Optional[np.ndarray] = None
) -> np.ndarray:
    """Boolean ``(B, Hkv, Nq, Nk)``: for every query, its visible keys sorted by ``z`` descending with a stable
    sort (ties: lower key index first), the first ``keep_window_size`` kept."""
    B, Hkv, Nk = z.shape
    vis = reference_mask(B, Nq, Nk, causal=causal, key_padding_mask=key_padding_mask)
    mask = np.zeros((B, Hkv, Nq, Nk), dtype=bool)
    for b in range(B):
        for g in range(Hkv):
            order = np.argsort(-z[b, g], kind="stable")
            for i in range(Nq):
                cand = order[vis[b, i][order]]
                mask[b, g, i, cand[:keep_window_size]] = True
    return mask


def _dma_probs(q, k, z, mask, scale):  # type: ignore[no-untyped-def]
    H = q.shape[1]
    k64 = _expand_kv(k, H)
    zb = _expand_kv(z[:, :, None, :], H)
    mk = _expand_kv(mask, H)
    s = scale * np.einsum("bhid,bhjd->bhij", q, k64) + zb
    s = np.where(mk, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mk, np.exp(s - m_safe), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = np.where(l != 0, e / np.where(l != 0, l, 1.0), 0.0)
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] != 0, m_safe[..., 0] + np.log(np.where(l != 0, l, 1.0)[..., 0]), -np.inf)
    return p, lse


def reference_dma(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray,
    keep_window_size: int = 1024, causal: bool = False, scale: Optional[float] = None,
    key_padding_mask: Optional[np.ndarray] = None, dropout: float = 0.0, seed: int = 0, log_space: bool = False,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dynamic mask attention in float64 the direct way: ``(out, lse, probs, mask (B, Hkv, Nq, Nk), z)``.

    ``probs`` are the undropped softmax probabilities ``(B, H, Nq, Nk)``.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    D = q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    z, _ = reference_dma_importance(v, dt_proj, a_coef, log_space)
    mask = reference_dma_mask(z, q.shape[2], keep_window_size, causal, key_padding_mask)
    p, lse = _dma_probs(q, k, z, mask, scale)
    pd = p * dropout_mask(seed, p.shape, dropout) / (1.0 - dropout) if dropout > 0 else p
    out = np.einsum("bhij,bhjd->bhid", pd, _expand_kv(v, q.shape[1]))
    return out, lse, p, mask, z


def reference_dma_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, dout: np.ndarray,
    keep_window_size: int = 1024, causal: bool = False, scale: Optional[float] = None,
    key_padding_mask: Optional[np.ndarray] = None, dropout: float = 0.0, seed: int = 0, log_space: bool = False,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dq, dk, dv, d_dt_proj, d_a_coef)`` of ``sum(out * dout)`` in float64 by the textbook formulas.

    As :func:`reference_attention_backward` with the bias ``z`` (``dz_j = sum over the group's heads and the
    queries of dS_ij``), then ``z`` chained to ``u = concat_heads(v) @ dt_proj^T`` and ``a_coef``.
    """
    q, k, v, do = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
    dt_proj, a_coef = np.asarray(dt_proj, dtype=np.float64), np.asarray(a_coef, dtype=np.float64)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    z, u = reference_dma_importance(v, dt_proj, a_coef, log_space)
    mask = reference_dma_mask(z, Nq, keep_window_size, causal, key_padding_mask)
    p, _ = _dma_probs(q, k, z, mask, scale)
    keep = dropout_mask(seed, p.shape, dropout) / (1.0 - dropout) if dropout > 0 else 1.0
    k64, v64 = _expand_kv(k, H), _expand_kv(v, H)
    dv_full = np.einsum("bhij,bhid->bhjd", p * keep, do)
    dp = np.einsum("bhid,bhjd->bhij", do, v64) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * np.einsum("bhij,bhjd->bhid", ds, k64)
    dk = (scale * np.einsum("bhij,bhid->bhjd", ds, q)).reshape(B, Hkv, G, Nk, D).sum(axis=2)
    dv = dv_full.reshape(B, Hkv, G, Nk, D).sum(axis=2)
    dz = ds.sum(axis=2).reshape(B, Hkv, G, Nk).sum(axis=2)  # (B, Hkv, Nk)
    sp = np.maximum(u, 0.0) + np.log1p(np.exp(-np.abs(u)))
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + np.exp(-u))
    a = a_coef[None, :, None]
    dzdu, dzda = (a * sig, sp) if log_space else (z * a * sig, z * sp)
    du = dz * dzdu
    x = v.transpose(0, 2, 1, 3).reshape(B, Nk, Hkv * D)
    d_dt = np.einsum("bgj,bjc->gc", du, x)
    d_a = (dz * dzda).sum(axis=(0, 2))
    dx = np.einsum("bgj,gc->bjc", du, dt_proj)
    dv = dv + dx.reshape(B, Nk, Hkv, D).transpose(0, 2, 1, 3)
    return dq, dk, dv, d_dt, d_a
