"""Benchmark of the tensor backends' core ops: FastOps against NumPy, and SimpleOps against FastOps.

    python benchmarks/bench_ops.py [--repeats 7] [--json benchmarks/results/bench_ops.json]

Cases (float32):

1. batched matmul ``(8, 512, 512) @ (8, 512, 512)``: ``FastTensorBackend.matrix_multiply`` vs ``numpy.matmul``;
2. a map/zip/reduce chain ``((a * b).relu() + a).sum(2)`` on ``(8, 512, 512)`` tensors: FastOps vs the same
   expression in NumPy;
3. SimpleOps (pure Python) vs FastOps at 128x128: one ``(1, 128, 128) @ (1, 128, 128)`` matmul and the chain.

Every candidate runs once first (Numba compiles, or loads its disk cache), then the candidates of a case are timed
in turns, `repeats` rounds (SimpleOps: fewer, it takes seconds), so that background load hits them alike. The table
shows the median and the minimum per candidate and the ratio of medians. Numba uses ``NUMBA_NUM_THREADS`` threads
as given by the environment (default: all cores); NumPy's BLAS picks its own thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numba  # noqa: E402

from minitorch.fast_ops import FastTensorBackend  # noqa: E402
from minitorch.tensor_functions import from_numpy  # noqa: E402
from minitorch.tensor_ops import SimpleBackend  # noqa: E402

TARGET_MATMUL_VS_NUMPY = 5.0  # FastOps matmul at most 5x slower than numpy.matmul
TARGET_FAST_VS_SIMPLE = 50.0  # FastOps at least 50x faster than SimpleOps


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: Dict[str, int]) -> Dict[str, List[float]]:
    """Seconds per call for every candidate, measured in turns (round r times every candidate that still has
    repeats left)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r < repeats[name]:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def chain_minitorch(a, b):  # type: ignore[no-untyped-def]
    """``((a * b).relu() + a).sum(2)`` with tensor operators."""
    return ((a * b).relu() + a).sum(2)


