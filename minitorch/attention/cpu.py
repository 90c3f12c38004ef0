"""Fused flash attention on the CPU: the FastTensorBackend's attention, as Numba kernels on raw NumPy arrays.

Two functions, as every backend (docs/internals.md)::

    forward(q, k, v, bias, spec) -> (out, lse)
    backward(q, k, v, bias, out, lse, dout, spec) -> (dq, dk, dv, dbias)

Shapes: ``q, out, dout, dq`` are ``(B, H, Nq, D)``; ``k, v, dk, dv`` are ``(B, Hkv, Nk, D)``; ``lse`` is ``(B, H, Nq)``;
``bias, dbias`` are ``(Bb, Hb, Nqb, Nk)`` or ``None``. Query head ``h`` reads kv head ``h // group`` in place.

The algorithm is FlashAttention's (Dao et al. 2022, 2023). The ``Nq x Nk`` score matrix never exists: queries are
cut into ``Tr`` tiles of ``Br`` rows, keys into ``Tc`` tiles of ``Bc`` columns, and every visited ``(i, j)`` tile pair
computes a ``Br x Bc`` score tile ``S_ij``, folds it into an *online softmax* (running row max ``m``, running row sum
``l``) and forgets it. Which tile pairs exist, and whether they need masking, comes from ``spec.tile_types``
(``attention/tiling.py``): ``SKIP`` tiles are never loaded, ``DENSE`` tiles run the inner loop without any mask
test, ``TRIANGLE`` tiles test every element.

* Forward, ``TileOrder.Q_MAJOR`` (FlashAttention-2): one program per (batch, head, query tile) keeps ``O_i, m_i,
  l_i`` in local buffers and streams the key tiles.
* Forward, ``TileOrder.K_MAJOR`` (FlashAttention-1, Algorithm 1): per (batch, head), the outer loop runs over key
  tiles; for every query tile the partial ``O_i, l_i, m_i`` are read from the full output arrays, updated and
  written back.
* Backward (FlashAttention-2): preprocess ``delta = rowsum(dO * O)``; a dK/dV kernel, one program per (batch, kv
  head, key tile), that loops over the query heads of its group and the query tiles; a dQ kernel, one program per
  (batch, head, query tile). ``P`` is recomputed from ``lse``; nothing of size ``Nq x Nk`` is stored.

**Programs and the launcher.** As on a GPU, a kernel is written for one *program* (a thread block, in CUDA words)
and launched over a *grid* of programs. :func:`_launch` runs the grid on ``numba.get_num_threads()`` threads,
worker ``w`` taking programs ``w, w + n, w + 2n, ...`` (interleaved, so that causal grids balance). The kernels are
``numba.njit(nogil=True)`` functions, so the threads really run in parallel. Programs write disjoint memory and
every sum runs in a fixed order, so the split between threads changes nothing: results are bitwise identical from
run to run, with no float atomics and no races. (We launch from Python threads rather than with ``prange``: a
``parallel=True`` wrapper per kernel more than doubled the compile time, 27 of 47 CPU seconds per dtype.)

Style: Triton's fused-attention tutorial. The forward reads top to bottom like the algorithm, and its inner step
is one helper (:func:`_attn_fwd_inner`) called for DENSE and TRIANGLE tiles alike; the backward's tile step
(:func:`_attn_bwd_tile`, recompute ``P_ij`` and ``dS_ij``) is shared by the dK/dV and dQ kernels. Each product of
the algorithm is one small matmul ``C (+)= A @ B`` (:func:`_matmul`), written with explicit SIMD vectors so that a
block of ``C`` stays in registers while the reduction loop runs. float64 inputs run in float64; float32 inputs
accumulate in float32, as FlashAttention does, with a vectorized ``exp``.

Kernels are compiled once per dtype (sizes are runtime arguments, so any head dim and block size reuses them) and
cached on disk (``cache=True``): a second process loads them instead of compiling.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Tuple

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, overload, register_model

from .dropout import build_dropout_hash
from .spec import AttentionSpec
from .tiling import TileOrder, TileType

# Tile types as plain ints (Numba freezes module-level ints into the compiled code).
SKIP = int(TileType.SKIP)
DENSE = int(TileType.DENSE)
TRIANGLE = int(TileType.TRIANGLE)

# Floating-point flags. Reassociation lets LLVM vectorize dot products and row sums; the order it picks is fixed
# at compile time, so results stay bitwise reproducible. We never allow 'nnan'/'ninf': lse = -inf and the masked
# sentinel must behave exactly. Element-wise code (exp's range reduction) must not be reassociated.
_FM_REDUCE = frozenset({"reassoc", "contract", "nsz", "arcp"})
_FM_EXACT = frozenset({"contract", "nsz", "arcp"})


def _helper(fastmath: frozenset = _FM_EXACT, **kw: Any) -> Callable:
    """``numba.njit`` for a device-side helper: cached on disk, no Python entry point."""
    return numba.njit(cache=True, fastmath=set(fastmath), no_cpython_wrapper=True, no_cfunc_wrapper=True, **kw)


def _kernel(fastmath: frozenset = _FM_REDUCE) -> Callable:
    """``numba.njit`` for a grid kernel ``kernel(worker, n_workers, ...)``: cached, and it releases the GIL."""
    return numba.njit(cache=True, nogil=True, fastmath=set(fastmath))


# Bundles of options, passed to the kernels as (typed) named tuples.
Masks = namedtuple("Masks", "q_pos k_pos_b causal window num_sinks")
"""``q_pos (Nq,)``, ``k_pos_b (B, Nk)``: int64 positions (-1 = empty); ``causal``; ``window`` (-1 = none);
``num_sinks``."""
BiasArg = namedtuple("BiasArg", "present head_div")
"""``present``: is there a bias; the bias head of query head ``h`` is ``h // head_div`` (1, group or H)."""
DropoutArg = namedtuple("DropoutArg", "present seed threshold inv_keep")
"""Keep element iff ``dropout_hash(seed, b, h, i, j) >= threshold``; kept probabilities are scaled by ``inv_keep``."""

