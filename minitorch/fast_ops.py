"""Numba CPU backend: `FastOps` and `FastTensorBackend` (MiniTorch module 3).

The same four higher-order ops as `SimpleOps` (``map``, ``zip``, ``reduce``, ``matrix_multiply``), compiled with
``numba.njit(parallel=True)`` and run with ``prange`` over chunks of output elements.

How the elementwise kernels walk a strided tensor (no index buffer per element):

* **Fast path.** When the output and every input have the same shape and the same row-major strides, element ``i``
  lives at storage position ``i`` in all of them: the kernel is one contiguous loop (which LLVM vectorizes).
* **Strided path.** Output elements are cut into chunks of `CHUNK` ordinals, one ``prange`` iteration each. A chunk
  allocates its one index buffer, finds its first index with `to_index` and its first positions with
  `index_to_position`, then steps through the chunk like an odometer: `_next_index` increments the index and
  returns the outermost dim ``d`` that changed, and every position moves by a precomputed ``delta[d]``
  (`_carry_deltas`). Broadcasting is folded into the strides: an input's strides, aligned to the output's dims,
  are 0 along broadcast dims (`_broadcast_strides`), which is exactly what `broadcast_index` computes per index.
* **Reduce** walks the *output* that way and runs the reduced dim as an inner loop with a fixed step (a plain
  contiguous loop when the step is 1), without index functions in the inner loop. When the reduced dim is not
  contiguous but the last dim is (``sum(0)`` of a row-major matrix), it instead adds whole rows of the input into a
  block of the output, so that every loop reads contiguous memory.
* **Matmul** packs its operands so that the rows of ``A`` and the columns of ``B`` are contiguous (a copy only when
  they are not already), then computes 4x4 blocks of the output with 16 dot products that share their loads
  (each dot product: one multiply-add per step), over cache tiles of 64x64 outputs.

Every kernel is compiled twice from the same source: with threads, and without (``prange`` then runs as ``range``).
Ops on fewer than `PARALLEL_MIN_SIZE` elements (matmuls under `MM_PARALLEL_MIN_WORK` multiply-adds) run the serial
build, because waking the thread pool costs more than such an op (tens of microseconds on an idle machine,
milliseconds on an oversubscribed one).

The scalar function given to ``map``/``zip``/``reduce`` (from `operators.py`) is compiled into the kernel: LLVM
inlines it, as it does the small ``njit`` helpers below (Numba's IR-level ``inline="always"`` gave the same run time
at twice the compile time, and a pedantic-IR warning for ``relu``). Kernels are built once per scalar function
(`FastOps.map` etc. keep them in a dict) and compiled once per dtype: float32 and float64 storages both work and
results keep the dtype.

Disk cache: Numba's ``cache=True`` keys a closure by the pickled contents of its cells. A cell holding a Numba
dispatcher pickles differently in every process (a random uuid), so the cache would never hit and only grow. The
scalar function is therefore made jittable with ``register_jitable`` (which returns the plain, importable
function: it pickles by name) and the closure also holds a *version key*: a hash of the bytecode of the
scalar function and of the index helpers, so that editing `operators.py` or `tensor_data.py` recompiles instead of
reusing a stale kernel.
"""

from __future__ import annotations

import hashlib
import marshal
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, NamedTuple, Optional

import numpy as np
from numba import njit, prange
from numba.extending import register_jitable

from . import tensor_data as _td
from .tensor_data import MAX_DIMS, Shape, Storage, Strides, shape_broadcast
from .tensor_ops import MapProto, TensorBackend, TensorOps

if TYPE_CHECKING:
    from .tensor import Tensor