def chain_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The same chain in NumPy."""
    return (np.maximum(a * b, 0) + a).sum(2, keepdims=True)


def run_case(
    title: str,
    fns: Dict[str, Callable[[], object]],
    repeats: Dict[str, int],
    baseline: str,
    warmup: Sequence[str],
) -> List[dict]:
    """Warm up, time, and return one row per candidate (ratio: candidate median / baseline median)."""
    for name in warmup:
        fns[name]()
    times = time_interleaved(fns, repeats)
    base = statistics.median(times[baseline])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(
            dict(case=title, candidate=name, median_ms=med * 1e3, min_ms=min(ts) * 1e3, runs=len(ts), ratio=med / base)
        )
    return rows


def main(argv: Sequence[str] = ()) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per fast candidate (default 7)")
    parser.add_argument("--simple-repeats", type=int, default=2, help="timed rounds for SimpleOps (default 2)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    args = parser.parse_args(list(argv))

    threads = numba.get_num_threads()
    print(f"minitorch ops benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Numba threads {threads} (NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'unset')}), "
          f"numpy {np.__version__}, numba {numba.__version__}")  # fmt: skip
    if hasattr(os, "getloadavg"):
        print("load average at start: %.2f %.2f %.2f" % os.getloadavg())

    rng = np.random.default_rng(0)
    dt = np.float32
    rows: List[dict] = []
    R = args.repeats

    # 1. batched matmul, FastOps vs numpy.matmul
    x = rng.standard_normal((8, 512, 512)).astype(dt)
    y = rng.standard_normal((8, 512, 512)).astype(dt)
    tx, ty = from_numpy(x, backend=FastTensorBackend), from_numpy(y, backend=FastTensorBackend)
    got = FastTensorBackend.matrix_multiply(tx, ty).to_numpy()
    np.testing.assert_allclose(got, x @ y, rtol=1e-3, atol=1e-3)
    rows += run_case(
        "matmul f32 (8,512,512)@(8,512,512)",
        {"numpy.matmul": lambda: np.matmul(x, y), "FastOps": lambda: FastTensorBackend.matrix_multiply(tx, ty)},
        {"numpy.matmul": R, "FastOps": R},
        baseline="numpy.matmul",
        warmup=["numpy.matmul", "FastOps"],
    )

    # 2. map/zip/reduce chain, FastOps vs NumPy
    np.testing.assert_allclose(chain_minitorch(tx, ty).to_numpy(), chain_numpy(x, y), rtol=1e-3, atol=1e-3)
    rows += run_case(
        "chain f32 ((a*b).relu()+a).sum(2), (8,512,512)",
        {"numpy": lambda: chain_numpy(x, y), "FastOps": lambda: chain_minitorch(tx, ty)},
        {"numpy": R, "FastOps": R},
        baseline="numpy",
        warmup=["numpy", "FastOps"],
    )

    # 3. SimpleOps vs FastOps at 128x128
    xs = rng.standard_normal((1, 128, 128)).astype(dt)
    ys = rng.standard_normal((1, 128, 128)).astype(dt)
    sx, sy = from_numpy(xs, backend=SimpleBackend), from_numpy(ys, backend=SimpleBackend)
    fx, fy = from_numpy(xs, backend=FastTensorBackend), from_numpy(ys, backend=FastTensorBackend)
    SR = args.simple_repeats
    rows += run_case(
        "matmul f32 (1,128,128)@(1,128,128)",
        {"SimpleOps": lambda: SimpleBackend.matrix_multiply(sx, sy),
         "FastOps": lambda: FastTensorBackend.matrix_multiply(fx, fy)},
        {"SimpleOps": SR, "FastOps": R},
        baseline="FastOps",
        warmup=["FastOps"],
    )  # fmt: skip
    rows += run_case(
        "chain f32 ((a*b).relu()+a).sum(2), (1,128,128)",
        {"SimpleOps": lambda: chain_minitorch(sx, sy), "FastOps": lambda: chain_minitorch(fx, fy)},
        {"SimpleOps": SR, "FastOps": R},
        baseline="FastOps",
        warmup=["FastOps"],
    )

    # Table
    print()
    header = f"{'case':<50} {'candidate':<14} {'median ms':>11} {'min ms':>11} {'runs':>5} {'ratio':>9}"
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        print(f"{case:<50} {r['candidate']:<14} {r['median_ms']:>11.2f} {r['min_ms']:>11.2f} {r['runs']:>5} "
              f"{r['ratio']:>8.2f}x")  # fmt: skip
    print("(ratio: median time / median time of the case's first candidate)")

    def med(case_prefix: str, cand: str) -> float:
        return next(r["median_ms"] for r in rows if r["case"].startswith(case_prefix) and r["candidate"] == cand)

    mm_ratio = med("matmul f32 (8", "FastOps") / med("matmul f32 (8", "numpy.matmul")
    simple_mm = med("matmul f32 (1", "SimpleOps") / med("matmul f32 (1", "FastOps")
    simple_chain = med("chain f32 ((a*b).relu()+a).sum(2), (1", "SimpleOps") / med(
        "chain f32 ((a*b).relu()+a).sum(2), (1", "FastOps"
    )
    targets = {
        "matmul_fast_over_numpy": mm_ratio,
        "matmul_fast_over_numpy_target_max": TARGET_MATMUL_VS_NUMPY,
        "matmul_simple_over_fast": simple_mm,
        "chain_simple_over_fast": simple_chain,
        "simple_over_fast_target_min": TARGET_FAST_VS_SIMPLE,
    }
    print()
    ok = "met" if mm_ratio <= TARGET_MATMUL_VS_NUMPY else "NOT met"
    print(f"FastOps matmul / numpy.matmul at 512: {mm_ratio:.2f}x (target <= {TARGET_MATMUL_VS_NUMPY:.0f}x: {ok})")
    for name, v in [("matmul", simple_mm), ("chain", simple_chain)]:
        ok = "met" if v >= TARGET_FAST_VS_SIMPLE else "NOT met"
        print(f"SimpleOps / FastOps {name} at 128: {v:.0f}x faster (target >= {TARGET_FAST_VS_SIMPLE:.0f}x: {ok})")
    if hasattr(os, "getloadavg"):
        print("load average at end: %.2f %.2f %.2f" % os.getloadavg())

    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "numba_threads": threads,
            "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
            "numpy": np.__version__,
            "numba": numba.__version__,
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "rows": rows,
        "targets": targets,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
