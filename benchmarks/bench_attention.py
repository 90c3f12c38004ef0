"""Flash attention on the CPU (the fused Numba kernels) against standard attention in NumPy and PyTorch's SDPA.

    python benchmarks/bench_attention.py [--max-n 8192] [--threads 2] [--heads 4] [--head-dim 64] [--memory-n 16384]

float32, batch 1. For each sequence length N (``Nq = Nk = N``, 512 ... ``--max-n``):

* **flash fwd** / **flash fwd+bwd** / **flash causal fwd**: ``FastTensorBackend.attention.forward`` / ``backward`` (minitorch/attention/kernels/cpu) on
  NumPy arrays (``make_spec`` with the default block sizes).
* **numpy naive**: ``softmax(Q K^T / sqrt(D)) V`` materializing the ``N x N`` scores (NumPy's BLAS, same threads).
* **torch sdpa** (when ``import torch`` works; minitorch itself never imports it):
  ``torch.nn.functional.scaled_dot_product_attention`` forward, causal forward and forward+backward.

GFLOP/s counts ``4 B H N^2 D`` for a forward, half of it when causal, and 2.5x the forward for a backward (so a
forward+backward is 3.5x). The table prints each time, its GFLOP/s and the ratios side by side.

Memory: in a fresh subprocess, the peak resident memory of one forward+backward at ``N = --memory-n`` beyond the
resident set before the call and the outputs and gradients it returns (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; ``ru_maxrss`` when that is not possible). Flash attention should need only its tiles.

Results go to ``benchmarks/results/local/bench_attention.json`` (ignored by git; ``--update-results`` replaces the
committed ``benchmarks/results/bench_attention.json``) with the machine (CPU model, cores, threads). A column with
no numbers says why under the tables (torch is not installed: ``pip install -e '.[bench]'``).
The timing core (:func:`time_callable`, :func:`time_interleaved`, :func:`run_suite`) takes plain callables, so the
same tables can time the tensor-level API. Competitors are timed in interleaved rounds (best of the rounds) so
that load from other processes hits them alike; the CPU-time table shows the work each run costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

THREADS_DEFAULT = 2


def _pin_threads(n: int) -> None:
    """Thread counts of every library, set before NumPy / Numba / torch start their pools."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)


TIMING = ("one process, OMP_WAIT_POLICY=PASSIVE, OPENBLAS_THREAD_TIMEOUT=4 and NUMBA_THREADING_LAYER=workqueue set "
          "before any library is imported (idle OpenMP and OpenBLAS threads sleep, so no contender loses a core to the one "
          "before it, and no second OpenMP runtime sits beside torch's), contenders interleaved in rounds: best and median wall "
          "time, least process CPU time")

if __name__ == "__main__":  # thread counts and the wait policy must be in the environment before numpy is imported
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"  # NumPy's OpenBLAS threads otherwise spin after each product
    # Numba's OpenMP threading layer (started by numba.set_num_threads or a parallel FastOps kernel) beside torch's own
    # OpenMP runtime made SDPA 1.75x slower in the same process (measured at N=4096); workqueue does not touch it
    os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
    _argv_threads = THREADS_DEFAULT
    for _i, _a in enumerate(sys.argv):
        if _a == "--threads" and _i + 1 < len(sys.argv):
            _argv_threads = int(sys.argv[_i + 1])
        elif _a.startswith("--threads="):
            _argv_threads = int(_a.split("=", 1)[1])
    _pin_threads(_argv_threads)

import numpy as np  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)

from benchmarks.common import matmul_peak, parse_with_output  # noqa: E402
from minitorch.attention.kernels.cpu import flash as cpu  # noqa: E402
from minitorch.attention.spec import make_spec  # noqa: E402

# ------------------------------------------------------------------------------------------------------------------
# Timing core: callables in, seconds out
# ------------------------------------------------------------------------------------------------------------------


