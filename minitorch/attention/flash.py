"""The tensor-level attention API: ``flash_attention`` and ``attention_reference`` (DESIGN.md section 3).

``flash_attention`` validates the call once (:func:`~minitorch.attention.spec.make_spec`), then runs the
``FlashAttention`` Function, which hands raw arrays to the backend's implementation:

========================  ===========================================  ==========================
backend                   implementation                               arrays
========================  ===========================================  ==========================
``SimpleBackend``         :mod:`minitorch.attention.simple` (NumPy)     NumPy
``FastTensorBackend``     :mod:`minitorch.attention.cpu` (Numba CPU)    NumPy
``CudaBackend``           :mod:`minitorch.cuda_kernels.cuda_kernel_ops` device arrays
========================  ===========================================  ==========================

``attention_reference`` is standard ``O(N^2)`` attention built from tensor ops, differentiated by autodiff: a
second opinion for tests and the baseline of the benchmarks.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

import numpy as np

from .reference import reference_mask
from .spec import AttentionSpec, check_qkv, make_spec
from .tiling import TileOrder

if TYPE_CHECKING:
    from ..tensor import Tensor
    from ..tensor_ops import TensorBackend


def attention_impl(backend: "TensorBackend") -> ModuleType:
    """The module implementing ``forward``/``backward`` on raw arrays for ``backend``."""
    kind = getattr(backend, "attention_kind", "simple")
    if kind == "fast":
        from . import cpu

        return cpu
    if kind == "cuda":
        from ..cuda_kernels import cuda_kernel_ops

        return cuda_kernel_ops
    from . import simple

    return simple


def raw4(t: "Tensor") -> Any:
    """The tensor's data as a contiguous array of its shape (NumPy or device array), a view when possible."""
    if not t._tensor.is_contiguous():
        t = t.contiguous()
    storage = t._tensor._storage
    n = t.size
    if storage.shape[0] != n:
        storage = storage[:n]
    return storage.reshape(t.shape)


def wrap(array: Any, backend: "TensorBackend") -> "Tensor":
    """A constant tensor around a contiguous NumPy or device array (no copy)."""
    from ..tensor import Tensor

    shape = tuple(int(s) for s in array.shape)
    flat = array.reshape(int(np.prod(shape)) if shape else 1)
    return Tensor.make(flat, shape, backend=backend)


def _to_numpy_mask(mask: Any) -> Optional[np.ndarray]:
    if mask is None:
        return None
    if hasattr(mask, "to_numpy"):
        mask = mask.to_numpy()
    return np.asarray(mask)


def _positions(pos: Any) -> Any:
    if pos is None:
        return None
    if hasattr(pos, "to_numpy"):
        pos = pos.to_numpy()
    return np.asarray(pos)


def _bias_tensor(attn_bias: Any, q: "Tensor") -> Optional["Tensor"]:
    from ..tensor import Tensor
    from ..tensor_functions import from_numpy

    if attn_bias is None:
        return None
    if isinstance(attn_bias, Tensor):
        return attn_bias
    arr = np.asarray(attn_bias, dtype=q.dtype)
    return from_numpy(arr, backend=q.backend)


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
) -> Union["Tensor", Tuple["Tensor", "Tensor"]]:
    """Fused, memory-efficient attention: ``softmax(scale * q k^T + bias, masked) v``.

    Args:
        q: ``(B, H, Nq, D)``. k, v: ``(B, Hkv, Nk, D)`` with ``H % Hkv == 0`` (MHA, GQA and MQA).
        causal, window, q_positions, k_positions: masks by absolute position (DESIGN.md section 3).
        key_padding_mask: ``(B, Nk)`` booleans, True = padding (ignored key).
        attn_bias: added to the scaled scores, ``(B|1, H|Hkv|1, Nq|1, Nk)``; differentiable if a Tensor.
        dropout, seed: attention dropout with a counter-based keep-mask (see :mod:`.dropout`).
        return_lse: also return ``lse (B, H, Nq)``, the natural-log log-sum-exp of each row (``-inf`` if empty).
        block_q, block_k, order: tiling (``Br``, ``Bc``, :class:`TileOrder`); the result does not depend on them.
        num_sinks: keys at positions below it ignore the window (attention sinks; used by the KV cache).

    Returns:
        ``out (B, H, Nq, D)``, or ``(out, lse)``.
    """
    from ..tensor import Tensor
    from ..tensor_functions import FlashAttention

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a minitorch Tensor, got {type(t).__name__}")
    bias = _bias_tensor(attn_bias, q)
    spec = make_spec(
        q.shape, k.shape, v.shape, causal=causal, scale=scale, window=window,
        key_padding_mask=_to_numpy_mask(key_padding_mask), bias_shape=None if bias is None else bias.shape,
        dropout=dropout, seed=seed, q_positions=_positions(q_positions), k_positions=_positions(k_positions),
        block_q=block_q, block_k=block_k, order=order, backend_kind=getattr(q.backend, "attention_kind", "simple"),
        num_sinks=num_sinks,
    )
    if bias is None:
        out = FlashAttention.apply(q, k, v, None, spec)
    else:
        out = FlashAttention.apply(q, k, v, bias, spec)
    if return_lse:
        return out, spec.extra["lse"]
    return out


