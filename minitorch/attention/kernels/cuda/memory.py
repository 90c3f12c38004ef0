"""Device memory of the CUDA engine's calls: scratch buffers reused from call to call, and one host-to-device copy
for a spec's small arrays.

* :func:`scratch`: the arrays a call needs only while it runs (split-K partials, the K-major running ``m, l``,
  backward's ``delta``, a bias gradient before its reduction, the selection's work arrays) come from one flat buffer
  per *role* (``"out_p"``, ``"delta"``, ...), dtype and host thread, kept between calls and grown when a call needs
  more. A repeated decode or training step therefore allocates only what it returns. A scratch array must never be
  returned: the next call of the same thread overwrites it. (Kernels of one thread run in order on the default
  stream, so a call's kernels are done with a buffer before the next call's kernels write it; each thread has its
  own buffers, so calls from two threads never share one.) Buffers larger than :data:`SCRATCH_MAX_BYTES` are not
  kept.
* :func:`to_device_packed`: several small host arrays (positions, tile types, a block table ...) in one copy: their
  bytes side by side in one buffer, each a typed view of its part. A copy to the device waits for the host, so a
  decode step that builds a new spec pays one such wait for its metadata instead of one per array.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Tuple

import numpy as np
from numba import cuda

DeviceArray = Any

SCRATCH_MAX_BYTES = 256 * 1024 * 1024
"""Largest scratch buffer kept between calls (a larger one is allocated for the call and freed with it)."""


class _Buffers(threading.local):
    """Each host thread's scratch buffers: ``(role, dtype) -> flat device array``."""

    def __init__(self) -> None:
        self.flat: Dict[Tuple[str, str], DeviceArray] = {}


_BUFFERS = _Buffers()


def scratch(role: str, shape: Tuple[int, ...], dtype: Any) -> DeviceArray:
    """A device array of ``shape`` and ``dtype`` for values that die with the call (uninitialized): a view of the
    calling thread's buffer for ``role``, reallocated (at least doubled) only when it is too small. Never return
    it, nor keep it past the call."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0 or n * dtype.itemsize > SCRATCH_MAX_BYTES:
        return cuda.device_array(shape, dtype=dtype)
    key = (role, dtype.str)
    buf = _BUFFERS.flat.get(key)
    if buf is None or buf.size < n:
        size = max(n, 1) if buf is None else min(max(n, 2 * buf.size), SCRATCH_MAX_BYTES // dtype.itemsize)
        buf = _BUFFERS.flat[key] = cuda.device_array(size, dtype=dtype)
    return buf[:n].reshape(shape)


def scratch_buffers() -> Dict[Tuple[str, str], DeviceArray]:
    """The calling thread's scratch buffers, ``(role, dtype.str) -> flat device array`` (for tests and inspection)."""
    return dict(_BUFFERS.flat)


def release_scratch() -> None:
    """Drop the calling thread's scratch buffers (their memory is freed once no call uses them)."""
    _BUFFERS.flat.clear()


def to_device_packed(arrays: Dict[str, Tuple[Any, Any]]) -> Dict[str, DeviceArray]:
    """``name -> (host array, dtype)`` as ``name -> device array`` of that dtype and shape, with one host-to-device
    copy for all of them (each part 8-byte aligned in one byte buffer, then viewed with its dtype)."""
    parts = []
    offset = 0
    for name, (a, dtype) in arrays.items():
        a = np.ascontiguousarray(a, dtype=dtype)
        parts.append((name, offset, a))
        offset += -(-a.nbytes // 8) * 8
    packed = np.zeros(max(offset, 8), dtype=np.uint8)
    for _, at, a in parts:
        packed[at:at + a.nbytes] = a.reshape(-1).view(np.uint8)
    dev = cuda.to_device(packed)
    out = {}
    for name, at, a in parts:
        if a.size == 0:
            out[name] = cuda.device_array(a.shape, dtype=a.dtype)
        else:
            out[name] = dev[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
    return out
