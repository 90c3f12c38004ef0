"""Ring attention on paper: how a sequence is laid over P ranks, what each ring step computes, and how the partial
results combine. Pure NumPy, no MPI: :mod:`minitorch.distributed` runs this plan, the visualizer draws it.

**Layouts.** The ``N`` positions of a sequence are cut into chunks whose sizes differ by at most one
(``numpy.array_split``), so any ``N`` at least the number of chunks works (no padding):

* ``"contiguous"``: ``P`` chunks, rank ``r`` holds chunk ``r``.
* ``"zigzag"``: ``2P`` chunks, rank ``r`` holds chunks ``r`` and ``2P-1-r``, in that order. Under a causal mask
  the early chunks see few keys and the late ones many; pairing chunk ``r`` with chunk ``2P-1-r`` gives every rank
  the same amount of work (with the contiguous layout rank 0 computes one block and then waits).

**The ring.** At step ``s = 0 .. P-1`` rank ``r`` holds the K/V block of rank ``(r - s) mod P`` (its own at step 0),
attends its queries to it and passes it on to rank ``r + 1``. A (query chunk, key chunk) pair is computed only if
some query in it may see some key in it; a block none of whose pairs is visible is skipped (no kernel launch).

**The merge.** A step's partial result over its keys is ``(out_b, lse_b)``: the softmax-normalized output over those
keys and the log-sum-exp of their scores. Two partials over disjoint key sets combine exactly by
``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``
(:func:`lse_merge`), which is the online softmax of flash attention applied to whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .merge import merge_partials

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    """``layout`` if it is ``"contiguous"`` or ``"zigzag"``, else a ``ValueError``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def num_chunks(P: int, layout: str) -> int:
    """How many chunks the sequence is cut into: ``P`` (contiguous) or ``2P`` (zigzag)."""
    return P if check_layout(layout) == "contiguous" else 2 * P


def check_sequence_length(N: int, P: int, layout: str) -> None:
    """Every chunk must hold at least one position: ``N >= num_chunks(P, layout)``."""
    c = num_chunks(P, layout)
    if N < c:
        raise ValueError(f"a sequence of N={N} positions cannot be split over {P} ranks with layout {layout!r}: "
                         f"it needs N >= {c} (one position per chunk)")