# Numba's default thread pool on Linux is GNU OpenMP, whose idle threads spin at the end of every parallel region.
# On a machine with more runnable processes than cores (CI runners, shared servers) the spinning threads and the
# threads still working take turns on the cores, and a 2 ms op took 8-10 ms (median; measured on a loaded 2-core
# VM). Sleeping threads cost a few microseconds of wake-up per op instead (small ops run serially anyway, see
# PARALLEL_MIN_SIZE). Only a default: an OMP_WAIT_POLICY set by the user wins, and it has no effect when OpenMP was
# started before this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The index helpers (same source as the Simple and CUDA backends use). Plain ``njit``: LLVM inlines these small
# functions into the kernels anyway, and Numba compiles each helper once instead of once per kernel (IR-level
# ``inline="always"`` doubled the compile time of every kernel for the same run time).
to_index = njit(_td.to_index)
index_to_position = njit(_td.index_to_position)
broadcast_index = njit(_td.broadcast_index)

CHUNK = 2048
"""Output elements per ``prange`` iteration in the strided paths (one index buffer per chunk)."""

REDUCE_BLOCK = 512
"""Reductions over a non-contiguous dim combine blocks of up to this many contiguous outputs at a time."""

PARALLEL_PACK_MIN_SIZE = 1 << 16
"""Operand copies of at least this many elements use threads (parallel matmul build only)."""

MM_TILE_I = 64
MM_TILE_J = 64
"""Matmul cache tiles: one ``prange`` iteration computes a (batch, 64 rows, 64 columns) tile of the output."""

_FASTMATH_REDUCE = {"reassoc", "nsz"}
"""Reassociation lets LLVM vectorize the sum/product over a contiguous row (a different, not worse, rounding)."""
_FASTMATH_MM = {"reassoc", "contract", "nsz"}
"""Reassociation vectorizes the dot products; contraction turns multiply + add into FMA."""


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers shared by the kernels
# ---------------------------------------------------------------------------------------------------------------------


@njit
def _size(shape: Shape) -> int:
    """Number of elements of `shape`."""
    n = 1
    for i in range(len(shape)):
        n *= shape[i]
    return n


@njit
def _same_dense(out_shape: Shape, out_strides: Strides, in_shape: Shape, in_strides: Strides) -> bool:
    """True when both tensors have the same shape and row-major strides: element i is at position i in both."""
    if len(out_shape) != len(in_shape):
        return False
    expected = 1
    for i in range(len(out_shape) - 1, -1, -1):
        if out_shape[i] != in_shape[i]:
            return False
        if out_shape[i] != 1:
            if out_strides[i] != expected or in_strides[i] != expected:
                return False
        expected *= out_shape[i]
    return True


@njit
def _broadcast_strides(out_shape: Shape, in_shape: Shape, in_strides: Strides) -> np.ndarray:
    """The input's strides aligned to the output's dims, 0 along broadcast dims.

    ``index_to_position(index, result) == index_to_position(broadcast_index(index, ...), in_strides)``.
    """
    nd = len(out_shape)
    offset = nd - len(in_shape)
    res = np.zeros(nd, np.int64)
    for i in range(len(in_shape)):
        if in_shape[i] > 1:
            res[i + offset] = in_strides[i]
    return res


@njit
def _carry_deltas(shape: Shape, strides: Any) -> np.ndarray:
    """``delta[d]``: how a position moves when dim ``d`` increments and every dim after it wraps to 0."""
    nd = len(shape)
    res = np.zeros(nd, np.int64)
    back = 0  # sum over e > d of (shape[e] - 1) * strides[e]
    for d in range(nd - 1, -1, -1):
        res[d] = strides[d] - back
        back += (shape[d] - 1) * strides[d]
    return res


@njit
def _next_index(index: np.ndarray, shape: Shape) -> int:
    """Advance `index` to the next row-major index of `shape`; return the outermost dim that changed."""
    d = len(shape) - 1
    index[d] += 1
    while d > 0 and index[d] == shape[d]:
        index[d] = 0
        d -= 1
        index[d] += 1
    return d


