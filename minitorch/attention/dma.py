"""Dynamic Mask Attention (DMA): every query attends to the ``keep_window_size`` most *important* keys it can see.

DESIGN.md section 3. For ``q (B, H, Nq, D)``, ``k, v (B, Hkv, Nk, D)``, ``dt_proj (Hkv, Hkv*D)``, ``a_coef (Hkv,)``::

    x[b, j]    = concat_heads(v)[b, j] = v[b, :, j, :].reshape(Hkv * D)
    u[b, g, j] = x[b, j] @ dt_proj[g]
    z[b, g, j] = exp(a_coef[g] * softplus(u[b, g, j]))       (log_space=True: z = a_coef[g] * softplus(u))
    s[i, j]    = scale * q_i . k_j + z[j]   for the kept keys j of query i, excluded otherwise

``log_space=True`` is the later variant of the paper's importance: the bias is ``a * softplus(...)`` itself (a
log-domain gate, which can be negative), instead of its exponential.

Query i's *candidates* are the keys it may see: keys that are not padding, and with ``causal=True`` the keys
``j <= p_i = Nk - Nq + i`` (bottom-right alignment, exactly as :func:`~minitorch.attention.flash.flash_attention`;
with ``Nq > Nk`` the first ``Nq - Nk`` queries of a causal call see nothing). Of more than ``keep_window_size``
candidates it keeps the ``keep_window_size`` largest ``z`` (ties: the lower key index wins); otherwise it keeps them
all (and still adds z).
Gradients flow to q, k, v, dt_proj and a_coef through the added z; the selection itself has no gradient.

Selection in O(N) memory (never the ``(Nq, Nk)`` mask)
-----------------------------------------------------
``z`` depends only on the key, so query i keeps the top-k of its visible prefix. One sweep over the keys of each
(batch, kv head) with a size-k min-heap (:func:`build_selection`, ``O(Nk log k)``) gives, for every query row:

* a **threshold** ``(thr_val, thr_idx)``: the worst kept key. Key j is kept by row i iff it is visible and
  ``z_j > thr_val or (z_j == thr_val and j <= thr_idx)``. Fused kernels test membership on the fly with it.
* each key's **lifetime**: key j enters the heap at step j and is evicted at step ``evict[j]`` (``Nk`` if never),
  so with causal it is kept exactly by the rows with ``j <= p_i < evict[j]`` (the top-k of a growing prefix never
  takes a key back). Without ``causal`` every row keeps the final heap.

Sparse blocks over a *compacted* key list
-----------------------------------------
A random top-k is scattered: with 20% of the keys kept, a 64-key tile holds no kept key with probability
``0.8**64 ~ 1e-6``, so skipping empty tiles of the key sequence saves nothing. The kernels therefore tile a
per-(batch, kv head) list ``kidx`` of the keys that some row keeps (``count`` of them): without ``causal`` exactly
the k selected keys, with ``causal`` the final top-k (by index) followed by the evicted keys, latest eviction
first (the evicted keys still alive at a query tile's first row are then a prefix of that part). Kernels *gather* K and V rows through ``kidx``;
dropout hashes the original key index, so the mask is the one flash attention uses. For every (query tile, key tile
of the list) :func:`build_selection`'s ``tile_flags`` computes, exactly, from the lifetimes:

* ``SKIP``: no row of the query tile keeps a key of the tile: never loaded, in forward or backward;
* ``DENSE``: every row keeps every key (the non-causal case): no per-element test, just ``+ z``;
* ``TRIANGLE``: membership tested per element with the thresholds.

Work is then ``Nq * k`` pairs without causal (every visited tile is fully kept) instead of ``Nq * Nk``. With causal
the list also holds keys that are only alive for a while; for a random top-k about half of the computed pairs are
kept (benchmarks/bench_dma.py). ``compact=False`` tiles the key sequence itself (the same code with
``kidx = arange(Nk)``): the textbook block-sparse scheme, kept for comparison.

Backward computes dQ first; its row sums of dS (zero up to rounding) refine flash attention's ``delta`` before the
dK/dV/dz pass, so that ``dz``, which feeds the nearly cancelling sums of ``d a_coef`` and ``d dt_proj``, keeps
float32 accuracy (see :mod:`.dma_cpu`).

Implementations (one module per backend, the same functions on raw arrays)
-------------------------------------------------------------------------
::

    importance(v, dt_proj, a_coef, log_space) -> (z, u)                       z, u: (B, Hkv, Nk)
    importance_backward(dz, v, dt_proj, a_coef, z, u, log_space, dv) -> (dv, d_dt_proj, d_a_coef)   (adds into dv)
    select(z, spec) -> Selection
    forward(q, k, v, z, sel, spec) -> (out, lse)
    backward(q, k, v, z, sel, out, lse, dout, spec) -> (dq, dk, dv, dz)        dz: (B, Hkv, Nk)

``dz[b, g, j]`` is the sum over the group's query heads and the queries of ``dS[i, j]`` for kept j. SimpleBackend:
this module (readable tiled NumPy, :class:`NumpyDMA`); FastTensorBackend: :mod:`.dma_cpu` (fused Numba kernels);
CudaBackend: :mod:`minitorch.cuda_kernels.dma`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Tuple, Union

import numpy as np

from ..tensor_functions import Function
from .dropout import build_dropout_hash
from .spec import AttentionSpec, check_qkv, make_spec
from .tiling import TileType

if TYPE_CHECKING:
    from ..tensor import Tensor
    from ..tensor_ops import TensorBackend

SKIP = int(TileType.SKIP)
DENSE = int(TileType.DENSE)
TRIANGLE = int(TileType.TRIANGLE)

PROBS_WARN_ELEMENTS = 2**24
"""``return_attn_probs`` materializes ``(B, H, Nq, Nk)``: above this many elements a warning is issued."""


# ------------------------------------------------------------------------------------------------------------------
# Importance z = exp(a * softplus(concat_heads(v) @ dt_proj^T)), host (NumPy) version
# ------------------------------------------------------------------------------------------------------------------


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


def importance(v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, log_space: bool) -> Tuple[np.ndarray, np.ndarray]:
    """``(z, u)``, both ``(B, Hkv, Nk)`` in the dtype of ``v``; ``u`` is the pre-activation (kept for backward)."""
    x = concat_heads(v)
    u = np.ascontiguousarray(np.transpose(x @ dt_proj.T, (0, 2, 1)))  # (B, Hkv, Nk)
    gate = a_coef.reshape(1, -1, 1) * softplus(u)
    z = gate if log_space else np.exp(gate)
    return np.ascontiguousarray(z, dtype=v.dtype), u


def importance_backward(
    dz: np.ndarray, v: np.ndarray, dt_proj: np.ndarray, a_coef: np.ndarray, z: np.ndarray, u: np.ndarray,
    log_space: bool, dv: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chain ``dz`` through the importance: returns ``(dv + d concat_heads^-1(dx), d_dt_proj, d_a_coef)``.

    ``dz/du = z a sigmoid(u)`` and ``dz/da = z softplus(u)`` (log space: ``a sigmoid(u)`` and ``softplus(u)``).
    ``O(B Nk Hkv D)`` memory.
    """
    B, Hkv, Nk, D = v.shape
    a = a_coef.reshape(1, -1, 1)
    sp, sig = softplus(u), sigmoid(u)
    if log_space:
        du, da = dz * a * sig, dz * sp
    else:
        du, da = dz * z * a * sig, dz * z * sp
    x = concat_heads(v)  # (B, Nk, Hkv*D)
    d_dt = np.einsum("bgj,bjc->gc", du, x, optimize=True)
    dx = np.matmul(np.transpose(du, (0, 2, 1)), dt_proj)  # (B, Nk, Hkv*D)
    dv = dv + np.transpose(dx.reshape(B, Nk, Hkv, D), (0, 2, 1, 3))
    return np.ascontiguousarray(dv, dtype=v.dtype), d_dt.astype(v.dtype), da.sum(axis=(0, 2)).astype(v.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Selection: one heap sweep per (batch, kv head); the same Python source for NumPy, numba.njit and numba.cuda.jit
# ------------------------------------------------------------------------------------------------------------------


def _worse(va, ia, vb, ib):  # type: ignore[no-untyped-def]
    """Does key ``(va, ia)`` rank below key ``(vb, ib)``? (smaller z; equal z and larger index)."""
    return va < vb or (va == vb and ia > ib)


def build_selection(jit: Callable[[Callable], Callable] = lambda f: f) -> Tuple[Callable, Callable]:
    """Return ``(select_head, tile_flags)`` compiled with ``jit`` (identity: plain Python on NumPy arrays;
    ``numba.njit``; ``numba.cuda.jit(device=True)``). Scalars and array indexing only, so all three agree.

    ``select_head(z, k_pos_b, b, g, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx, kidx, counts,
    compact, big)`` sweeps the keys of (batch ``b``, kv head ``g``) in index order with a min-heap (root = worst
    kept key) held in ``hv, hi (B, Hkv, cap)``. Query row i sits at position ``off + i`` (``off = Nk - Nq``).
    With causal, row i keeps keys ``j <= off + i`` only. Writes ``evict, victim (B, Hkv, Nk)`` (key j is kept by rows at positions ``[j, evict[j])``; ``victim[s]`` is
    the key evicted at step s or -1), the thresholds ``thr_val, thr_idx (B, Hkv, Nq)`` (``(big, -1)``: keep
    nothing), the compacted key list ``kidx (B, Hkv, Nk)`` and its length ``counts[b, g]``.

    ``tile_flags(kidx, counts, evict, b, g, tq, Br, Bc, causal, off, Nq, types)`` classifies the tiles of query
    tile ``tq`` against every ``Bc``-key tile of the list into ``types[b, g, tq, :]`` (SKIP / DENSE / TRIANGLE).
    """
    worse = jit(_worse)

    def sift_up(hv, hi, b, g, pos):  # type: ignore[no-untyped-def]
        while pos > 0:
            parent = (pos - 1) // 2
            if worse(hv[b, g, pos], hi[b, g, pos], hv[b, g, parent], hi[b, g, parent]):
                tv = hv[b, g, pos]
                ti = hi[b, g, pos]
                hv[b, g, pos] = hv[b, g, parent]
                hi[b, g, pos] = hi[b, g, parent]
                hv[b, g, parent] = tv
                hi[b, g, parent] = ti
                pos = parent
            else:
                break

    def sift_down(hv, hi, b, g, size, pos):  # type: ignore[no-untyped-def]
        while 2 * pos + 1 < size:
            c = 2 * pos + 1
            if c + 1 < size and worse(hv[b, g, c + 1], hi[b, g, c + 1], hv[b, g, c], hi[b, g, c]):
                c = c + 1
            if worse(hv[b, g, c], hi[b, g, c], hv[b, g, pos], hi[b, g, pos]):
                tv = hv[b, g, pos]
                ti = hi[b, g, pos]
                hv[b, g, pos] = hv[b, g, c]
                hi[b, g, pos] = hi[b, g, c]
                hv[b, g, c] = tv
                hi[b, g, c] = ti
                pos = c
            else:
                break

    sift_up_j = jit(sift_up)
    sift_down_j = jit(sift_down)

    def select_head(z, k_pos_b, b, g, keep, causal, off, hv, hi, evict, victim, thr_val, thr_idx,  # type: ignore[no-untyped-def]
                    kidx, counts, compact, big):
        Nk = z.shape[2]
        Nq = thr_val.shape[2]
        never = Nk
        for j in range(Nk):
            evict[b, g, j] = j  # empty lifetime: never kept
            victim[b, g, j] = -1
        for i in range(Nq):
            thr_val[b, g, i] = big
            thr_idx[b, g, i] = -1
        size = 0
        for j in range(Nk):
            if k_pos_b[b, j] >= 0:  # not padding
                zj = z[b, g, j]
                if size < keep:
                    hv[b, g, size] = zj
                    hi[b, g, size] = j
                    sift_up_j(hv, hi, b, g, size)
                    size += 1
                    evict[b, g, j] = never
                elif zj > hv[b, g, 0]:  # j has the largest index so far: on a tie it loses
                    old = hi[b, g, 0]
                    evict[b, g, old] = j
                    victim[b, g, j] = old
                    hv[b, g, 0] = zj
                    hi[b, g, 0] = j
                    sift_down_j(hv, hi, b, g, size, 0)
                    evict[b, g, j] = never
            i = j - off  # the row at position j sees exactly the keys swept so far
            if causal and i >= 0 and i < Nq and size > 0:
                thr_val[b, g, i] = hv[b, g, 0]
                thr_idx[b, g, i] = hi[b, g, 0]
        if not causal and size > 0:  # every row keeps the final heap
            for i in range(Nq):
                thr_val[b, g, i] = hv[b, g, 0]
                thr_idx[b, g, i] = hi[b, g, 0]
        # the compacted key list: every key some row keeps
        count = 0
        if not compact:
            for j in range(Nk):
                kidx[b, g, j] = j
            count = Nk
        elif Nq > 0:
            lo = off if off > 0 else 0  # causal: position of the first row that sees anything
            for j in range(Nk):  # the final top-k, by index (kept by the last rows; by all rows without causal)
                if evict[b, g, j] == never:
                    kidx[b, g, count] = j
                    count += 1
            if causal:  # then the evicted keys, latest eviction first (alive at [key, s) with s > lo)
                for s in range(Nk - 1, lo, -1):
                    old = victim[b, g, s]
                    if old >= 0:
                        kidx[b, g, count] = old
                        count += 1
        counts[b, g] = count

    def tile_flags(kidx, counts, evict, b, g, tq, Br, Bc, causal, off, Nq, types):  # type: ignore[no-untyped-def]
        Nk = evict.shape[2]
        never = Nk
        i0 = tq * Br
        i1 = min(Nq, i0 + Br)
        p_first = off + i0  # causal: the last key index the tile's first and last rows see
        p_last = off + i1 - 1
        rows_valid = p_first >= 0  # causal rows at p < 0 keep nothing
        if p_first < 0:
            p_first = 0
        if not causal:  # every row keeps the final heap: lifetimes are [0, Nk) or empty
            rows_valid = True
            p_first = 0
            p_last = 0
        count = counts[b, g]
        for tc in range(types.shape[3]):
            c0 = tc * Bc
            c1 = min(count, c0 + Bc)
            t = 0  # SKIP
            if p_last >= 0 and c0 < count:
                some = False
                every = rows_valid
                for c in range(c0, c1):
                    j = kidx[b, g, c]
                    start = j  # kept by rows at positions [start, end)
                    end = evict[b, g, j]
                    if not causal:
                        start = 0
                        if end != never:
                            end = 0
                    if start < end and start <= p_last and end > p_first:
                        some = True
                    if not (start <= p_first and end > p_last):
                        every = False
                if some:
                    t = 1 if every else 2  # DENSE : TRIANGLE
            types[b, g, tq, tc] = t

    return jit(select_head), jit(tile_flags)


@dataclass
class Selection:
    """Output of ``select``: arrays on the device of the backend (NumPy for Simple/Fast, device arrays for CUDA).

    ``thr_val (B, Hkv, Nq)`` (dtype of z), ``thr_idx (B, Hkv, Nq)`` int64: row i keeps key j iff visible and
    ``z_j > thr_val or (z_j == thr_val and j <= thr_idx)``. ``evict (B, Hkv, Nk)`` int64: key j is kept by rows
    at positions ``[j, evict[j])`` (causal). ``kidx (B, Hkv, Nk)`` int64, ``counts (B, Hkv)``: the compacted key
    list. ``types (B, Hkv, Tr, Tc)`` int8: the flags of (query tile of ``block_q`` rows, ``block_k``-key tile of the
    list). ``block_q, block_k``: the tile sizes the flags were computed for.
    """

    thr_val: Any
    thr_idx: Any
    evict: Any
    kidx: Any
    counts: Any
    types: Any
    block_q: int
    block_k: int

    def host(self) -> "Selection":
        """A copy with NumPy arrays (for tests and the probabilities)."""
        conv = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)  # noqa: E731
        return Selection(*(conv(getattr(self, n)) for n in ("thr_val", "thr_idx", "evict", "kidx", "counts", "types")),
                         self.block_q, self.block_k)