def chunk_bounds(N: int, n_chunks: int) -> np.ndarray:
    """Boundaries ``(n_chunks + 1,)``: chunk ``c`` is ``[b[c], b[c+1])``; the first ``N % n_chunks`` are one longer."""
    base, extra = divmod(N, n_chunks)
    sizes = np.full(n_chunks, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def rank_chunks(P: int, rank: int, layout: str) -> Tuple[int, ...]:
    """The chunks rank ``rank`` holds, in the order its local rows store them."""
    if not 0 <= rank < P:
        raise ValueError(f"rank must be in [0, {P}), got {rank}")
    return (rank,) if check_layout(layout) == "contiguous" else (rank, 2 * P - 1 - rank)


def rank_segments(N: int, P: int, rank: int, layout: str) -> List[Tuple[int, int, int]]:
    """``(chunk, start, end)`` per chunk of ``rank``: its global positions ``[start, end)``, in local row order."""
    b = chunk_bounds(N, num_chunks(P, layout))
    return [(c, int(b[c]), int(b[c + 1])) for c in rank_chunks(P, rank, layout)]


def local_length(N: int, P: int, rank: int, layout: str) -> int:
    """How many positions rank ``rank`` holds."""
    return sum(e - s for _, s, e in rank_segments(N, P, rank, layout))


def local_positions(N: int, P: int, rank: int, layout: str) -> np.ndarray:
    """The global position of each local row of ``rank``: int64 ``(local_length,)``."""
    return np.concatenate([np.arange(s, e, dtype=np.int64) for _, s, e in rank_segments(N, P, rank, layout)])


def chunks_see(q_range: Tuple[int, int], k_range: Tuple[int, int], causal: bool, window: Optional[int]) -> bool:
    """May some query at positions ``[qa, qb)`` see some key at positions ``[ka, kb)``?

    Visibility depends on ``d = q - k`` only (``causal``: ``0 <= d``; ``window``: ``d < window`` causal,
    ``|d| < window`` otherwise, the rule of ``flash_attention``). Over two ranges ``d`` takes every integer in
    ``[qa - kb + 1, qb - 1 - ka]``, so the question is whether that interval meets the visible differences.
    """
    (qa, qb), (ka, kb) = q_range, k_range
    if qa >= qb or ka >= kb:
        return False
    d_lo, d_hi = qa - kb + 1, qb - 1 - ka
    vis_lo = 0 if causal else -np.inf
    vis_hi = np.inf if window is None else window - 1
    if window is not None and not causal:
        vis_lo = -(window - 1)
    return max(d_lo, vis_lo) <= min(d_hi, vis_hi)


@dataclass(frozen=True)
class RingStep:
    """What one rank computes at one ring step.

    ``kv_rank``: whose K/V block the rank holds. ``pairs``: ``(q_chunk, k_chunk, computed)`` for every pair of its
    query chunks and the block's key chunks. ``q_rows``, ``k_rows``: the local query rows and the block's key rows
    that one kernel call covers (the smallest span holding every computed pair; ``None`` when the step is skipped).
    Pairs inside the span that see nothing cost no work either: the kernel's tile schedule skips them.
    """

    step: int
    kv_rank: int
    pairs: Tuple[Tuple[int, int, bool], ...]
    q_rows: Optional[slice]
    k_rows: Optional[slice]

    @property
    def skipped(self) -> bool:
        return self.q_rows is None


def _row_span(segments: List[Tuple[int, int, int]], used: List[bool]) -> slice:
    """The local rows from the first to the last used segment (segments are stored back to back)."""
    offsets = np.concatenate([[0], np.cumsum([e - s for _, s, e in segments])])
    idx = [i for i, u in enumerate(used) if u]
    return slice(int(offsets[idx[0]]), int(offsets[idx[-1] + 1]))


def ring_plan(N: int, P: int, rank: int, layout: str, causal: bool = False,
              window: Optional[int] = None) -> List[RingStep]:
    """The ``P`` steps of ``rank`` in a ring over a sequence of ``N`` positions (see the module docstring)."""
    check_sequence_length(N, P, layout)
    q_segs = rank_segments(N, P, rank, layout)
    steps = []
    for s in range(P):
        src = (rank - s) % P
        k_segs = rank_segments(N, P, src, layout)
        pairs = tuple((qc, kc, chunks_see((qs, qe), (ks, ke), causal, window))
                      for qc, qs, qe in q_segs for kc, ks, ke in k_segs)
        q_used = [any(ok for qc, _, ok in pairs if qc == seg[0]) for seg in q_segs]
        k_used = [any(ok for _, kc, ok in pairs if kc == seg[0]) for seg in k_segs]
        if any(q_used):
            steps.append(RingStep(s, src, pairs, _row_span(q_segs, q_used), _row_span(k_segs, k_used)))
        else:
            steps.append(RingStep(s, src, pairs, None, None))
    return steps


def lse_merge(out_a: np.ndarray, lse_a: np.ndarray, out_b: np.ndarray, lse_b: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray]:
    """Combine two attention results over disjoint key sets: ``out (..., n, D)``, ``lse (..., n)`` each.

    ``lse = logaddexp(lse_a, lse_b)`` and ``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b``
    (:func:`minitorch.attention.merge.merge_partials` with two parts). A row that saw no key has ``lse = -inf`` and
    ``out = 0`` and gets weight 0; a row empty in both stays empty.
    """
    return merge_partials(np.stack([out_a, out_b], axis=-2), np.stack([lse_a, lse_b], axis=-1))