"""The attention engines, one per backend, and their installation on the backends' ops.

* :mod:`.simple`: readable NumPy, tile by tile (``SimpleBackend``);
* :mod:`.cpu`: fused Numba CPU kernels (``FastTensorBackend``);
* :mod:`.cuda`: fused Numba CUDA kernels (``CudaBackend``).

After this module is imported, ``backend.attention`` is the engine of every backend built on these ops (a
``TensorBackend(SimpleOps)`` made later included).
"""

from __future__ import annotations

from ...cuda_ops import CudaOps
from ...fast_ops import FastOps
from ...tensor_ops import SimpleOps
from .cpu import CpuAttention
from .cuda import CudaAttention
from .simple import SimpleAttention

SimpleOps.attention = SimpleAttention()
FastOps.attention = CpuAttention()
CudaOps.attention = CudaAttention()