def attention_reference(
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
) -> Union["Tensor", Tuple["Tensor", "Tensor"]]:
    """Standard attention from tensor ops (matmul, exp, sum), differentiated by autodiff. ``O(Nq Nk)`` memory.

    Same arguments and results as :func:`flash_attention` (the tiling arguments are accepted and ignored).
    """
    from ..tensor_functions import from_numpy
    from .dropout import dropout_mask

    B, H, Hkv, Nq, Nk, D = check_qkv(q.shape, k.shape, v.shape)
    bias = _bias_tensor(attn_bias, q)
    spec = make_spec(  # validation only, so both APIs reject the same inputs
        q.shape, k.shape, v.shape, causal=causal, scale=scale, window=window,
        key_padding_mask=_to_numpy_mask(key_padding_mask), bias_shape=None if bias is None else bias.shape,
        dropout=dropout, seed=seed, q_positions=_positions(q_positions), k_positions=_positions(k_positions),
        block_q=block_q, block_k=block_k, order=order, num_sinks=num_sinks,
    )
    G = H // Hkv
    backend, dtype = q.backend, q.dtype
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
    mask_np = reference_mask(
        B, Nq, Nk, causal, window, spec.q_pos, spec.k_pos, _to_numpy_mask(key_padding_mask), num_sinks
    ).astype(dtype)[:, None, None]  # (B, 1, 1, Nq, Nk)
    mask = from_numpy(mask_np, backend=backend)
    row_any = from_numpy((mask_np.sum(axis=-1, keepdims=True) > 0).astype(dtype), backend=backend)
    # Softmax over visible keys: subtract a constant row max (no gradient needed through it), exp, mask, normalise.
    s_np = s.detach().to_numpy()
    m_np = np.where(mask_np > 0, s_np, -np.inf).max(axis=-1, keepdims=True)
    m_np = np.where(np.isfinite(m_np), m_np, 0.0).astype(dtype)
    e = (s - from_numpy(m_np, backend=backend)).exp() * mask
    l = e.sum(4)
    l_safe = l + (row_any * -1.0 + 1.0)  # 1 on empty rows, so they divide 0 by 1
    p = e / l_safe
    if spec.dropout > 0:
        keep = dropout_mask(spec.seed, (B, H, Nq, Nk), spec.dropout).astype(dtype) / (1.0 - spec.dropout)
        p = p * from_numpy(keep.reshape(B, Hkv, G, Nq, Nk), backend=backend)
    v5 = v.contiguous().view(B, Hkv, 1, Nk, D)
    out = (p @ v5).contiguous().view(B, H, Nq, D)
    if return_lse:
        l_np = l.detach().to_numpy()[..., 0]
        with np.errstate(divide="ignore"):
            lse_np = np.where(l_np > 0, m_np[..., 0] + np.log(np.where(l_np > 0, l_np, 1.0)), -np.inf)
        return out, from_numpy(lse_np.reshape(B, H, Nq).astype(dtype), backend=backend)
    return out


def run_forward(q: "Tensor", k: "Tensor", v: "Tensor", bias: Optional["Tensor"], spec: AttentionSpec) -> Tuple[Any, Any]:
    """Raw-array forward of the backend of ``q``: ``(out, lse)`` arrays."""
    impl = attention_impl(q.backend)
    b = None if bias is None else raw4(bias).reshape(spec.bias_shape)
    return impl.forward(raw4(q), raw4(k), raw4(v), b, spec)


def run_backward(
    q: "Tensor", k: "Tensor", v: "Tensor", bias: Optional["Tensor"], out: "Tensor", lse: "Tensor",
    dout: "Tensor", spec: AttentionSpec,
) -> Tuple[Any, Any, Any, Any]:
    """Raw-array backward of the backend of ``q``: ``(dq, dk, dv, dbias)`` arrays (dbias None without bias)."""
    impl = attention_impl(q.backend)
    b = None if bias is None else raw4(bias).reshape(spec.bias_shape)
    return impl.backward(raw4(q), raw4(k), raw4(v), b, raw4(out), raw4(lse), raw4(dout), spec)
