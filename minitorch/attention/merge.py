"""Merging partial attention results by their log-sum-exp (split-K decoding, ring attention).

Attention of a query row over a set of keys is ``out = sum_j P_j V_j`` with ``P = softmax(s)``. Cut the keys into
parts ``1..S``; part ``s`` alone gives a normalized ``out_s`` and its ``lse_s = log sum_{j in s} exp(s_j)``. The
whole row is the parts weighted by their share of the total mass::

    lse = M + log(sum_s exp(lse_s - M))         (M = max_s lse_s, for stability)
    out = sum_s exp(lse_s - lse) out_s

A part that saw no key has ``lse_s = -inf`` and weight 0; a row no part saw gets ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np


def merge_partials(out_parts: np.ndarray, lse_parts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Merge ``S`` partial results: ``out_parts (..., S, D)``, ``lse_parts (..., S)`` -> ``(out (..., D), lse (...))``.

    The parts are combined in index order (deterministic); dtype of ``out_parts``.
    """
    # BEGIN SOLUTION task5_5: w_s = exp(lse_s - max); out = sum w_s out_s / sum w_s; lse = max + log sum w_s
    dt = out_parts.dtype
    M = lse_parts.max(axis=-1, initial=-np.inf)  # NaN if a part is NaN: the row stays NaN
    empty = M == -np.inf
    M_safe = np.where(empty, 0, M)
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.where(lse_parts == -np.inf, 0, np.exp(lse_parts - M_safe[..., None])).astype(dt)
        den = w.sum(axis=-1)
        # a part of weight 0 is never read, so an empty part cannot poison the row whatever its buffer holds
        num = np.where(w[..., None] == 0, 0, w[..., None] * out_parts).sum(axis=-2)
        out = np.where(empty[..., None], 0, num / np.where(empty, 1, den)[..., None]).astype(dt)
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, M_safe + np.log(np.where(empty, 1, den))).astype(dt)
    return out, lse
    # END SOLUTION
