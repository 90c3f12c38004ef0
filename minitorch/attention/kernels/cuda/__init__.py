"""The CudaBackend's attention engine: Numba CUDA kernels on device arrays.

Modules, one concept each:

* :mod:`.tiles`: register-tile geometry (:class:`~.tiles.TileShape`), the compile-time :class:`~.tiles.Flags` and
  run-time :class:`~.tiles.Config` of a kernel, and the tile helpers (key source, score modification, products);
* :mod:`.forward`: the forward tile step (online softmax) and the Q-major (split-K), merge and K-major kernels;
* :mod:`.backward`: the backward tile step (recompute ``P`` and ``dS``) and the preprocess, dQ and dK/dV kernels;
* :mod:`.select`: Dynamic Mask Attention's importance and top-k selection;
* :mod:`.launch`: a spec as kernel tiles, flags and config; the launches; zeros and row copies for the caches.

Flash attention (both orders), Dynamic Mask Attention (a key list, the importance as bias and the top-k rule) and
ring-cache decoding (slot positions, split-K) are all configurations of the same two steps.
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from ...engine import AttentionEngine
from . import launch, select


class CudaAttention(AttentionEngine):
    """Numba CUDA kernels on device arrays (numba ``DeviceNDArray``, or the simulator's)."""

    name = "cuda"
    blocks_for = "cuda"

    forward = staticmethod(launch.forward)
    backward = staticmethod(launch.backward)
    sinks_backward = staticmethod(launch.sinks_backward)
    importance = staticmethod(select.importance)
    importance_backward = staticmethod(select.importance_backward)
    decode_splits = staticmethod(launch.decode_splits)
    write_rows = staticmethod(launch.write_rows)
    take_rows = staticmethod(launch.take_rows)

    def select(self, z: Any, dspec: Any) -> Any:
        return select.select(z, dspec, launch.device_positions(dspec.attn))

    def asarray(self, x: Any, dtype: Any) -> Any:
        return launch.on_device(x, dtype)

    def to_host(self, x: Any) -> np.ndarray:
        return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)

    def zeros(self, shape: Tuple[int, ...], dtype: Any) -> Any:
        return launch.zeros(shape, dtype)