def empty_threshold(dtype: Any) -> Any:
    """The threshold of a row that keeps nothing: ``(finfo.max, -1)``."""
    return np.dtype(dtype).type(np.finfo(dtype).max)


def kept_dense(sel: Selection, z: np.ndarray, spec: "DMASpec") -> np.ndarray:
    """The boolean ``(B, Hkv, Nq, Nk)`` keep-mask that ``sel``'s thresholds describe (tests and probabilities only:
    ``O(Nq Nk)``)."""
    sel = sel.host()
    z = np.asarray(z)
    j = np.arange(spec.Nk)
    qp = spec.off + np.arange(spec.Nq)
    tv, ti = sel.thr_val[..., None], sel.thr_idx[..., None]
    zz = z[:, :, None, :]
    keep = (zz > tv) | ((zz == tv) & (j <= ti))
    vis = (j[None, :] <= qp[:, None]) | (not spec.causal)
    vis = vis[None, None] & (spec.attn.k_pos_b >= 0)[:, None, None, :]
    return keep & vis


# ------------------------------------------------------------------------------------------------------------------
# The call's description
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class DMASpec:
    """A validated DMA call: the flash :class:`AttentionSpec` (shapes, scale, causal, padding, dropout, blocks)
    plus ``keep`` (keep_window_size), ``log_space``, ``compact`` and ``return_probs``. Results that the caller
    reads after the call (``probs``) go to ``extra``."""

    attn: AttentionSpec
    keep: int
    log_space: bool = False
    compact: bool = True
    return_probs: bool = False
    extra: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # B, H, Hkv, Nq, Nk, D, group, scale, causal, dropout, seed, ...
        if name == "attn":
            raise AttributeError(name)
        return getattr(self.attn, name)

    @property
    def off(self) -> int:
        """With causal, row i sees the keys ``j <= off + i`` (``off = Nk - Nq``: bottom-right alignment)."""
        return self.attn.Nk - self.attn.Nq


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def make_dma_spec(
    q_shape: Tuple[int, ...], k_shape: Tuple[int, ...], v_shape: Tuple[int, ...],
    dt_shape: Tuple[int, ...], a_shape: Tuple[int, ...], *,
    keep_window_size: int = 1024, causal: bool = False, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[np.ndarray] = None, seed: Optional[int] = None, log_space: bool = False,
    return_attn_probs: bool = False, block_q: Optional[int] = None, block_k: Optional[int] = None,
    backend_kind: str = "simple", compact: bool = True,
) -> DMASpec:
    """Validate a DMA call (raising ``ValueError``/``TypeError`` naming the argument and the shapes)."""
    B, H, Hkv, Nq, Nk, D = check_qkv(q_shape, k_shape, v_shape)
    keep = _check_int("keep_window_size", keep_window_size, 1)
    if tuple(dt_shape) != (Hkv, Hkv * D):
        raise ValueError(
            f"dt_proj must have shape (Hkv, Hkv*D)=({Hkv}, {Hkv * D}) for k/v of shape {tuple(k_shape)}, "
            f"got {tuple(dt_shape)}"
        )
    if tuple(a_shape) != (Hkv,):
        raise ValueError(f"a_coef must have shape (Hkv,)=({Hkv},) for k/v of shape {tuple(k_shape)}, got {tuple(a_shape)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if softmax_scale is not None and (
        isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer))
        or not math.isfinite(float(softmax_scale))
    ):
        raise TypeError(f"softmax_scale must be a finite number or None, got {softmax_scale!r}")
    attn = make_spec(
        q_shape, k_shape, v_shape, causal=bool(causal), scale=softmax_scale, key_padding_mask=key_padding_mask,
        dropout=float(dropout_p), seed=seed, block_q=block_q, block_k=block_k, backend_kind=backend_kind,
    )
    return DMASpec(attn, keep, bool(log_space), bool(compact), bool(return_attn_probs))


