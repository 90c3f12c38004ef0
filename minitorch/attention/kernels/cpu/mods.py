"""A user's ``score_mod`` inside the compiled CPU kernels, without compiling the kernels again.

The kernels are compiled once per dtype and cached on disk (:mod:`.launch`); a ``score_mod`` is a new Python
function in every session. Three ways to bring it into the fused loop, measured here (float32, one thread):

* a kernel factory per function (``score_mod`` inlined): full speed, but the four kernels compile again for every
  function and dtype (~20 s), and a closure cannot be cached on disk;
* a Numba first-class function in the kernels' :class:`~.flash.Config` (a ``cfunc`` typed ``FunctionType``): the
  kernels compile once, but a kernel whose signature holds a function type is never cached on disk (every
  process would compile every kernel), and one indirect call per score costs ~7 ns, twice the fused forward's own
  time per score (~3.4 ns at D = 64);
* what is done here: the function is compiled into a small *row function* (``cfunc``, 0.2-0.4 s) that modifies a
  row of a score tile with the user's function inlined (a loop LLVM vectorizes), and the kernels call it through its
  address, a plain ``int64`` in the Config: the kernels compile once and stay cached, and one indirect call per tile
  row costs little next to the row's work (an ALiBi-like ``score_mod``: forward +10%, backward +7% at N = 1024).

``row(s, d, kp, n, b, h, q_pos, want_grad)`` on C pointers: ``d[c] = score_mod_grad(s[c], b, h, q_pos, kp[c])``
when ``want_grad`` (the backward), then ``s[c] = score_mod(s[c], b, h, q_pos, kp[c])``, for ``c < n``. A function
Numba cannot compile, or one that returns something other than a number, raises a ``TypeError`` naming it.
"""

from __future__ import annotations

import re
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ...mods import ScoreMod, describe


@intrinsic
def call_row(typingctx, addr, s, d, kp, n, b, h, q_pos, want):  # type: ignore[no-untyped-def]
    """``row(s, d, kp, n, b, h, q_pos, want)`` for the row function at address ``addr`` (an int); ``s, d, kp``
    are 1-D contiguous arrays (their data pointers are passed), the rest ints. The only indirect call of the
    kernels."""
    sig = types.void(addr, s, d, kp, n, b, h, q_pos, want)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptrs = [cgutils.create_struct_proxy(ty)(context, builder, value=val).data
                for ty, val in zip(signature.args[1:4], args[1:4])]
        ints = [context.cast(builder, val, ty, types.int64) for ty, val in zip(signature.args[4:], args[4:])]
        fnty = ir.FunctionType(ir.VoidType(), [p.type for p in ptrs] + [ir.IntType(64)] * len(ints))
        target = context.cast(builder, args[0], signature.args[0], types.int64)
        builder.call(builder.inttoptr(target, fnty.as_pointer()), ptrs + ints)
        return context.get_dummy_value()

    return sig, codegen


def _check_returns_number(what: str, fn: Any, ft: Any) -> Any:
    """Compile ``fn`` for ``(ft, int64 x 4)``; raise a ``TypeError`` naming it if Numba cannot, or if it does not
    return a number. Returns the inlinable dispatcher."""
    jitted = numba.njit(inline="always", error_model="numpy")(fn)
    args = (ft,) + (types.int64,) * 4
    try:
        jitted.compile(args)
        cres = jitted.overloads[args]
    except Exception as e:  # a typing error (NumbaError), or any error Numba meets lowering the user's code
        raise TypeError(f"{what} {describe(fn)} cannot be compiled by Numba for the CPU kernels "
                        f"(arguments: {ft} score, int64 b, h, q_pos, k_pos): {_first_lines(e)}") from None
    rt = cres.signature.return_type
    if not isinstance(rt, (types.Float, types.Integer)) or isinstance(rt, types.Boolean):
        raise TypeError(f"{what} {describe(fn)} must return a number (the score), but returns {rt}")
    return jitted


def row_function(mod: ScoreMod, dtype: Any) -> int:
    """The address of ``mod``'s row function for ``dtype`` (module docstring), compiled once per ``ScoreMod``
    and dtype; the ``cfunc`` is kept on ``mod`` (the address is valid while it lives)."""
    key = ("cpu", np.dtype(dtype).name)
    if key not in mod.compiled:
        ft = numba.from_dtype(np.dtype(dtype))
        f = _check_returns_number("score_mod", mod.fn, ft)
        g = _check_returns_number("score_mod_grad", mod.grad, ft) if mod.grad is not None else None
        ptr = types.CPointer
        sig = types.void(ptr(ft), ptr(ft), ptr(types.int64), types.int64, types.int64, types.int64, types.int64,
                         types.int64)
        if g is None:
            def row(sp, dp, kpp, n, b, h, qp, want):  # type: ignore[no-untyped-def]
                s, kp = numba.carray(sp, (n,)), numba.carray(kpp, (n,))
                for c in range(n):
                    s[c] = f(s[c], b, h, qp, kp[c])
        else:
            def row(sp, dp, kpp, n, b, h, qp, want):  # type: ignore[no-untyped-def]
                s, d, kp = numba.carray(sp, (n,)), numba.carray(dp, (n,)), numba.carray(kpp, (n,))
                if want:
                    for c in range(n):
                        d[c] = g(s[c], b, h, qp, kp[c])
                for c in range(n):
                    s[c] = f(s[c], b, h, qp, kp[c])
        try:
            mod.compiled[key] = numba.cfunc(sig, error_model="numpy", fastmath={"contract", "nsz", "arcp"})(row)
        except Exception as e:  # e.g. a score_mod whose result cannot be stored as a float
            raise TypeError(f"score_mod {describe(mod.fn)} cannot be compiled by Numba for the CPU kernels: "
                            f"{_first_lines(e)}") from None
    return int(mod.compiled[key].address)


def _first_lines(e: Exception, n: int = 4) -> str:
    """The gist of a Numba error: its first lines, without colours, blank lines and Numba's pipeline notes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    skip = ("^", "<source", "Failed in ", "During:", "File ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return f"{type(e).__name__}: " + " | ".join(lines[:n])
