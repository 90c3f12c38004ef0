"""A user's own attention variant as two Python functions: ``mask_mod`` (which pairs) and ``score_mod`` (what score).

FlexAttention's idea, on this project's engine (docs/api.md)::

    mask_mod(b, h, q_pos, k_pos) -> bool              True: query at q_pos may see key at k_pos (batch b, head h)
    score_mod(score, b, h, q_pos, k_pos) -> score     applied after ``scale q.k + bias``
    score_mod_grad(score, b, h, q_pos, k_pos) -> d score_mod / d score    (backward needs it)

Positions are the call's absolute positions (``q_positions``, ``k_positions``). Write them with operators,
``abs``, comparisons, ``&``, ``|``, ``~`` and NumPy functions (``np.where``, ``np.tanh``, ...), not ``and``, ``or`` or
``if`` on the arguments: the same function is run on NumPy arrays (the Simple backend, and every ``mask_mod``) and
compiled by Numba for the CPU and the GPU.

How each one reaches the kernels, and why (the design constraint is compile time):

* ``mask_mod`` is *evaluated*, never compiled: once per call, vectorized over the positions, it gives the tile
  types and, for the tiles it masks in part, their bits (:mod:`.block_mask`), which every kernel reads as one more
  visibility input. A new mask costs no compilation at all.
* ``score_mod`` depends on the score, so it must run inside the fused loop: the NumPy engine calls it on each
  score tile, the CPU engine compiles it into a small row function that the (compiled once) kernels call through
  its address (:mod:`.kernels.cpu.mods`), the CUDA engine compiles it as a device function into its kernels
  (:mod:`.kernels.cuda.tiles`). Each compilation is cached on the :class:`ScoreMod` of the function.

This module checks the functions (argument count, what they return, whether they run at all) and evaluates them
in NumPy; a function that fails raises a ``TypeError`` that names it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Optional

import numpy as np

ModFn = Callable[..., Any]


def describe(fn: Any) -> str:
    """``'name' (file:line)`` of a user function, for error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})" if code is not None else ""
    return f"{name!r}{where}"


def check_function(what: str, fn: Any, params: str) -> None:
    """``fn`` must be callable with the positional parameters ``params`` (e.g. ``"b, h, q_pos, k_pos"``)."""
    if not callable(fn):
        raise TypeError(f"{what} must be a function ({params}), got {type(fn).__name__}")
    n = len(params.split(","))
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: it will be tried as it is
        return
    try:
        sig.bind(*range(n))
    except TypeError:
        raise TypeError(f"{what} {describe(fn)} must take {n} arguments ({params}), "
                        f"but its signature is {sig}") from None


def _run(what: str, fn: ModFn, *args: Any) -> np.ndarray:
    try:
        with np.errstate(all="ignore"):  # masked or empty pairs may divide by zero: their values are not used
            return np.asarray(fn(*args))
    except Exception as e:  # the user's code: any failure is a failure to evaluate it on arrays
        raise TypeError(
            f"{what} {describe(fn)} could not be evaluated on arrays of positions ({type(e).__name__}: {e}); "
            "write it with operators, comparisons, &, |, ~ and NumPy functions such as np.where, "
            "not `and`, `or` or `if` on its arguments") from e


def _check_result(what: str, fn: ModFn, out: np.ndarray, kinds: str, expected: str, shape: tuple) -> None:
    if out.dtype.kind not in kinds:
        raise TypeError(f"{what} {describe(fn)} must return {expected}, got dtype {out.dtype}")
    try:
        np.broadcast_shapes(out.shape, shape)
    except ValueError:
        raise ValueError(f"{what} {describe(fn)} returned shape {out.shape}, which does not broadcast to the "
                         f"shape of its arguments {shape}") from None


def evaluate_mask(mask_mod: ModFn, b: Any, h: Any, q_pos: np.ndarray, k_pos: np.ndarray) -> np.ndarray:
    """``mask_mod`` on broadcasting arrays (or ints) of batch rows, heads and positions: a bool array of the
    broadcast shape of its result (a mask that ignores ``b`` keeps a batch axis of 1, so it is stored once)."""
    out = _run("mask_mod", mask_mod, b, h, q_pos, k_pos)
    shape = np.broadcast_shapes(np.shape(b), np.shape(h), np.shape(q_pos), np.shape(k_pos))
    _check_result("mask_mod", mask_mod, out, "b", "booleans (True = may attend)", shape)
    return out


class ScoreMod:
    """A user's ``score_mod`` with its derivative ``grad`` (or None: forward only), and its compilations.

    :meth:`apply` and :meth:`derivative` run them on NumPy arrays (the Simple engine and the reference);
    ``compiled`` memoizes what the CPU and CUDA engines build from them (keyed by engine and dtype). One object per
    pair of functions (:func:`score_mod_of`), so that a function is compiled once per process.
    """

    def __init__(self, fn: ModFn, grad: Optional[ModFn]) -> None:
        self.fn, self.grad = fn, grad
        self.compiled: Dict[Any, Any] = {}

    def __repr__(self) -> str:
        return f"ScoreMod({describe(self.fn)}, grad={describe(self.grad) if self.grad else None})"

    def apply(self, s: np.ndarray, b: Any, h: Any, q_pos: Any, k_pos: Any) -> np.ndarray:
        """``score_mod(s, b, h, q_pos, k_pos)`` elementwise, in the dtype of ``s``."""
        return self._eval("score_mod", self.fn, s, b, h, q_pos, k_pos)

    def derivative(self, s: np.ndarray, b: Any, h: Any, q_pos: Any, k_pos: Any) -> np.ndarray:
        """``d score_mod / d score`` at ``s``, in the dtype of ``s``."""
        if self.grad is None:
            raise ValueError(missing_grad_message(self.fn))
        return self._eval("score_mod_grad", self.grad, s, b, h, q_pos, k_pos)

    @staticmethod
    def _eval(what: str, fn: ModFn, s: np.ndarray, *args: Any) -> np.ndarray:
        out = _run(what, fn, s, *args)
        shape = np.broadcast_shapes(np.shape(s), *(np.shape(a) for a in args))
        _check_result(what, fn, out, "fiu", "a number (the new score)" if what == "score_mod" else "a number",
                      shape)
        return np.broadcast_to(out, shape).astype(s.dtype)


def missing_grad_message(fn: ModFn) -> str:
    return (f"backward through score_mod {describe(fn)} needs its derivative: pass score_mod_grad=, a function "
            "(score, b, h, q_pos, k_pos) -> d score_mod / d score (for score_mod=lambda s, b, h, q, k: 0.5 * s - "
            "abs(q - k), score_mod_grad=lambda s, b, h, q, k: 0.5)")


@functools.lru_cache(maxsize=256)
def score_mod_of(fn: ModFn, grad: Optional[ModFn]) -> ScoreMod:
    """The :class:`ScoreMod` of ``(fn, grad)``, one per pair per process (its compilations are kept on it)."""
    check_function("score_mod", fn, "score, b, h, q_pos, k_pos")
    if grad is not None:
        check_function("score_mod_grad", grad, "score, b, h, q_pos, k_pos")
    return ScoreMod(fn, grad)
