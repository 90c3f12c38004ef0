"""Counter-based attention dropout: the keep-mask is a pure function of ``(seed, b, h, i, j)``.

Flash attention cannot store an ``(Nq, Nk)`` dropout mask, so it regenerates it: forward and backward, CPU and
GPU, all compute the same 32-bit hash of the element's coordinates and keep the element iff the hash is at least
``drop_threshold(p) = floor(p * 2**32)``.

The hash is a chain of ``lowbias32`` mixers (Chris Wellons' integer hash). Everything is done in uint64 and masked
to 32 bits, with every constant typed, because Numba promotes ``uint64 op int64`` to float64. The same
Python function therefore compiles with ``numba.njit``, with ``numba.cuda.jit(device=True)``, and runs
elementwise on NumPy ``uint64`` arrays, so :func:`dropout_mask` is bit-identical to what the kernels use.
"""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
_C1 = np.uint64(0x7FEB352D)
_C2 = np.uint64(0x846CA68B)
_GOLDEN = np.uint64(0x9E3779B9)
_S16 = np.uint64(16)
_S15 = np.uint64(15)
_S32 = np.uint64(32)


def _mix32(x):  # type: ignore[no-untyped-def]
    """lowbias32: a 32-bit integer mixer with good avalanche (x holds a value < 2**32 as uint64)."""
    x = x ^ (x >> _S16)
    x = (x * _C1) & _M32
    x = x ^ (x >> _S15)
    x = (x * _C2) & _M32
    x = x ^ (x >> _S16)
    return x


def build_dropout_hash(jit: Callable[[Callable], Callable] = lambda f: f) -> Callable:
    """Return ``dropout_hash(seed, b, h, i, j) -> uint32-valued uint64`` compiled with ``jit`` (``seed``: 64 bits).

    ``jit`` is ``numba.njit(inline="always")`` for the CPU kernels, ``numba.cuda.jit(device=True)`` for the CUDA
    kernels, and the identity for NumPy (then the arguments may be ``uint64`` arrays). Every version computes
    the same bits.
    """
    mix = jit(_mix32)

    def dropout_hash(seed, b, h, i, j):  # type: ignore[no-untyped-def]
        x = mix((np.uint64(seed) & _M32) ^ _GOLDEN)
        x = mix(x ^ (np.uint64(seed) >> _S32))  # all 64 bits of the seed count
        x = mix(x ^ (np.uint64(b) & _M32))
        x = mix(x ^ (np.uint64(h) & _M32))
        x = mix(x ^ (np.uint64(i) & _M32))
        x = mix(x ^ (np.uint64(j) & _M32))
        return x

    return jit(dropout_hash)


dropout_hash = build_dropout_hash()
"""NumPy / Python version of the hash (elementwise on uint64 arrays)."""


def drop_threshold(p: float) -> int:
    """Elements whose hash is ``>= drop_threshold(p)`` are kept: probability ``1 - p``."""
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return int(np.floor(p * 2.0**32))


def dropout_mask(seed: int, shape: Tuple[int, int, int, int], p: float) -> np.ndarray:
    """The boolean keep-mask of shape ``(B, H, Nq, Nk)`` that the attention kernels use for ``(seed, p)``.

    ``True`` means kept. For tests and the reference only: it is ``O(B H Nq Nk)`` memory.
    """
    B, H, Nq, Nk = shape
    b, h, i, j = np.meshgrid(
        np.arange(B, dtype=np.uint64),
        np.arange(H, dtype=np.uint64),
        np.arange(Nq, dtype=np.uint64),
        np.arange(Nk, dtype=np.uint64),
        indexing="ij",
    )
    with np.errstate(over="ignore"):
        hashed = dropout_hash(np.uint64(seed), b, h, i, j)
    return hashed >= np.uint64(drop_threshold(p))
