"""The online softmax, one query row at a time: the trick that lets flash attention skip the score matrix.

Standard attention computes the whole row of scores ``s (Nk,)``, then ``p = softmax(s)`` and ``out = p @ V``.
Flash attention sees the keys one tile of ``Bc`` columns at a time and never holds the whole row. It keeps three
running quantities and updates them after every tile ``j`` (FlashAttention 2, Algorithm 1, lines 8-10):

* ``m``: the largest score seen so far (the running max; starts at ``-inf``),
* ``l``: the running sum ``sum_k exp(s_k - m)`` over the keys seen so far (starts at 0),
* ``acc``: the *unnormalized* output ``sum_k exp(s_k - m) V_k`` over the keys seen so far (starts at 0).

When tile ``j`` arrives with scores ``s_j``::

    m_new = max(m, max(s_j))
    alpha = exp(m - m_new)                # how much the old terms shrink because the max grew
    p_j   = exp(s_j - m_new)              # this tile's unnormalized probabilities
    l     = alpha * l + sum(p_j)
    acc   = alpha * acc + p_j @ V_j
    m     = m_new

After the last tile, ``out = acc / l`` is exactly ``softmax(s) @ V`` and ``lse = m + log(l)`` is the row's
log-sum-exp (what the backward pass saves). Nothing depends on the order in which the tiles arrive, and nothing
of size ``Nk`` is ever stored: only ``m``, ``l`` (two numbers) and ``acc`` (``D`` numbers).

:func:`online_softmax_trace` runs this loop and records every step, so that a student (or the visualizer's
Online-softmax page) can watch ``m``, ``l`` and ``acc`` evolve. The kernels in :mod:`minitorch.attention.simple`,
:mod:`minitorch.attention.cpu` and the CUDA kernels do the same for ``Br`` rows at once.

Masked keys (score ``-inf``) contribute nothing; a row whose keys are all masked ends with ``l = 0`` and outputs
zeros with ``lse = -inf``, as in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np


@dataclass
class OnlineSoftmaxStep:
    """The state after one key tile.

    Attributes:
        tile: index ``j`` of the key tile.
        k_start, k_end: the columns ``[k_start, k_end)`` of the tile.
        scores: ``(k_end - k_start,)`` the tile's scores ``s_j``.
        m_prev: running max before the tile; ``m``: after it.
        alpha: ``exp(m_prev - m)``, the factor the previous ``l`` and ``acc`` were multiplied by (0 before any key).
        p: ``(k_end - k_start,)`` ``exp(s_j - m)``, the tile's unnormalized probabilities.
        l: running sum after the tile.
        acc: ``(D,)`` unnormalized output accumulator after the tile.
        out: ``(D,)`` ``acc / l``, the softmax-weighted average of the values seen so far (zeros while ``l == 0``).
    """

    tile: int
    k_start: int
    k_end: int
    scores: np.ndarray
    m_prev: float
    m: float
    alpha: float
    p: np.ndarray
    l: float
    acc: np.ndarray
    out: np.ndarray


@dataclass
class OnlineSoftmaxTrace:
    """Every step of the online softmax of one row, and the result.

    Attributes:
        steps: one :class:`OnlineSoftmaxStep` per key tile, in order.
        output: ``(D,)`` the final ``acc / l`` (equals ``softmax(scores) @ values``).
        lse: ``m + log(l)``, the log-sum-exp of the scores (``-inf`` when every key is masked).
        block_k: the tile width used.
    """

    steps: List[OnlineSoftmaxStep] = field(default_factory=list)
    output: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lse: float = -np.inf
    block_k: int = 1

    @property
    def m(self) -> np.ndarray:
        """Running max after each step, ``(num_steps,)``."""
        return np.array([s.m for s in self.steps])

    @property
    def l(self) -> np.ndarray:
        """Running sum after each step, ``(num_steps,)``."""
        return np.array([s.l for s in self.steps])


def online_softmax_trace(scores_row: np.ndarray, values: np.ndarray, block_k: int) -> OnlineSoftmaxTrace:
    """Compute ``softmax(scores_row) @ values`` tile by tile with the online softmax, recording every step.

    Args:
        scores_row: ``(Nk,)`` the scores of one query row (``-inf`` for a masked key).
        values: ``(Nk, D)`` the value rows.
        block_k: ``Bc``, the number of keys per tile (>= 1).

    Returns:
        an :class:`OnlineSoftmaxTrace` with ``ceil(Nk / block_k)`` steps, the output ``(D,)`` and the ``lse``.
        Computed in float64.
    """
    s = np.asarray(scores_row, dtype=np.float64)
    V = np.asarray(values, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores_row must be 1-D (Nk,), got shape {s.shape}")
    if V.ndim != 2 or V.shape[0] != s.shape[0]:
        raise ValueError(f"values must be (Nk, D) with Nk={s.shape[0]}, got shape {V.shape}")
    if isinstance(block_k, bool) or int(block_k) != block_k or block_k < 1:
        raise ValueError(f"block_k must be a positive int, got {block_k!r}")
    block_k = int(block_k)
    Nk, D = V.shape

    m = -np.inf  # running max
    l = 0.0  # running sum of exp(s - m)
    acc = np.zeros(D)  # running sum of exp(s - m) * V
    trace = OnlineSoftmaxTrace(block_k=block_k)
    for j, k_start in enumerate(range(0, Nk, block_k)):
        k_end = min(k_start + block_k, Nk)
        s_j, V_j = s[k_start:k_end], V[k_start:k_end]
        m_prev = m
        m_new = max(m, float(s_j.max()))
        # While every key so far is masked, m_new is -inf: use 0 as the shift so exp(-inf - 0) = 0, never NaN.
        shift = m_new if np.isfinite(m_new) else 0.0
        alpha = float(np.exp(m - shift))  # exp(-inf) = 0 on the first visible tile: nothing to rescale yet
        p_j = np.exp(s_j - shift)
        l = alpha * l + float(p_j.sum())
        acc = alpha * acc + p_j @ V_j
        m = m_new
        out = acc / l if l > 0 else np.zeros(D)
        trace.steps.append(
            OnlineSoftmaxStep(j, k_start, k_end, s_j.copy(), float(m_prev), float(m), alpha, p_j, float(l),
                              acc.copy(), out)
        )
    trace.output = acc / l if l > 0 else np.zeros(D)
    trace.lse = float(m + np.log(l)) if l > 0 else -np.inf
    return trace


def softmax_row(scores_row: np.ndarray) -> np.ndarray:
    """The ordinary (two-pass) softmax of one row in float64, for comparison: zeros if every key is masked."""
    s = np.asarray(scores_row, dtype=np.float64)
    m = s.max() if s.size else -np.inf
    if not np.isfinite(m):
        return np.zeros_like(s)
    e = np.exp(s - m)
    return e / e.sum()
