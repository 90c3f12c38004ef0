"""Compile the common Numba kernels ahead of time, so that the first real call does not wait for them.

    python -m minitorch.warmup            # the CPU attention kernels, float32 and float64
    python -m minitorch.warmup --list     # what it would compile

Numba compiles a kernel the first time it runs (seconds each: the fused attention backward about 15 s) and caches
the machine code on disk next to the source (``__pycache__``), so every later process loads it in a fraction of a
second. This runs every CPU attention kernel once on tiny inputs (forward in both tile orders, split-K, backward,
Dynamic Mask Attention's selection, the tile classifier) with a progress bar.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import FastTensorBackend
from .attention.functions import dma_config
from .attention.spec import make_dma_spec, make_spec


def _attention_steps(dtype: np.dtype) -> List[Tuple[str, Callable[[], object]]]:
    engine = FastTensorBackend.attention
    name = np.dtype(dtype).name
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((1, 2, 8, 4)).astype(dtype) for _ in range(4))
    spec = make_spec(q.shape, k.shape, v.shape, causal=True, block_q=4, block_k=4)

    def forward() -> object:
        return engine.forward(q, k, v, None, spec)

    def forward_k_major() -> object:
        return engine.forward(q, k, v, None, spec.replace(order=spec.order.K_MAJOR))

    def forward_split() -> object:
        return engine.forward(q, k, v, None, spec.replace(num_splits=2))

    def backward() -> object:
        out, lse = engine.forward(q, k, v, None, spec)
        return engine.backward(q, k, v, None, out, lse, do, spec)

    def backward_refined() -> object:  # a bias broadcast over the query rows: the two-pass backward
        bias = np.zeros((1, 1, 1, 8), dtype)
        spec_b = spec.replace(bias_shape=bias.shape)
        out, lse = engine.forward(q, k, v, bias, spec_b)
        return engine.backward(q, k, v, bias, out, lse, do, spec_b)

    def dma() -> object:
        dspec = make_dma_spec(q.shape, k.shape, v.shape, (2, 8), (2,), keep_window_size=3, causal=True, block_q=4,
                              block_k=4)
        z, _ = engine.importance(v, rng.standard_normal((2, 8)).astype(dtype), np.ones(2, dtype), False)
        return dma_config(engine, z, dspec)

    return [(f"attention forward {name}", forward), (f"attention forward K-major {name}", forward_k_major),
            (f"attention forward split-K {name}", forward_split), (f"attention backward {name}", backward),
            (f"attention backward, refined delta {name}", backward_refined), (f"DMA selection {name}", dma)]


def steps(dtypes: Sequence[str] = ("float32", "float64")) -> List[Tuple[str, Callable[[], object]]]:
    """``(name, function)`` of everything the warm-up runs, in order."""
    out: List[Tuple[str, Callable[[], object]]] = []
    for dt in dtypes:
        out += _attention_steps(np.dtype(dt))
    return out


def _bar(done: int, total: int, label: str, width: int = 24) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minitorch.warmup", description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float32", "float64"], action="append",
                    help="compile for this dtype only (repeatable; default: both)")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    args = ap.parse_args(argv)
    todo = steps(args.dtype or ("float32", "float64"))
    if args.list:
        for name, _ in todo:
            print(name)
        return 0
    t0 = time.perf_counter()
    for i, (name, fn) in enumerate(todo):
        print("\r" + _bar(i, len(todo), name).ljust(72), end="", file=sys.stderr, flush=True)
        fn()
    print("\r" + _bar(len(todo), len(todo), "done").ljust(72), file=sys.stderr, flush=True)
    print(f"{len(todo)} kernels ready in {time.perf_counter() - t0:.1f} s (cached on disk for later processes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
