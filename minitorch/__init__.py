"""minitorch: an educational autodiff framework with fused flash attention in Numba (CPU and CUDA).

The course modules (operators, scalars, tensors, backends, nn) keep the MiniTorch names; attention lives in
:mod:`minitorch.attention` (front end, and its engines in ``minitorch.attention.kernels``). The public API:
``docs/api.md``.
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
from .attention import (  # noqa: F401
    BufferState,
    DecoderFeedbackBuffer,
    FlashAttention,
    FlashDMAAttention,
    PagedKVCache,
    RingBufferAttention,
    RingBufferConfig,
    RingBufferKVCache,
    TileOrder,
    TileSchedule,
    TileType,
    attention_reference,
    flash_attention,
    flash_dma_attention,
)