_dropout_hash = build_dropout_hash(numba.njit(inline="always"))


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------


@intrinsic
def _float32_from_bits(typingctx, bits):  # type: ignore[no-untyped-def]
    """Reinterpret the low 32 bits of an integer as a float32 (C's ``memcpy`` trick): builds ``2**n`` for exp."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(bits), codegen


_EXP_LO = np.float32(-87.33)  # below this, float32 exp underflows: the result is 0
_EXP_HI = np.float32(88.0)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO (Cody-Waite: n * _LN2_HI is exact)
_LN2_LO = np.float32(-2.12194440e-4)


def exp(x):  # type: ignore[no-untyped-def]
    """``exp(x)`` for the kernels: libm for float64; for float32 a branch-free polynomial that LLVM vectorizes.

    The float32 version (Cephes ``expf``, about 1 ulp) writes ``x = n ln2 + r`` with ``|r| <= ln2 / 2``, evaluates
    ``exp(r)`` by a polynomial and multiplies by ``2**n`` built from its bits. It returns exactly 0 below ``-87.33``
    (and for ``-inf``), which is what masked scores need. This Python body serves NumPy callers; compiled code
    gets the overload below.
    """
    return np.exp(x)


@overload(exp, jit_options={"fastmath": set(_FM_EXACT)})
def _exp_overload(x):  # type: ignore[no-untyped-def]
    if isinstance(x, types.Float) and x.bitwidth == 32:

        def exp_float32(x):  # type: ignore[no-untyped-def]
            xc = min(max(x, _EXP_LO), _EXP_HI)
            n = np.floor(xc * _LOG2E + np.float32(0.5))
            r = xc - n * _LN2_HI
            r = r - n * _LN2_LO
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            p = p * r * r + r + np.float32(1.0)
            y = p * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
            return y if x >= _EXP_LO else np.float32(0.0)

        return exp_float32
    return lambda x: np.exp(x)


# A tiny SIMD vocabulary. Triton's ``tl.dot`` or a BLAS call would hide this; here it is in the open. LLVM's
# auto-vectorizer cannot keep a block of C in vector registers across the K loop (it cannot prove that C does not
# alias A or B), so the matmul spells its vectors out: ``Vec`` is one SIMD register of ``vwidth`` lanes (64 bytes
# with AVX-512, else 32), and a few intrinsics load, store, zero, add, fuse-multiply-add, max and exponentiate
# them, or sum / max their lanes.
_VEC_BYTES = 64 if llvm_binding.get_host_cpu_features().get("avx512f", False) else 32


class Vec(types.Type):
    """A SIMD register of ``_VEC_BYTES // itemsize`` lanes of ``dtype`` (an LLVM vector value)."""

    def __init__(self, dtype: types.Type) -> None:
        self.dtype = dtype
        self.lanes = _VEC_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vec{self.lanes}({dtype})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # type: ignore[no-untyped-def]
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(elem, fe_type.lanes))


def _element_pointer(context, builder, aryty, ary, i, j):  # type: ignore[no-untyped-def]
    arr = context.make_array(aryty)(context, builder, ary)
    shape = cgutils.unpack_tuple(builder, arr.shape)
    strides = cgutils.unpack_tuple(builder, arr.strides)
    return cgutils.get_item_pointer2(context, builder, arr.data, shape, strides, aryty.layout, [i, j], wraparound=False)


def vwidth(x):  # type: ignore[no-untyped-def]
    """Lanes of a ``Vec`` of ``x``'s dtype (a compile-time constant in compiled code)."""
    return _VEC_BYTES // np.dtype(x.dtype).itemsize


@overload(vwidth)
def _vwidth_overload(x):  # type: ignore[no-untyped-def]
    lanes = Vec(x.dtype).lanes
    return lambda x: lanes


@intrinsic
def vload(typingctx, ary, i, j):  # type: ignore[no-untyped-def]
    """``ary[i, j:j + lanes]`` as a ``Vec`` (2-D C-contiguous ``ary``; no bounds check)."""
    vt = Vec(ary.dtype)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2])
        vptr = builder.bitcast(ptr, context.get_value_type(vt).as_pointer())
        return builder.load(vptr, align=ary.dtype.bitwidth // 8)

    return vt(ary, i, j), codegen


@intrinsic
def vstore(typingctx, ary, i, j, v):  # type: ignore[no-untyped-def]
    """``ary[i, j:j + lanes] = v``."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ptr = _element_pointer(context, builder, sig.args[0], args[0], args[1], args[2])
        builder.store(args[3], builder.bitcast(ptr, args[3].type.as_pointer()), align=ary.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(ary, i, j, v), codegen


@intrinsic
def vzeros(typingctx, like):  # type: ignore[no-untyped-def]
    """A ``Vec`` of zeros of ``like``'s dtype."""
    vt = Vec(like.dtype)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return ir.Constant(context.get_value_type(vt), None)

    return vt(like), codegen


@intrinsic
def vfma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``c + a * b`` with the scalar ``a`` broadcast to every lane (one fused multiply-add instruction)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        vty = args[2].type
        splat = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count)
        splat = builder.shuffle_vector(splat, ir.Constant(vty, ir.Undefined), mask)
        suffix = f"v{vty.count}f{sig.return_type.dtype.bitwidth}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.{suffix}")
        return builder.call(fma, [splat, args[1], args[2]])

    return c(b.dtype, b, c), codegen


