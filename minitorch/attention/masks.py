"""Which keys a query may see: the one visibility rule of every attention kernel, and DMA's keep rule.

Every mask of the attention API is a function of *positions* (docs/api.md): query row ``i`` sits at position
``qp``, key slot ``j`` at position ``kp``, and ``-1`` marks an empty row or slot (a padded key, an empty ring-cache
slot). :func:`visible` is the rule, written once, with ``&``, ``|`` and ``abs`` only, so that the same Python
source

* runs elementwise on NumPy integer arrays (the readable kernels, the tests, :class:`~.tiling.TileSchedule`),
* compiles with ``numba.njit`` (the CPU kernels) and with ``numba.cuda.jit(device=True)`` (the GPU kernels),

the way :func:`~.dropout.build_dropout_hash` is built. No kernel writes the rule again: they call
:func:`build_visible`'s compiled copy. Packed sequences add one more rule of the same kind, :func:`same_segment`
(a query sees a key only within its own segment), on a second per-row / per-key coordinate, the segment id.

The rule depends on a valid pair only through the difference ``d = qp - kp`` and whether the key is a sink
(``kp < num_sinks``); for either kind of key the set of visible differences is an interval that contains 0
(or is empty, for ``window=0``). :class:`~.tiling.TileSchedule` relies on exactly this to classify a whole tile by
testing a few corner pairs with the same rule; ``tests/test_masks.py`` checks the property.
"""

from __future__ import annotations

from typing import Callable


def visible(qp, kp, causal, window, num_sinks):  # type: ignore[no-untyped-def]
    """May a query at position ``qp`` see a key at position ``kp``?

    * both positions valid (``>= 0``; ``-1`` is an empty row or slot);
    * ``causal``: the key is not in the future, ``kp <= qp``;
    * ``window >= 0``: the key is within ``window`` positions, ``qp - kp < window`` (``|qp - kp| < window``
      without ``causal``), unless it is an attention sink, ``kp < num_sinks``, which every query sees.

    ``qp``, ``kp`` are ints (compiled code) or broadcasting integer arrays (NumPy); the result is a bool or a
    bool array. ``causal``, ``window``, ``num_sinks`` are scalars.
    """
    ok = (qp >= 0) & (kp >= 0)
    if causal:
        ok = ok & (kp <= qp)
        dist = qp - kp
    else:
        dist = abs(qp - kp)
    if window >= 0:
        ok = ok & ((dist < window) | (kp < num_sinks))
    return ok


def same_segment(qs, ks):  # type: ignore[no-untyped-def]
    """Packed sequences: may a query of segment ``qs`` see a key of segment ``ks``? Only within one segment, and
    never for padding (segment ``-1``). Ints or broadcasting integer arrays, like :func:`visible`; a pair must pass
    both rules (and every other mask)."""
    return (qs >= 0) & (qs == ks)


def kept(zj, j, thr_val, thr_idx):  # type: ignore[no-untyped-def]
    """Dynamic Mask Attention's top-k keep rule: does a row with threshold ``(thr_val, thr_idx)`` keep key ``j``
    of importance ``zj``? Keys rank by ``z`` descending, ties by lower index; the threshold is the worst key the
    row keeps (``(finfo.max, -1)``: it keeps nothing). Same three compilations as :func:`visible`."""
    return (zj > thr_val) | ((zj == thr_val) & (j <= thr_idx))


def build_visible(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """:func:`visible` compiled with ``jit`` (``numba.njit(inline="always")``, ``numba.cuda.jit(device=True)``, or
    the identity for NumPy)."""
    return jit(visible)


def build_same_segment(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """:func:`same_segment` compiled with ``jit``."""
    return jit(same_segment)


def build_kept(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """:func:`kept` compiled with ``jit``."""
    return jit(kept)
