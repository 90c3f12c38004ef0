"""The differentiable attention Functions: flash attention (its output and its lse) and Dynamic Mask Attention.

Each is glue between tensors and the backend's engine (:mod:`.engine`): ``forward`` hands raw arrays to
``engine.forward`` and wraps the results, ``backward`` hands the saved arrays and the incoming gradient to
``engine.backward``. Nothing of size ``Nq x Nk`` is saved: q, k, v, the bias, out and ``lse (B, H, Nq)``.

Flash attention has two outputs, ``out`` and ``lse``, and both have gradients (``d lse_i / d s_ij = P_ij``). A
``Function`` here has one output, so the forward runs once (:func:`attend`) and two Functions record it:
:class:`FlashAttention` gives ``out``, :class:`FlashAttentionLSE` gives ``lse``; each one's backward is the
engine's backward with its own incoming gradient (``dout``, or ``dlse``), and autodiff adds them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Tuple

from ..autodiff import Context
from ..tensor import Tensor
from ..tensor_functions import Function
from .engine import Array, engine_of, raw4, wrap
from .mods import missing_grad_message
from .spec import AttentionSpec, DMASpec, KeyList, TopK


class Attended(NamedTuple):
    """The raw result of one engine forward: ``out (B, H, Nq, D)``, ``lse (B, H, Nq)``, and the bias array the
    engine saw (``None`` without a bias). (A named tuple: made on every call, it should cost nothing.)"""

    out: Array
    lse: Array
    bias: Optional[Array]


def _bias_array(bias: Optional[Tensor], spec: AttentionSpec) -> Optional[Array]:
    return None if bias is None else raw4(bias).reshape(spec.bias_shape)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], spec: AttentionSpec) -> Attended:
    """Run the engine's forward of ``q``'s backend once (no autodiff; the Functions below record it)."""
    b = _bias_array(bias, spec)
    out, lse = engine_of(q.backend).forward(raw4(q), raw4(k), raw4(v), b, spec)
    return Attended(out, lse, b)


def _gradients(ctx: Context, dout: Optional[Tensor], dlse: Optional[Tensor]) -> Tuple[Any, ...]:
    """The engine's backward for the saved call, with an incoming gradient on ``out`` and/or ``lse``."""
    q, k, v, bias, sinks, fwd, spec = ctx.saved_values
    engine = engine_of(q.backend)
    if spec.score_mod is not None and spec.score_mod.grad is None:
        raise ValueError(missing_grad_message(spec.score_mod.fn))
    dout_a = raw4(dout) if dout is not None else engine.zeros(tuple(q.shape), q.dtype)
    dlse_a = raw4(dlse) if dlse is not None else None
    dq, dk, dv, dbias = engine.backward(raw4(q), raw4(k), raw4(v), fwd.bias, fwd.out, fwd.lse, dout_a, spec, dlse_a)
    backend = q.backend
    db = None
    if bias is not None and dbias is not None:
        db = wrap(dbias.reshape(bias.shape), backend)
    dsinks = None
    if sinks is not None:
        dsinks = wrap(engine.sinks_backward(fwd.out, fwd.lse, dout_a, dlse_a, spec), backend)
    return wrap(dq, backend), wrap(dk, backend), wrap(dv, backend), db, dsinks, None, None


class FlashAttention(Function):
    """Fused attention with recomputation (FlashAttention 1/2), as a differentiable Function: the output.

    ``apply(q, k, v, bias_or_None, sinks_or_None, spec, attended)`` with ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk,
    D)``, the bias a Tensor broadcastable as ``(B|1, H|Hkv|1, Nq|1, Nk)``, the learnable sink logits a Tensor
    ``(H,)`` (their values are ``spec.sinks``), ``spec`` the validated :class:`AttentionSpec` and ``attended`` the
    :func:`attend` result. Backward recomputes the probabilities tile by tile from ``lse``.
    """

    @staticmethod
    def forward(ctx: Context, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], sinks: Optional[Tensor],
                spec: AttentionSpec, attended: Attended) -> Tensor:
        ctx.save_for_backward(q, k, v, bias, sinks, attended, spec)
        return wrap(attended.out, q.backend)

    @staticmethod
    def backward(ctx: Context, grad_out: Tensor) -> Tuple[Any, ...]:
        return _gradients(ctx, grad_out, None)