@intrinsic
def vmax(typingctx, a, b):  # type: ignore[no-untyped-def]
    """Lane-wise ``max(a, b)``."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return a(a, b), codegen


def _reduce_lanes(builder, v, combine):  # type: ignore[no-untyped-def]
    """Fold the lanes of ``v`` in a fixed tree order (halves, quarters, ...) and return lane 0."""
    n = v.type.count
    i32 = ir.IntType(32)
    step = n // 2
    while step >= 1:
        mask = ir.Constant(ir.VectorType(i32, n), [(i + step) % n for i in range(n)])
        v = combine(v, builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), mask))
        step //= 2
    return builder.extract_element(v, ir.Constant(i32, 0))


@intrinsic
def vhsum(typingctx, v):  # type: ignore[no-untyped-def]
    """The sum of the lanes of ``v`` (a fixed tree order: deterministic)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return _reduce_lanes(builder, args[0], builder.fadd)

    return v.dtype(v), codegen


@intrinsic
def vhmax(typingctx, v):  # type: ignore[no-untyped-def]
    """The largest lane of ``v``."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return _reduce_lanes(builder, args[0], lambda a, b: builder.select(builder.fcmp_ordered(">", a, b), a, b))

    return v.dtype(v), codegen


@intrinsic
def vadd(typingctx, a, b):  # type: ignore[no-untyped-def]
    """Lane-wise ``a + b``."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def vexp(typingctx, v, shift):  # type: ignore[no-untyped-def]
    """Lane-wise ``exp(v - shift)``: for float32 the polynomial of :func:`exp`, written on vectors; for float64
    LLVM's ``exp`` (one libm call per lane)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        vty = args[0].type
        n, bits = vty.count, sig.return_type.dtype.bitwidth
        i32 = ir.IntType(32)

        def const(x):  # type: ignore[no-untyped-def]
            return ir.Constant(vty, [x] * n)

        def call(name, *xs):  # type: ignore[no-untyped-def]
            fnty = ir.FunctionType(vty, [vty] * len(xs))
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.{name}.v{n}f{bits}")
            return builder.call(fn, list(xs))

        ivec = ir.VectorType(i32, n)
        splat = builder.insert_element(ir.Constant(vty, ir.Undefined), args[1], ir.Constant(i32, 0))
        splat = builder.shuffle_vector(splat, ir.Constant(vty, ir.Undefined), ir.Constant(ivec, [0] * n))
        x = builder.fsub(args[0], splat)
        if bits == 64:
            return call("exp", x)
        lo, hi = const(float(_EXP_LO)), const(float(_EXP_HI))
        xc = builder.select(builder.fcmp_ordered(">", x, lo), x, lo)
        xc = builder.select(builder.fcmp_ordered("<", xc, hi), xc, hi)
        nf = call("floor", call("fma", xc, const(float(_LOG2E)), const(0.5)))
        r = call("fma", nf, const(-float(_LN2_HI)), xc)
        r = call("fma", nf, const(-float(_LN2_LO)), r)
        p = const(1.9875691500e-4)
        for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
            p = call("fma", p, r, const(coef))
        p = builder.fadd(call("fma", p, builder.fmul(r, r), r), const(1.0))
        ni = builder.fptosi(nf, ivec)
        pow2 = builder.shl(builder.add(ni, ir.Constant(ivec, [127] * n)), ir.Constant(ivec, [23] * n))
        y = builder.fmul(p, builder.bitcast(pow2, vty))
        return builder.select(builder.fcmp_ordered(">=", x, lo), y, const(0.0))

    return v(v, v.dtype), codegen


@_helper()
def _matmul(a, b, c, M, N, K, accumulate):  # type: ignore[no-untyped-def]
    """``C[:M, :N] (+)= A[:M, :K] @ B[:K, :N]``: the one small matmul every step of flash attention is made of.

    A block of 4 rows x 2 vectors of C stays in 8 vector registers while the K loop (the reduction, innermost)
    runs: each step loads two vectors of row ``k`` of B and broadcasts one element of A per row, 8 fused
    multiply-adds. ``a`` and ``c`` need ``M`` rounded up to 4 rows, ``b`` and ``c`` ``N`` rounded up to 2 vectors
    of columns: the tile buffers are allocated padded, and padding (anything finite) gives results nobody reads.
    ``b`` and ``c`` are C-contiguous; ``a`` may also be a transposed view (``x.T``, Numba compiles that variant
    separately), which is how the backward multiplies by ``P^T`` and ``dS^T`` without copying them.
    """
    W = vwidth(c)
    for i in range(0, M, 4):
        for j in range(0, N, 2 * W):
            if accumulate:
                c00, c01 = vload(c, i, j), vload(c, i, j + W)
                c10, c11 = vload(c, i + 1, j), vload(c, i + 1, j + W)
                c20, c21 = vload(c, i + 2, j), vload(c, i + 2, j + W)
                c30, c31 = vload(c, i + 3, j), vload(c, i + 3, j + W)
            else:
                c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = vzeros(c)
            for kk in range(K):
                b0, b1 = vload(b, kk, j), vload(b, kk, j + W)
                a0, a1, a2, a3 = a[i, kk], a[i + 1, kk], a[i + 2, kk], a[i + 3, kk]
                c00, c01 = vfma(a0, b0, c00), vfma(a0, b1, c01)
                c10, c11 = vfma(a1, b0, c10), vfma(a1, b1, c11)
                c20, c21 = vfma(a2, b0, c20), vfma(a2, b1, c21)
                c30, c31 = vfma(a3, b0, c30), vfma(a3, b1, c31)
            vstore(c, i, j, c00)
            vstore(c, i, j + W, c01)
            vstore(c, i + 1, j, c10)
            vstore(c, i + 1, j + W, c11)
            vstore(c, i + 2, j, c20)
            vstore(c, i + 2, j + W, c21)
            vstore(c, i + 3, j, c30)
            vstore(c, i + 3, j + W, c31)


@_helper()
def _rows_max(s, nr, nc, m, m_new):  # type: ignore[no-untyped-def]
    """``m_new[i] = max(m[i], max(s[i, :nc]))`` for every row, a vector at a time (LLVM does not vectorize a max
    reduction by itself)."""
    W = vwidth(s)
    nv = nc - nc % W
    for i in range(nr):
        mx = m[i]
        if nv > 0:
            vm = vload(s, i, 0)
            for j in range(W, nv, W):
                vm = vmax(vm, vload(s, i, j))
            x = vhmax(vm)
            mx = x if x > mx else mx
        for j in range(nv, nc):
            x = s[i, j]
            mx = x if x > mx else mx
        m_new[i] = mx


@_helper()
def _exp_rows(s, nr, nc, shift, rowsum):  # type: ignore[no-untyped-def]
    """``s[i, :nc] = exp(s[i, :nc] - shift[i])`` and ``rowsum[i] = sum(s[i, :nc])``: one pass, exp once per score,
    a vector at a time (the lanes of the sum are added in a fixed order)."""
    W = vwidth(s)
    nv = nc - nc % W
    for i in range(nr):
        x0 = shift[i]
        vsum = vzeros(s)
        for j in range(0, nv, W):
            p = vexp(vload(s, i, j), x0)
            vstore(s, i, j, p)
            vsum = vadd(vsum, p)
        acc = vhsum(vsum)
        for j in range(nv, nc):
            p = exp(s[i, j] - x0)
            s[i, j] = p
            acc += p
        rowsum[i] = acc


@_helper()
def _masked_value(x):  # type: ignore[no-untyped-def]
    """The finite sentinel that stands for a masked score, and for 'no key seen yet' in the running max."""
    return x.dtype.type(np.finfo(x.dtype).min)


@_helper()
def _load_rows(src, start, n, dst, scale):  # type: ignore[no-untyped-def]
    """``dst[:n] = scale * src[start:start + n]`` for 2-D ``(rows, D)`` arrays: a tile copied to a local buffer."""
    for r in range(n):
        for d in range(src.shape[1]):
            dst[r, d] = src[start + r, d] * scale


@_helper()
def _load_rows_t(src, start, n, dst):  # type: ignore[no-untyped-def]
    """``dst[:, :n] = src[start:start + n].T``: a transposed ``(D, rows)`` tile, so that a product that reduces
    over rows reads contiguous memory."""
    for r in range(n):
        for d in range(src.shape[1]):
            dst[d, r] = src[start + r, d]


@_helper()
def _mask_and_bias(s, nr, nc, qs, ks, b, masked, masks, bias2, bias_present):  # type: ignore[no-untyped-def]
    """Finish a ``(query, key)`` score tile: ``S += bias``; then, for a TRIANGLE tile, ``S = MASKED`` where the key
    is not visible (the rule of docs/internals.md). ``bias2`` is the bias's ``(Nqb, Nk)`` slab for this (b, h).
    """
    sentinel = _masked_value(s)
    causal, window, num_sinks = masks.causal, masks.window, masks.num_sinks
    for i in range(nr):
        if bias_present:
            brow = qs + i if bias2.shape[0] > 1 else 0
            for j in range(nc):
                s[i, j] += bias2[brow, ks + j]
        if masked:
            qp = masks.q_pos[qs + i]
            for j in range(nc):
                kp = masks.k_pos_b[b, ks + j]
                visible = qp >= 0 and kp >= 0 and (not causal or kp <= qp)
                if visible and window >= 0 and kp >= num_sinks:
                    visible = (qp - kp < window) if causal else (abs(qp - kp) < window)
                if not visible:
                    s[i, j] = sentinel


@_helper()
def _dropout_row(p, i, nc, b, h, qi, ks, drop):  # type: ignore[no-untyped-def]
    """``p[i, :nc] *= keep / (1 - dropout)`` for query row ``qi`` and keys ``ks...``: the mask is re-hashed, never
    stored."""
    zero = p.dtype.type(0)
    for j in range(nc):
        keep = _dropout_hash(drop.seed, b, h, qi, ks + j) >= drop.threshold
        p[i, j] = p[i, j] * drop.inv_keep if keep else zero


@_helper()
def _round_up(n, k):  # type: ignore[no-untyped-def]
    return (n + k - 1) // k * k


# ------------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------------


@_helper(fastmath=_FM_REDUCE)
def _attn_fwd_inner(  # type: ignore[no-untyped-def]
    acc, m, l, qt, kT, vj, s, rows, nr, nc, D, qs, ks, b, h, masked, masks, bias2, bias_present, drop
):
    """One step of the online softmax: fold key tile ``j`` into query tile ``i`` (FA2 Algorithm 1, lines 8-10).

    ``qt (R4, D)``: ``scale * Q_i``; ``kT (D, Bcp)``: ``K_j^T``; ``vj (Bc, Dp)``: ``V_j``; ``s (R4, Bcp)`` and
    ``rows (3, R4)``: scratch. Updated in place: ``acc (R4, Dp)``, the unnormalized ``O_i``; ``m, l (R4,)``, the
    running row max and row sum. ``masked`` is True for a TRIANGLE tile (test every element), False for a DENSE one.
    """
    m_new, alpha, rowsum = rows[0], rows[1], rows[2]
    sentinel = _masked_value(s)
    # S_ij = Q_i K_j^T (scale already folded into Q_i) + bias, masked
    _matmul(qt, kT, s, nr, nc, D, False)
    if masked or bias_present:
        _mask_and_bias(s, nr, nc, qs, ks, b, masked, masks, bias2, bias_present)
    # m_i^new = max(m_i, rowmax(S_ij)); a row that has seen no visible key yet keeps the sentinel, and shifting
    # by +max then makes its P_ij exactly 0 (l_i stays 0, alpha = 1)
    _rows_max(s, nr, nc, m, m_new)
    for i in range(nr):
        alpha[i] = exp(m[i] - m_new[i])
        m[i] = m_new[i]
        if m_new[i] == sentinel:
            m_new[i] = np.finfo(s.dtype).max
    # P_ij = exp(S_ij - m_i^new);  l_i = exp(m_i - m_i^new) l_i + rowsum(P_ij)
    _exp_rows(s, nr, nc, m_new, rowsum)
    for i in range(nr):
        l[i] = alpha[i] * l[i] + rowsum[i]
        # O_i = diag(exp(m_i - m_i^new)) O_i   (the "+ P_ij V_j" follows, as one matmul for the whole tile)
        a = alpha[i]
        for d in range(D):
            acc[i, d] *= a
        # dropout acts on P in the product with V only (l, hence lse, are of the undropped scores)
        if drop.present:
            _dropout_row(s, i, nc, b, h, qs + i, ks, drop)
    # O_i += P_ij V_j
    _matmul(s, vj, acc, nr, D, nc, True)


@_helper()
def _tile_shapes(Br, Bc, D, like):  # type: ignore[no-untyped-def]
    """Padded tile sizes: rows of a matmul's A and C to a multiple of 4, columns of its B and C to 2 vectors."""
    W2 = 2 * vwidth(like)
    return _round_up(Br, 4), _round_up(Bc, 4), _round_up(Bc, W2), _round_up(D, W2)


