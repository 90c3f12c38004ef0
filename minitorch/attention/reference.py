"""Float64 NumPy reference attention: the oracle every kernel is tested against.

It is deliberately the *standard* algorithm: build the full ``(Nq, Nk)`` score matrix, mask it, take a softmax,
multiply by V. It shares no code with the kernels (it builds its own masks from the positions), so a bug in the
kernels' shared pieces cannot hide in it. ``O(N^2)`` memory: for tests and small inputs.

All functions take and return NumPy arrays: ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, Optional, Tuple

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


_VARIANTS = ("mask_mod", "score_mod", "score_mod_grad", "q_segment_ids", "k_segment_ids", "sinks", "softcap",
             "alibi_slopes")
"""The attention variants of :func:`attention_probs` and its callers (keyword arguments, all default None)."""


def _positions(Nq: int, Nk: int, q_positions: Any, k_positions: Any) -> Tuple[np.ndarray, np.ndarray]:
    shift = max(0, Nq - Nk)
    kp = shift + np.arange(Nk) if k_positions is None else np.asarray(k_positions, dtype=np.int64)
    qp = shift + np.arange(Nk - Nq, Nk) if q_positions is None else np.asarray(q_positions, dtype=np.int64)
    return qp.astype(np.int64), kp.astype(np.int64)


def _scores(q: np.ndarray, k: np.ndarray, causal: bool = False, scale: Optional[float] = None,
            window: Optional[int] = None, key_padding_mask: Optional[np.ndarray] = None,
            attn_bias: Optional[np.ndarray] = None, q_positions: Any = None, k_positions: Any = None,
            num_sinks: int = 0, mask_mod: Any = None, score_mod: Any = None, score_mod_grad: Any = None,
            q_segment_ids: Any = None, k_segment_ids: Any = None, softcap: Optional[float] = None,
            alibi_slopes: Any = None, sinks: Any = None, dtype: Any = np.float64
            ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """The full score matrix ``s (B, H, Nq, Nk)`` in ``dtype``, the mask, and ``ds/dt``, the derivative of the final
    score by ``t = scale q.k + bias`` (``None`` when ``s = t``; needs ``score_mod_grad`` with a ``score_mod``).

    In the order of the public API: ``t = scale q.k + bias``, ``score_mod(t, b, h, q_pos, k_pos)``, ``softcap
    tanh(. / softcap)``, ``- alibi_slopes[h] |q_pos - k_pos|``; the mask ANDs the positions' rule, the padding,
    the segments (equal ids, ``>= 0``) and ``mask_mod``. The user functions are called on the whole broadcast
    grid of ``(b, h, q_pos, k_pos)``.
    """
    q = np.asarray(q, dtype=dtype)
    k = _expand_kv(np.asarray(k, dtype=dtype), q.shape[1])
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = dtype(1.0 / math.sqrt(D) if scale is None else scale)
    mask = reference_mask(B, Nq, Nk, causal, window, q_positions, k_positions, key_padding_mask, num_sinks)[:, None]
    qp, kp = _positions(Nq, Nk, q_positions, k_positions)
    b4, h4 = np.arange(B).reshape(B, 1, 1, 1), np.arange(H).reshape(1, H, 1, 1)
    q4, k4 = qp.reshape(1, 1, Nq, 1), kp.reshape(1, 1, 1, Nk)
    full = (B, H, Nq, Nk)
    if q_segment_ids is not None:
        qs, ks = np.asarray(q_segment_ids), np.asarray(k_segment_ids)
        mask = mask & ((qs[:, :, None] == ks[:, None, :]) & (qs[:, :, None] >= 0))[:, None]
    if mask_mod is not None:
        mask = mask & np.broadcast_to(np.asarray(mask_mod(b4, h4, q4, k4), dtype=bool), full)
    t = scale * np.matmul(q, np.swapaxes(k, -1, -2)) + _full_bias(attn_bias, B, H, Nq, Nk).astype(dtype)
    grad = None
    with np.errstate(all="ignore"):  # masked pairs may overflow or divide by zero: they are replaced below
        if score_mod is not None:
            if score_mod_grad is not None:
                grad = np.broadcast_to(np.asarray(score_mod_grad(t, b4, h4, q4, k4), dtype=dtype), full)
            t = np.broadcast_to(np.asarray(score_mod(t, b4, h4, q4, k4), dtype=dtype), full)
        if softcap is not None:
            th = np.tanh(t / dtype(softcap))
            t = dtype(softcap) * th
            grad = (1 - th * th) * (1 if grad is None else grad)
        if alibi_slopes is not None:
            t = t - np.asarray(alibi_slopes, dtype=dtype).reshape(1, H, 1, 1) * np.abs(q4 - k4).astype(dtype)
    return np.broadcast_to(t, full), np.broadcast_to(mask, full), grad


def _softmax(s: np.ndarray, mask: np.ndarray, sinks: Any) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(P (B, H, Nq, Nk), lse (B, H, Nq), P_sink (B, H, Nq))`` of the masked scores, in their dtype; with ``sinks
    (H,)`` every row has one more term ``exp(sinks[h])`` (``P_sink``, no value), else ``P_sink = 0``."""
    dt = s.dtype.type
    s = np.where(mask, s, dt(-np.inf))
    m = s.max(axis=-1, keepdims=True, initial=dt(-np.inf))  # initial: Nk == 0 is legal
    sink = None if sinks is None else np.asarray(sinks, dtype=s.dtype).reshape(1, -1, 1, 1)
    if sink is not None:
        m = np.maximum(m, sink)
    m_safe = np.where(np.isfinite(m), m, dt(0))
    e = np.where(mask, np.exp(s - m_safe), dt(0))
    e_sink = np.zeros_like(m_safe) if sink is None else np.exp(sink - m_safe)
    l = e.sum(axis=-1, keepdims=True) + e_sink
    safe = np.where(l != 0, l, dt(1))
    p = np.where(mask & (l != 0), e / safe, dt(0))  # a masked pair: 0, also in a row that is NaN
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] != 0, m_safe[..., 0] + np.log(safe[..., 0]), dt(-np.inf))
    return p, lse, (e_sink / safe)[..., 0]


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
    **variants: Any,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax probabilities ``P (B, H, Nq, Nk)``, ``lse (B, H, Nq)`` and the mask, in float64.

    ``variants``: ``mask_mod``, ``score_mod`` (``score_mod_grad`` is ignored here), ``q_segment_ids``,
    ``k_segment_ids``, ``sinks`` (then rows of ``P`` sum to ``1 - P_sink``), ``softcap``, ``alibi_slopes``: see
    ``flash_attention``.
    """
    _check_variants(variants)
    s, mask, _ = _scores(q, k, causal, scale, window, key_padding_mask, attn_bias, q_positions, k_positions,
                         num_sinks, **{n: x for n, x in variants.items() if n != "sinks"})
    p, lse, _ = _softmax(s, mask, variants.get("sinks"))
    return p, lse, mask


def _check_variants(variants: Dict[str, Any]) -> None:
    unknown = sorted(set(variants) - set(_VARIANTS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")


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
    **variants: Any,
) -> Tuple[np.ndarray, np.ndarray]:
    """Standard attention in float64: returns ``(out (B, H, Nq, D), lse (B, H, Nq))``; ``variants`` as
    :func:`attention_probs`."""
    p, lse, _ = attention_probs(
        q, k, causal, scale, window, key_padding_mask, attn_bias, q_positions, k_positions, num_sinks, **variants
    )
    if dropout > 0:
        p = p * dropout_mask(seed, p.shape, dropout) / (1.0 - dropout)
    v64 = _expand_kv(np.asarray(v, dtype=np.float64), p.shape[1])
    return np.einsum("bhij,bhjd->bhid", p, v64), lse


def reference_paged_attention(
    q: np.ndarray,
    k_pages: np.ndarray,
    v_pages: np.ndarray,
    block_table: np.ndarray,
    seq_lens: np.ndarray,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    num_sinks: int = 0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Paged attention in float64, the direct way: gather each sequence's keys and values out of its pages into
    contiguous arrays, then :func:`reference_attention` on them, one sequence at a time. Returns ``(out (S, H, T, D),
    lse (S, H, T))``.

    ``q (S, H, T, D)`` holds the ``T`` newest tokens of each sequence (positions ``seq_lens[s] - T ..``); token ``j``
    of sequence ``s`` is row ``j % page_size`` of page ``block_table[s, j // page_size]`` of
    ``k_pages, v_pages (num_pages, Hkv, page_size, D)``.
    """
    q = np.asarray(q, dtype=np.float64)
    S, H, T, D = q.shape
    page_size = k_pages.shape[2]
    out = np.zeros(q.shape)
    lse = np.full((S, H, T), -np.inf)
    for s in range(S):
        n = int(seq_lens[s])
        j = np.arange(n)
        pages = np.asarray(block_table)[s, j // page_size]
        k = np.asarray(k_pages, dtype=np.float64)[pages, :, j % page_size].transpose(1, 0, 2)[None]  # (1, Hkv, n, D)
        v = np.asarray(v_pages, dtype=np.float64)[pages, :, j % page_size].transpose(1, 0, 2)[None]
        out[s : s + 1], lse[s : s + 1] = reference_attention(
            q[s : s + 1], k, v, causal=causal, scale=scale, window=window, q_positions=np.arange(n - T, n),
            k_positions=j, num_sinks=num_sinks)
    return out, lse


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


def reference_attention_grads(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: Optional[np.ndarray], dlse: Optional[np.ndarray] = None,
    dtype: Any = np.float64, **options: Any,
) -> Dict[str, Any]:
    """``out``, ``lse`` and every gradient of ``sum(out * dout) + sum(lse * dlse)``, by the textbook formulas: a dict
    with ``out, lse, dq, dk, dv``, ``dbias`` (None without ``attn_bias``) and ``dsinks`` (None without ``sinks``).
    ``options`` are :func:`reference_attention`'s; a ``score_mod`` needs its ``score_mod_grad``. In float64; with
    ``dtype=np.float32`` the same formulas in float32, the baseline of FlashAttention's error rule.

    With ``Z = P * keep / (1 - p)``: ``dV = Z^T dO``, ``dP = (dO V^T) * keep / (1 - p)``, ``delta = rowsum(dP * P) -
    dlse``, ``dS = P (dP - delta)`` (the gradient of the final scores), ``dsinks[h] = -sum_(b, i) P_sink delta``,
    ``dT = dS * ds/dt`` (through softcap and score_mod), ``dQ = scale dT K``, ``dK = scale dT^T Q``, ``dBias = dT``
    summed to its shape.
    """
    allowed = set(inspect.signature(reference_attention).parameters) - {"q", "k", "v", "variants"}
    unknown = sorted(set(options) - allowed - set(_VARIANTS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}")
    dt = np.dtype(dtype).type
    dropout, seed = options.pop("dropout", 0.0), options.pop("seed", 0)
    attn_bias, sinks = options.get("attn_bias"), options.get("sinks")
    if options.get("score_mod") is not None and options.get("score_mod_grad") is None and dout is not None:
        raise ValueError("the reference backward through a score_mod needs its score_mod_grad")
    q_ = np.asarray(q, dtype=dt)
    H, D = q_.shape[1], q_.shape[3]
    Hkv = k.shape[1]
    scale = options.get("scale")
    options["scale"] = scale = dt(1.0 / math.sqrt(D) if scale is None else scale)
    s, mask, ds_dt = _scores(q, k, dtype=dt, **options)
    p, lse, p_sink = _softmax(s, mask, sinks)
    do = np.zeros(q_.shape, dt) if dout is None else np.asarray(dout, dtype=dt)
    k_ = _expand_kv(np.asarray(k, dtype=dt), H)
    v_ = _expand_kv(np.asarray(v, dtype=dt), H)
    keep = (dropout_mask(seed, p.shape, dropout) / (1.0 - dropout)).astype(dt) if dropout > 0 else dt(1)
    z = p * keep
    out = np.matmul(z, v_)
    dv_full = np.matmul(np.swapaxes(z, -1, -2), do)
    dp = np.matmul(do, np.swapaxes(v_, -1, -2)) * keep
    delta = (dp * p).sum(axis=-1) - (dt(0) if dlse is None else np.asarray(dlse, dtype=dt))
    ds = p * (dp - delta[..., None])
    dsinks = None if sinks is None else -(p_sink * delta).sum(axis=(0, 2))
    if ds_dt is not None:
        with np.errstate(invalid="ignore"):
            ds = np.where(mask, ds * ds_dt, dt(0))
    dq = scale * np.matmul(ds, k_)
    dk_full = scale * np.matmul(np.swapaxes(ds, -1, -2), q_)
    B, _, Nk, _ = dk_full.shape
    dk = dk_full.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dv = dv_full.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dbias = None if attn_bias is None else _sum_to(ds, np.shape(attn_bias), H)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv, "dbias": dbias, "dsinks": dsinks}


def reference_attention_backward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, **options: Any
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Gradients ``(dq, dk, dv, dbias)`` of ``sum(out * dout)`` in float64 (:func:`reference_attention_grads`)."""
    g = reference_attention_grads(q, k, v, dout, **options)
    return g["dq"], g["dk"], g["dv"], g["dbias"]


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