def time_callable(
    fn: Callable[[], Any], repeats: int = 5, min_seconds: float = 1.0, max_repeats: int = 50
) -> Dict[str, float]:
    """Best and median wall time of ``fn()`` after one warm-up call (compilation, caches, page faults), and the
    least process CPU time of a run (all threads together: the work done, whatever else runs on the machine).

    Runs at least ``repeats`` times and until ``min_seconds`` have passed (at most ``max_repeats`` runs).
    """
    fn()
    times: List[float] = []
    cpu_times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    times.sort()
    return {"best_s": times[0], "median_s": times[len(times) // 2], "cpu_s": min(cpu_times), "runs": len(times)}


def time_interleaved(
    fns: Dict[str, Callable[[], Any]], repeats: int = 5, min_seconds: float = 2.0, max_rounds: int = 30
) -> Dict[str, Dict[str, float]]:
    """:func:`time_callable` for several callables at once, in rounds (each round runs each callable once), so that
    a change in the machine's load between measurements hits every competitor alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: Dict[str, List[float]] = {name: [] for name in fns}
    cpu_times: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < max_rounds):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
        rounds += 1
    out = {}
    for name in fns:
        ts = sorted(times[name])
        out[name] = {"best_s": ts[0], "median_s": ts[len(ts) // 2], "cpu_s": min(cpu_times[name]), "runs": len(ts)}
    return out


def run_suite(
    sizes: List[int],
    impls: Dict[str, Callable[[int], Optional[Callable[[], Any]]]],
    flops: Dict[str, Callable[[int], float]],
    repeats: int = 5,
    log: Callable[[str], None] = print,
) -> Dict[int, Dict[str, Dict[str, float]]]:
    """``impls[name](N)`` builds the callable to time at size N (or None to skip); ``flops[name](N)`` its work.
    At each N all callables are timed together, in interleaved rounds."""
    results: Dict[int, Dict[str, Dict[str, float]]] = {}
    for n in sizes:
        fns = {name: fn for name, fn in ((name, make(n)) for name, make in impls.items()) if fn is not None}
        results[n] = time_interleaved(fns, repeats=repeats)
        for name, t in results[n].items():
            t["gflops"] = flops[name](n) / t["best_s"] / 1e9
            log(f"  N={n:6d} {name:24s} {t['best_s'] * 1e3:10.2f} ms  {t['gflops']:7.1f} GFLOP/s  "
                f"(median {t['median_s'] * 1e3:.1f} ms, cpu {t['cpu_s'] * 1e3:.1f} ms, {t['runs']} runs)")
        del fns
    return results


# ------------------------------------------------------------------------------------------------------------------
# The implementations (array level)
# ------------------------------------------------------------------------------------------------------------------


def naive_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Standard attention: materialize the ``(N, N)`` scores, softmax, multiply by V (float32 throughout)."""
    s = (q * np.float32(scale)) @ np.swapaxes(k, -1, -2)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v


IMPLS = ["flash fwd", "flash causal fwd", "flash fwd+bwd", "flash causal fwd+bwd", "numpy naive fwd", "torch sdpa fwd",
         "torch sdpa causal fwd", "torch sdpa fwd+bwd", "torch sdpa causal fwd+bwd"]
TORCH_IMPLS = [name for name in IMPLS if name.startswith("torch")]


def make_impls(B: int, H: int, D: int, naive_max_n: int) -> Dict[str, Callable[[int], Optional[Callable[[], Any]]]]:
    rng = np.random.default_rng(0)
    data: Dict[int, Any] = {}

    def arrays(n: int) -> Any:
        if n not in data:
            data.clear()
            shape = (B, H, n, D)
            data[n] = tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        return data[n]

    def flash_fwd(n: int, causal: bool = False) -> Callable[[], Any]:
        q, k, v, _ = arrays(n)
        spec = make_spec(q.shape, k.shape, v.shape, causal=causal)
        return lambda: cpu.forward(q, k, v, None, spec)

    def flash_fwd_bwd(n: int, causal: bool = False) -> Callable[[], Any]:
        q, k, v, do = arrays(n)
        spec = make_spec(q.shape, k.shape, v.shape, causal=causal)

        def run() -> Any:
            out, lse = cpu.forward(q, k, v, None, spec)
            return cpu.backward(q, k, v, None, out, lse, do, spec)

        return run

    def naive(n: int) -> Optional[Callable[[], Any]]:
        if n > naive_max_n:
            return None
        q, k, v, _ = arrays(n)
        return lambda: naive_attention(q, k, v, 1.0 / np.sqrt(D))

    impls: Dict[str, Callable[[int], Optional[Callable[[], Any]]]] = {
        "flash fwd": flash_fwd,
        "flash causal fwd": lambda n: flash_fwd(n, causal=True),
        "flash fwd+bwd": flash_fwd_bwd,
        "flash causal fwd+bwd": lambda n: flash_fwd_bwd(n, causal=True),
        "numpy naive fwd": naive,
    }
    torch, _ = try_torch()
    if torch is not None:
        F = torch.nn.functional

        def sdpa(n: int, causal: bool = False) -> Callable[[], Any]:
            q, k, v, _ = (torch.from_numpy(x) for x in arrays(n))

            def run() -> Any:
                with torch.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            return run

        def sdpa_fwd_bwd(n: int, causal: bool = False) -> Callable[[], Any]:
            q, k, v, do = (torch.from_numpy(x) for x in arrays(n))
            q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))

            def run() -> Any:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return torch.autograd.grad(out, (q, k, v), do)

            return run

        impls["torch sdpa fwd"] = sdpa
        impls["torch sdpa causal fwd"] = lambda n: sdpa(n, causal=True)
        impls["torch sdpa fwd+bwd"] = sdpa_fwd_bwd
        impls["torch sdpa causal fwd+bwd"] = lambda n: sdpa_fwd_bwd(n, causal=True)
    return impls