def _code_key(*fns: Callable) -> str:
    """A hash of the bytecode (and constants, names, line numbers) of `fns`: changes when their source changes."""
    h = hashlib.sha1()
    for f in fns:
        code = getattr(f, "__code__", None)
        h.update(marshal.dumps(code) if code is not None else repr(f).encode())
    return h.hexdigest()


_HELPERS_KEY = _code_key(_td.to_index, _td.index_to_position, _td.broadcast_index)


def _variant_key(fn: Optional[Callable], parallel: bool) -> str:
    """The closure cell that keys Numba's disk cache: the scalar function's code, the index helpers' code, and the
    variant (Numba's cache key has no compiler flags: a serial and a parallel build of the same closure would
    otherwise load each other's machine code)."""
    return (_code_key(fn) if fn is not None else "") + _HELPERS_KEY + ("-parallel" if parallel else "-serial")


_JITABLE: Dict[Callable, Callable] = {}


def _jitable(fn: Callable) -> Callable:
    """`fn`, callable from jitted code (registered once per function)."""
    if hasattr(fn, "py_func"):  # already a Numba dispatcher: use the Python function behind it
        fn = fn.py_func
    if fn not in _JITABLE:
        _JITABLE[fn] = register_jitable(fn)
    return _JITABLE[fn]


# ---------------------------------------------------------------------------------------------------------------------
# Low-level kernels (course signatures: storage, shape, strides for out and each input)
# ---------------------------------------------------------------------------------------------------------------------


def tensor_map(fn: Callable[[float], float], parallel: bool = True) -> Callable[..., None]:
    """Compiled ``out[i] = fn(in[broadcast(i)])`` over every index ``i`` of the output shape.

    With ``parallel=False`` the same code is compiled without threads (``prange`` runs as ``range``).

    Returns:
        ``_map(out, out_shape, out_strides, in_storage, in_shape, in_strides) -> None``.
    """
    f = _jitable(fn)
    version = _variant_key(fn, parallel)

    def _map(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        in_storage: Storage,
        in_shape: Shape,
        in_strides: Strides,
    ) -> None:
        version  # noqa: B018 - a closure cell, so that it is part of Numba's cache key
        # BEGIN SOLUTION task3_1: prange over chunks of outputs: a contiguous loop when aligned, else step indices
        size = _size(out_shape)
        n_chunks = (size + CHUNK - 1) // CHUNK
        if _same_dense(out_shape, out_strides, in_shape, in_strides):
            for c in prange(n_chunks):
                lo = c * CHUNK
                hi = min(size, lo + CHUNK)
                o = out[lo:hi]
                x = in_storage[lo:hi]
                for i in range(hi - lo):
                    o[i] = f(x[i])
            return
        in_bstrides = _broadcast_strides(out_shape, in_shape, in_strides)
        out_delta = _carry_deltas(out_shape, out_strides)
        in_delta = _carry_deltas(out_shape, in_bstrides)
        for c in prange(n_chunks):
            lo = c * CHUNK
            hi = min(size, lo + CHUNK)
            index = np.empty(MAX_DIMS, np.int32)
            to_index(lo, out_shape, index)
            o = index_to_position(index, out_strides)
            j = index_to_position(index, in_bstrides)
            for _ in range(lo, hi):
                out[o] = f(in_storage[j])
                d = _next_index(index, out_shape)
                o += out_delta[d]
                j += in_delta[d]
        # END SOLUTION

    return njit(parallel=parallel, cache=True)(_map)