@_kernel()
def _fwd_q_major(  # type: ignore[no-untyped-def]
    worker, n_workers, q, k, v, bias, out, lse, Br, Bc, tile_types, scale, masks, bias_arg, drop
):
    """Q-major forward, FlashAttention-2 Algorithm 1. Grid: one program per (batch, head, query tile)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    T = q.dtype
    group = H // k.shape[1]
    Tr, Tc = tile_types.shape[1], tile_types.shape[2]
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    # on-chip buffers (allocated once per worker, reused by its programs)
    qt = np.zeros((R4, D), T)
    acc = np.zeros((R4, Dp), T)
    m = np.zeros(R4, T)
    l = np.zeros(R4, T)
    kT = np.zeros((D, Bcp), T)
    vj = np.zeros((Bc, Dp), T)
    s = np.zeros((R4, Bcp), T)
    rows = np.zeros((3, R4), T)
    for prog in range(worker, B * H * Tr, n_workers):
        b, h, tq = prog // (H * Tr), (prog // Tr) % H, prog % Tr
        hk = h // group  # GQA / MQA: the kv head this query head reads, in place
        bias2 = bias[b % bias.shape[0], h // bias_arg.head_div]
        qs = tq * Br
        nr = min(Br, Nq - qs)
        # line 4: load Q_i (scale folded in); O_i = 0, l_i = 0, m_i = -inf (a finite sentinel)
        _load_rows(q[b, h], qs, nr, qt, scale)
        acc[:] = 0
        l[:] = 0
        m[:] = _masked_value(m)
        # line 5: for each key tile j (SKIP tiles are never loaded)
        for tk in range(Tc):
            tile = tile_types[b, tq, tk]
            if tile == SKIP:
                continue
            ks = tk * Bc
            nc = min(Bc, Nk - ks)
            # line 6: load K_j (transposed: S_ij = Q_i K_j^T reads it by rows), V_j
            _load_rows_t(k[b, hk], ks, nc, kT)
            _load_rows(v[b, hk], ks, nc, vj, T.type(1))
            # lines 8-10: S_ij, online softmax, O_i update
            _attn_fwd_inner(acc, m, l, qt, kT, vj, s, rows, nr, nc, D, qs, ks, b, h, tile == TRIANGLE, masks, bias2,
                            bias_arg.present, drop)
        # lines 12-13: O_i = diag(l_i)^-1 O_i, lse_i = m_i + log(l_i); a row that saw no key: O = 0, lse = -inf
        for i in range(nr):
            inv = T.type(1) / l[i] if l[i] > 0 else T.type(0)
            for d in range(D):
                out[b, h, qs + i, d] = acc[i, d] * inv
            lse[b, h, qs + i] = m[i] + np.log(l[i]) if l[i] > 0 else -np.inf


@_kernel()
def _fwd_k_major(  # type: ignore[no-untyped-def]
    worker, n_workers, q, k, v, bias, out, lse, m_hbm, l_hbm, Br, Bc, tile_types, scale, masks, bias_arg, drop
):
    """K-major forward, FlashAttention-1 Algorithm 1. Grid: one program per (batch, head).

    ``out``, ``m_hbm``, ``l_hbm`` play the role of HBM: every visited tile reads ``O_i, l_i, m_i`` from them and
    writes them back. ``lse`` is filled at the end.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    T = q.dtype
    group = H // k.shape[1]
    Tr, Tc = tile_types.shape[1], tile_types.shape[2]
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt = np.zeros((R4, D), T)
    acc = np.zeros((R4, Dp), T)
    m = np.zeros(R4, T)
    l = np.zeros(R4, T)
    kT = np.zeros((D, Bcp), T)
    vj = np.zeros((Bc, Dp), T)
    s = np.zeros((R4, Bcp), T)
    rows = np.zeros((3, R4), T)
    for prog in range(worker, B * H, n_workers):
        b, h = prog // H, prog % H
        hk = h // group
        bias2 = bias[b % bias.shape[0], h // bias_arg.head_div]
        # line 2: O = 0, l = 0, m = -inf (a finite sentinel), in "HBM"
        out[b, h] = 0
        l_hbm[b, h] = 0
        m_hbm[b, h] = _masked_value(m)
        # line 5: outer loop over key tiles j; line 6: load K_j, V_j once
        for tk in range(Tc):
            ks = tk * Bc
            nc = min(Bc, Nk - ks)
            _load_rows_t(k[b, hk], ks, nc, kT)
            _load_rows(v[b, hk], ks, nc, vj, T.type(1))
            # line 7: inner loop over query tiles i
            for tq in range(Tr):
                tile = tile_types[b, tq, tk]
                if tile == SKIP:
                    continue
                qs = tq * Br
                nr = min(Br, Nq - qs)
                # line 8: load Q_i, O_i, l_i, m_i; keep diag(l_i) O_i, the unnormalized output
                _load_rows(q[b, h], qs, nr, qt, scale)
                for i in range(nr):
                    m[i] = m_hbm[b, h, qs + i]
                    l[i] = l_hbm[b, h, qs + i]
                    for d in range(D):
                        acc[i, d] = out[b, h, qs + i, d] * l[i]
                # lines 9-11: S_ij, m_ij, P_ij, l_ij and diag(l_i) e^{m_i - m_new} O_i + e^{m_ij - m_new} P_ij V_j
                _attn_fwd_inner(acc, m, l, qt, kT, vj, s, rows, nr, nc, D, qs, ks, b, h, tile == TRIANGLE, masks,
                                bias2, bias_arg.present, drop)
                # lines 12-13: write O_i = diag(l_i^new)^-1 (...), l_i, m_i back
                for i in range(nr):
                    inv = T.type(1) / l[i] if l[i] > 0 else T.type(0)
                    for d in range(D):
                        out[b, h, qs + i, d] = acc[i, d] * inv
                    m_hbm[b, h, qs + i] = m[i]
                    l_hbm[b, h, qs + i] = l[i]
        for i in range(Nq):
            li = l_hbm[b, h, i]
            lse[b, h, i] = m_hbm[b, h, i] + np.log(li) if li > 0 else -np.inf


# ------------------------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------------------------


@_kernel()
def _bwd_preprocess(worker, n_workers, out, dout, delta):  # type: ignore[no-untyped-def]
    """``delta_i = rowsum(dO_i * O_i)`` (FA2 Algorithm 2, line 4). Grid: one program per (batch, head)."""
    B, H, Nq, D = out.shape
    for prog in range(worker, B * H, n_workers):
        b, h = prog // H, prog % H
        for i in range(Nq):
            acc = out.dtype.type(0)
            for d in range(D):
                acc += dout[b, h, i, d] * out[b, h, i, d]
            delta[b, h, i] = acc


@_helper()
def _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t):  # type: ignore[no-untyped-def]
    """Load ``scale * Q_i``, ``dO_i``, ``lse_i``, ``delta_i`` of a query tile. A row that saw no key (``lse = -inf``)
    gets ``lse = +max`` so that ``exp(S - lse)`` is exactly 0 there."""
    _load_rows(q[b, h], qs, nr, qt, scale)
    _load_rows(dout[b, h], qs, nr, doi, q.dtype.type(1))
    for i in range(nr):
        x = lse[b, h, qs + i]
        lse_t[i] = x if x != -np.inf else np.finfo(lse_t.dtype).max
        delta_t[i] = delta[b, h, qs + i]


