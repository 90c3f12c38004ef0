"""minitorch: an educational autodiff framework with fused flash attention in Numba (CPU and CUDA).

The course modules (operators, scalars, tensors, backends, nn) keep the MiniTorch names; attention lives in
:mod:`minitorch.attention` and :mod:`minitorch.cuda_kernels`. The public API: ``docs/api.md``.
"""

from . import operators  # noqa: F401
from .autodiff import Context, Variable, backpropagate, central_difference, topological_sort  # noqa: F401
from .datasets import datasets  # noqa: F401
from .module import Module, Parameter  # noqa: F401
from .optim import SGD, Adam, Optimizer  # noqa: F401
from .scalar import Scalar, ScalarHistory, derivative_check  # noqa: F401
from .scalar_functions import ScalarFunction  # noqa: F401
from .tensor_data import (  # noqa: F401
    IndexingError,
    Shape,
    Storage,
    Strides,
    TensorData,
    UserIndex,
    UserShape,
    UserStrides,
    broadcast_index,
    index_to_position,
    prod,
    shape_broadcast,
    strides_from_shape,
    to_index,
)
from .tensor import Tensor  # noqa: F401
from .tensor_ops import SimpleBackend, SimpleOps, TensorBackend, TensorOps  # noqa: F401
from .tensor_functions import (  # noqa: F401
    FlashAttention,
    Function,
    from_numpy,
    grad_central_difference,
    grad_check,
    ones,
    rand,
    tensor,
    zeros,
)
from .testing import MathTest, MathTestVariable  # noqa: F401
from .fast_ops import FastOps, FastTensorBackend  # noqa: F401
from .cuda_ops import CudaBackend, CudaOps, mm_practice, sum_practice  # noqa: F401
from .fast_conv import Conv1dFun, Conv2dFun, conv1d, conv2d  # noqa: F401
from .nn import argmax, avgpool2d, dropout, logsoftmax, max, maxpool2d, softmax, tile  # noqa: F401
from .attention.tiling import TileOrder, TileSchedule, TileType  # noqa: F401
from .attention.flash import attention_reference, flash_attention  # noqa: F401
from .attention.kv_cache import DecoderFeedbackBuffer, RingBufferKVCache  # noqa: F401
from .attention.ring_buffer import BufferState, RingBufferAttention, RingBufferConfig  # noqa: F401
from .attention.dma import FlashDMAAttention, flash_dma_attention  # noqa: F401