def try_torch() -> Tuple[Any, Optional[str]]:
    """``(torch, None)``, or ``(None, why not)``: torch is an optional peer (the ``bench`` extra), never a
    dependency of minitorch."""
    try:
        import torch
    except ImportError:
        return None, "torch is not installed (it is optional: pip install -e '.[bench]')"
    except Exception as err:  # an install that fails to load (missing shared library, ...)
        return None, f"import torch failed: {type(err).__name__}: {err}"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", THREADS_DEFAULT)))
    return torch, None


def not_measured(sizes: List[int], naive_max_n: int) -> Dict[str, str]:
    """Why a column of the tables is empty, or has empty cells: ``{implementation: reason}``."""
    notes = {}
    _, why = try_torch()
    if why:
        notes.update({name: why for name in TORCH_IMPLS})
    if any(n > naive_max_n for n in sizes):
        notes["numpy naive fwd"] = f"not run above N = {naive_max_n} (--naive-max-n: it stores the N x N scores)"
    return notes


def make_flops(B: int, H: int, D: int) -> Dict[str, Callable[[int], float]]:
    fwd = lambda n: 4.0 * B * H * n * n * D  # noqa: E731
    table = {"flash fwd": fwd, "numpy naive fwd": fwd, "torch sdpa fwd": fwd}
    table.update({"flash causal fwd": lambda n: fwd(n) / 2, "torch sdpa causal fwd": lambda n: fwd(n) / 2})
    table.update({"flash fwd+bwd": lambda n: 3.5 * fwd(n), "torch sdpa fwd+bwd": lambda n: 3.5 * fwd(n)})
    table.update({"flash causal fwd+bwd": lambda n: 1.75 * fwd(n), "torch sdpa causal fwd+bwd": lambda n: 1.75 * fwd(n)})
    return table


# ------------------------------------------------------------------------------------------------------------------
# Peak memory of forward + backward, in a fresh process
# ------------------------------------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent(
    """
    import gc, json, resource, sys
    import numpy as np
    sys.path.insert(0, {root!r})
    from minitorch.attention.kernels.cpu import flash as cpu
    from minitorch.attention.spec import make_spec

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    B, H, N, D = 1, {heads}, {n}, {head_dim}
    # load the kernels (from the disk cache) on a tiny problem first
    t = np.ones((1, 1, 8, D), np.float32)
    s = make_spec(t.shape, t.shape, t.shape)
    o, l = cpu.forward(t, t, t, None, s)
    cpu.backward(t, t, t, None, o, l, t, s)
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((B, H, N, D), dtype=np.float32) for _ in range(4))
    spec = make_spec(q.shape, k.shape, v.shape)
    gc.collect()
    rss0 = status("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current resident set
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    out, lse = cpu.forward(q, k, v, None, spec)
    dq, dk, dv, _ = cpu.backward(q, k, v, None, out, lse, do, spec)
    if method == "VmHWM":
        peak = status("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        rss0 = max(rss0, maxrss0)
    returned = out.nbytes + lse.nbytes + dq.nbytes + dk.nbytes + dv.nbytes
    print(json.dumps({{"method": method, "rss_before_mib": rss0 / 2**20, "peak_mib": peak / 2**20,
                      "inputs_mib": 4 * q.nbytes / 2**20, "outputs_and_grads_mib": returned / 2**20,
                      "extra_mib": (peak - rss0 - returned) / 2**20}}))
    """
)