def tensor_zip(fn: Callable[[float, float], float], parallel: bool = True) -> Callable[..., None]:
    """Compiled ``out[i] = fn(a[broadcast(i)], b[broadcast(i)])`` over every index of the output shape.

    Returns:
        ``_zip(out, out_shape, out_strides, a_storage, a_shape, a_strides, b_storage, b_shape, b_strides) -> None``.
    """
    f = _jitable(fn)
    version = _variant_key(fn, parallel)

    def _zip(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        a_storage: Storage,
        a_shape: Shape,
        a_strides: Strides,
        b_storage: Storage,
        b_shape: Shape,
        b_strides: Strides,
    ) -> None:
        version  # noqa: B018 - a closure cell, so that it is part of Numba's cache key
        # BEGIN SOLUTION task3_1: like _map with two broadcast inputs: out[o] = f(a[j], b[k])
        size = _size(out_shape)
        n_chunks = (size + CHUNK - 1) // CHUNK
        if _same_dense(out_shape, out_strides, a_shape, a_strides) and _same_dense(
            out_shape, out_strides, b_shape, b_strides
        ):
            for c in prange(n_chunks):
                lo = c * CHUNK
                hi = min(size, lo + CHUNK)
                o = out[lo:hi]
                x = a_storage[lo:hi]
                y = b_storage[lo:hi]
                for i in range(hi - lo):
                    o[i] = f(x[i], y[i])
            return
        a_bstrides = _broadcast_strides(out_shape, a_shape, a_strides)
        b_bstrides = _broadcast_strides(out_shape, b_shape, b_strides)
        out_delta = _carry_deltas(out_shape, out_strides)
        a_delta = _carry_deltas(out_shape, a_bstrides)
        b_delta = _carry_deltas(out_shape, b_bstrides)
        for c in prange(n_chunks):
            lo = c * CHUNK
            hi = min(size, lo + CHUNK)
            index = np.empty(MAX_DIMS, np.int32)
            to_index(lo, out_shape, index)
            o = index_to_position(index, out_strides)
            j = index_to_position(index, a_bstrides)
            k = index_to_position(index, b_bstrides)
            for _ in range(lo, hi):
                out[o] = f(a_storage[j], b_storage[k])
                d = _next_index(index, out_shape)
                o += out_delta[d]
                j += a_delta[d]
                k += b_delta[d]
        # END SOLUTION

    return njit(parallel=parallel, cache=True)(_zip)


