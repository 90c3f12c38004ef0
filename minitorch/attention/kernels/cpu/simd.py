"""The CPU kernels' SIMD vocabulary: a vector register type, a vectorized ``exp``, and the tile matmul.

Triton's ``tl.dot`` or a BLAS call would hide this; here it is in the open. LLVM's auto-vectorizer cannot keep a
block of C in vector registers across the K loop of a matmul (it cannot prove that C does not alias A or B), so
:func:`matmul` spells its vectors out: ``Vec`` is one SIMD register of ``vwidth`` lanes (64 bytes with AVX-512,
else 32), and a few intrinsics load, store, zero, add, fuse-multiply-add, max and exponentiate them, or sum / max
their lanes. Every helper here works on tiles of a few dozen rows held in small local buffers.

NaN and Inf: nothing here drops them. ``exp`` of NaN is NaN (so a NaN score poisons its row, as in PyTorch);
``exp(-inf)`` and ``exp`` of anything below ``-87.33`` (float32) is exactly 0 (so a masked score costs nothing).
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, overload, register_model

from .launch import FM_EXACT, helper

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
    (and for ``-inf``), which is what masked scores need, and NaN for NaN. This Python body serves NumPy callers;
    compiled code gets the overload below.
    """
    return np.exp(x)


@overload(exp, jit_options={"fastmath": set(FM_EXACT)})
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
            if x != x:  # NaN stays NaN (the clamps above would turn it into a number)
                return x
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
def vfma_vec(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``c + a * b`` lane by lane (three vectors; one fused multiply-add instruction)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        vty = args[2].type
        suffix = f"v{vty.count}f{sig.return_type.dtype.bitwidth}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.{suffix}")
        return builder.call(fma, [args[0], args[1], args[2]])

    return c(a, b, c), codegen


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
        y = builder.select(builder.fcmp_ordered(">=", x, lo), y, const(0.0))
        return builder.select(builder.fcmp_unordered("uno", x, x), x, y)  # NaN lanes stay NaN

    return v(v, v.dtype), codegen


@helper()
def matmul(a, b, c, M, N, K, accumulate):  # type: ignore[no-untyped-def]
    """``C[:M, :N] (+)= A[:M, :K] @ B[:K, :N]``: the one small matmul every step of flash attention is made of.

    A block of 4 rows x 2 vectors of C stays in 8 vector registers while the K loop (the reduction, innermost)
    runs: each step loads two vectors of row ``k`` of B and broadcasts one element of A per row, 8 fused
    multiply-adds. ``a`` and ``c`` need ``M`` rounded up to 4 rows, ``b`` and ``c`` ``N`` rounded up to 2 vectors
    of columns: the tile buffers are allocated padded, and padding (anything finite) gives results nobody reads.
    ``b`` and ``c`` are C-contiguous; ``a`` may also be a transposed view (``x.T``, Numba compiles that variant
    separately), which is how the backward multiplies by ``P^T`` and ``dS^T`` without copying them.
    """
    W = vwidth(c)
    if N <= W:  # one vector of columns (a small head dim): 4 rows, K split in two chains (8 registers in flight)
        _matmul_narrow(a, b, c, M, K, accumulate)
        return
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


@helper()
def _matmul_narrow(a, b, c, M, K, accumulate):  # type: ignore[no-untyped-def]
    """:func:`matmul` for ``N <= lanes``: only the first vector of columns is computed (a head dim of 16 in
    float32 with AVX-512 would otherwise pay for 32 columns). Even and odd ``k`` accumulate in separate registers,
    added at the end (a fixed order), so that 8 multiply-adds are in flight as in the wide case."""
    for i in range(0, M, 4):
        e0 = e1 = e2 = e3 = o0 = o1 = o2 = o3 = vzeros(c)
        for kk in range(0, K - 1, 2):
            b0, b1 = vload(b, kk, 0), vload(b, kk + 1, 0)
            e0, o0 = vfma(a[i, kk], b0, e0), vfma(a[i, kk + 1], b1, o0)
            e1, o1 = vfma(a[i + 1, kk], b0, e1), vfma(a[i + 1, kk + 1], b1, o1)
            e2, o2 = vfma(a[i + 2, kk], b0, e2), vfma(a[i + 2, kk + 1], b1, o2)
            e3, o3 = vfma(a[i + 3, kk], b0, e3), vfma(a[i + 3, kk + 1], b1, o3)
        if K % 2 == 1:
            kk = K - 1
            b0 = vload(b, kk, 0)
            e0, e1 = vfma(a[i, kk], b0, e0), vfma(a[i + 1, kk], b0, e1)
            e2, e3 = vfma(a[i + 2, kk], b0, e2), vfma(a[i + 3, kk], b0, e3)
        e0, e1, e2, e3 = vadd(e0, o0), vadd(e1, o1), vadd(e2, o2), vadd(e3, o3)
        if accumulate:
            e0, e1 = vadd(vload(c, i, 0), e0), vadd(vload(c, i + 1, 0), e1)
            e2, e3 = vadd(vload(c, i + 2, 0), e2), vadd(vload(c, i + 3, 0), e3)
        vstore(c, i, 0, e0)
        vstore(c, i + 1, 0, e1)
        vstore(c, i + 2, 0, e2)
        vstore(c, i + 3, 0, e3)


@helper()
def rows_max(s, nr, nc, m, m_new):  # type: ignore[no-untyped-def]
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


@helper()
def exp_rows(s, nr, nc, shift, rowsum):  # type: ignore[no-untyped-def]
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


@helper()
def matmul_visible(a, b, c, vis, M, N, K):  # type: ignore[no-untyped-def]
    """``C[:M, :N] += A[:M, :K] @ B[:K, :N]`` leaving out the pairs ``(i, k)`` with ``vis[i, k] == 0``.

    The slow, scalar path of a TRIANGLE tile whose ``B`` holds NaN or Inf: ``A``'s masked entries are 0, but
    ``0 * NaN`` is NaN, and a key (or a query) that a row does not see must never change that row. ``a`` and
    ``vis`` may be transposed views (``x.T``) together.
    """
    for i in range(M):
        for kk in range(K):
            if vis[i, kk] != 0:
                x = a[i, kk]
                for j in range(N):
                    c[i, j] += x * b[kk, j]
