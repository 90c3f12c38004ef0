"""Flash attention in plain NumPy, tile by tile: the version to read first.

This is the SimpleBackend's attention. It is slow (Python loops over batch, heads and tiles) but it is the
algorithm of the FlashAttention papers written out step by step, with the papers' names:

* ``Br, Bc``: rows of a query tile, columns of a key tile; ``Tr, Tc``: number of query and key tiles.
* ``S_ij = scale * Q_i K_j^T + bias``: the ``(Br, Bc)`` score tile. The full ``(Nq, Nk)`` matrix is never built.
* ``m``: running row maximum of the scores, ``l``: running row sum of ``exp(S - m)`` (the online softmax).
* ``lse = m + log(l)``: the log-sum-exp of each row, saved for the backward pass.
* ``delta = rowsum(dO * O)``: the backward preprocessing step.

Forward, two loop orders over the same tiles (``spec.order``), same result:

* ``Q_MAJOR`` (FlashAttention 2, Algorithm 1): for each query tile ``i``, loop over key tiles ``j``; ``O_i``,
  ``m_i``, ``l_i`` are local to the query tile ("on chip") and written once at the end.
* ``K_MAJOR`` (FlashAttention 1, Algorithm 1): for each key tile ``j``, loop over query tiles ``i``; ``O``, ``l``,
  ``m`` live in full arrays ("in HBM") and each step reads, updates and writes back its rows.

Backward (FlashAttention 2, Algorithm 2, split as in Triton's tutorial): preprocess ``delta``; then ``dK, dV`` in
key-tile order (outer loop over key tiles, inner over query tiles); then ``dQ`` in query-tile order. ``P`` is
recomputed from ``S`` and the saved ``lse``: nothing of size ``Nq x Nk`` is stored or allocated.

Which tiles exist and which need masking comes from ``spec.tile_types[b]`` (see ``tiling.py``): ``SKIP`` tiles are
never touched, ``DENSE`` tiles need no mask, ``TRIANGLE`` tiles are masked element by element with the visibility
rule of docs/internals.md (causal, window, attention sinks, empty slots and padded keys via ``k_pos_b``).

Contract (docs/internals.md): ``forward(q, k, v, bias, spec) -> (out, lse)`` and
``backward(q, k, v, bias, out, lse, dout, spec) -> (dq, dk, dv, dbias)`` on raw NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .dropout import build_dropout_hash
from .spec import AttentionSpec
from .tiling import TileOrder, TileType, visible

dropout_hash = build_dropout_hash()  # the NumPy version: same bits as the Numba CPU and CUDA kernels


# ---------------------------------------------------------------------------------------------------------------
# One (batch row, query head): the score tile S_ij and the dropout tile, shared by forward and backward
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Head:
    """The inputs seen by query head ``h`` of batch row ``b``.

    ``q (Nq, D)``, ``k, v (Nk, D)`` are views (GQA: kv head ``h // group``, no copy); ``bias`` is the 2-D
    ``(Nqb, Nk)`` slice of the broadcast bias for this (b, h), or ``None``.
    """

    spec: AttentionSpec
    b: int
    h: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    bias: Optional[np.ndarray]

    def scores(self, tq: int, tk: int) -> np.ndarray:
        """``S_ij = scale * Q_i K_j^T + bias_ij`` of shape ``(Br, Bc)``, ``-inf`` where the pair is masked."""
        spec = self.spec
        qs, qe = spec.schedule.q_range(tq)
        ks, ke = spec.schedule.k_range(tk)
        s = spec.scale * (self.q[qs:qe] @ self.k[ks:ke].T)
        if self.bias is not None:
            rows = slice(0, 1) if self.bias.shape[0] == 1 else slice(qs, qe)  # a (1, Nk) bias broadcasts
            s = s + self.bias[rows, ks:ke]
        if spec.tile_types[self.b, tq, tk] == TileType.TRIANGLE:
            # Partly masked tile: test every pair with the positions (k_pos_b already marks padded keys -1).
            ok = visible(spec.q_pos[qs:qe, None], spec.k_pos_b[self.b, ks:ke][None, :],
                         spec.causal, spec.window, spec.num_sinks)
            s = np.where(ok, s, -np.inf)
        return s.astype(self.q.dtype, copy=False)

    def dropout_scale(self, tq: int, tk: int) -> Optional[np.ndarray]:
        """``(Br, Bc)``: ``1 / (1 - p)`` where the element is kept, ``0`` where dropped; ``None`` without dropout.

        The keep bit is a hash of ``(seed, b, h, i, j)``, so backward regenerates exactly the forward's mask.
        """
        spec = self.spec
        if spec.dropout == 0.0:
            return None
        qs, qe = spec.schedule.q_range(tq)
        ks, ke = spec.schedule.k_range(tk)
        i = np.arange(qs, qe, dtype=np.uint64)[:, None]
        j = np.arange(ks, ke, dtype=np.uint64)[None, :]
        with np.errstate(over="ignore"):
            keep = dropout_hash(np.uint64(spec.seed), np.uint64(self.b), np.uint64(self.h), i, j)
        keep = keep >= np.uint64(spec.drop_threshold)
        return np.where(keep, 1.0 / (1.0 - spec.dropout), 0.0).astype(self.q.dtype)


def _bias_index(spec: AttentionSpec, bias: np.ndarray, b: int, h: int) -> Tuple[int, int]:
    """Which ``(batch, head)`` of a ``(Bb, Hb, Nqb, Nk)`` bias query head ``h`` of row ``b`` reads."""
    Bb, Hb = bias.shape[0], bias.shape[1]
    bb = b if Bb == spec.B else 0
    if Hb == spec.H:
        hb = h
    elif Hb == spec.Hkv:
        hb = h // spec.group  # a kv-head bias is shared by the query heads of its group
    else:
        hb = 0
    return bb, hb


def _head(q, k, v, bias, spec: AttentionSpec, b: int, h: int) -> _Head:
    hk = h // spec.group  # GQA / MQA: query head h reads kv head h // group
    bias_bh = None
    if bias is not None:
        bb, hb = _bias_index(spec, bias, b, h)
        bias_bh = bias[bb, hb]
    return _Head(spec, b, h, q[b, h], k[b, hk], v[b, hk], bias_bh)


def _visited(types: np.ndarray) -> np.ndarray:
    """Indices of the tiles in a row or column of ``tile_types`` that are not SKIP."""
    return np.nonzero(types != TileType.SKIP)[0]


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------
def forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray], spec: AttentionSpec
) -> Tuple[np.ndarray, np.ndarray]:
    """Flash attention forward.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; bias: ``(Bb, Hb, Nqb, Nk)`` or ``None``.
        spec: the :class:`AttentionSpec` of the call (masks, tiles, order, dropout).

    Returns:
        ``out (B, H, Nq, D)`` and ``lse (B, H, Nq)`` in q's dtype; rows that see no key: out 0, lse ``-inf``.
    """
    out = np.zeros(q.shape, dtype=q.dtype)
    lse = np.full(q.shape[:3], -np.inf, dtype=q.dtype)
    one_head = _forward_q_major if spec.order == TileOrder.Q_MAJOR else _forward_k_major
    for b in range(spec.B):
        for h in range(spec.H):
            one_head(_head(q, k, v, bias, spec, b, h), out[b, h], lse[b, h])
    return out, lse


def _forward_q_major(head: _Head, out: np.ndarray, lse: np.ndarray) -> None:
    """FlashAttention 2, Algorithm 1, for one head: fills ``out (Nq, D)`` and ``lse (Nq,)`` in place."""
    spec, dtype = head.spec, head.q.dtype
    for tq in range(spec.Tr):  # line 3: for each query tile Q_i (one thread block on a GPU)
        qs, qe = spec.schedule.q_range(tq)
        # line 5: on-chip accumulators of this query tile
        O_i = np.zeros((qe - qs, spec.D), dtype=dtype)
        l_i = np.zeros(qe - qs, dtype=dtype)
        m_i = np.full(qe - qs, -np.inf, dtype=dtype)
        for tk in _visited(spec.tile_types[head.b, tq]):  # lines 6-7: for each key tile, load K_j, V_j (not SKIP)
            ks, ke = spec.schedule.k_range(tk)
            S_ij = head.scores(tq, tk)  # line 8
            m_i, l_i, O_i = _online_softmax_step(S_ij, head.v[ks:ke], head.dropout_scale(tq, tk), m_i, l_i, O_i)
        # lines 12-15: normalize once at the end, write O_i and lse_i = m_i + log(l_i)
        seen = l_i > 0  # rows that saw at least one key
        out[qs:qe] = np.where(seen[:, None], O_i / np.where(seen, l_i, 1)[:, None], 0)
        lse[qs:qe] = np.where(seen, m_i + np.log(np.where(seen, l_i, 1)), -np.inf)


def _online_softmax_step(
    S_ij: np.ndarray, V_j: np.ndarray, drop: Optional[np.ndarray], m_i: np.ndarray, l_i: np.ndarray, O_i: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of the online softmax (FA2 Algorithm 1, lines 9-10); returns the new ``(m_i, l_i, O_i)``.

    ``O_i`` is the *unnormalized* accumulator ``sum_j exp(S_ij - m_i) V_j``; when the running max grows from
    ``m_old`` to ``m_new`` everything accumulated so far is rescaled by ``exp(m_old - m_new)``.
    """
    m_new = np.maximum(m_i, S_ij.max(axis=1))
    m_safe = np.where(np.isfinite(m_new), m_new, 0)  # a row masked so far: keep exp(-inf - 0) = 0, never NaN
    alpha = np.exp(m_i - m_safe)  # rescale factor exp(m_old - m_new) (0 while nothing was seen)
    P_ij = np.exp(S_ij - m_safe[:, None])  # masked entries: exp(-inf) = 0
    l_new = alpha * l_i + P_ij.sum(axis=1)  # l of the *undropped* probabilities: lse ignores dropout
    if drop is not None:
        P_ij = P_ij * drop  # dropout acts on the probabilities that multiply V
    O_new = alpha[:, None] * O_i + P_ij @ V_j
    return m_new, l_new, O_new


def _forward_k_major(head: _Head, out: np.ndarray, lse: np.ndarray) -> None:
    """FlashAttention 1, Algorithm 1, for one head: ``out`` is the ``O`` kept "in HBM" and updated in place.

    ``O`` stays normalized after every step (as in the paper), ``l`` and ``m`` are full ``(Nq,)`` arrays.
    """
    spec, dtype = head.spec, head.q.dtype
    O = out  # line 2: O = 0, l = 0, m = -inf in HBM
    l = np.zeros(spec.Nq, dtype=dtype)
    m = np.full(spec.Nq, -np.inf, dtype=dtype)
    for tk in range(spec.Tc):  # line 5: for each key tile
        ks, ke = spec.schedule.k_range(tk)
        V_j = head.v[ks:ke]  # line 6: load K_j, V_j
        for tq in _visited(spec.tile_types[head.b, :, tk]):  # line 7: for each query tile that sees this key tile
            qs, qe = spec.schedule.q_range(tq)
            O_i, l_i, m_i = O[qs:qe], l[qs:qe], m[qs:qe]  # line 8: load Q_i, O_i, l_i, m_i
            S_ij = head.scores(tq, tk)  # line 9
            # line 10: statistics of this tile alone
            m_ij = S_ij.max(axis=1)
            m_ij_safe = np.where(np.isfinite(m_ij), m_ij, 0)
            P_ij = np.exp(S_ij - m_ij_safe[:, None])
            l_ij = P_ij.sum(axis=1)
            # line 11: merge with the running statistics
            m_new = np.maximum(m_i, m_ij)
            m_safe = np.where(np.isfinite(m_new), m_new, 0)
            alpha = np.exp(m_i - m_safe)  # exp(m_i - m_new)
            beta = np.exp(m_ij - m_safe)  # exp(m_ij - m_new)
            l_new = alpha * l_i + beta * l_ij
            drop = head.dropout_scale(tq, tk)
            if drop is not None:
                P_ij = P_ij * drop
            # line 12: O_i = diag(l_new)^-1 (diag(l_i) exp(m_i - m_new) O_i + exp(m_ij - m_new) P_ij V_j), written back
            inv_l = np.where(l_new > 0, 1 / np.where(l_new > 0, l_new, 1), 0)
            O[qs:qe] = inv_l[:, None] * ((l_i * alpha)[:, None] * O_i + beta[:, None] * (P_ij @ V_j))
            # line 13: write l_i, m_i back
            l[qs:qe], m[qs:qe] = l_new, m_new
    seen = l > 0
    lse[:] = np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------
def backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    bias: Optional[np.ndarray],
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    spec: AttentionSpec,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Flash attention backward: gradients of ``sum(out * dout)``.

    Args:
        q, out, dout: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; bias ``(Bb, Hb, Nqb, Nk)`` or ``None``;
        lse: ``(B, H, Nq)`` saved by :func:`forward`.

    Returns:
        ``dq (B, H, Nq, D)``, ``dk, dv (B, Hkv, Nk, D)``, ``dbias`` of the bias's shape (summed over the dims it
        was broadcast along; a kv-head bias sums its group) or ``None``. All in q's dtype.
    """
    dtype = q.dtype
    dq = np.zeros(q.shape, dtype=dtype)
    dk = np.zeros(k.shape, dtype=dtype)
    dv = np.zeros(v.shape, dtype=dtype)
    dbias = None if bias is None else np.zeros(bias.shape, dtype=dtype)
    # Preprocess (FA2 Algorithm 2, line 4): delta_i = rowsum(dO_i * O_i). O(Nq D), no score matrix needed.
    delta = (dout * out).sum(axis=-1, dtype=dtype)
    # Rows that saw no key have lse = -inf; their S is all -inf too, so any finite stand-in gives P = 0.
    lse_safe = np.where(np.isfinite(lse), lse, 0).astype(dtype)

    for b in range(spec.B):
        for hk in range(spec.Hkv):
            heads = [_head(q, k, v, bias, spec, b, h) for h in range(hk * spec.group, (hk + 1) * spec.group)]
            _backward_dk_dv(heads, dout[b], lse_safe[b], delta[b], dk[b, hk], dv[b, hk], dbias)
        for h in range(spec.H):
            head = _head(q, k, v, bias, spec, b, h)
            _backward_dq(head, dout[b, h], lse_safe[b, h], delta[b, h], dq[b, h])
    return dq, dk, dv, dbias


def _tile_grads(head: _Head, tq: int, tk: int, dO_i: np.ndarray, lse_i: np.ndarray, delta_i: np.ndarray):
    """Recompute one tile (FA2 Algorithm 2, lines 10-14): returns ``(P_ij, Z_ij, dS_ij)``.

    ``P_ij = exp(S_ij - lse_i)`` (softmax, recomputed), ``Z_ij`` the probabilities after dropout (what multiplied V),
    ``dS_ij = P_ij * (dP_ij - delta_i)`` with ``dP_ij = (dO_i V_j^T) * dropout``.
    """
    ks, ke = head.spec.schedule.k_range(tk)
    S_ij = head.scores(tq, tk)
    P_ij = np.exp(S_ij - lse_i[:, None])
    dP_ij = dO_i @ head.v[ks:ke].T
    drop = head.dropout_scale(tq, tk)
    Z_ij = P_ij
    if drop is not None:
        Z_ij = P_ij * drop
        dP_ij = dP_ij * drop
    dS_ij = P_ij * (dP_ij - delta_i[:, None])
    return P_ij, Z_ij, dS_ij


def _backward_dk_dv(heads, dout_b, lse_b, delta_b, dk_hk, dv_hk, dbias) -> None:
    """dK and dV of one kv head, key tile by key tile (outer loop over key tiles: no write conflicts).

    ``heads`` are the query heads of the group (GQA), whose contributions are summed into the same ``dK_j, dV_j``.
    The bias gradient ``dS`` is accumulated here as well.
    """
    spec = heads[0].spec
    b = heads[0].b
    for tk in range(spec.Tc):  # lines 5-7: for each key tile, dK_j = dV_j = 0 on chip
        ks, ke = spec.schedule.k_range(tk)
        dK_j = np.zeros((ke - ks, spec.D), dtype=dk_hk.dtype)
        dV_j = np.zeros((ke - ks, spec.D), dtype=dv_hk.dtype)
        for head in heads:
            h = head.h
            for tq in _visited(spec.tile_types[b, :, tk]):  # line 8: for each query tile that sees K_j
                qs, qe = spec.schedule.q_range(tq)
                dO_i = dout_b[h, qs:qe]
                _, Z_ij, dS_ij = _tile_grads(head, tq, tk, dO_i, lse_b[h, qs:qe], delta_b[h, qs:qe])
                dV_j += Z_ij.T @ dO_i  # line 12: dV_j += P_ij^T dO_i (with dropout)
                dK_j += dS_ij.T @ head.q[qs:qe]  # line 16 (scale applied once below)
                if dbias is not None:
                    bb, hb = _bias_index(spec, dbias, b, h)
                    if dbias.shape[2] == 1:
                        dbias[bb, hb, 0, ks:ke] += dS_ij.sum(axis=0)
                    else:
                        dbias[bb, hb, qs:qe, ks:ke] += dS_ij
        dk_hk[ks:ke] = spec.scale * dK_j  # line 18: write dK_j, dV_j
        dv_hk[ks:ke] = dV_j


def _backward_dq(head: _Head, dout_bh, lse_bh, delta_bh, dq_bh) -> None:
    """dQ of one query head, query tile by query tile (outer loop over query tiles: no write conflicts)."""
    spec = head.spec
    for tq in range(spec.Tr):
        qs, qe = spec.schedule.q_range(tq)
        dQ_i = np.zeros((qe - qs, spec.D), dtype=dq_bh.dtype)
        for tk in _visited(spec.tile_types[head.b, tq]):  # every key tile this query tile sees
            ks, ke = spec.schedule.k_range(tk)
            _, _, dS_ij = _tile_grads(head, tq, tk, dout_bh[qs:qe], lse_bh[qs:qe], delta_bh[qs:qe])
            dQ_i += dS_ij @ head.k[ks:ke]  # line 15: dQ_i += dS_ij K_j
        dq_bh[qs:qe] = spec.scale * dQ_i