class FlashAttentionLSE(Function):
    """The log-sum-exp output ``lse (B, H, Nq)`` of the same call, differentiable: ``d lse_i / d s_ij = P_ij``, so
    its gradient is the engine's backward with ``dlse`` (and no ``dout``). ``apply`` as :class:`FlashAttention`."""

    @staticmethod
    def forward(ctx: Context, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], sinks: Optional[Tensor],
                spec: AttentionSpec, attended: Attended) -> Tensor:
        ctx.save_for_backward(q, k, v, bias, sinks, attended, spec)
        return wrap(attended.lse, q.backend)

    @staticmethod
    def backward(ctx: Context, grad_lse: Tensor) -> Tuple[Any, ...]:
        return _gradients(ctx, None, grad_lse)


@dataclass(frozen=True)
class DMAAttended:
    """The raw result of one Dynamic Mask Attention forward: ``out``, ``lse``, the importance ``z`` and its
    pre-activation ``u`` (``(B, Hkv, Nk)``), the selection and the engine spec configured with it."""

    out: Array
    lse: Array
    z: Array
    u: Array
    selection: Any
    spec: AttentionSpec


def dma_config(engine: Any, z: Array, dspec: DMASpec) -> Tuple[AttentionSpec, Any]:
    """The engine configuration of a DMA call: ``engine.select`` the keys, then the flash spec with keys read
    through the selection's compacted list, its tiles, ``z`` as a bias of shape ``(B, Hkv, 1, Nk)`` (one number
    per key, shared by a group's heads and every query) and the top-k keep rule. Returns ``(spec, selection)``."""
    sel = engine.select(z, dspec)
    attn = dspec.attn
    spec = attn.replace(
        block_q=sel.block_q, block_k=sel.block_k, bias_shape=(attn.B, attn.Hkv, 1, attn.Nk),
        keys=KeyList(sel.kidx, sel.counts, sel.types, per_tile=None if sel.per_tile is None else KeyList(
            *sel.per_tile)), topk=TopK(sel.thr_val, sel.thr_idx),
    )
    return spec, sel


def dma_attend(q: Tensor, k: Tensor, v: Tensor, dt_proj: Tensor, a_coef: Tensor, dspec: DMASpec) -> DMAAttended:
    """Run a DMA forward once (no autodiff): the importance ``z``, the selection, and the engine's flash attention
    configured for DMA (:func:`dma_config`)."""
    engine = engine_of(q.backend)
    z, u = engine.importance(raw4(v), raw4(dt_proj), raw4(a_coef), dspec.log_space)
    spec, sel = dma_config(engine, z, dspec)
    out, lse = engine.forward(raw4(q), raw4(k), raw4(v), z.reshape(spec.bias_shape), spec)
    return DMAAttended(out, lse, z, u, sel, spec)


class FlashDMAAttention(Function):
    """Dynamic mask attention as one differentiable Function.

    ``FlashDMAAttention.apply(q, k, v, dt_proj, a_coef, dspec, attended)`` with a :class:`DMASpec` and the
    :func:`dma_attend` result. It saves q, k, v, dt_proj, a_coef and the result (all ``O(N)``). Backward runs the
    engine's backward, whose bias gradient is ``dz``, then chains dz through the importance into dv, dt_proj and
    a_coef (the selection itself has no gradient).
    """

    @staticmethod
    def forward(ctx: Context, q: Tensor, k: Tensor, v: Tensor, dt_proj: Tensor, a_coef: Tensor, dspec: DMASpec,
                attended: DMAAttended) -> Tensor:
        ctx.save_for_backward(q, k, v, dt_proj, a_coef, dspec, attended)
        return wrap(attended.out, q.backend)

    @staticmethod
    def backward(ctx: Context, grad_output: Tensor) -> Tuple[Any, ...]:
        q, k, v, dt_proj, a_coef, dspec, fwd = ctx.saved_values
        engine = engine_of(q.backend)
        qa, ka, va, dta, aa = (raw4(t) for t in (q, k, v, dt_proj, a_coef))
        z, spec = fwd.z, fwd.spec
        dq, dk, dv, dz4 = engine.backward(qa, ka, va, z.reshape(spec.bias_shape), fwd.out, fwd.lse,
                                          raw4(grad_output), spec)
        dv, d_dt, d_a = engine.importance_backward(dz4.reshape(z.shape), va, dta, aa, z, fwd.u, dspec.log_space, dv)
        bk = q.backend
        return wrap(dq, bk), wrap(dk, bk), wrap(dv, bk), wrap(d_dt, bk), wrap(d_a, bk), None, None