def tensor_reduce(fn: Callable[[float, float], float], parallel: bool = True) -> Callable[..., None]:
    """Compiled reduction of dim `reduce_dim`: ``out[i] = fn(...fn(fn(out[i], a[i, 0]), a[i, 1])..., a[i, n-1])``.

    `out` has a's shape with size 1 in `reduce_dim` and holds the start value on entry.

    Returns:
        ``_reduce(out, out_shape, out_strides, a_storage, a_shape, a_strides, reduce_dim) -> None``.
    """
    f = _jitable(fn)
    version = _variant_key(fn, parallel)

    def _reduce(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        a_storage: Storage,
        a_shape: Shape,
        a_strides: Strides,
        reduce_dim: int,
    ) -> None:
        version  # noqa: B018 - a closure cell, so that it is part of Numba's cache key
        # BEGIN SOLUTION task3_1: prange over outputs; fold f over the reduced dim with its stride, from out[o]
        size = _size(out_shape)
        n = a_shape[reduce_dim]
        step = a_strides[reduce_dim]
        nd = len(out_shape)
        width = out_shape[nd - 1]
        if step != 1 and width >= 8 and out_strides[nd - 1] == 1 and a_strides[nd - 1] == 1:
            # Column path (e.g. sum over dim 0 of a row-major matrix): the last dim is contiguous in a and out, so
            # sweep a's rows and combine them elementwise into a block of out (contiguous, vectorized) instead of
            # walking every output's column with a large step.
            lead_shape = out_shape[: nd - 1]
            n_blocks = (width + REDUCE_BLOCK - 1) // REDUCE_BLOCK
            for t in prange((size // width) * n_blocks):
                row = t // n_blocks
                lo = (t % n_blocks) * REDUCE_BLOCK
                w = min(REDUCE_BLOCK, width - lo)
                index = np.empty(MAX_DIMS, np.int32)
                to_index(row, lead_shape, index)
                o = index_to_position(index, out_strides[: nd - 1]) + lo
                j = index_to_position(index, a_strides[: nd - 1]) + lo
                acc = out[o : o + w]
                for s in range(n):
                    x = a_storage[j + s * step : j + s * step + w]
                    for k in range(w):
                        acc[k] = f(acc[k], x[k])
            return
        # Row path: outputs per chunk, about CHUNK input elements of work each.
        per_chunk = max(1, CHUNK // max(1, n))
        n_chunks = (size + per_chunk - 1) // per_chunk
        # out index has 0 in reduce_dim, so a's strides give the position of the first reduced element.
        out_delta = _carry_deltas(out_shape, out_strides)
        a_delta = _carry_deltas(out_shape, a_strides)
        for c in prange(n_chunks):
            lo = c * per_chunk
            hi = min(size, lo + per_chunk)
            index = np.empty(MAX_DIMS, np.int32)
            to_index(lo, out_shape, index)
            o = index_to_position(index, out_strides)
            j = index_to_position(index, a_strides)
            for _ in range(lo, hi):
                acc = out[o]
                if step == 1:
                    row = a_storage[j : j + n]
                    for s in range(n):
                        acc = f(acc, row[s])
                else:
                    for s in range(n):
                        acc = f(acc, a_storage[j + s * step])
                out[o] = acc
                d = _next_index(index, out_shape)
                o += out_delta[d]
                j += a_delta[d]
        # END SOLUTION

    return njit(parallel=parallel, cache=True, fastmath=_FASTMATH_REDUCE)(_reduce)


@njit(cache=True)
def _pack_rows(
    storage: Storage, n_batch: int, rows: int, cols: int, s_batch: int, s_row: int, s_col: int
) -> np.ndarray:
    """Contiguous copy ``res[(b * rows + r) * cols + c] = storage[b * s_batch + r * s_row + c * s_col]``."""
    res = np.empty(n_batch * rows * cols, storage.dtype)
    for t in range(n_batch * rows):
        src = (t // rows) * s_batch + (t % rows) * s_row
        dst = res[t * cols : (t + 1) * cols]
        for c in range(cols):
            dst[c] = storage[src + c * s_col]
    return res


@njit(parallel=True, cache=True)
def _pack_rows_parallel(
    storage: Storage, n_batch: int, rows: int, cols: int, s_batch: int, s_row: int, s_col: int
) -> np.ndarray:
    """`_pack_rows` with threads over the rows of the copy (the parallel matmul's large operands)."""
    res = np.empty(n_batch * rows * cols, storage.dtype)
    for t in prange(n_batch * rows):
        src = (t // rows) * s_batch + (t % rows) * s_row
        dst = res[t * cols : (t + 1) * cols]
        for c in range(cols):
            dst[c] = storage[src + c * s_col]
    return res


@njit
def _pack(
    storage: Storage, n_batch: int, rows: int, cols: int, s_batch: int, s_row: int, s_col: int, threads: bool
) -> np.ndarray:
    """`_pack_rows`, with threads when asked and the copy is large."""
    if threads and n_batch * rows * cols >= PARALLEL_PACK_MIN_SIZE:
        return _pack_rows_parallel(storage, n_batch, rows, cols, s_batch, s_row, s_col)
    return _pack_rows(storage, n_batch, rows, cols, s_batch, s_row, s_col)


@njit(fastmath=_FASTMATH_MM)
def _dot(a: Storage, a_pos: int, b: Storage, b_pos: int, m: int, zero: Any) -> Any:
    """``sum_k a[a_pos + k] * b[b_pos + k]``: one multiply per step over two contiguous rows."""
    x = a[a_pos : a_pos + m]
    y = b[b_pos : b_pos + m]
    acc = zero
    for k in range(m):
        acc += x[k] * y[k]
    return acc


@njit(fastmath=_FASTMATH_MM)
def _block_4x4(
    out: Storage,
    o_pos: int,
    o_row: int,
    o_col: int,
    a: Storage,
    a_pos: int,
    a_row: int,
    b: Storage,
    b_pos: int,
    b_row: int,
    m: int,
    zero: Any,
) -> None:
    """4 rows of A times 4 columns of B (rows of the packed B^T): 16 dot products sharing their loads."""
    a0 = a[a_pos : a_pos + m]
    a1 = a[a_pos + a_row : a_pos + a_row + m]
    a2 = a[a_pos + 2 * a_row : a_pos + 2 * a_row + m]
    a3 = a[a_pos + 3 * a_row : a_pos + 3 * a_row + m]
    b0 = b[b_pos : b_pos + m]
    b1 = b[b_pos + b_row : b_pos + b_row + m]
    b2 = b[b_pos + 2 * b_row : b_pos + 2 * b_row + m]
    b3 = b[b_pos + 3 * b_row : b_pos + 3 * b_row + m]
    c00 = c01 = c02 = c03 = zero
    c10 = c11 = c12 = c13 = zero
    c20 = c21 = c22 = c23 = zero
    c30 = c31 = c32 = c33 = zero
    for k in range(m):
        y0 = b0[k]
        y1 = b1[k]
        y2 = b2[k]
        y3 = b3[k]
        x = a0[k]
        c00 += x * y0
        c01 += x * y1
        c02 += x * y2
        c03 += x * y3
        x = a1[k]
        c10 += x * y0
        c11 += x * y1
        c12 += x * y2
        c13 += x * y3
        x = a2[k]
        c20 += x * y0
        c21 += x * y1
        c22 += x * y2
        c23 += x * y3
        x = a3[k]
        c30 += x * y0
        c31 += x * y1
        c32 += x * y2
        c33 += x * y3
    o1 = o_pos + o_row
    o2 = o1 + o_row
    o3 = o2 + o_row
    out[o_pos] = c00
    out[o_pos + o_col] = c01
    out[o_pos + 2 * o_col] = c02
    out[o_pos + 3 * o_col] = c03
    out[o1] = c10
    out[o1 + o_col] = c11
    out[o1 + 2 * o_col] = c12
    out[o1 + 3 * o_col] = c13
    out[o2] = c20
    out[o2 + o_col] = c21
    out[o2 + 2 * o_col] = c22
    out[o2 + 3 * o_col] = c23
    out[o3] = c30
    out[o3 + o_col] = c31
    out[o3 + 2 * o_col] = c32
    out[o3 + 3 * o_col] = c33


def _make_matrix_multiply(parallel: bool) -> Callable[..., None]:
    """The batched matmul kernel, with threads over output tiles or (``parallel=False``) without."""
    variant = _variant_key(None, parallel)

    def _tensor_matrix_multiply(
        out: Storage,
        out_shape: Shape,
        out_strides: Strides,
        a_storage: Storage,
        a_shape: Shape,
        a_strides: Strides,
        b_storage: Storage,
        b_shape: Shape,
        b_strides: Strides,
    ) -> None:
        """Batched ``out[n] = a[n] @ b[n]`` for 3-D operands of any strides; a batch size of 1 broadcasts.

        Shapes: a ``(Ba, n, m)``, b ``(Bb, m, p)``, out ``(max(Ba, Bb), n, p)``.
        """
        variant  # noqa: B018 - a closure cell, so that it is part of Numba's cache key
        # BEGIN SOLUTION task3_2: prange over (batch, row, column) work; out[n, i, j] = dot(row i of a, column j of b)
        n_batch = out_shape[0]
        n = out_shape[1]
        p = out_shape[2]
        m = a_shape[2]
        zero = out.dtype.type(0)

        # A with contiguous rows: (batch stride, row stride); a copy only when the k-stride is not 1.
        if a_strides[2] == 1 or m == 1:
            a = a_storage
            a_batch = a_strides[0] if a_shape[0] > 1 else 0
            a_row = a_strides[1]
        else:
            a = _pack(a_storage, a_shape[0], n, m, a_strides[0], a_strides[1], a_strides[2], parallel)
            a_batch = n * m if a_shape[0] > 1 else 0
            a_row = m
        # B^T with contiguous rows (the columns of B): free when b is itself a transposed view.
        if b_strides[1] == 1 or m == 1:
            bt = b_storage
            b_batch = b_strides[0] if b_shape[0] > 1 else 0
            b_row = b_strides[2]
        else:
            bt = _pack(b_storage, b_shape[0], p, m, b_strides[0], b_strides[2], b_strides[1], parallel)
            b_batch = p * m if b_shape[0] > 1 else 0
            b_row = m

        o_batch = out_strides[0]
        o_row = out_strides[1]
        o_col = out_strides[2]
        n_ti = (n + MM_TILE_I - 1) // MM_TILE_I
        n_tj = (p + MM_TILE_J - 1) // MM_TILE_J
        for t in prange(n_batch * n_ti * n_tj):
            bi = t // (n_ti * n_tj)
            rem = t % (n_ti * n_tj)
            i_lo = (rem // n_tj) * MM_TILE_I
            j_lo = (rem % n_tj) * MM_TILE_J
            i_hi = min(n, i_lo + MM_TILE_I)
            j_hi = min(p, j_lo + MM_TILE_J)
            a_base = bi * a_batch
            b_base = bi * b_batch
            o_base = bi * o_batch
            i = i_lo
            while i + 4 <= i_hi:
                j = j_lo
                while j + 4 <= j_hi:
                    _block_4x4(
                        out, o_base + i * o_row + j * o_col, o_row, o_col,
                        a, a_base + i * a_row, a_row,
                        bt, b_base + j * b_row, b_row,
                        m, zero,
                    )  # fmt: skip
                    j += 4
                for jj in range(j, j_hi):  # right edge
                    for ii in range(i, i + 4):
                        out[o_base + ii * o_row + jj * o_col] = _dot(
                            a, a_base + ii * a_row, bt, b_base + jj * b_row, m, zero
                        )
                i += 4
            for ii in range(i, i_hi):  # bottom edge
                for jj in range(j_lo, j_hi):
                    out[o_base + ii * o_row + jj * o_col] = _dot(
                        a, a_base + ii * a_row, bt, b_base + jj * b_row, m, zero
                    )
        # END SOLUTION

    return njit(parallel=parallel, cache=True, fastmath=_FASTMATH_MM)(_tensor_matrix_multiply)


tensor_matrix_multiply = _make_matrix_multiply(True)
"""``tensor_matrix_multiply(out, out_shape, out_strides, a_storage, a_shape, a_strides, b_storage, b_shape,
b_strides)``: batched ``a @ b`` for 3-D operands of any strides (parallel over output tiles)."""
_tensor_matrix_multiply_serial = _make_matrix_multiply(False)


# ---------------------------------------------------------------------------------------------------------------------
# FastOps: the Tensor-level ops
# ---------------------------------------------------------------------------------------------------------------------

PARALLEL_MIN_SIZE = 32768
"""Elementwise ops and reductions over fewer input elements run the serial build of the kernel: waking threads
costs more than the work (the same grain size as PyTorch's ``at::internal::GRAIN_SIZE``)."""
MM_PARALLEL_MIN_WORK = 1 << 18
"""Matmuls with fewer multiply-adds (``batch * n * m * p``, e.g. below 64x64x64) run serially."""


class _Variants(NamedTuple):
    parallel: Callable[..., None]
    serial: Callable[..., None]

    def pick(self, work: int) -> Callable[..., None]:
        return self.parallel if work >= PARALLEL_MIN_SIZE else self.serial


_MAP_KERNELS: Dict[Callable, _Variants] = {}
_ZIP_KERNELS: Dict[Callable, _Variants] = {}
_REDUCE_KERNELS: Dict[Callable, _Variants] = {}


def _kernels(cache: Dict[Callable, _Variants], factory: Callable, fn: Callable) -> _Variants:
    """The kernels (parallel and serial) of scalar function `fn`, built once per process; Numba compiles each on
    its first call per dtype (or loads it from the disk cache)."""
    kernels = cache.get(fn)
    if kernels is None:
        kernels = cache[fn] = _Variants(factory(fn, parallel=True), factory(fn, parallel=False))
    return kernels


class FastOps(TensorOps):
    """Parallel Numba CPU backend. Storage is a 1-D NumPy array (float32 or float64), as for `SimpleOps`; the
    storage hooks (`to_storage`, `zeros_storage`, `storage_to_numpy`) are `TensorOps`' NumPy defaults."""

    cuda = False

    @staticmethod
    def map(fn: Callable[[float], float]) -> MapProto:
        """Elementwise `fn`; with ``out`` given, `a` is broadcast to out's shape.

        Returns:
            ``(a: Tensor[shape], out: Tensor[broadcast shape] | None) -> Tensor`` with a's dtype.
        """
        kernels = _kernels(_MAP_KERNELS, tensor_map, fn)

        def ret(a: "Tensor", out: Optional["Tensor"] = None) -> "Tensor":
            if out is None:
                out = a.zeros(a.shape)
            kernels.pick(out.size)(*out.tuple(), *a.tuple())
            return out

        return ret

    @staticmethod
    def zip(fn: Callable[[float, float], float]) -> Callable[["Tensor", "Tensor"], "Tensor"]:
        """Elementwise `fn` of two tensors broadcast to a common shape; the result has a's dtype."""
        kernels = _kernels(_ZIP_KERNELS, tensor_zip, fn)

        def ret(a: "Tensor", b: "Tensor") -> "Tensor":
            out = a.zeros() if a.shape == b.shape else a.zeros(shape_broadcast(a.shape, b.shape))
            kernels.pick(out.size)(*out.tuple(), *a.tuple(), *b.tuple())
            return out

        return ret

    @staticmethod
    def reduce(
        fn: Callable[[float, float], float], start: float = 0.0
    ) -> Callable[["Tensor", int], "Tensor"]:
        """Reduce dim `dim` with `fn` starting from `start`; the result has size 1 in that dim."""
        kernels = _kernels(_REDUCE_KERNELS, tensor_reduce, fn)

        def ret(a: "Tensor", dim: int) -> "Tensor":
            out_shape = list(a.shape)
            out_shape[dim] = 1
            out = a.zeros(tuple(out_shape))
            if start != 0.0:  # (zeros already)
                out._tensor._storage[:] = start
            # One output element: nothing to share between threads.
            kernel = kernels.pick(a.size) if out.size > 1 else kernels.serial
            kernel(*out.tuple(), *a.tuple(), int(dim))
            return out

        return ret

    @staticmethod
    def matrix_multiply(a: "Tensor", b: "Tensor") -> "Tensor":
        """``(Ba, n, m) @ (Bb, m, p) -> (max(Ba, Bb), n, p)``, a batch size of 1 broadcasting; a's dtype."""
        batch = max(a.shape[0], b.shape[0])
        out = a.zeros((batch, a.shape[1], b.shape[2]))
        work = out.size * a.shape[2]
        kernel = tensor_matrix_multiply if work >= MM_PARALLEL_MIN_WORK else _tensor_matrix_multiply_serial
        kernel(*out.tuple(), *a.tuple(), *b.tuple())
        return out


FastTensorBackend = TensorBackend(FastOps)

__all__ = [
    "FastOps",
    "FastTensorBackend",
    "tensor_map",
    "tensor_zip",
    "tensor_reduce",
    "tensor_matrix_multiply",
    "to_index",
    "index_to_position",
    "broadcast_index",
]
