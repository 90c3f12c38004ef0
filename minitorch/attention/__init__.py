"""Attention: the front end (API, spec, tiling, masks, reference, caches, selection) and the engines.

Front end, one concept per module:

* :mod:`.api`: ``flash_attention`` / ``attention_reference`` on tensors (and the ``Tensor.flash_attention`` method).
* :mod:`.functions`: the autodiff Functions (``FlashAttention``, ``FlashAttentionLSE``, ``FlashDMAAttention``).
* :mod:`.spec`: validation of a call and the ``AttentionSpec`` every engine reads (key source, score modification).
* :mod:`.masks`: the one visibility rule (and packed sequences' and DMA's keep rule), for NumPy, Numba CPU and CUDA.
* :mod:`.mods`, :mod:`.block_mask`: a user's ``mask_mod`` / ``score_mod`` (checks, evaluation) and a ``mask_mod`` as
  tiles (``block_mask_from``); :mod:`.sinks`: learnable sinks' formulas.
* :mod:`.tiling`: ``TileType``, ``TileOrder``, ``TileSchedule``: which tiles exist, their type and order.
* :mod:`.dropout`: the counter-based keep-mask (``dropout_mask``).
* :mod:`.reference`: the float64 NumPy oracle.
* :mod:`.online_softmax`, :mod:`.merge`: the online softmax step by step, and the merge of partial results by lse.
* :mod:`.kv_cache`, :mod:`.ring_buffer`: the ring-buffer KV cache and the seed-compatible module.
* :mod:`.paged`: the paged KV cache and paged attention (keys read through block tables).
* :mod:`.dma`, :mod:`.importance`, :mod:`.selection`: Dynamic Mask Attention.
* :mod:`.engine`: the raw-array contract between the front end and the kernels.

Engines (:mod:`.kernels`): ``simple`` (NumPy), ``cpu`` (Numba CPU), ``cuda`` (Numba CUDA), one per backend,
reached as ``backend.attention``.
"""

from . import kernels  # noqa: F401  (installs the engines on the backends)
from .api import attention_reference, flash_attention  # noqa: F401
from .block_mask import BlockMask, block_mask_from  # noqa: F401
from .dma import flash_dma_attention  # noqa: F401
from .dropout import dropout_mask  # noqa: F401
from .functions import FlashAttention, FlashAttentionLSE, FlashDMAAttention  # noqa: F401
from .kv_cache import DecoderFeedbackBuffer, RingBufferKVCache  # noqa: F401
from .paged import OutOfPagesError, PagedKVCache, paged_attention  # noqa: F401
from .reference import (  # noqa: F401
    attention_probs,
    naive_attention_float32,
    reference_attention,
    reference_attention_backward,
    reference_attention_grads,
    reference_mask,
    reference_paged_attention,
)
from .ring_buffer import BufferState, RingBufferAttention, RingBufferConfig, build_attention, register_attention  # noqa: F401
from .tiling import TileOrder, TileSchedule, TileType, standard_attention_hbm_bytes  # noqa: F401