@_helper(fastmath=_FM_REDUCE)
def _attn_bwd_tile(  # type: ignore[no-untyped-def]
    qt, doi, kT, vT, lse_t, delta_t, s, dp, scratch, nr, nc, D, qs, ks, b, h, masked, masks, bias2, bias_present, drop
):
    """Recompute one tile of the backward pass (FA2 Algorithm 2, lines 11-13 and 16-17), for both kernels:

    ``s <- P_ij = exp(Q_i K_j^T + bias - lse_i)`` (masked) and ``dp <- dS_ij = P_ij * (dP_ij - delta_i)`` with
    ``dP_ij = (dO_i V_j^T) * Z`` (``Z = keep / (1 - p)`` under dropout, else 1).
    ``qt = scale * Q_i``, ``doi``: ``(R4, >= D)``; ``kT, vT``: ``K_j^T, V_j^T (D, Bcp)``; ``s, dp``: ``(R4, Bcp)``;
    ``scratch (R4,)``.
    """
    # S_ij = Q_i K_j^T (+ bias, masked);  P_ij = exp(S_ij - lse_i)
    _matmul(qt, kT, s, nr, nc, D, False)
    if masked or bias_present:
        _mask_and_bias(s, nr, nc, qs, ks, b, masked, masks, bias2, bias_present)
    _exp_rows(s, nr, nc, lse_t, scratch)  # (the row sums land in scratch, unused)
    # dP_ij = dO_i V_j^T (times Z);  dS_ij = P_ij * (dP_ij - delta_i)
    _matmul(doi, vT, dp, nr, nc, D, False)
    for i in range(nr):
        if drop.present:
            _dropout_row(dp, i, nc, b, h, qs + i, ks, drop)
        for j in range(nc):
            dp[i, j] = s[i, j] * (dp[i, j] - delta_t[i])


