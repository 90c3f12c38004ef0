"""Shared helpers of the benchmark suite: timing (warm-up, median of repeats), the machine's matmul peak, peak memory
of a snippet in a fresh process, machine information and JSON writing.

Nothing here imports minitorch, so the helpers also serve scripts that pin thread counts before importing it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")  # committed results: written only with --update-results
LOCAL_RESULTS_DIR = os.path.join(RESULTS_DIR, "local")  # every other run's (ignored by git)


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def time_median(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0,
                max_repeats: int = 50) -> Dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls (compilation, caches, page faults), then at least ``repeats`` timed
    calls, more until ``min_seconds`` have passed (at most ``max_repeats``). Returns median, best, mean, all times."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "best_s": min(times), "mean_s": statistics.fmean(times),
            "runs": len(times), "times_s": times}


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> Dict[str, Any]:
    """The machine's reference FLOP rate: NumPy (BLAS) ``n x n @ n x n`` in ``dtype``, ``2 n^3`` FLOPs per call.

    Uses NumPy's default BLAS threads (all cores unless ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` say
    otherwise). Median and best of ``repeats`` after a warm-up."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    t = time_median(lambda: np.matmul(a, b, out=out), repeats=repeats, warmup=1)
    flops = 2.0 * n**3
    return {"n": n, "dtype": dtype, "gflops_median": flops / t["median_s"] / 1e9,
            "gflops_best": flops / t["best_s"] / 1e9, "median_s": t["median_s"], "runs": t["runs"],
            "blas_threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                 "MKL_NUM_THREADS") if os.environ.get(k)}}


def scaling(sizes: List[int], values: List[Optional[float]]) -> List[Dict[str, Any]]:
    """For consecutive sizes, the ratio ``value(N2) / value(N1)`` and the exponent ``log(ratio) / log(N2 / N1)``:
    2.0 for work (or memory) growing as ``N^2``, 1.0 for linear."""
    rows = []
    for (n1, v1), (n2, v2) in zip(zip(sizes, values), zip(sizes[1:], values[1:])):
        if v1 and v2 and v1 > 0 and v2 > 0:
            r = v2 / v1
            rows.append({"from": n1, "to": n2, "ratio": r, "exponent": math.log(r) / math.log(n2 / n1)})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


def _status_mib(key: str) -> float:
    """A memory line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MiB; NaN where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``; NaN elsewhere)."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (``VmHWM``) to its current size; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident set size (``VmHWM``) of this process in MiB since the last :func:`reset_peak_rss`."""
    return _status_mib("VmHWM")


_PROBE = """
import gc, json, resource, sys
sys.path.insert(0, {root!r})

def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None

{setup}
gc.collect()
_rss0 = _status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    _method = "VmHWM"
except OSError:
    _method = "ru_maxrss"
    _rss0 = max(_rss0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
{run}
_peak = _status("VmHWM") if _method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"method": _method, "rss_before_mib": _rss0 / 2**20, "peak_mib": _peak / 2**20,
                  "extra_mib": (_peak - _rss0) / 2**20}}))
"""


def peak_memory_probe(setup: str, run: str, timeout: float = 600.0, env: Optional[Dict[str, str]] = None
                      ) -> Dict[str, Any]:
    """Peak resident memory of ``run`` beyond the resident set after ``setup``, in a fresh Python process.

    ``setup`` builds inputs and warms up (compiles) the code; ``run`` is what is measured. On Linux the peak is
    ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` (else ``ru_maxrss``, which cannot be reset, so
    the setup's peak is the floor). Returns ``{"extra_mib", "peak_mib", "rss_before_mib", "method"}`` or
    ``{"error": ...}``.
    """
    code = _PROBE.format(root=ROOT, setup=textwrap.dedent(setup), run=textwrap.dedent(run))
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, **(env or {})))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-1500:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# Machine and output
# ---------------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_name() -> Optional[str]:
    """The CUDA device's name, or None without a real GPU (the Numba simulator does not count)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        from numba import cuda

        if not cuda.is_available():
            return None
        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, load, library versions, GPU name (or None)."""
    import numpy as np

    info: Dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "gpu": gpu_name(),
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # NumPy arrays and scalars
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def parse_with_output(parser: argparse.ArgumentParser, name: str, argv: Optional[Sequence[str]] = None
                      ) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with ``--out PATH`` and ``--update-results`` added, ``args.out`` resolved: a run
    writes ``benchmarks/results/local/<name>`` (ignored by git) unless asked to replace the committed
    ``benchmarks/results/<name>``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", default=None, metavar="PATH",
                       help=f"where to write (default: benchmarks/results/local/{name}, ignored by git)")
    group.add_argument("--update-results", action="store_true",
                       help=f"replace the committed benchmarks/results/{name} instead")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(RESULTS_DIR if args.update_results else LOCAL_RESULTS_DIR, name)
    return args


def write_json(path: str, obj: Any) -> str:
    """Write ``obj`` (NumPy values allowed; NaN/inf become null) as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
    return path


def read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
