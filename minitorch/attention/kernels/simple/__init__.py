"""The SimpleBackend's attention engine: flash attention tile by tile in readable NumPy (:mod:`.flash`)."""

from __future__ import annotations

from ...engine import AttentionEngine
from ...importance import importance, importance_backward
from ...selection import select_numpy
from . import flash


class SimpleAttention(AttentionEngine):
    """Readable NumPy: Python loops over tiles, NumPy inside a tile."""

    name = "simple"
    blocks_for = "cpu"

    forward = staticmethod(flash.forward)
    backward = staticmethod(flash.backward)
    importance = staticmethod(importance)
    importance_backward = staticmethod(importance_backward)
    select = staticmethod(select_numpy)
