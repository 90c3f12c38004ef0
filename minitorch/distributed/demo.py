"""Ring attention on every rank of ``mpiexec``, checked against one process.

    mpiexec -n 4 python -m minitorch.distributed.demo [--n 1024] [--layout zigzag|contiguous] [--no-causal]

Every rank makes the same random ``q, k, v (B, H, N, D)`` (same seed), keeps its shard, runs ring attention forward
and backward, and gathers the output and the gradients. Rank 0 then runs ``flash_attention`` on the whole sequence
and prints the largest differences, and each rank's part: which positions it holds, the blocks it computed and
skipped, and its seconds of compute and of waiting for messages.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence

import numba
import numpy as np

import minitorch

from ..attention.ring_schedule import rank_segments
from . import MPI, abort_on_exception, gather_sequence, ring_attention, shard_sequence


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1024, help="sequence length N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64, help="head dim D")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=1, help="Numba threads per rank (one core each by default)")
    args = p.parse_args(argv)
    abort_on_exception()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    be = minitorch.FastTensorBackend
    rng = np.random.default_rng(0)
    shape_q = (args.batch, args.heads, args.n, args.dim)
    shape_kv = (args.batch, args.kv_heads, args.n, args.dim)
    full = {name: minitorch.from_numpy(rng.standard_normal(s).astype(args.dtype), backend=be)
            for name, s in (("q", shape_q), ("k", shape_kv), ("v", shape_kv), ("g", shape_q))}
    opts = dict(causal=args.causal, window=args.window)
    tiny = minitorch.from_numpy(np.ones((1, 1, 2 * P, args.dim), args.dtype), backend=be)
    warm = shard_sequence(tiny, comm, args.layout).requires_grad_()
    ring_attention(warm, warm, warm, comm, layout=args.layout, **opts).sum().backward()  # compile before timing
    local = {name: shard_sequence(t, comm, args.layout) for name, t in full.items()}
    for name in "qkv":
        local[name].requires_grad_()
    stats: Dict[str, Any] = {}
    out = ring_attention(local["q"], local["k"], local["v"], comm, layout=args.layout, stats=stats, **opts)
    (out * local["g"]).sum().backward()
    gathered = [gather_sequence(t, comm, args.layout).to_numpy()
                for t in (out, local["q"].grad, local["k"].grad, local["v"].grad)]
    held = ", ".join(f"{s}:{e}" for _, s, e in rank_segments(args.n, P, rank, args.layout))
    rows: List[Any] = comm.gather((rank, held, stats["forward"], stats["backward"]))
    summary: Dict[str, Any] = {}
    if rank == 0:
        print(f"ring attention on {P} ranks: N={args.n}, B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, "
              f"D={args.dim}, {args.dtype}, causal={args.causal}, window={args.window}, layout={args.layout}")
        print(f"{'rank':>4}  {'positions held':<22} {'fwd blocks':>10} {'skipped':>7} {'fwd compute s':>13} "
              f"{'fwd wait s':>10} {'bwd compute s':>13} {'bwd wait s':>10}")
        for r, h, f, b in rows:
            print(f"{r:>4}  {h:<22} {f['blocks_computed']:>10} {f['blocks_skipped']:>7} {f['compute_s']:>13.3f} "
                  f"{f['wait_s']:>10.3f} {b['compute_s']:>13.3f} {b['wait_s']:>10.3f}")
        for name in "qkv":
            full[name].requires_grad_()
        ref = minitorch.flash_attention(full["q"], full["k"], full["v"], **opts)
        (ref * full["g"]).sum().backward()
        want = [ref.to_numpy()] + [full[name].grad.to_numpy() for name in "qkv"]
        for name, got, w in zip(("out", "dq", "dk", "dv"), gathered, want):
            summary[name] = float(np.max(np.abs(got - w)) / np.max(np.abs(w)))
        print("max |ring - flash_attention on one process| / max |flash|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main()
