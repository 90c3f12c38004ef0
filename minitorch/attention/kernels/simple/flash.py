"""Flash attention in plain NumPy, tile by tile: the version to read first (the SimpleBackend's engine).

It is slow (Python loops over batch, heads and tiles) but it is the algorithm of the FlashAttention papers written
out step by step, with the papers' names:

* ``Br, Bc``: rows of a query tile, columns of a key tile; ``Tr, Tc``: number of query and key tiles.
* ``S_ij = scale * Q_i K_j^T + bias``: the ``(Br, Bc)`` score tile. The full ``(Nq, Nk)`` matrix is never built.
* ``m``: running row maximum of the scores, ``l``: running row sum of ``exp(S - m)`` (the online softmax).
* ``lse = m + log(l)``: the log-sum-exp of each row, saved for the backward pass.
* ``delta = rowsum(dO * O)``: the backward preprocessing step.

Everything is built from two steps, used by every loop of this module:

* :func:`_online_softmax_step` (forward, FA2 Algorithm 1 lines 8-10): fold one score tile into ``(m, l, O)``;
* :func:`_tile_grads` (backward, FA2 Algorithm 2 lines 11-14): recompute ``P_ij`` and ``dS_ij`` of one tile;

and one way to get a tile, :meth:`_Head.scores`, configured by the :class:`~minitorch.attention.spec.AttentionSpec`:
the *key source* (a contiguous key tile, or keys read through an index list, :meth:`_Head.key_rows`) and the *score
modification* (bias; a user's ``score_mod``, softcap, ALiBi (:meth:`_Head.modify`); the visibility rule of
:mod:`minitorch.attention.masks` on positions and segment ids, a ``mask_mod``, DMA's top-k keep rule; dropout).
Learnable sinks are the online softmax's starting point: ``(m, l) = (sinks[h], 1)`` instead of ``(-inf, 0)``.

Forward, two loop orders over the same tiles (``spec.order``), same result:

* ``Q_MAJOR`` (FlashAttention 2, Algorithm 1): for each query tile ``i``, loop over key tiles ``j``; ``O_i``,
  ``m_i``, ``l_i`` are local to the query tile ("on chip") and written once at the end. With ``spec.num_splits``
  the key tiles are cut into splits, each giving a partial ``(O, lse)``, merged by :mod:`..merge` (split-K).
* ``K_MAJOR`` (FlashAttention 1, Algorithm 1): for each key tile ``j``, loop over query tiles ``i``; ``O``, ``l``,
  ``m`` live in full arrays ("in HBM") and each step reads, updates and writes back its rows.

Backward (FlashAttention 2, Algorithm 2, split as in Triton's tutorial): preprocess ``delta``; ``dQ`` in
query-tile order, which also sums each row of ``dS``; then ``dK, dV`` in key-tile order with ``delta`` refined by
those sums (so that every row of ``dS`` sums to what it should, see :func:`backward`). ``P`` is recomputed from
``S`` and the saved ``lse``: nothing of size ``Nq x Nk`` is stored.

A key that a query does not see is never read for it: masked pairs are left out of every product
(:func:`_product`), so NaN or Inf in a padded key, an empty slot or a future key changes nothing; NaN in a visible
input propagates to the rows that see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np

from ...dropout import build_dropout_hash
from ...masks import build_kept, build_same_segment, build_visible
from ...merge import merge_partials
from ...mods import evaluate_mask
from ...sinks import sink_probs
from ...spec import AttentionSpec, check_backward
from ...tiling import TileOrder, TileType

dropout_hash = build_dropout_hash()  # the NumPy versions: the same bits and rule as the compiled kernels
visible = build_visible()
same_segment = build_same_segment()
kept = build_kept()


# ---------------------------------------------------------------------------------------------------------------
# One (batch row, query head): its tiles, scores and dropout, shared by forward and backward
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Head:
    """The inputs seen by query head ``h`` of batch row ``b``.

    ``q (Nq, D)``, ``k, v (Nk, D)`` are views (GQA: kv head ``g = h // group``, no copy), or in a paged batch
    :class:`_PagedRows` reading the rows through the block table; ``bias`` is the 2-D ``(Nqb, Nk)`` slice of the
    broadcast bias for this (b, h), or ``None``; ``types (Tr, Tc)`` the tile types.
    """

    spec: AttentionSpec
    b: int
    h: int
    g: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    bias: Optional[np.ndarray]
    types: np.ndarray

    def query_rows(self, tq: int) -> np.ndarray:
        """Rows ``[tq Br, (tq + 1) Br)`` of query tile ``tq``."""
        Br = self.spec.block_q
        return np.arange(tq * Br, min((tq + 1) * Br, self.spec.Nq))

    def key_rows(self, tk: int) -> np.ndarray:
        """The key source: the key rows of key tile ``tk``, a contiguous range or entries of the key list."""
        spec, Bc = self.spec, self.spec.block_k
        if spec.keys is None:  # a paged sequence has its own length
            n = spec.Nk if spec.pages is None else int(spec.pages.lengths[self.b])
            return np.arange(tk * Bc, min((tk + 1) * Bc, n))
        kidx, counts = spec.keys.kidx, spec.keys.counts
        b, g = self.b % kidx.shape[0], self.g % kidx.shape[1]
        return kidx[b, g, tk * Bc : min((tk + 1) * Bc, int(counts[b, g]))]

    def visited(self, tq: Optional[int] = None, tk: Optional[int] = None) -> np.ndarray:
        """The key tiles query tile ``tq`` visits, or the query tiles key tile ``tk`` visits (not SKIP)."""
        line = self.types[tq] if tq is not None else self.types[:, tk]
        return np.nonzero(line != TileType.SKIP)[0]

    def scores(self, tq: int, tk: int) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """``S_ij = modify(scale Q_i K_j^T + bias_ij)`` of shape ``(Br, Bc)``, the visibility of its pairs, and
        ``dS/dT``, the derivative of the modification (``None`` when there is none; see :meth:`modify`).

        In a TRIANGLE tile every pair is tested (positions, segment ids, the ``mask_mod``; with a
        :class:`~minitorch.attention.spec.TopK`, also the keep rule) and masked pairs score ``-inf``; ``vis`` is the
        boolean tile. A DENSE tile needs no test (``vis = None``: every pair is visible).
        """
        spec, b = self.spec, self.b
        i, j = self.query_rows(tq), self.key_rows(tk)
        s = spec.scale * (self.q[i] @ self.k[j].T)
        if self.bias is not None:
            s = s + self.bias[i if self.bias.shape[0] > 1 else [0]][:, j]  # a (1, Nk) bias broadcasts over rows
        s, ds_dt = self.modify(s, spec.q_pos_b[b, i][:, None], spec.k_pos[j][None, :])
        vis = None
        if self.types[tq, tk] == TileType.TRIANGLE:
            vis = visible(spec.q_pos_b[b, i][:, None], spec.k_pos_b[b, j][None, :], spec.causal, spec.window,
                          spec.num_sinks)
            if spec.q_seg is not None:  # packed sequences: only within one segment
                vis &= same_segment(spec.q_seg[b, i][:, None], spec.k_seg[b, j][None, :])
            if spec.block_mask is not None:  # the user's mask_mod, on this tile's positions
                vis &= evaluate_mask(spec.block_mask.mask_mod, b, self.h, spec.q_pos_b[b, i][:, None],
                                     spec.k_pos[j][None, :])
            if spec.topk is not None:  # Dynamic Mask Attention: does row i keep key j? (the bias is its z)
                thr_val, thr_idx = spec.topk.thr_val[b, self.g, i], spec.topk.thr_idx[b, self.g, i]
                vis &= kept(self.bias[0, j][None, :], j[None, :], thr_val[:, None], thr_idx[:, None])
            s = np.where(vis, s, -np.inf)
        return s.astype(self.q.dtype, copy=False), vis, ds_dt

    def modify(self, t: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """The score modification after ``t = scale q.k + bias``, in the order of the public API: the user's
        ``score_mod``, ``softcap tanh(. / softcap)``, ALiBi's ``- slope[h] |q_pos - k_pos|``. Returns ``(s, ds/dt)``
        (``ds/dt`` None when nothing depends on ``t``): backward chains ``dS`` through it."""
        spec, dtype = self.spec, self.q.dtype
        ds_dt = None
        with np.errstate(all="ignore"):  # masked pairs may overflow: they are replaced by the masks
            if spec.score_mod is not None:
                if spec.score_mod.grad is not None:
                    ds_dt = spec.score_mod.derivative(t, self.b, self.h, q_pos, k_pos)
                t = spec.score_mod.apply(t, self.b, self.h, q_pos, k_pos)
            if spec.softcap > 0:
                th = np.tanh(t / dtype.type(spec.softcap))
                t = dtype.type(spec.softcap) * th
                ds_dt = (1 - th * th) * (1 if ds_dt is None else ds_dt)
            if spec.alibi is not None:
                t = t - dtype.type(spec.alibi[self.h]) * np.abs(q_pos - k_pos).astype(dtype)
        return t, ds_dt

    def dropout_scale(self, tq: int, tk: int) -> Optional[np.ndarray]:
        """``(Br, Bc)``: ``1 / (1 - p)`` where the element is kept, ``0`` where dropped; ``None`` without dropout.

        The keep bit is a hash of ``(seed, b, h, i, j)`` (``j`` the key row), so backward regenerates exactly the
        forward's mask, and a key read through a list draws the same bit as read in place.
        """
        spec = self.spec
        if spec.dropout == 0.0:
            return None
        i = self.query_rows(tq).astype(np.uint64)[:, None]
        j = self.key_rows(tk).astype(np.uint64)[None, :]
        with np.errstate(over="ignore"):
            keep = dropout_hash(np.uint64(spec.seed), np.uint64(self.b), np.uint64(self.h), i, j)
        keep = keep >= np.uint64(spec.drop_threshold)
        return np.where(keep, 1.0 / (1.0 - spec.dropout), 0.0).astype(self.q.dtype)


class _PagedRows:
    """The key (or value) rows of one sequence and kv head in a page pool ``(num_pages, Hkv, page_size, D)``: row
    ``j`` is ``pool[block_table[j // page_size], g, j % page_size]``, read in place through the sequence's block
    table (``rows[j]`` gathers only the rows asked for; the sequence is never copied out whole)."""

    def __init__(self, pool: np.ndarray, table: np.ndarray, page_size: int, g: int) -> None:
        self.pool, self.table, self.page_size, self.g = pool, table, page_size, g

    def __getitem__(self, j: np.ndarray) -> np.ndarray:
        j = np.asarray(j)
        return self.pool[self.table[j // self.page_size], self.g, j % self.page_size]


def _head(q, k, v, bias, spec: AttentionSpec, b: int, h: int) -> _Head:  # type: ignore[no-untyped-def]
    g = h // spec.group  # GQA / MQA: query head h reads kv head h // group
    bias_bh = None
    if bias is not None:
        Bb, Hb = bias.shape[0], bias.shape[1]
        hb = h if Hb == spec.H else (g if Hb == spec.Hkv else 0)  # a kv-head bias is shared by its group
        bias_bh = bias[b if Bb == spec.B else 0, hb]
    types = spec.kernel_tiles()  # (B, Ht, Tr, Tc): per batch row, per kv head (a key list) or per head (mask_mod)
    if spec.pages is None:  # where the key source's rows are stored: this batch row's own rows ...
        kb, vb = k[b, g], v[b, g]
    else:  # ... or a paged sequence's pages in the shared pool
        table, ps = spec.pages.block_table[b], spec.pages.page_size
        kb, vb = _PagedRows(k, table, ps, g), _PagedRows(v, table, ps, g)
    return _Head(spec, b, h, g, q[b, h], kb, vb, bias_bh, types[b, h // (spec.H // types.shape[1])])


def _heads(q, k, v, bias, spec: AttentionSpec) -> Iterator[_Head]:  # type: ignore[no-untyped-def]
    for b in range(spec.B):
        for h in range(spec.H):
            yield _head(q, k, v, bias, spec, b, h)


def _product(a: np.ndarray, b: np.ndarray, vis: Optional[np.ndarray]) -> np.ndarray:
    """``a @ b`` leaving out the masked pairs: ``out_r = sum_c vis[r, c] a[r, c] b[c]``.

    ``a``'s masked entries are 0 already, so a plain matmul is exact, unless a row of ``b`` holds NaN or Inf:
    ``0 * NaN`` is NaN, and a key (or query) that a row does not see must not change it. Only then (a TRIANGLE
    tile with non-finite inputs) are the masked pairs skipped explicitly.
    """
    if vis is None or np.isfinite(b).all():
        return a @ b
    with np.errstate(invalid="ignore"):  # the products of masked pairs are computed, then thrown away
        return np.where(vis[:, :, None], a[:, :, None] * b[None, :, :], 0).sum(axis=1).astype(a.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------
def _online_softmax_step(
    S_ij: np.ndarray, V_j: np.ndarray, vis: Optional[np.ndarray], drop: Optional[np.ndarray],
    m_i: np.ndarray, l_i: np.ndarray, O_i: np.ndarray,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step of the online softmax (FA2 Algorithm 1, lines 8-10); returns the new ``(m_i, l_i, O_i)``.

    ``O_i`` is the *unnormalized* accumulator ``sum_j exp(S_ij - m_i) V_j``; when the running max grows from
    ``m_old`` to ``m_new`` everything accumulated so far is rescaled by ``exp(m_old - m_new)``.
    """
    # BEGIN SOLUTION task5_2: new row max; rescale l_i, O_i by exp(m_old - m_new); add P_ij = exp(S_ij - m_new)
    m_new = np.maximum(m_i, S_ij.max(axis=1))
    m_safe = np.where(m_new == -np.inf, 0, m_new)  # a row masked so far: exp(-inf - 0) = 0, never NaN
    alpha = np.exp(m_i - m_safe)  # rescale factor exp(m_old - m_new) (0 while nothing was seen)
    P_ij = np.exp(S_ij - m_safe[:, None])  # masked entries: exp(-inf) = 0
    l_new = alpha * l_i + P_ij.sum(axis=1)  # l of the *undropped* probabilities: lse ignores dropout
    if drop is not None:
        P_ij = P_ij * drop  # dropout acts on the probabilities that multiply V
    O_new = alpha[:, None] * O_i + _product(P_ij, V_j, vis)
    return m_new, l_new, O_new
    # END SOLUTION


def _finish(m: np.ndarray, l: np.ndarray, O: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """FA2 Algorithm 1 lines 12-13: ``O / l`` and ``lse = m + log(l)``; a row that saw no key: 0 and ``-inf``."""
    # BEGIN SOLUTION task5_2: out = O / l, lse = m + log(l); a row with l == 0 saw no key: out 0, lse -inf
    seen = l != 0  # (NaN counts as seen: it propagates)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(seen[:, None], O / np.where(seen, l, 1)[:, None], 0)
        lse = np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf)
    return out, lse
    # END SOLUTION


def forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray], spec: AttentionSpec
) -> Tuple[np.ndarray, np.ndarray]:
    """Flash attention forward.

    Args:
        q: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; bias: ``(Bb, Hb, Nqb, Nk)`` or ``None``.
        spec: the :class:`AttentionSpec` of the call (key source, masks, tiles, order, splits, dropout).

    Returns:
        ``out (B, H, Nq, D)`` and ``lse (B, H, Nq)`` in q's dtype; rows that see no key: out 0, lse ``-inf``.
    """
    out = np.zeros(q.shape, dtype=q.dtype)
    lse = np.full(q.shape[:3], -np.inf, dtype=q.dtype)
    one_head = _forward_k_major if spec.order == TileOrder.K_MAJOR else _forward_q_major
    for head in _heads(q, k, v, bias, spec):
        one_head(head, out[head.b, head.h], lse[head.b, head.h])
    return out, lse


def _start(head: _Head, n: int, with_sink: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The online softmax's starting ``(m, l)`` for ``n`` rows: nothing seen, ``(-inf, 0)``; or, with learnable
    sinks, the sink's term already folded in, ``(sinks[h], 1)``: ``exp(sinks[h] - m) = 1`` is its share of ``l``,
    and it adds nothing to ``O`` (a sink has no value). A row that sees no key ends with ``O = 0``, ``lse =
    sinks[h]``."""
    dtype = head.q.dtype
    if with_sink and head.spec.sinks is not None:
        return np.full(n, head.spec.sinks[head.h], dtype=dtype), np.ones(n, dtype=dtype)
    return np.full(n, -np.inf, dtype=dtype), np.zeros(n, dtype=dtype)


def _attend(head: _Head, tq: int, key_tiles: np.ndarray, with_sink: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """FA2 Algorithm 1, lines 4-13, for query tile ``tq`` over ``key_tiles``: the normalized ``(O_i, lse_i)``
    (the sink folded in when ``with_sink``: one split of split-K holds it)."""
    n = len(head.query_rows(tq))
    dtype = head.q.dtype
    O_i = np.zeros((n, head.spec.D), dtype=dtype)  # line 5: on-chip accumulators of this query tile
    m_i, l_i = _start(head, n, with_sink)
    for tk in key_tiles:  # lines 6-7: for each key tile, load K_j, V_j
        S_ij, vis, _ = head.scores(tq, tk)  # line 8
        m_i, l_i, O_i = _online_softmax_step(S_ij, head.v[head.key_rows(tk)], vis, head.dropout_scale(tq, tk),
                                             m_i, l_i, O_i)
    return _finish(m_i, l_i, O_i)  # lines 12-13


def _forward_q_major(head: _Head, out: np.ndarray, lse: np.ndarray) -> None:
    """FlashAttention 2 for one head: fills ``out (Nq, D)`` and ``lse (Nq,)`` in place.

    With ``num_splits = S`` the visited key tiles of a query tile are cut into ``S`` contiguous splits, each
    attended on its own (on a GPU, by its own block) and merged by their log-sum-exp.
    """
    for tq in range(head.spec.Tr):  # line 3: for each query tile Q_i (one thread block on a GPU)
        rows = head.query_rows(tq)
        if head.spec.num_splits == 1:
            out[rows], lse[rows] = _attend(head, tq, head.visited(tq=tq))
            continue
        splits: List[np.ndarray] = np.array_split(head.visited(tq=tq), head.spec.num_splits)
        parts = [_attend(head, tq, tiles, with_sink=n == 0) for n, tiles in enumerate(splits)]
        out[rows], lse[rows] = merge_partials(np.stack([o for o, _ in parts], axis=1),
                                              np.stack([x for _, x in parts], axis=1))


def _forward_k_major(head: _Head, out: np.ndarray, lse: np.ndarray) -> None:
    """FlashAttention 1, Algorithm 1, for one head: ``out`` is the ``O`` kept "in HBM" and updated in place.

    ``O`` stays normalized after every step (as in the paper), ``l`` and ``m`` are full ``(Nq,)`` arrays. Each
    step un-normalizes ``O_i`` (``l_i O_i``), runs the same online-softmax step as Q-major, and normalizes back.
    """
    spec = head.spec
    O = out  # line 2: O = 0, l = 0, m = -inf in HBM (or the sink's term)
    m, l = _start(head, spec.Nq, True)
    for tk in range(spec.Tc):  # line 5: for each key tile
        V_j = head.v[head.key_rows(tk)]  # line 6: load K_j, V_j
        for tq in head.visited(tk=tk):  # line 7: for each query tile that sees this key tile
            rows = head.query_rows(tq)  # line 8: load Q_i, O_i, l_i, m_i
            S_ij, vis, _ = head.scores(tq, tk)  # line 9
            acc = np.where(l[rows, None] != 0, l[rows, None] * O[rows], 0)  # diag(l_i) O_i
            # lines 10-11: the online-softmax step; line 12: O_i = diag(l_i^new)^-1 (...), written back
            m[rows], l[rows], acc = _online_softmax_step(S_ij, V_j, vis, head.dropout_scale(tq, tk), m[rows],
                                                         l[rows], acc)
            O[rows] = _finish(m[rows], l[rows], acc)[0]
    lse[:] = _finish(m, l, O)[1]


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------
def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray], out: np.ndarray, lse: np.ndarray,
             dout: np.ndarray, spec: AttentionSpec, dlse: Optional[np.ndarray] = None
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Flash attention backward: gradients of ``sum(out * dout) + sum(lse * dlse)``.

    Args:
        q, out, dout: ``(B, H, Nq, D)``; k, v: ``(B, Hkv, Nk, D)``; bias ``(Bb, Hb, Nqb, Nk)`` or ``None``;
        lse: ``(B, H, Nq)`` saved by :func:`forward`; dlse: ``(B, H, Nq)`` or ``None`` (zero).

    Returns:
        ``dq (B, H, Nq, D)``, ``dk, dv (B, Hkv, Nk, D)``, ``dbias`` of the bias's shape (summed over the dims it
        was broadcast along; a kv-head bias sums its group) or ``None``. All in q's dtype.

    With ``dS_ij = P_ij (dP_ij - delta_i)`` the gradient of the scores, ``delta_i = rowsum(dO_i O_i) - dlse_i``
    (preprocess, FA2 Algorithm 2 line 4: ``d lse / d S = P`` folds into delta). Exactly, ``sum_j dS_ij = dlse_i``;
    in floating point ``delta`` comes from ``O`` and the sum is off by rounding, which matters where ``dS`` is
    summed over a whole row (a bias broadcast over the keys' rows, DMA's ``z``). The dQ pass therefore also sums
    each row of ``dS`` (``rs``) and the dK/dV pass uses ``delta + rs - dlse``, whose rows sum as they should. With
    learnable sinks a row has one more column, the sink's, with ``dS = -P_sink delta`` (its ``dP`` is 0: it has no
    value), so the refined delta is ``delta (1 - P_sink) + rs - dlse``. ``dS`` is of the final scores; dQ, dK and
    dBias take it through the score modification (``dT = dS ds/dt``, :meth:`_Head.modify`).
    """
    check_backward(spec)
    dtype = q.dtype
    dq = np.zeros(q.shape, dtype=dtype)
    dk = np.zeros(k.shape, dtype=dtype)
    dv = np.zeros(v.shape, dtype=dtype)
    dbias = None if bias is None else np.zeros(bias.shape, dtype=dtype)
    dlse = np.zeros(lse.shape, dtype=dtype) if dlse is None else dlse
    delta = (dout * out).sum(axis=-1, dtype=dtype) - dlse  # line 4: preprocess
    # Rows that saw no key have lse = -inf; their S is all -inf too, so any finite stand-in gives P = 0.
    lse_safe = np.where(lse == -np.inf, 0, lse).astype(dtype)

    rs = np.zeros(lse.shape, dtype=dtype)
    for head in _heads(q, k, v, bias, spec):
        b, h = head.b, head.h
        _backward_dq(head, dout[b, h], lse_safe[b, h], delta[b, h], dq[b, h], rs[b, h])
    if spec.refine_delta:  # refined: every row of dS (with the sink's column) now sums to dlse
        delta = delta * (1 - sink_probs(lse, spec.sinks)) + rs - dlse
    for b in range(spec.B):
        for g in range(spec.Hkv):
            heads = [_head(q, k, v, bias, spec, b, h) for h in range(g * spec.group, (g + 1) * spec.group)]
            _backward_dk_dv(heads, dout[b], lse_safe[b], delta[b], dk[b, g], dv[b, g], dbias)
    return dq, dk, dv, dbias


def _tile_grads(head: _Head, tq: int, tk: int, dO_i: np.ndarray, lse_i: np.ndarray, delta_i: np.ndarray):
    """Recompute one tile (FA2 Algorithm 2, lines 11-14): returns ``(Z_ij, dS_ij, dT_ij, vis)``.

    ``P_ij = exp(S_ij - lse_i)`` (softmax, recomputed), ``Z_ij`` the probabilities after dropout (what multiplied
    V), ``dS_ij = P_ij * (dP_ij - delta_i)`` with ``dP_ij = (dO_i V_j^T) * dropout``, and ``dT_ij = dS_ij dS/dT``,
    the gradient of ``T = scale Q K^T + bias`` (through score_mod and softcap; ``dS_ij`` itself without them), both
    exactly 0 where masked.
    """
    # BEGIN SOLUTION task5_3: P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dT = dS ds/dt; 0 where masked
    S_ij, vis, ds_dt = head.scores(tq, tk)
    P_ij = np.exp(S_ij - lse_i[:, None])
    drop = head.dropout_scale(tq, tk)
    with np.errstate(invalid="ignore"):  # NaN in a masked V_j: its dS entries are replaced by 0 below
        dP_ij = dO_i @ head.v[head.key_rows(tk)].T
        Z_ij = P_ij
        if drop is not None:
            Z_ij = P_ij * drop
            dP_ij = dP_ij * drop
        dS_ij = P_ij * (dP_ij - delta_i[:, None])
        dT_ij = dS_ij if ds_dt is None else dS_ij * ds_dt
    if vis is not None:  # a masked pair has no gradient, whatever V (or the modification) gives there, and no
        # probability, whatever the row's lse (NaN for a row that sees a NaN: it must not reach dV of other keys)
        Z_ij, dS_ij, dT_ij = np.where(vis, Z_ij, 0), np.where(vis, dS_ij, 0), np.where(vis, dT_ij, 0)
    return Z_ij, dS_ij, dT_ij, vis
    # END SOLUTION


def _backward_dq(head: _Head, dout_bh, lse_bh, delta_bh, dq_bh, rs_bh) -> None:  # type: ignore[no-untyped-def]
    """dQ of one query head, query tile by query tile; also ``rs``, the row sums of dS (see :func:`backward`)."""
    spec = head.spec
    for tq in range(spec.Tr):
        rows = head.query_rows(tq)
        dQ_i = np.zeros((len(rows), spec.D), dtype=dq_bh.dtype)
        for tk in head.visited(tq=tq):  # every key tile this query tile sees
            _, dS_ij, dT_ij, vis = _tile_grads(head, tq, tk, dout_bh[rows], lse_bh[rows], delta_bh[rows])
            dQ_i += _product(dT_ij, head.k[head.key_rows(tk)], vis)  # line 15: dQ_i += dS_ij K_j
            rs_bh[rows] += dS_ij.sum(axis=1)
        dq_bh[rows] = spec.scale * dQ_i


def _backward_dk_dv(heads: List[_Head], dout_b, lse_b, delta_b, dk_g, dv_g, dbias) -> None:  # type: ignore[no-untyped-def]
    """dK and dV of one kv head, key tile by key tile (outer loop over key tiles: no write conflicts).

    ``heads`` are the query heads of the group (GQA), whose contributions are summed into the same ``dK_j, dV_j``.
    The bias gradient ``dS`` is accumulated here as well.
    """
    spec = heads[0].spec
    for tk in range(spec.Tc):  # lines 5-7: for each key tile, dK_j = dV_j = 0 on chip
        j = heads[0].key_rows(tk)
        dK_j = np.zeros((len(j), spec.D), dtype=dk_g.dtype)
        dV_j = np.zeros((len(j), spec.D), dtype=dv_g.dtype)
        for head in heads:
            for tq in head.visited(tk=tk):  # line 8: for each query tile that sees K_j
                rows = head.query_rows(tq)
                dO_i = dout_b[head.h, rows]
                Z_ij, _, dT_ij, vis = _tile_grads(head, tq, tk, dO_i, lse_b[head.h, rows], delta_b[head.h, rows])
                vis_t = None if vis is None else vis.T
                dV_j += _product(Z_ij.T, dO_i, vis_t)  # line 12: dV_j += P_ij^T dO_i (with dropout)
                dK_j += _product(dT_ij.T, head.q[rows], vis_t)  # line 16 (scale applied once below)
                if dbias is not None:  # dBias = dT, summed over the dims the bias was broadcast along
                    Bb, Hb = dbias.shape[0], dbias.shape[1]
                    bb = head.b if Bb == spec.B else 0
                    hb = head.h if Hb == spec.H else (head.g if Hb == spec.Hkv else 0)
                    if dbias.shape[2] == 1:
                        dbias[bb, hb, 0, j] += dT_ij.sum(axis=0)
                    else:
                        dbias[bb, hb, rows[:, None], j[None, :]] += dT_ij
        dk_g[j] = spec.scale * dK_j  # line 18: write dK_j, dV_j
        dv_g[j] = dV_j