# ------------------------------------------------------------------------------------------------------------------
# SimpleBackend: tiled NumPy, the algorithm written out
# ------------------------------------------------------------------------------------------------------------------

_select_head_py, _tile_flags_py = build_selection()
_dropout_hash_np = build_dropout_hash()


def select_arrays(z: np.ndarray, spec: DMASpec, select_head: Callable, tile_flags: Callable) -> Selection:
    """Run a (host) ``select_head`` over every (b, g) and ``tile_flags`` over every query tile."""
    B, Hkv, Nq, Nk = spec.B, spec.Hkv, spec.Nq, spec.Nk
    Br, Bc = spec.block_q, spec.block_k
    cap = max(1, min(spec.keep, Nk))
    hv, hi = np.empty((B, Hkv, cap), z.dtype), np.empty((B, Hkv, cap), np.int64)
    sel = _alloc_selection(B, Hkv, Nq, Nk, Br, Bc, z.dtype)
    kpb = np.ascontiguousarray(spec.attn.k_pos_b, dtype=np.int64)
    big = empty_threshold(z.dtype)
    victim = np.empty((B, Hkv, Nk), np.int64)
    for b in range(B):
        for g in range(Hkv):
            select_head(z, kpb, b, g, spec.keep, spec.causal, spec.off, hv, hi, sel.evict, victim, sel.thr_val,
                        sel.thr_idx, sel.kidx, sel.counts, spec.compact, big)
            for tq in range(sel.types.shape[2]):
                tile_flags(sel.kidx, sel.counts, sel.evict, b, g, tq, Br, Bc, spec.causal, spec.off, Nq, sel.types)
    return sel


