"""Dynamic mask attention vs dense flash attention on the CPU: a sparsity sweep (float32, fused Numba kernels).

    python benchmarks/bench_dma.py [--sizes 1024 4096 16384] [--ratios 0.2 0.1 0.05 0.025] [--causal both]
                                   [--heads 4] [--kv-heads 2] [--head-dim 64] [--repeats 3] [--index-order]

For every sequence length N (Nq = Nk = N) and keep ratio r (``keep_window_size = r * N``):

* **DMA**: what ``FlashDMAAttention`` runs, at the array level (no tensor glue): importance ``z`` (NumPy),
  **selection included** (heap sweep, thresholds, compacted key list, tile flags: ``FastTensorBackend.attention.select``), the fused
  forward; for forward+backward also the fused backward and the chain of ``dz`` into ``v``, ``dt_proj``,
  ``a_coef``.
* **dense**: flash attention at the same N and mask (``attention.cpu.forward`` / ``backward`` through
  ``make_spec``), the dense baseline. Its time does not depend on r: measured once per (N, causal).

Times are the best of ``--repeats`` runs (the kernels are compiled and cached before timing): wall time, and the
process CPU time of all threads, which stays meaningful on a shared, loaded machine (waiting for a core is not
counted). ``x`` is dense time / DMA time. Memory: ``tracemalloc`` peak of the NumPy allocations of one
forward+backward (a separate, untimed run; kernel-local tile buffers are not NumPy allocations), next to the size
one dense float32 score matrix ``(B, H, N, N)`` would have. ``--index-order`` adds DMA with ``compact=False``
(block-sparse tiles of the key sequence itself, the textbook scheme) at N <= 4096: a random top-k touches nearly
every key tile, so it cannot skip. Results: ``benchmarks/results/local/bench_dma.json`` (ignored by git;
``--update-results`` replaces the committed ``benchmarks/results/bench_dma.json``).

Targets from the design note (speedup of DMA over dense flash attention): 3.3-4x at (N=1024, r=0.2), 5-6.7x at
(4096, 0.1), 6.7-10x at (16384, 0.05). The ideal is ``1/r`` without causal and ``1/(2r)`` with causal (dense causal
attention already skips half the tiles, while the causal top-k of a growing prefix keeps r*N keys per query).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


# idle OpenMP / OpenBLAS threads sleep instead of spinning into the next contender (before NumPy loads them)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import parse_with_output  # noqa: E402
from minitorch import FastTensorBackend  # noqa: E402
from minitorch.attention.functions import dma_config  # noqa: E402
from minitorch.attention.spec import make_dma_spec  # noqa: E402

engine = FastTensorBackend.attention
from minitorch.attention.spec import make_spec  # noqa: E402

TARGETS = {(1024, 0.2): (3.3, 4.0), (4096, 0.1): (5.0, 6.7), (16384, 0.05): (6.7, 10.0)}


def best_time(fn: Callable[[], Any], repeats: int) -> Tuple[float, float]:
    """Best wall time and best process CPU time (all threads) of ``repeats`` runs."""
    wall, cpu_s = float("inf"), float("inf")
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu_s = min(cpu_s, time.process_time() - c0)
    return wall, cpu_s


def peak_bytes(fn: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def problem(N: int, H: int, Hkv: int, D: int, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f = np.float32
    return {
        "q": rng.standard_normal((1, H, N, D)).astype(f), "k": rng.standard_normal((1, Hkv, N, D)).astype(f),
        "v": rng.standard_normal((1, Hkv, N, D)).astype(f), "do": rng.standard_normal((1, H, N, D)).astype(f),
        "dt": (rng.standard_normal((Hkv, Hkv * D)) / np.sqrt(Hkv * D)).astype(f),
        "a": rng.uniform(0.5, 1.5, Hkv).astype(f),
    }


def dense_fns(p: Dict[str, np.ndarray], causal: bool) -> Dict[str, Callable[[], Any]]:
    q, k, v, do = p["q"], p["k"], p["v"], p["do"]
    spec = make_spec(q.shape, k.shape, v.shape, causal=causal)

    def fwd() -> Any:
        return engine.forward(q, k, v, None, spec)

    def fwd_bwd() -> Any:
        out, lse = engine.forward(q, k, v, None, spec)
        return engine.backward(q, k, v, None, out, lse, do, spec)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def dma_fns(p: Dict[str, np.ndarray], causal: bool, keep: int, compact: bool = True) -> Dict[str, Callable[[], Any]]:
    q, k, v, do, dt, a = p["q"], p["k"], p["v"], p["do"], p["dt"], p["a"]
    spec = make_dma_spec(q.shape, k.shape, v.shape, dt.shape, a.shape, keep_window_size=keep, causal=causal,
                         compact=compact)

    def fwd() -> Any:
        z, u = engine.importance(v, dt, a, False)
        espec, sel = dma_config(engine, z, spec)
        return engine.forward(q, k, v, z.reshape(espec.bias_shape), espec), z, u, espec

    def fwd_bwd() -> Any:
        (out, lse), z, u, espec = fwd()
        z4 = z.reshape(espec.bias_shape)
        dq, dk, dv, dz = engine.backward(q, k, v, z4, out, lse, do, espec)
        return engine.importance_backward(dz.reshape(z.shape), v, dt, a, z, u, False, dv)

    def stats() -> Dict[str, Any]:
        z, _ = engine.importance(v, dt, a, False)
        t0 = time.perf_counter()
        sel = engine.select(z, spec)
        t_sel = time.perf_counter() - t0
        visited = int((sel.types != 0).sum())
        return {"select_s": t_sel, "listed_keys": int(sel.counts.max()), "tiles_visited": visited,
                "tiles_dense": int((sel.types == 1).sum()), "block_q": sel.block_q, "block_k": sel.block_k}

    return {"fwd": fwd, "fwd_bwd": fwd_bwd, "stats": stats}


def table_header() -> str:
    return (f"{'N':>6} {'causal':>6} {'ratio':>6} {'keep':>5} | {'dense fwd':>9} {'DMA fwd':>8} {'x':>5} "
            f"{'x cpu':>5} | {'dense f+b':>9} {'DMA f+b':>8} {'x':>5} {'x cpu':>5} | {'target':>8} | {'select':>7} "
            f"{'keys':>5} | {'MiB dense':>9} {'MiB DMA':>7} {'MiB S':>6}")


def table_row(r: Dict[str, Any]) -> str:
    """One line of the table for a result row (times in ms, speedups as ``x``)."""
    ms = lambda s, w: f"{s * 1e3:>{w - 3}.0f} ms"  # noqa: E731
    tgt = f"{r['target'][0]:.1f}-{r['target'][1]:.1f}x" if r.get("target") else ""
    line = (f"{r['N']:>6} {str(r['causal']):>6} {r['ratio']:>6.3f} {r['keep']:>5} | {ms(r['dense_fwd_s'], 9)} "
            f"{ms(r['dma_fwd_s'], 8)} {r['speedup_fwd']:>4.1f}x {r['speedup_fwd_cpu']:>4.1f}x | "
            f"{ms(r['dense_fwd_bwd_s'], 9)} {ms(r['dma_fwd_bwd_s'], 8)} {r['speedup_fwd_bwd']:>4.1f}x "
            f"{r['speedup_fwd_bwd_cpu']:>4.1f}x | {tgt:>8} | {r['select_s'] * 1e3:>4.1f} ms {r['listed_keys']:>5} | "
            f"{r['peak_numpy_bytes_dense'] / 2**20:>9.1f} {r['peak_numpy_bytes_dma'] / 2**20:>7.1f} "
            f"{r['score_matrix_bytes'] / 2**20:>6.0f}")
    if "dma_index_order_fwd_s" in r:
        line += f" | index-order fwd {r['dma_index_order_fwd_s'] * 1e3:.0f} ms"
    return line


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.025])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many (N >= 16384: at most 2)")
    ap.add_argument("--index-order", action="store_true", help="also DMA over key-order tiles (N <= 4096, forward)")
    return parse_with_output(ap, "bench_dma.json", argv)


def main() -> None:
    args = parse_args()

    import numba

    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    print(f"DMA vs dense flash attention, float32, CPU ({numba.get_num_threads()} threads), B=1, H={H}, Hkv={Hkv}, "
          f"D={D}; DMA times include importance and selection. Load average at start: {os.getloadavg()}")
    # compile (or load from numba's cache) before timing
    warm = problem(256, H, Hkv, D)
    for c in (False, True):
        dense_fns(warm, c)["fwd_bwd"]()
        dma_fns(warm, c, 32)["fwd_bwd"]()

    results: List[Dict[str, Any]] = []
    header = table_header()
    print(header)
    print("-" * len(header))
    for N in args.sizes:
        reps = args.repeats if N < 16384 else min(args.repeats, 2)
        p = problem(N, H, Hkv, D)
        for causal in causals:
            dense = dense_fns(p, causal)
            d_f, d_fb = best_time(dense["fwd"], reps), best_time(dense["fwd_bwd"], reps)
            mem_dense = peak_bytes(dense["fwd_bwd"])
            for ratio in args.ratios:
                keep = max(1, int(round(ratio * N)))
                fns = dma_fns(p, causal, keep)
                m_f, m_fb = best_time(fns["fwd"], reps), best_time(fns["fwd_bwd"], reps)
                if N < 16384:  # dense again, interleaved: the best of both rounds (load on a shared machine varies)
                    d_f = tuple(map(min, d_f, best_time(dense["fwd"], 1)))  # type: ignore[assignment]
                    d_fb = tuple(map(min, d_fb, best_time(dense["fwd_bwd"], 1)))  # type: ignore[assignment]
                mem = peak_bytes(fns["fwd_bwd"])
                st = fns["stats"]()
                score_bytes = H * N * N * 4
                row: Dict[str, Any] = {
                    "N": N, "causal": causal, "ratio": ratio, "keep": keep, "B": 1, "H": H, "Hkv": Hkv, "D": D,
                    "dense_fwd_s": d_f[0], "dma_fwd_s": m_f[0], "speedup_fwd": d_f[0] / m_f[0],
                    "dense_fwd_bwd_s": d_fb[0], "dma_fwd_bwd_s": m_fb[0], "speedup_fwd_bwd": d_fb[0] / m_fb[0],
                    "dense_fwd_cpu_s": d_f[1], "dma_fwd_cpu_s": m_f[1], "speedup_fwd_cpu": d_f[1] / m_f[1],
                    "dense_fwd_bwd_cpu_s": d_fb[1], "dma_fwd_bwd_cpu_s": m_fb[1],
                    "speedup_fwd_bwd_cpu": d_fb[1] / m_fb[1],
                    "peak_numpy_bytes_dense": mem_dense, "peak_numpy_bytes_dma": mem, "score_matrix_bytes": score_bytes,
                    "target": TARGETS.get((N, ratio)), "loadavg": os.getloadavg()[0], **st,
                }
                if args.index_order and N <= 4096:
                    row["dma_index_order_fwd_s"] = best_time(dma_fns(p, causal, keep, compact=False)["fwd"], reps)[0]
                results.append(row)
                print(table_row(row), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                   "loadavg_end": os.getloadavg(), "dtype": "float32", "selection_included": True,
                   "results": results}, f, indent=2)
    print(f"wrote {args.out}  ('x' = dense time / DMA time, wall and process CPU; 'keys' = length of the compacted "
          "key list per kv head; MiB = tracemalloc peak of NumPy allocations of one forward+backward; 'MiB S' = one "
          "dense score matrix)")


if __name__ == "__main__":
    main()
