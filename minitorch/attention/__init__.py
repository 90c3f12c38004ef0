"""Attention: tiling, reference, kernels, KV cache, DMA.

Submodules, one concept each:

* :mod:`.tiling`: ``TileType``, ``TileOrder``, ``TileSchedule`` (which tiles exist, their type and order).
* :mod:`.spec`: validation of an attention call and the ``AttentionSpec`` the kernels read.
* :mod:`.dropout`: the counter-based keep-mask (``dropout_mask``).
* :mod:`.reference`: the float64 NumPy oracle.
* :mod:`.simple`, :mod:`.cpu`: the SimpleBackend (readable NumPy) and FastTensorBackend (Numba) kernels.
* :mod:`.flash`: the tensor-level ``flash_attention`` / ``attention_reference``.
* :mod:`.kv_cache`, :mod:`.decode`, :mod:`.ring_buffer`: the ring-buffer KV cache and the seed-compatible module.
* :mod:`.dma`: Dynamic Mask Attention.
"""

from .dropout import dropout_mask  # noqa: F401
from .flash import attention_reference, flash_attention  # noqa: F401
from .reference import (  # noqa: F401
    attention_probs,
    naive_attention_float32,
    reference_attention,
    reference_attention_backward,
    reference_mask,
)
from .tiling import TileOrder, TileSchedule, TileType, standard_attention_hbm_bytes  # noqa: F401
from .ring_buffer import build_attention, register_attention  # noqa: F401