def _alloc_selection(B: int, Hkv: int, Nq: int, Nk: int, Br: int, Bc: int, dtype: Any) -> Selection:
    Tr, Tc = -(-Nq // Br), -(-Nk // Bc)
    return Selection(
        np.empty((B, Hkv, Nq), dtype), np.empty((B, Hkv, Nq), np.int64), np.empty((B, Hkv, Nk), np.int64),
        np.zeros((B, Hkv, Nk), np.int64), np.zeros((B, Hkv), np.int64), np.zeros((B, Hkv, Tr, Tc), np.int8), Br, Bc,
    )


class NumpyDMA:
    """The SimpleBackend implementation: tile by tile in NumPy (readable; Python loops over tiles)."""

    importance = staticmethod(importance)
    importance_backward = staticmethod(importance_backward)

    @staticmethod
    def select(z: np.ndarray, spec: DMASpec) -> Selection:
        return select_arrays(z, spec, _select_head_py, _tile_flags_py)

    @staticmethod
    def _tiles(sel: Selection, spec: DMASpec, b: int, g: int, tq: int):  # type: ignore[no-untyped-def]
        """The visited tiles of query tile ``tq``: ``(tile type, original key indices of the tile)``."""
        Bc = sel.block_k
        count = int(sel.counts[b, g])
        for tc in range(-(-count // Bc)):
            t = int(sel.types[b, g, tq, tc])
            if t != SKIP:
                yield t, sel.kidx[b, g, tc * Bc : min(count, (tc + 1) * Bc)]

    @staticmethod
    def _scores(q_i: np.ndarray, k: np.ndarray, z: np.ndarray, sel: Selection, spec: DMASpec, b: int, g: int,
                rows: np.ndarray, cols: np.ndarray, t: int) -> np.ndarray:
        """``S = scale Q_i K_cols^T + z_cols``, ``-inf`` where row i does not keep key j (TRIANGLE tiles)."""
        zc = z[b, g, cols]
        s = spec.scale * (q_i @ k[b, g, cols].T) + zc[None, :]
        if t == TRIANGLE:
            tv, ti = sel.thr_val[b, g, rows][:, None], sel.thr_idx[b, g, rows][:, None]
            ok = (zc > tv) | ((zc == tv) & (cols <= ti))
            if spec.causal:
                ok &= cols[None, :] <= spec.off + rows[:, None]
            s = np.where(ok, s, -np.inf)
        return s.astype(q_i.dtype, copy=False)

    @staticmethod
    def _dropout(spec: DMASpec, b: int, h: int, rows: np.ndarray, cols: np.ndarray, dtype: Any) -> Any:
        """``keep / (1 - p)`` for the tile (the flash attention hash of the original key index), or 1."""
        if spec.dropout <= 0:
            return dtype.type(1)
        with np.errstate(over="ignore"):
            bits = _dropout_hash_np(np.uint64(spec.seed & 0xFFFFFFFF), np.uint64(b), np.uint64(h),
                                    rows.astype(np.uint64)[:, None], cols.astype(np.uint64)[None, :])
        return np.where(bits >= np.uint64(spec.drop_threshold), dtype.type(1.0 / (1.0 - spec.dropout)), dtype.type(0))

    @staticmethod
    def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, z: np.ndarray, sel: Selection, spec: DMASpec
                ) -> Tuple[np.ndarray, np.ndarray]:
        """Q-major online softmax over the visited tiles of the compacted key list: ``(out, lse)``."""
        B, H, Nq, D = q.shape
        dt = q.dtype
        out = np.zeros_like(q)
        lse = np.full((B, H, Nq), -np.inf, dt)
        Br = sel.block_q
        for b in range(B):
            for h in range(H):
                g = h // spec.group
                for tq in range(-(-Nq // Br)):
                    rows = np.arange(tq * Br, min(Nq, (tq + 1) * Br))
                    q_i = q[b, h, rows]
                    m = np.full(len(rows), -np.inf, dt)
                    l = np.zeros(len(rows), dt)
                    acc = np.zeros((len(rows), D), dt)
                    for t, cols in NumpyDMA._tiles(sel, spec, b, g, tq):
                        s = NumpyDMA._scores(q_i, k, z, sel, spec, b, g, rows, cols, t)
                        # m_new = max(m, rowmax(S)); P = exp(S - m_new); l = e^(m - m_new) l + rowsum(P)
                        m_new = np.maximum(m, s.max(axis=1))
                        m_safe = np.where(np.isfinite(m_new), m_new, 0).astype(dt)  # rows that saw no kept key
                        p = np.exp(s - m_safe[:, None])
                        alpha = np.exp(m - m_safe)
                        l = alpha * l + p.sum(axis=1)
                        # O = e^(m - m_new) O + dropout(P) V_cols
                        acc = alpha[:, None] * acc + (p * NumpyDMA._dropout(spec, b, h, rows, cols, dt)) @ v[b, g, cols]
                        m = m_new
                    ok = l > 0
                    out[b, h, rows] = np.where(ok[:, None], acc / np.where(ok, l, 1)[:, None], 0)
                    lse[b, h, rows] = np.where(ok, np.where(ok, m, 0) + np.log(np.where(ok, l, 1)), -np.inf)
        return out, lse

    @staticmethod
    def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, z: np.ndarray, sel: Selection, out: np.ndarray,
                 lse: np.ndarray, dout: np.ndarray, spec: DMASpec) -> Tuple[np.ndarray, ...]:
        """``delta = rowsum(dO O)``; per visited tile ``P = exp(S - lse)``, ``dS = P (dP - delta)``.

        First pass: ``dQ += scale dS K`` and the row sums ``rs`` of dS (zero up to rounding). Second pass, with
        ``delta + rs`` (so that rows of dS sum to zero, as the textbook formula's do; this keeps ``dz``, which
        feeds a nearly cancelling sum, accurate in float32): ``dK += scale dS^T Q``, ``dV += P_drop^T dO``,
        ``dz += colsum(dS)``.
        """
        B, H, Nq, D = q.shape
        dt = q.dtype
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        dz = np.zeros(z.shape, dt)
        delta = (dout * out).sum(axis=-1)
        rs = np.zeros_like(delta)
        Br = sel.block_q
        for second in (False, True):
            for b in range(B):
                for h in range(H):
                    g = h // spec.group
                    for tq in range(-(-Nq // Br)):
                        rows = np.arange(tq * Br, min(Nq, (tq + 1) * Br))
                        q_i, do_i = q[b, h, rows], dout[b, h, rows]
                        lse_i = lse[b, h, rows]
                        lse_safe = np.where(np.isfinite(lse_i), lse_i, 0).astype(dt)
                        delta_i = delta[b, h, rows] + (rs[b, h, rows] if second else 0)
                        for t, cols in NumpyDMA._tiles(sel, spec, b, g, tq):
                            s = NumpyDMA._scores(q_i, k, z, sel, spec, b, g, rows, cols, t)
                            p = np.exp(s - lse_safe[:, None])  # rows with lse = -inf have s = -inf: p = 0
                            keep = NumpyDMA._dropout(spec, b, h, rows, cols, dt)
                            dp = (do_i @ v[b, g, cols].T) * keep
                            ds = (p * (dp - delta_i[:, None])).astype(dt)
                            if not second:
                                dq[b, h, rows] += spec.scale * (ds @ k[b, g, cols])
                                rs[b, h, rows] += ds.sum(axis=1)
                            else:
                                dk[b, g, cols] += spec.scale * (ds.T @ q_i)
                                dv[b, g, cols] += (p * keep).T @ do_i
                                dz[b, g, cols] += ds.sum(axis=0)
        return dq, dk, dv, dz


def dma_impl(backend: "TensorBackend") -> Any:
    """The implementation (module or class with the six functions) for ``backend``."""
    kind = getattr(backend, "attention_kind", "simple")
    if kind == "fast":
        from . import dma_cpu

        return dma_cpu
    if kind == "cuda":
        from ..cuda_kernels import dma as dma_cuda

        return dma_cuda
    return NumpyDMA


# ------------------------------------------------------------------------------------------------------------------
# Dense probabilities (return_attn_probs), on the host
# ------------------------------------------------------------------------------------------------------------------


def _host(a: Any) -> np.ndarray:
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def dense_probs(q: Any, k: Any, z: Any, lse: Any, sel: Selection, spec: DMASpec) -> np.ndarray:
    """Softmax probabilities ``(B, H, Nq, Nk)`` of the kept keys (zeros elsewhere, and without dropout)."""
    q, k, z, lse = (_host(a) for a in (q, k, z, lse))
    B, H, Nq, Nk = spec.B, spec.H, spec.Nq, spec.Nk
    if B * H * Nq * Nk > PROBS_WARN_ELEMENTS:
        warnings.warn(
            f"return_attn_probs materializes a ({B}, {H}, {Nq}, {Nk}) array ({B * H * Nq * Nk} elements); "
            "it is meant for tests and small inputs",
            stacklevel=4,
        )
    kept = kept_dense(sel, z, spec)  # (B, Hkv, Nq, Nk)
    probs = np.zeros((B, H, Nq, Nk), q.dtype)
    for b in range(B):
        for h in range(H):
            g = h // spec.group
            ok = kept[b, g] & np.isfinite(lse[b, h])[:, None]
            s = spec.scale * (q[b, h] @ k[b, g].T) + z[b, g][None, :]
            lse_safe = np.where(np.isfinite(lse[b, h]), lse[b, h], 0)[:, None]
            probs[b, h] = np.where(ok, np.exp(np.where(ok, s - lse_safe, 0)), 0)
    return probs


# ------------------------------------------------------------------------------------------------------------------
# The Function and the public API
# ------------------------------------------------------------------------------------------------------------------


def _raw(t: "Tensor") -> Any:
    from .flash import raw4

    return raw4(t)


def _wrap(a: Any, backend: "TensorBackend") -> "Tensor":
    from .flash import wrap

    return wrap(a, backend)


class FlashDMAAttention(Function):
    """Dynamic mask attention as one differentiable Function.

    ``FlashDMAAttention.apply(q, k, v, dt_proj, a_coef, spec)`` with a :class:`DMASpec`. Forward computes z, the
    selection (no gradient) and the fused forward; it saves q, k, v, dt_proj, a_coef, out, lse, z, u and the
    selection (all ``O(N)``), nothing of size ``Nq x Nk``. Backward runs the fused backward for dq, dk, dv and dz,
    then chains dz through the importance into dv, dt_proj and a_coef.
    """

    @staticmethod
    def forward(ctx: Any, q: "Tensor", k: "Tensor", v: "Tensor", dt_proj: "Tensor", a_coef: "Tensor",
                spec: DMASpec) -> "Tensor":
        impl = dma_impl(q.backend)
        qa, ka, va, dta, aa = (_raw(t) for t in (q, k, v, dt_proj, a_coef))
        z, u = impl.importance(va, dta, aa, spec.log_space)
        sel = impl.select(z, spec)
        out, lse = impl.forward(qa, ka, va, z, sel, spec)
        spec.extra["lse"] = _wrap(lse, q.backend)
        spec.extra["z"], spec.extra["selection"] = z, sel
        if spec.return_probs:
            spec.extra["probs"] = dense_probs(qa, ka, z, lse, sel, spec)
        ctx.save_for_backward(q, k, v, dt_proj, a_coef, out, lse, z, u, sel, spec)
        return _wrap(out, q.backend)

    @staticmethod
    def backward(ctx: Any, grad_output: "Tensor") -> Tuple[Any, ...]:
        q, k, v, dt_proj, a_coef, out, lse, z, u, sel, spec = ctx.saved_values
        impl = dma_impl(q.backend)
        qa, ka, va, dta, aa = (_raw(t) for t in (q, k, v, dt_proj, a_coef))
        dq, dk, dv, dz = impl.backward(qa, ka, va, z, sel, out, lse, _raw(grad_output), spec)
        dv, d_dt, d_a = impl.importance_backward(dz, va, dta, aa, z, u, spec.log_space, dv)
        bk = q.backend
        return _wrap(dq, bk), _wrap(dk, bk), _wrap(dv, bk), _wrap(d_dt, bk), _wrap(d_a, bk), None


def _as_tensor(name: str, x: Any, like: "Tensor") -> "Tensor":
    from ..tensor import Tensor
    from ..tensor_functions import from_numpy

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
        log_space: the importance is ``a * softplus(...)`` instead of ``exp(a * softplus(...))``.
        block_q, block_k: tile sizes (query rows, keys of the compacted list); the result does not depend on them.
        compact: tile the compacted list of kept keys (default) or, for comparison, the key sequence itself.

    Returns:
        ``out (B, H, Nq, D)``, or ``(out, probs)``.
    """
    from ..tensor import Tensor
    from ..tensor_functions import from_numpy
    from .flash import _to_numpy_mask

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a minitorch Tensor, got {type(t).__name__}")
    dt_proj, a_coef = _as_tensor("dt_proj", dt_proj, q), _as_tensor("a_coef", a_coef, q)
    spec = make_dma_spec(
        q.shape, k.shape, v.shape, dt_proj.shape, a_coef.shape, keep_window_size=keep_window_size, causal=causal,
        dropout_p=dropout_p, softmax_scale=softmax_scale, key_padding_mask=_to_numpy_mask(key_padding_mask),
        seed=seed, log_space=log_space, return_attn_probs=return_attn_probs, block_q=block_q, block_k=block_k,
        backend_kind=getattr(q.backend, "attention_kind", "simple"), compact=compact,
    )
    out = FlashDMAAttention.apply(q, k, v, dt_proj, a_coef, spec)
    if return_attn_probs:
        return out, from_numpy(spec.extra["probs"], backend=q.backend)
    return out
