"""The tensor-level attention API: ``flash_attention`` and ``attention_reference`` (docs/api.md).

``flash_attention`` validates the call once (:func:`~minitorch.attention.spec.make_spec`), runs the engine of
``q``'s backend once (:func:`~.functions.attend`) and records it with the :class:`~.functions.FlashAttention`
Function (and :class:`~.functions.FlashAttentionLSE` for ``return_lse``):

========================  =======================================================  ==============
backend                   engine (``backend.attention``)                            arrays
========================  =======================================================  ==============
``SimpleBackend``         :mod:`minitorch.attention.kernels.simple` (NumPy tiles)   NumPy
``FastTensorBackend``     :mod:`minitorch.attention.kernels.cpu` (Numba CPU)        NumPy
``CudaBackend``           :mod:`minitorch.attention.kernels.cuda` (Numba CUDA)      device arrays
========================  =======================================================  ==============

``attention_reference`` is standard ``O(N^2)`` attention built from tensor ops, differentiated by autodiff: a
second opinion for tests and the baseline of the benchmarks.

Importing this module also gives tensors their ``q.flash_attention(k, v, ...)`` method (the core package never
imports attention; attention extends it).
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple, Union

import numpy as np

from ..autodiff import Context
from ..tensor import Tensor
from ..tensor_functions import Function, from_numpy
from .block_mask import BlockMask
from .dropout import dropout_mask
from .engine import engine_of, raw4
from .functions import FlashAttention, FlashAttentionLSE, attend
from .mods import evaluate_mask
from .reference import reference_mask
from .spec import AttentionSpec, cached_spec, check_flag, check_qkv
from .tiling import TileOrder


def _to_numpy_mask(mask: Any) -> Optional[np.ndarray]:
    if mask is None:
        return None
    if hasattr(mask, "to_numpy"):
        mask = mask.to_numpy()
    return np.asarray(mask)


def _host(x: Any) -> Any:
    """A Tensor or array-like option (positions, segment ids, slopes) as a NumPy array (None stays None)."""
    if x is None:
        return None
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    return np.asarray(x)


def _bias_tensor(attn_bias: Any, q: Tensor, name: str = "attn_bias") -> Optional[Tensor]:
    """``attn_bias`` (or ``sinks``) as a Tensor of q's backend and dtype (a Tensor is used as it is: it may need a
    gradient)."""
    if attn_bias is None:
        return None
    if isinstance(attn_bias, Tensor):
        return attn_bias
    try:
        arr = np.asarray(attn_bias)
        if arr.dtype.kind not in "biuf":
            raise TypeError
        arr = arr.astype(q.dtype)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a Tensor or an array of numbers, got {type(attn_bias).__name__}") from None
    return from_numpy(arr, backend=q.backend)


def _sinks_array(sinks: Optional[Tensor], q: Tensor) -> Any:
    """The raw array of the sink logits, which the kernels read (same backend and dtype as q)."""
    if sinks is None:
        return None
    if sinks.backend is not q.backend or sinks.dtype != q.dtype:
        raise TypeError(f"sinks must be a Tensor of q's backend and dtype ({q.backend.name}, {np.dtype(q.dtype)}), "
                        f"got {sinks.backend.name}, {np.dtype(sinks.dtype)}")
    return raw4(sinks)


def _check_tensors(q: Any, k: Any, v: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a minitorch Tensor, got {type(t).__name__}")


def _spec(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], **options: Any) -> AttentionSpec:
    """Validate a call on ``q``'s backend (its engine's default tiles); a call like an earlier one (same shapes, same
    plain options) reuses its spec (:func:`~.spec.cached_spec`)."""
    return cached_spec(
        q.shape, k.shape, v.shape, bias_shape=None if bias is None else bias.shape,
        default_blocks=engine_of(q.backend).default_blocks(int(q.shape[-1])) if len(q.shape) == 4 else None,
        **options,
    )


def flash_attention(
    q: "Tensor",
    k: "Tensor",
    v: "Tensor",
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    key_padding_mask: Any = None,
    attn_bias: Any = None,
    dropout: float = 0.0,
    seed: Optional[int] = None,
    return_lse: bool = False,
    q_positions: Any = None,
    k_positions: Any = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    order: Union[TileOrder, str] = TileOrder.Q_MAJOR,
    num_sinks: int = 0,
    mask_mod: Any = None,
    score_mod: Any = None,
    score_mod_grad: Any = None,
    q_segment_ids: Any = None,
    k_segment_ids: Any = None,
    sinks: Any = None,
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
) -> Union["Tensor", Tuple["Tensor", "Tensor"]]:
    """Fused, memory-efficient attention: ``softmax(modify(scale * q k^T + bias), masked) v``.

    Args:
        q: ``(B, H, Nq, D)``. k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (MHA, GQA and MQA).
        causal, window, q_positions, k_positions: masks by absolute position (docs/api.md).
        key_padding_mask: ``(B, Nk)`` booleans, True = padding (ignored key).
        attn_bias: added to the scaled scores, ``(B|1, H|Hkv|1, Nq|1, Nk)``; differentiable if a Tensor.
        dropout, seed: attention dropout with a counter-based keep-mask (see :mod:`.dropout`).
        return_lse: also return ``lse (B, H, Nq)``, the natural-log log-sum-exp of each row (``-inf`` if empty).
        block_q, block_k, order: tiling (``Br``, ``Bc``, :class:`TileOrder`); the result does not depend on them.
        num_sinks: keys at positions below it ignore the window (attention sinks; used by the KV cache).
        mask_mod: ``(b, h, q_pos, k_pos) -> bool`` (True: may attend), ANDed with every other mask; or a
            :class:`~.block_mask.BlockMask` of ``block_mask_from`` (built once, reused).
        score_mod, score_mod_grad: ``(score, b, h, q_pos, k_pos) -> new score`` applied after scale and bias, and
            its derivative by ``score`` (backward needs it).
        q_segment_ids, k_segment_ids: ``(B, Nq)``, ``(B, Nk)`` ints, packed sequences: a query sees a key only if
            their ids are equal (``-1``: padding).
        sinks: ``(H,)`` learnable sink logits: each row's softmax gets one more term ``exp(sinks[h])``, with no
            value; a Tensor receives a gradient.
        softcap: ``score -> softcap tanh(score / softcap)`` (after score_mod).
        alibi_slopes: ``(H,)``: ``score -= alibi_slopes[h] |q_pos - k_pos|`` (after softcap).

    Returns:
        ``out (B, H, Nq, D)``, or ``(out, lse)``.
    """
    _check_tensors(q, k, v)
    return_lse = check_flag("return_lse", return_lse)
    bias = _bias_tensor(attn_bias, q)
    sinks_t = _bias_tensor(sinks, q, "sinks")
    spec = _spec(
        q, k, v, bias, causal=causal, scale=scale, window=window, key_padding_mask=_to_numpy_mask(key_padding_mask),
        dropout=dropout, seed=seed, q_positions=_host(q_positions), k_positions=_host(k_positions),
        block_q=block_q, block_k=block_k, order=order, num_sinks=num_sinks, mask_mod=mask_mod, score_mod=score_mod,
        score_mod_grad=score_mod_grad, q_segment_ids=_host(q_segment_ids),
        k_segment_ids=_host(k_segment_ids), sinks=_sinks_array(sinks_t, q), softcap=softcap,
        alibi_slopes=_host(alibi_slopes),
    )
    attended = attend(q, k, v, bias, spec)
    out = FlashAttention.apply(q, k, v, bias, sinks_t, spec, attended)
    if return_lse:
        return out, FlashAttentionLSE.apply(q, k, v, bias, sinks_t, spec, attended)
    return out


def attention_reference(q: Tensor, k: Tensor, v: Tensor, **options: Any) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Standard attention from tensor ops (matmul, exp, sum), differentiated by autodiff. ``O(Nq Nk)`` memory.

    The keyword arguments and results of :func:`flash_attention` (the tiling arguments are validated and ignored);
    the ``lse`` it returns is differentiable too, and so are ``attn_bias`` and ``sinks`` Tensors. Masked scores are
    excluded *before* the row max and the ``exp``, so a masked score, however large, never overflows a row.
    """
    _check_tensors(q, k, v)
    B, H, Hkv, Nq, Nk, D = check_qkv(q.shape, k.shape, v.shape)
    options = dict(_DEFAULTS, **_known(options))
    return_lse = check_flag("return_lse", options.pop("return_lse"))
    bias = _bias_tensor(options.pop("attn_bias"), q)
    sinks = _bias_tensor(options.pop("sinks"), q, "sinks")
    pad = _to_numpy_mask(options.pop("key_padding_mask"))
    for name in ("q_positions", "k_positions", "q_segment_ids", "k_segment_ids", "alibi_slopes"):
        options[name] = _host(options[name])
    # validation only (both APIs reject the same input); the block mask is not needed here
    spec = _spec(q, k, v, bias, key_padding_mask=pad, sinks=_sinks_array(sinks, q),
                 **dict(options, mask_mod=None))
    causal, window, num_sinks = spec.causal, None if spec.window < 0 else spec.window, spec.num_sinks
    G = H // Hkv
    backend, dtype = q.backend, q.dtype
    const = lambda a: from_numpy(np.ascontiguousarray(a, dtype=dtype), backend=backend)  # noqa: E731
    # Group query heads by their kv head: (B, Hkv, G, Nq, D) against (B, Hkv, 1, Nk, D), no K/V copies per head.
    q5 = q.contiguous().view(B, Hkv, G, Nq, D)
    kT = k.contiguous().view(B, Hkv, 1, Nk, D).permute(0, 1, 2, 4, 3)
    s = (q5 @ kT) * spec.scale  # (B, Hkv, G, Nq, Nk)
    if bias is not None:
        b4 = bias.contiguous().view(*spec.bias_shape)
        Hb = spec.bias_shape[1]
        if Hb == H and H != Hkv:
            b5 = b4.view(spec.bias_shape[0], Hkv, G, spec.bias_shape[2], Nk)
        elif Hb == H:  # H == Hkv
            b5 = b4.view(spec.bias_shape[0], Hkv, 1, spec.bias_shape[2], Nk)
        else:  # Hb in (1, Hkv): shared by the group
            b5 = b4.view(spec.bias_shape[0], Hb, 1, spec.bias_shape[2], Nk)
        s = s + b5
    # the call's (b, h, q_pos, k_pos) as broadcasting arrays of the (B, Hkv, G, Nq, Nk) layout
    grid = (np.arange(B).reshape(B, 1, 1, 1, 1), np.arange(H).reshape(1, Hkv, G, 1, 1),
            spec.q_pos.reshape(1, 1, 1, Nq, 1), spec.k_pos.reshape(1, 1, 1, 1, Nk))
    s = _modify(s, spec, grid, const)
    mask_np = reference_mask(B, Nq, Nk, causal, window, spec.q_pos, spec.k_pos, pad, num_sinks)[:, None, None]
    if spec.q_seg is not None:
        mask_np = mask_np & (spec.q_seg[:, :, None] == spec.k_seg[:, None, :])[:, None, None] & (
            spec.q_seg >= 0)[:, None, None, :, None]
    if options["mask_mod"] is not None:
        mm = options["mask_mod"]
        mask_np = mask_np & evaluate_mask(mm.mask_mod if isinstance(mm, BlockMask) else mm, *grid)
    mask_np = np.broadcast_to(mask_np, np.broadcast_shapes(mask_np.shape, (B, 1, 1, Nq, Nk)))
    mask = const(mask_np)
    row_any = mask_np.any(axis=-1, keepdims=True)
    # Softmax over visible keys: a constant row max of the *visible* scores (no gradient needed through it); masked
    # scores are replaced by that max before the exp (s * 0 + m - m = 0 exactly), so however large a masked score
    # is it never overflows, and the mask's 0 removes it. Learnable sinks: one more term exp(sink - m) in each row.
    s_np = s.detach().to_numpy()
    m_np = np.where(mask_np, s_np, -np.inf).max(axis=-1, keepdims=True, initial=-np.inf)
    sink5 = None
    if sinks is not None:
        sink5 = sinks.contiguous().view(1, Hkv, G, 1, 1)
        m_np = np.maximum(m_np, sink5.detach().to_numpy())
        row_any = np.ones_like(row_any)
    m_np = np.where(row_any, m_np, 0.0).astype(dtype)
    m = const(m_np)
    fill = const(np.where(mask_np, 0.0, m_np))
    e = (s * mask + fill - m).exp() * mask
    l = e.sum(4)
    if sink5 is not None:
        l = l + (sink5 - m).exp()
    l_safe = l + const(~row_any)  # 1 on empty rows, so they divide 0 by 1
    p = e / l_safe
    if spec.dropout > 0:
        keep = dropout_mask(spec.seed, (B, H, Nq, Nk), spec.dropout).astype(dtype) / (1.0 - spec.dropout)
        p = p * const(keep.reshape(B, Hkv, G, Nq, Nk))
    v5 = v.contiguous().view(B, Hkv, 1, Nk, D)
    out = (p @ v5).contiguous().view(B, H, Nq, D)
    if return_lse:
        # lse = m + log(l), differentiable through l; an empty row gets -inf (a constant)
        empty = const(np.where(row_any, 0.0, -np.inf))
        lse = (l_safe.log() + m + empty).contiguous().view(B, H, Nq)
        return out, lse
    return out