def measure_memory(n: int, heads: int, head_dim: int) -> Dict[str, Any]:
    code = _MEMORY_PROBE.format(root=os.path.abspath(ROOT), heads=heads, n=n, head_dim=head_dim)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    if res.returncode != 0:
        return {"error": res.stderr[-2000:]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out.update({"N": n, "H": heads, "D": head_dim, "dtype": "float32"})
    return out


# ------------------------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> Dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba

    info: Dict[str, Any] = {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "threads": threads,
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    torch, why = try_torch()
    info["torch"] = torch.__version__ if torch is not None else why
    return info


def print_ceiling(results: Dict[int, Dict[str, Dict[str, float]]], gemm_gflops: float) -> None:
    """Each forward's GFLOP/s as a share of the machine's float32 matrix-product rate (:func:`...common.matmul_peak`,
    measured in the same run on the same threads). A fused attention forward is two products of that kind plus a
    softmax, so no implementation runs it faster: the share is the headroom left to any of them."""
    fwd = ("flash fwd", "torch sdpa fwd", "flash causal fwd", "torch sdpa causal fwd")
    print(f"\nshare of the machine's float32 matrix-product rate ({gemm_gflops:.0f} GFLOP/s, NumPy's BLAS on the same "
          "threads), forward")
    print(f"{'N':>6} " + " ".join(f"{n:>22}" for n in fwd))
    for n, row in results.items():
        cells = [f"{row[m]['gflops'] / gemm_gflops:.0%}" if m in row else "-" for m in fwd]
        print(f"{n:>6} " + " ".join(f"{c:>22}" for c in cells))


def print_table(results: Dict[int, Dict[str, Dict[str, float]]], notes: Dict[str, str]) -> None:
    """The time, CPU-time and speedup tables; ``-`` marks a cell not measured, and ``notes`` (see `not_measured`)
    say why under the tables."""
    pairs = [("flash fwd", "numpy naive fwd"), ("flash fwd", "torch sdpa fwd"),
             ("flash causal fwd", "torch sdpa causal fwd"), ("flash fwd+bwd", "torch sdpa fwd+bwd"),
             ("flash causal fwd+bwd", "torch sdpa causal fwd+bwd")]
    names = IMPLS
    print("\ntime in ms (GFLOP/s)")
    print(f"{'N':>6} " + " ".join(f"{n:>22}" for n in names))
    for n, row in results.items():
        cells = [f"{row[m]['best_s'] * 1e3:10.1f} ({row[m]['gflops']:6.1f})" if m in row else f"{'-':>19}"
                 for m in names]
        print(f"{n:>6} " + " ".join(f"{c:>22}" for c in cells))
    print("\nprocess CPU time in ms (all threads; what each run costs whatever else shares the machine)")
    print(f"{'N':>6} " + " ".join(f"{n:>22}" for n in names))
    for n, row in results.items():
        cells = [f"{row[m]['cpu_s'] * 1e3:10.1f}" if m in row else f"{'-':>10}" for m in names]
        print(f"{n:>6} " + " ".join(f"{c:>22}" for c in cells))
    print("\nspeedup of flash (other time / flash time, wall)")
    print(f"{'N':>6} " + " ".join(f"{a + ' vs ' + b:>44}" for a, b in pairs))
    for n, row in results.items():
        cells = [f"{row[b]['best_s'] / row[a]['best_s']:.2f}x" if a in row and b in row else "-" for a, b in pairs]
        print(f"{n:>6} " + " ".join(f"{c:>44}" for c in cells))
    print("\nspeedup of flash in process CPU time (other / flash: the work each costs, whatever the load)")
    for n, row in results.items():
        cells = [f"{row[b]['cpu_s'] / row[a]['cpu_s']:.2f}x" if a in row and b in row else "-" for a, b in pairs]
        print(f"{n:>6} " + " ".join(f"{c:>44}" for c in cells))
    reasons: Dict[str, List[str]] = {}
    for name, why in notes.items():
        reasons.setdefault(why, []).append(name)
    for why, names_ in reasons.items():
        print(f"- {', '.join(names_)}: {why}")


def thread_scaling(sizes: List[int], B: int, H: int, D: int, threads: int) -> Dict[str, Dict[str, float]]:
    """Each flash kernel on 1 thread and on ``threads`` threads, interleaved (best of the rounds): the speedup of
    the threads, ``t(1) / t(threads)`` (an idle machine is needed for this to mean anything: on a loaded one the
    second core is not free)."""
    import numba

    impls = make_impls(B, H, D, naive_max_n=0)
    out: Dict[str, Dict[str, float]] = {}
    print(f"\nthread scaling: best time on 1 thread / on {threads} threads (wall)")
    for n in sizes:
        for name in ("flash fwd", "flash causal fwd", "flash fwd+bwd", "flash causal fwd+bwd"):
            fn = impls[name](n)

            def on(t: int, fn: Callable[[], Any] = fn) -> Callable[[], Any]:
                def run() -> Any:
                    numba.set_num_threads(t)
                    try:
                        return fn()
                    finally:
                        numba.set_num_threads(threads)
                return run

            r = time_interleaved({"1": on(1), str(threads): on(threads)}, repeats=3, min_seconds=1.0)
            x = r["1"]["best_s"] / r[str(threads)]["best_s"]
            out[f"{n} {name}"] = {"one_thread_s": r["1"]["best_s"], "threads_s": r[str(threads)]["best_s"], "speedup": x}
            print(f"  N={n:6d} {name:24s} {r['1']['best_s'] * 1e3:9.1f} ms / {r[str(threads)]['best_s'] * 1e3:9.1f} ms"
                  f" = {x:.2f}x")
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-n", type=int, default=8192)
    parser.add_argument("--min-n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=THREADS_DEFAULT)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-n", type=int, default=8192, help="skip the O(N^2)-memory baseline above this")
    parser.add_argument("--memory-n", type=int, default=16384, help="0 to skip the memory measurement")
    parser.add_argument("--thread-scaling", action="store_true",
                        help="also time the flash kernels on 1 thread against --threads threads (N <= 4096)")
    return parse_with_output(parser, "bench_attention.json", argv)


def main() -> None:
    args = parse_args()
    _pin_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    B, H, D = 1, args.heads, args.head_dim
    sizes = [n for n in (512, 1024, 2048, 4096, 8192, 16384, 32768) if args.min_n <= n <= args.max_n]
    info = machine_info(args.threads)
    print(f"{info['cpu_model']}, {info['cores']} cores, {args.threads} threads; B={B} H={H} D={D} float32; "
          f"load average {info['load_average_at_start'][0]:.2f}")
    print(f"timing: {TIMING}")
    results = run_suite(sizes, make_impls(B, H, D, args.naive_max_n), make_flops(B, H, D), repeats=args.repeats)
    notes = not_measured(sizes, args.naive_max_n)
    print_table(results, notes)
    gemm = matmul_peak(2048, repeats=10)["gflops_best"]
    print_ceiling(results, gemm)
    scaling = thread_scaling([n for n in sizes if n <= 4096], B, H, D, args.threads) if args.thread_scaling else None
    memory = None
    if args.memory_n:
        memory = measure_memory(args.memory_n, H, D)
        if "error" in memory:
            print("\nmemory measurement failed:", memory["error"])
        else:
            print(f"\npeak extra resident memory of forward+backward at N={args.memory_n} (H={H}, D={D}, float32): "
                  f"{memory['extra_mib']:.1f} MiB beyond inputs ({memory['inputs_mib']:.0f} MiB) and "
                  f"outputs+gradients ({memory['outputs_and_grads_mib']:.0f} MiB) [{memory['method']}]")
    info["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "bench_attention",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "timing": TIMING,
        "config": {"B": B, "H": H, "D": D, "dtype": "float32", "sizes": sizes,
                   "flops": "forward 4*B*H*N^2*D, causal half, backward 2.5x forward"},
        "results": {str(n): row for n, row in results.items()},
        "not_measured": notes,
        "gemm_ceiling_gflops": gemm,
        "memory": memory,
        "thread_scaling": scaling,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