@_kernel()
def _bwd_dkdv(  # type: ignore[no-untyped-def]
    worker, n_workers, q, k, v, bias, dout, lse, delta, dk, dv, dbias, Br, Bc, nb, nh, tile_types, scale, masks,
    bias_arg, drop
):
    """dK, dV (and dBias), FA2 Algorithm 2's outer loop over key tiles. Grid: (batch, kv head, key tile).

    A program loops over the ``group`` query heads that read its kv head and over their query tiles, accumulating
    ``dK_j, dV_j`` in local buffers, and adds ``dS_ij`` into ``dbias``. A bias broadcast over the batch (or the heads)
    is shared by several (batch, kv head) pairs: then the caller passes ``nb = 1`` (or ``nh = 1``) and one program
    runs all batch rows (kv heads) of its key tile one after the other, so that it is the only writer of its
    ``dbias`` columns. No races, and every sum in a fixed order.
    """
    B, Hkv = k.shape[0], k.shape[1]
    Nq, D = q.shape[2], q.shape[3]
    Nk = k.shape[2]
    T = q.dtype
    group = q.shape[1] // Hkv
    Tr, Tc = tile_types.shape[1], tile_types.shape[2]
    R4, C4, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    qt = np.zeros((R4, Dp), T)  # scale * Q_i: A of S = Q K^T, and B of dK = dS^T (scale Q)
    doi = np.zeros((R4, Dp), T)  # dO_i: A of dP = dO V^T, and B of dV = P^T dO
    lse_t = np.zeros(R4, T)
    delta_t = np.zeros(R4, T)
    scratch = np.zeros(R4, T)
    kT = np.zeros((D, Bcp), T)
    vT = np.zeros((D, Bcp), T)
    s = np.zeros((R4, Bcp), T)
    dp = np.zeros((R4, Bcp), T)
    dk_acc = np.zeros((C4, Dp), T)
    dv_acc = np.zeros((C4, Dp), T)
    for prog in range(worker, nb * nh * Tc, n_workers):
        pb, ph, tk = prog // (nh * Tc), (prog // Tc) % nh, prog % Tc
        b_lo, b_hi = (pb, pb + 1) if nb == B else (0, B)
        h_lo, h_hi = (ph, ph + 1) if nh == Hkv else (0, Hkv)
        ks = tk * Bc
        nc = min(Bc, Nk - ks)
        for b in range(b_lo, b_hi):
            for hk in range(h_lo, h_hi):
                # load K_j, V_j (transposed, for the products with Q_i and dO_i); dK_j = dV_j = 0
                _load_rows_t(k[b, hk], ks, nc, kT)
                _load_rows_t(v[b, hk], ks, nc, vT)
                dk_acc[:] = 0
                dv_acc[:] = 0
                for h in range(hk * group, (hk + 1) * group):  # the query heads that read kv head hk
                    bias2 = bias[b % bias.shape[0], h // bias_arg.head_div]
                    dbias2 = dbias[b % dbias.shape[0], h // bias_arg.head_div]
                    for tq in range(Tr):
                        tile = tile_types[b, tq, tk]
                        if tile == SKIP:
                            continue
                        qs = tq * Br
                        nr = min(Br, Nq - qs)
                        # load Q_i, dO_i, lse_i, delta_i
                        _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t)
                        # s = P_ij, dp = dS_ij
                        _attn_bwd_tile(qt, doi, kT, vT, lse_t, delta_t, s, dp, scratch, nr, nc, D, qs, ks, b, h,
                                       tile == TRIANGLE, masks, bias2, bias_arg.present, drop)
                        # dBias += dS_ij, summed over the dims the bias was broadcast along, in this fixed order
                        if bias_arg.present:
                            for i in range(nr):
                                brow = qs + i if dbias2.shape[0] > 1 else 0
                                for j in range(nc):
                                    dbias2[brow, ks + j] += dp[i, j]
                        # dV_j += (P_ij * Z)^T dO_i   (``s.T`` is a transposed view: no copy)
                        if drop.present:
                            for i in range(nr):
                                _dropout_row(s, i, nc, b, h, qs + i, ks, drop)
                        _matmul(s.T, doi, dv_acc, nc, D, nr, True)
                        # dK_j += dS_ij^T (scale Q_i)
                        _matmul(dp.T, qt, dk_acc, nc, D, nr, True)
                # write dK_j, dV_j
                for j in range(nc):
                    for d in range(D):
                        dk[b, hk, ks + j, d] = dk_acc[j, d]
                        dv[b, hk, ks + j, d] = dv_acc[j, d]


@_kernel()
def _bwd_dq(  # type: ignore[no-untyped-def]
    worker, n_workers, q, k, v, bias, dout, lse, delta, dq, Br, Bc, tile_types, scale, masks, bias_arg, drop
):
    """dQ, FA2 Algorithm 2's dQ half as its own kernel (no atomics). Grid: (batch, head, query tile)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    T = q.dtype
    group = H // k.shape[1]
    Tr, Tc = tile_types.shape[1], tile_types.shape[2]
    R4, _, Bcp, Dp = _tile_shapes(Br, Bc, D, q)
    one = T.type(1)
    qt = np.zeros((R4, D), T)
    doi = np.zeros((R4, D), T)
    lse_t = np.zeros(R4, T)
    delta_t = np.zeros(R4, T)
    scratch = np.zeros(R4, T)
    kT = np.zeros((D, Bcp), T)
    vT = np.zeros((D, Bcp), T)
    kj = np.zeros((Bc, Dp), T)
    s = np.zeros((R4, Bcp), T)
    dp = np.zeros((R4, Bcp), T)
    dq_acc = np.zeros((R4, Dp), T)
    for prog in range(worker, B * H * Tr, n_workers):
        b, h, tq = prog // (H * Tr), (prog // Tr) % H, prog % Tr
        hk = h // group
        bias2 = bias[b % bias.shape[0], h // bias_arg.head_div]
        qs = tq * Br
        nr = min(Br, Nq - qs)
        # load Q_i, dO_i, lse_i, delta_i; dQ_i = 0
        _load_query_tile(q, dout, lse, delta, b, h, qs, nr, scale, qt, doi, lse_t, delta_t)
        dq_acc[:] = 0
        for tk in range(Tc):
            tile = tile_types[b, tq, tk]
            if tile == SKIP:
                continue
            ks = tk * Bc
            nc = min(Bc, Nk - ks)
            # load K_j, V_j (transposed for the products with Q_i, dO_i) and K_j (for dS_ij K_j)
            _load_rows_t(k[b, hk], ks, nc, kT)
            _load_rows_t(v[b, hk], ks, nc, vT)
            _load_rows(k[b, hk], ks, nc, kj, one)
            # s = P_ij, dp = dS_ij
            _attn_bwd_tile(qt, doi, kT, vT, lse_t, delta_t, s, dp, scratch, nr, nc, D, qs, ks, b, h, tile == TRIANGLE,
                           masks, bias2, bias_arg.present, drop)
            # dQ_i += dS_ij K_j   (times scale, below)
            _matmul(dp, kj, dq_acc, nr, D, nc, True)
        for i in range(nr):
            for d in range(D):
                dq[b, h, qs + i, d] = dq_acc[i, d] * scale


# ------------------------------------------------------------------------------------------------------------------
# The launcher, and the Python entry points (unpack the spec into arrays and scalars, launch the kernels)
# ------------------------------------------------------------------------------------------------------------------

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _launch(kernel: Callable, n_programs: int, *args: Any) -> None:
    """Run ``kernel(worker, n_workers, *args)`` for every worker and wait: a grid launch, as on a GPU.

    ``n_workers = min(numba.get_num_threads(), n_programs)``; the calling thread is worker 0, a small thread pool
    runs the others. Programs write disjoint memory, so how they are shared out cannot change any result.
    """
    global _pool, _pool_size
    n_workers = max(1, min(numba.get_num_threads(), n_programs))
    if n_workers == 1:
        kernel(0, 1, *args)
        return
    with _pool_lock:
        if _pool is None or _pool_size < n_workers - 1:
            _pool_size = max(n_workers - 1, numba.config.NUMBA_NUM_THREADS - 1)
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="minitorch-attention")
        pool = _pool
    futures = [pool.submit(kernel, w, n_workers, *args) for w in range(1, n_workers)]
    try:
        kernel(0, n_workers, *args)
    finally:
        for f in futures:
            f.result()


def _as_input(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous, writeable array of ``dtype`` (no copy when ``x`` already is one)."""
    arr = np.ascontiguousarray(x, dtype=dtype)
    if not arr.flags.writeable:  # a read-only array would compile a second version of every kernel
        arr = arr.copy()
    return arr


def _check_dtype(q: np.ndarray) -> np.dtype:
    dtype = np.dtype(q.dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"flash attention on the CPU needs float32 or float64 arrays, got q of dtype {dtype}")
    return dtype


def _kernel_args(bias: Optional[np.ndarray], spec: AttentionSpec, dtype: np.dtype):  # type: ignore[no-untyped-def]
    """The bias array (a 1x1x1x1 dummy when absent, so that one compiled kernel serves both) and the option tuples."""
    if bias is None:
        bias_arr = np.zeros((1, 1, 1, 1), dtype)
        bias_arg = BiasArg(False, 1)
    else:
        shape = spec.bias_shape if spec.bias_shape is not None else np.shape(bias)
        bias_arr = _as_input(np.reshape(bias, shape), dtype)
        Hb = bias_arr.shape[1]
        head_div = 1 if Hb == spec.H else (spec.group if Hb == spec.Hkv else spec.H)
        bias_arg = BiasArg(True, int(head_div))
    masks = Masks(
        _as_input(spec.q_pos, np.dtype(np.int64)),
        _as_input(spec.k_pos_b, np.dtype(np.int64)),
        bool(spec.causal),
        int(spec.window),
        int(spec.num_sinks),
    )
    inv_keep = dtype.type(1.0 / (1.0 - spec.dropout))
    drop = DropoutArg(spec.dropout > 0, int(spec.seed), np.uint64(spec.drop_threshold), inv_keep)
    tile_types = _as_input(spec.tile_types, np.dtype(np.int8))
    return bias_arr, bias_arg, masks, drop, tile_types


def forward(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, bias: Optional[np.ndarray], spec: AttentionSpec
) -> Tuple[np.ndarray, np.ndarray]:
    """Flash attention forward: ``out (B, H, Nq, D)`` and ``lse (B, H, Nq)`` (natural log, ``-inf`` for empty rows).

    ``spec.order`` picks the Q-major (FlashAttention-2) or K-major (FlashAttention-1) loop order.
    """
    dtype = _check_dtype(q)
    q, k, v = (_as_input(x, dtype) for x in (q, k, v))
    bias_arr, bias_arg, masks, drop, tile_types = _kernel_args(bias, spec, dtype)
    B, H, Nq, D = q.shape
    out = np.empty((B, H, Nq, D), dtype)
    lse = np.empty((B, H, Nq), dtype)
    scale = dtype.type(spec.scale)
    Tr = tile_types.shape[1]
    if TileOrder(spec.order) == TileOrder.K_MAJOR:
        m_hbm = np.empty((B, H, Nq), dtype)
        l_hbm = np.empty((B, H, Nq), dtype)
        _launch(_fwd_k_major, B * H, q, k, v, bias_arr, out, lse, m_hbm, l_hbm, spec.block_q, spec.block_k,
                tile_types, scale, masks, bias_arg, drop)
    else:
        _launch(_fwd_q_major, B * H * Tr, q, k, v, bias_arr, out, lse, spec.block_q, spec.block_k, tile_types, scale,
                masks, bias_arg, drop)
    return out, lse


def backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    bias: Optional[np.ndarray],
    out: np.ndarray,
    lse: np.ndarray,
    dout: np.ndarray,
    spec: AttentionSpec,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Flash attention backward: ``(dq, dk, dv, dbias)``; ``dbias`` has the bias's shape (``None`` without a bias)."""
    dtype = _check_dtype(q)
    q, k, v, out, dout, lse = (_as_input(x, dtype) for x in (q, k, v, out, dout, lse))
    bias_arr, bias_arg, masks, drop, tile_types = _kernel_args(bias, spec, dtype)
    B, H, Nq, D = q.shape
    Hkv = k.shape[1]
    Tr, Tc = tile_types.shape[1], tile_types.shape[2]
    scale = dtype.type(spec.scale)
    # preprocess: delta = rowsum(dO * O)
    delta = np.empty((B, H, Nq), dtype)
    _launch(_bwd_preprocess, B * H, out, dout, delta)
    # dK, dV (and dBias). A bias shared across batch rows / heads makes one program own all of them (see _bwd_dkdv).
    dq = np.empty_like(q)
    dk = np.empty_like(k)
    dv = np.empty_like(v)
    dbias_arr = np.zeros(bias_arr.shape, dtype)
    nb = 1 if (bias_arg.present and bias_arr.shape[0] == 1) else B
    nh = 1 if (bias_arg.present and bias_arr.shape[1] == 1) else Hkv
    _launch(_bwd_dkdv, nb * nh * Tc, q, k, v, bias_arr, dout, lse, delta, dk, dv, dbias_arr, spec.block_q,
            spec.block_k, nb, nh, tile_types, scale, masks, bias_arg, drop)
    # dQ
    _launch(_bwd_dq, B * H * Tr, q, k, v, bias_arr, dout, lse, delta, dq, spec.block_q, spec.block_k, tile_types,
            scale, masks, bias_arg, drop)
    dbias = None if bias is None else dbias_arr.reshape(np.shape(bias))
    return dq, dk, dv, dbias
