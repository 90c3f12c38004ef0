"""How the CPU kernels are compiled and launched: Numba options, and a grid launcher on a thread pool.

As on a GPU, a kernel is written for one *program* (a thread block, in CUDA words) and launched over a *grid* of
programs. :func:`launch` runs the grid on ``n = numba.get_num_threads()`` threads. The programs are dealt out in
rounds of ``n``, one to each worker, the direction of the deal alternating from round to round (:func:`program`:
worker 0 takes programs ``0, 2n - 1, 2n, 4n - 1, ...``): a causal grid, whose programs grow in cost with the query
tile, then gives every worker the same work. The kernels are ``numba.njit(nogil=True)``
functions, so the threads really run in parallel. Programs write disjoint memory and every sum runs in a fixed
order, so the split between threads changes nothing: results are bitwise identical from run to run, with no float
atomics and no races. (We launch from Python threads rather than with ``prange``: a ``parallel=True`` wrapper per
kernel more than doubled the compile time.)

Kernels are compiled once per dtype (sizes are runtime arguments, so any head dim and block size reuses them) and
cached on disk (``cache=True``): a second process loads them instead of compiling.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numba
import numpy as np

# Floating-point flags. Reassociation lets LLVM vectorize dot products and row sums; the order it picks is fixed
# at compile time, so results stay bitwise reproducible. We never allow 'nnan'/'ninf': lse = -inf, the masked
# sentinel and NaN inputs must behave exactly. Element-wise code (exp's range reduction) must not be reassociated.
FM_REDUCE = frozenset({"reassoc", "contract", "nsz", "arcp"})
FM_EXACT = frozenset({"contract", "nsz", "arcp"})


def helper(fastmath: frozenset = FM_EXACT, **kw: Any) -> Callable:
    """``numba.njit`` for a device-side helper: cached on disk, no Python entry point."""
    return numba.njit(cache=True, fastmath=set(fastmath), no_cpython_wrapper=True, no_cfunc_wrapper=True, **kw)


def kernel(fastmath: frozenset = FM_REDUCE) -> Callable:
    """``numba.njit`` for a grid kernel ``kernel(worker, n_workers, ...)``: cached, and it releases the GIL."""
    return numba.njit(cache=True, nogil=True, fastmath=set(fastmath))


@helper()
def rounds(n_programs, n_workers):  # type: ignore[no-untyped-def]
    """How many rounds of :func:`program` deal out ``n_programs`` to ``n_workers``."""
    return (n_programs + n_workers - 1) // n_workers


@helper()
def program(worker, n_workers, r):  # type: ignore[no-untyped-def]
    """The program that ``worker`` runs in round ``r`` (it may be past the grid's end in the last round: skip it).

    Round ``r`` deals the programs ``r n .. r n + n - 1``, forwards in even rounds and backwards in odd ones (a
    boustrophedon). Where the cost grows along the grid (causal query tiles ``0, 1, 2, ...``) a plain interleave
    ``w, w + n, ...`` always gives the last worker the dearest program of each round: with 2 workers and 8 causal
    query tiles, costs 1 + 3 + 5 + 7 = 16 against 2 + 4 + 6 + 8 = 20, so two threads can be at most 1.8x faster
    than one. Dealt back and forth, both get 1 + 4 + 5 + 8 = 2 + 3 + 6 + 7 = 18."""
    w = worker if r % 2 == 0 else n_workers - 1 - worker
    return r * n_workers + w


_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


NOTE_AFTER_S = 0.5
"""A first call that takes longer than this is a compile (a disk-cache load takes a fraction of it): say so."""
_noted = False


@contextmanager
def first_compile_note(what: str = "attention kernels") -> Iterator[None]:
    """Print one line to stderr, once per process, if the call inside takes longer than :data:`NOTE_AFTER_S`:
    the first call of a kernel compiles it (seconds), later processes load it from the disk cache."""
    global _noted
    if _noted:
        yield
        return

    def note() -> None:
        global _noted
        if not _noted:
            _noted = True
            print(f"compiling {what} (first run only; cached on disk afterwards; "
                  "`python -m minitorch.warmup` does it ahead of time)...", file=sys.stderr, flush=True)

    timer = threading.Timer(NOTE_AFTER_S, note)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


_entry_points: Dict[Tuple[Any, ...], Callable] = {}
_entry_lock = threading.Lock()


def launch(kernel_fn: Callable, n_programs: int, *args: Any) -> None:
    """Run ``kernel_fn(worker, n_workers, *args)`` for every worker and wait: a grid launch, as on a GPU.

    ``n_workers = min(numba.get_num_threads(), n_programs)``; the calling thread is worker 0, a small thread pool
    runs the others. Programs write disjoint memory, so how they are shared out cannot change any result. The first
    launch of a kernel for a dtype in this process may compile it (:func:`first_compile_note`).

    Numba's dispatcher types every argument on every call, which for the large Config costs more than a small
    problem's whole kernel. The engine passes arrays it normalized (:func:`as_input`: C-contiguous, writeable, of
    the call's dtype), so the Python types of the arguments and the dtype decide the compiled version: the first
    launch goes through the dispatcher, and later launches of the same key call that version's entry point.
    """
    key = (kernel_fn, getattr(args[0], "dtype", None), tuple(map(type, args)))
    entry = _entry_points.get(key)
    if entry is not None:
        _run_grid(entry, n_programs, args)
        return
    with first_compile_note():
        _run_grid(kernel_fn, n_programs, args)
    entry = _entry_point(kernel_fn, args)
    if entry is not None:
        with _entry_lock:
            _entry_points[key] = entry


def _entry_point(kernel_fn: Callable, args: Tuple[Any, ...]) -> Optional[Callable]:
    """The compiled version of ``kernel_fn`` for these arguments, called without typing them (None if unknown)."""
    try:
        sig = tuple(kernel_fn.typeof_pyval(a) for a in (0, 1) + tuple(args))
        return kernel_fn.overloads[sig].entry_point
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _run_grid(kernel_fn: Callable, n_programs: int, args: Any) -> None:
    global _pool, _pool_size
    # (one program: no need to ask Numba for its thread count, which costs a call into its threading layer)
    n_workers = 1 if n_programs <= 1 else min(numba.get_num_threads(), n_programs)
    if n_workers == 1:
        kernel_fn(0, 1, *args)
        return
    with _pool_lock:
        if _pool is None or _pool_size < n_workers - 1:
            _pool_size = max(n_workers - 1, numba.config.NUMBA_NUM_THREADS - 1)
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="minitorch-attention")
        pool = _pool
    futures = [pool.submit(kernel_fn, w, n_workers, *args) for w in range(1, n_workers)]
    try:
        kernel_fn(0, n_workers, *args)
    finally:
        for f in futures:
            f.result()


def as_input(x: np.ndarray, dtype: Any) -> np.ndarray:
    """A C-contiguous, writeable array of ``dtype`` (no copy when ``x`` already is one)."""
    arr = np.ascontiguousarray(x, dtype=dtype)
    if not arr.flags.writeable:  # a read-only array would compile a second version of every kernel
        arr = arr.copy()
    return arr