def _modify(s: Tensor, spec: AttentionSpec, grid: Tuple[np.ndarray, ...], const: Any) -> Tensor:
    """The score modification of ``attention_reference``, with tensor ops: ``score_mod`` (a Function whose backward
    is ``score_mod_grad``), ``softcap tanh(s / softcap)`` (``tanh x = 2 sigmoid(2x) - 1``), ALiBi (a constant)."""
    if spec.score_mod is not None:
        s = _ScoreModFn.apply(s, spec.score_mod, grid)
    if spec.softcap > 0:
        c = spec.softcap
        s = ((s * (2.0 / c)).sigmoid() * 2.0 - 1.0) * c
    if spec.alibi is not None:
        slopes = spec.alibi.reshape(1, grid[1].shape[1], grid[1].shape[2], 1, 1)
        s = s - const(slopes * np.abs(grid[2] - grid[3]))
    return s


class _ScoreModFn(Function):
    """A user's ``score_mod`` as an autodiff Function (NumPy forward, ``score_mod_grad`` in backward)."""

    @staticmethod
    def forward(ctx: Context, t: Tensor, mod: Any, grid: Tuple[np.ndarray, ...]) -> Tensor:
        x = t.to_numpy()
        ctx.save_for_backward(x, mod, grid)
        return from_numpy(np.ascontiguousarray(mod.apply(x, *grid)), backend=t.backend)

    @staticmethod
    def backward(ctx: Context, grad: Tensor) -> Tuple[Any, ...]:
        x, mod, grid = ctx.saved_values
        return grad * from_numpy(np.ascontiguousarray(mod.derivative(x, *grid)), backend=grad.backend), None, None


_DEFAULTS = {name: p.default for name, p in inspect.signature(flash_attention).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
"""flash_attention's keyword arguments and their defaults (attention_reference takes the same)."""


def _known(options: Any) -> Any:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; the options are {sorted(_DEFAULTS)}")
    return options


attention_reference.__signature__ = inspect.signature(flash_attention)  # type: ignore[attr-defined]


def _flash_attention_method(self: Tensor, k: Tensor, v: Tensor, **options: Any) -> Any:
    """Fused attention with this tensor as the queries: ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)``.

    Same options as :func:`minitorch.flash_attention` (causal, scale, window, key_padding_mask, attn_bias,
    dropout, seed, return_lse, q_positions, k_positions, block_q, block_k, order).
    """
    return flash_attention(self, k, v, **options)


Tensor.flash_attention = _flash_attention_method  # type: ignore[attr-defined]
