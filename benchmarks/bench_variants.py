"""Attention variants on the CPU: packed documents and a mask_mod, against what they replace (float32, fused kernels).

    python benchmarks/bench_variants.py [--docs 8] [--doc-len 512] [--heads 4] [--head-dim 64] [--window 256]
                                        [--repeats 5] [--threads 1]

* **Packed documents**: ``--docs`` causal documents of ``--doc-len`` tokens packed into one sequence of
  ``N = docs * doc_len`` (``q_segment_ids = k_segment_ids``), against the same documents as ``docs`` separate causal
  calls, and against one causal call over all ``N`` tokens (what packing without segment ids would cost). Packed
  should cost about ``1 / docs`` of the full causal call (its SKIP tiles are never loaded) and about the separate
  calls' total.
* **mask_mod sliding window**: ``mask_mod = lambda b, h, q, k: (k <= q) & (q - k < W)`` against the built-in
  ``causal=True, window=W`` at ``N``: the same tiles (the built-in's are classified from positions, the mask_mod's
  from its evaluation), the mask_mod's TRIANGLE tiles also testing their bits. Two ways: a ``BlockMask`` built once
  by ``block_mask_from`` and reused (FlexAttention's way: the figure to compare, target within 10%), and the
  function itself, evaluated on every call (the evaluation's cost is reported on its own).

Engine calls on raw arrays (``FastTensorBackend.attention``, the specs made outside the timed region except where the
spec's construction is the point: the per-call ``mask_mod``). ``OMP_WAIT_POLICY=PASSIVE`` is set before anything is
imported; every contender runs in this one process, their repeats interleaved (so that a change in the machine's
load hits them alike), and the table gives the median of ``--repeats`` runs, wall time and process CPU time (all
threads). Results: ``benchmarks/results/local/bench_variants.json`` (``--update-results``: the committed
``benchmarks/results/bench_variants.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before NumPy / Numba load their thread pools
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # NumPy's OpenBLAS threads: no spinning after a product

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import machine_info, parse_with_output, write_json  # noqa: E402
from minitorch import FastTensorBackend  # noqa: E402
from minitorch.attention import block_mask_from  # noqa: E402
from minitorch.attention.spec import make_spec  # noqa: E402

engine = FastTensorBackend.attention


def interleaved(contenders: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, Dict[str, float]]:
    """Median wall and process-CPU seconds of each contender, one warm-up call each, repeats interleaved."""
    for fn in contenders.values():
        fn()
    times: Dict[str, List[tuple]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: {"wall_s": statistics.median(t[0] for t in ts), "cpu_s": statistics.median(t[1] for t in ts),
                   "runs": len(ts)} for name, ts in times.items()}


def fwd_bwd(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray, spec: Any, backward: bool) -> Any:
    out, lse = engine.forward(q, k, v, None, spec)
    if backward:
        engine.backward(q, k, v, None, out, lse, do, spec)
    return out


def documents(args: argparse.Namespace, rng: np.random.Generator, backward: bool) -> Dict[str, Any]:
    H, D, L, n = args.heads, args.head_dim, args.doc_len, args.docs
    N = n * L
    q, k, v, do = (rng.standard_normal((1, H, N, D)).astype(np.float32) for _ in range(4))
    seg = np.repeat(np.arange(n), L)[None]
    packed = make_spec(q.shape, k.shape, v.shape, causal=True, q_segment_ids=seg, k_segment_ids=seg)
    full = make_spec(q.shape, k.shape, v.shape, causal=True)
    parts = [tuple(np.ascontiguousarray(x[:, :, d * L:(d + 1) * L]) for x in (q, k, v, do)) for d in range(n)]
    one = make_spec(parts[0][0].shape, parts[0][1].shape, parts[0][2].shape, causal=True)
    res = interleaved({
        "packed (segment ids)": lambda: fwd_bwd(q, k, v, do, packed, backward),
        f"{n} separate calls": lambda: [fwd_bwd(*p, one, backward) for p in parts],
        f"one causal call of {N}": lambda: fwd_bwd(q, k, v, do, full, backward),
    }, args.repeats)
    counts = {"packed": packed.schedule.counts(), "full causal": full.schedule.counts()}
    return {"N": N, "results": res, "tiles": counts,
            "skip_fraction": {"packed": packed.schedule.skip_fraction(), "full": full.schedule.skip_fraction()}}


def sliding_window(args: argparse.Namespace, rng: np.random.Generator, backward: bool) -> Dict[str, Any]:
    H, D, W = args.heads, args.head_dim, args.window
    N = args.docs * args.doc_len
    q, k, v, do = (rng.standard_normal((1, H, N, D)).astype(np.float32) for _ in range(4))

    def window_mask(b, h, qp, kp):  # type: ignore[no-untyped-def]
        return (kp <= qp) & (qp - kp < W)

    builtin = make_spec(q.shape, k.shape, v.shape, causal=True, window=W)
    bq, bk = builtin.block_q, builtin.block_k
    bm = block_mask_from(window_mask, 1, 1, N, N, bq, bk)
    reused = make_spec(q.shape, k.shape, v.shape, mask_mod=bm)
    per_call = lambda: make_spec(q.shape, k.shape, v.shape, mask_mod=window_mask, block_q=bq, block_k=bk)  # noqa: E731
    res = interleaved({
        f"built-in window={W}": lambda: fwd_bwd(q, k, v, do, builtin, backward),
        "mask_mod (BlockMask reused)": lambda: fwd_bwd(q, k, v, do, reused, backward),
        "mask_mod (evaluated per call)": lambda: fwd_bwd(q, k, v, do, per_call(), backward),
        "block_mask_from alone": lambda: block_mask_from(window_mask, 1, 1, N, N, bq, bk),
    }, args.repeats)
    same = bool(np.array_equal(reused.kernel_tiles()[0, 0], builtin.kernel_tiles()[0, 0]))
    return {"N": N, "W": W, "results": res, "same_tiles": same, "tiles": builtin.schedule.counts()}


def print_block(title: str, block: Dict[str, Any], base: str) -> None:
    print(f"\n{title}")
    ref = block["results"][base]
    for name, r in block["results"].items():
        print(f"  {name:34s} wall {r['wall_s'] * 1e3:8.1f} ms  cpu {r['cpu_s'] * 1e3:8.1f} ms   "
              f"x {r['wall_s'] / ref['wall_s']:.3f} of {base} (cpu x {r['cpu_s'] / ref['cpu_s']:.3f})")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: numba's)")
    return parse_with_output(ap, "bench_variants.json", argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        import numba

        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    out: Dict[str, Any] = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "out"}}
    for backward in (False, True):
        tag = "fwd+bwd" if backward else "fwd"
        doc = documents(args, rng, backward)
        print_block(f"packed documents, {tag}: {args.docs} x {args.doc_len} (N = {doc['N']}), causal, "
                    f"H = {args.heads}, D = {args.head_dim}, float32", doc, f"one causal call of {doc['N']}")
        win = sliding_window(args, rng, backward)
        print_block(f"sliding window, {tag}: N = {win['N']}, W = {win['W']} (same tiles: {win['same_tiles']})",
                    win, f"built-in window={args.window}")
        out[tag] = {"documents": doc, "sliding_window": win}
    print(f"\nwrote {write_json(args.out, out)}")


if __name__ == "__main__":
    main()
