"""Dynamic Mask Attention (DMA): every query attends to the ``keep_window_size`` most *important* keys it can see.

docs/api.md. For ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)``, ``dt_proj (Hkv, Hkv*D)``, ``a_coef (Hkv,)``::

    x[b, j]    = concat_heads(v)[b, j] = v[b, :, j, :].reshape(Hkv * D)
    u[b, g, j] = x[b, j] @ dt_proj[g]
    z[b, g, j] = exp(a_coef[g] * softplus(u[b, g, j]))       importance="exp" (the default)
    z[b, g, j] = a_coef[g] * softplus(u[b, g, j])            importance="log"
    s[i, j]    = scale * q_i . k_j + z[j]   for the kept keys j of query i, excluded otherwise

``importance="log"`` is the form the reference Doge model code uses: the bias is the log-domain gate ``a *
softplus(...)`` itself (which can be negative), not its exponential, which overflows for large gates (``log_space=
True`` is its older name). Both have exact gradients to ``v``, ``dt_proj`` and ``a_coef``.

Query i's *candidates* are the keys it may see: keys that are not padding, and with ``causal=True`` the keys
``j <= p_i = Nk - Nq + i`` (bottom-right alignment, exactly as :func:`~minitorch.attention.flash.flash_attention`;
with ``Nq > Nk`` the first ``Nq - Nk`` queries of a causal call see nothing). Of more than ``keep_window_size``
candidates it keeps the ``keep_window_size`` largest ``z`` (ties: the lower key index wins); otherwise it keeps them
all (and still adds z).
Gradients flow to q, k, v, dt_proj and a_coef through the added z; the selection itself has no gradient.

Selection and tiles
-------------------
``z`` depends only on the key, so query i keeps the top-k of its visible prefix: one heap sweep per (batch, kv
head) gives every row a threshold and every key a lifetime, and the kernels tile a compacted list of the keys some
row keeps, with exact SKIP / DENSE / TRIANGLE types (:mod:`.selection`). Work is then ``Nq * k`` pairs without
causal instead of ``Nq * Nk``.

The engine's backward computes dQ first; its row sums of dS (zero up to rounding) refine ``delta`` before the
dK/dV/dz pass, so that ``dz``, which feeds the nearly cancelling sums of ``d a_coef`` and ``d dt_proj``, keeps
float32 accuracy.

Where it lives: the importance (:mod:`.importance`), the selection (:mod:`.selection`, and the engines'
``select``), the call's validation (:class:`~.spec.DMASpec`), the Function (:class:`~.functions.FlashDMAAttention`);
the attention itself is the engine's flash attention configured with the selection (:func:`~.functions.dma_attend`).
This module is the public entry point and the dense probabilities.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..tensor import Tensor
from ..tensor_functions import from_numpy
from .api import _check_tensors, _to_numpy_mask
from .engine import engine_of
from .functions import DMAAttended, FlashDMAAttention, dma_attend
from .selection import kept_dense
from .spec import make_dma_spec

PROBS_WARN_ELEMENTS = 2**24
"""``return_attn_probs`` materializes ``(B, H, Nq, Nk)``: above this many elements a warning is issued."""


def _host(a: Any) -> np.ndarray:
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def dense_probs(q: Any, k: Any, attended: DMAAttended, dspec: Any) -> np.ndarray:
    """Softmax probabilities ``(B, H, Nq, Nk)`` of the kept keys (zeros elsewhere, and without dropout)."""
    q, k, z, lse = (_host(a) for a in (q, k, attended.z, attended.lse))
    B, H, Nq, Nk = dspec.B, dspec.H, dspec.Nq, dspec.Nk
    if B * H * Nq * Nk > PROBS_WARN_ELEMENTS:
        warnings.warn(
            f"return_attn_probs materializes a ({B}, {H}, {Nq}, {Nk}) array ({B * H * Nq * Nk} elements); "
            "it is meant for tests and small inputs",
            stacklevel=3,
        )
    kept = kept_dense(attended.selection, z, dspec)  # (B, Hkv, Nq, Nk)
    probs = np.zeros((B, H, Nq, Nk), q.dtype)
    for b in range(B):
        for h in range(H):
            g = h // dspec.group
            ok = kept[b, g] & np.isfinite(lse[b, h])[:, None]
            s = dspec.scale * (q[b, h] @ k[b, g].T) + z[b, g][None, :]
            lse_safe = np.where(np.isfinite(lse[b, h]), lse[b, h], 0)[:, None]
            probs[b, h] = np.where(ok, np.exp(np.where(ok, s - lse_safe, 0)), 0)
    return probs


def _as_tensor(name: str, x: Any, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x
    try:
        arr = np.asarray(x, dtype=like.dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a minitorch Tensor (or array-like), got {type(x).__name__}") from None
    return from_numpy(arr, backend=like.backend)  # a constant: no gradient



def flash_dma_attention(
    q: "Tensor", k: "Tensor", v: "Tensor", dt_proj: Any, a_coef: Any, keep_window_size: int = 1024,
    causal: bool = False, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    return_attn_probs: bool = False, key_padding_mask: Any = None, seed: Optional[int] = None,
    log_space: bool = False, *, block_q: Optional[int] = None, block_k: Optional[int] = None, compact: bool = True,
    importance: Optional[str] = None,
) -> Union["Tensor", Tuple["Tensor", "Tensor"]]:
    """Dynamic mask attention (see the module docstring): each query keeps its ``keep_window_size`` most
    important visible keys and adds their importance ``z`` to the scores.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (MHA, GQA, MQA).
        dt_proj: ``(Hkv, Hkv*D)``; a_coef: ``(Hkv,)``. Tensors (parameters, with gradients) or arrays (constants).
        keep_window_size: keys kept per query (>= 1); with fewer candidates all are kept.
        causal: bottom-right aligned causal mask, as ``flash_attention``.
        dropout_p, seed: attention dropout with flash attention's counter-based mask.
        softmax_scale: defaults to ``1/sqrt(D)``.
        return_attn_probs: also return the dense ``(B, H, Nq, Nk)`` probabilities (undropped; zeros for
            excluded keys). ``O(Nq Nk)``: warns above ``PROBS_WARN_ELEMENTS``.
        key_padding_mask: ``(B, Nk)`` booleans, True = padding (never a candidate).
        importance: ``"exp"`` (``z = exp(a * softplus(...))``, the default) or ``"log"`` (``z = a * softplus(...)``,
            the reference Doge model code's log-domain form); ``log_space=True`` is the older name of ``"log"``.
        block_q, block_k: tile sizes (query rows, keys of the compacted list); the result does not depend on them.
        compact: tile the compacted list of kept keys (default) or, for comparison, the key sequence itself.

    Returns:
        ``out (B, H, Nq, D)``, or ``(out, probs)``.
    """
    _check_tensors(q, k, v)
    dt_proj, a_coef = _as_tensor("dt_proj", dt_proj, q), _as_tensor("a_coef", a_coef, q)
    spec = make_dma_spec(
        q.shape, k.shape, v.shape, dt_proj.shape, a_coef.shape, keep_window_size=keep_window_size, causal=causal,
        dropout_p=dropout_p, softmax_scale=softmax_scale, key_padding_mask=_to_numpy_mask(key_padding_mask),
        seed=seed, log_space=log_space, return_attn_probs=return_attn_probs, block_q=block_q, block_k=block_k,
        default_blocks=engine_of(q.backend).default_blocks(int(q.shape[3])) if len(q.shape) == 4 else None,
        compact=compact, importance=importance,
    )
    attended = dma_attend(q, k, v, dt_proj, a_coef, spec)
    out = FlashDMAAttention.apply(q, k, v, dt_proj, a_coef, spec, attended)
    if spec.return_probs:
        return out, from_numpy(dense_probs(q.to_numpy(), k.to_numpy(), attended, spec), backend=q.backend)
    return out
