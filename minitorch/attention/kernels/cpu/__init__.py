"""The FastTensorBackend's attention engine: fused Numba CPU kernels (:mod:`.flash`) on NumPy arrays.

Modules: :mod:`.launch` (how kernels are compiled and launched on a thread pool), :mod:`.simd` (the SIMD
vocabulary and the tile matmul), :mod:`.flash` (the inner steps and the forward / backward kernels),
:mod:`.importance` and :mod:`.select` (DMA's importance and top-k selection).
"""

from __future__ import annotations

from ...engine import AttentionEngine
from . import flash, select
from . import importance as dma_importance


class CpuAttention(AttentionEngine):
    """Numba CPU kernels on NumPy arrays."""

    name = "cpu"
    blocks_for = "cpu"
    decode_block = 512  # a one-row step pays a fixed cost per key tile: 512 slots decode ~1.3x faster than 128

    forward = staticmethod(flash.forward)
    backward = staticmethod(flash.backward)
    importance = staticmethod(dma_importance.importance)
    importance_backward = staticmethod(dma_importance.importance_backward)
    select = staticmethod(select.select)
