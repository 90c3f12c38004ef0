"""The CudaBackend's attention engine: Numba CUDA kernels on device arrays."""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np
from numba import cuda

from ...engine import AttentionEngine
from . import launch


class CudaAttention(AttentionEngine):
    """Numba CUDA kernels on device arrays (numba ``DeviceNDArray``, or the simulator's)."""

    name = "cuda"
    blocks_for = "cuda"

    forward = staticmethod(launch.forward)
    backward = staticmethod(launch.backward)

    def asarray(self, x: Any, dtype: Any) -> Any:
        if hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray):
            if np.dtype(x.dtype) != np.dtype(dtype):
                raise TypeError(f"a device array of dtype {np.dtype(x.dtype)} where {np.dtype(dtype)} is needed")
            return x
        return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))

    def to_host(self, x: Any) -> np.ndarray:
        return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)

    def zeros(self, shape: Tuple[int, ...], dtype: Any) -> Any:
        size = int(np.prod(shape, dtype=np.int64))
        return cuda.to_device(np.zeros(size, dtype=dtype)).reshape(shape)
