"""Decoding with the ring-buffer KV cache vs recomputing attention over the window at every step.

    python benchmarks/bench_decode.py [--capacity 4096] [--heads 8] [--head-dim 64] [--steps 200] [--memory-factor 10]

* **ring cache**: each step appends one token's key and value to its slot and runs the decode kernel of the
  backend (Numba CPU, CUDA split-K) over the slots: ``O(capacity * D)`` work per token.
* **recompute**: what a decoder without a KV cache does: at every step run causal flash attention over the whole
  window again (``capacity`` queries x ``capacity`` keys, the backend's fused flash kernel): ``O(capacity^2 * D)``.
* **bandwidth**: the bytes a decode step reads (every key and value slot) per second, against a NumPy copy of the
  same number of bytes measured in the same run (the memory-bandwidth limit of one thread);
* **unrotate + attend**: a cache that must be read in chronological order: copy the window out of the ring, then
  attend with one query (to show what reading the slots in place saves).

Memory: the process's resident set (``VmRSS``) after decoding 1x and ``--memory-factor`` x capacity tokens one at
a time; the cache's storage is fixed, so it must stay flat. Results go to ``benchmarks/results/local/bench_decode.json``
(ignored by git); ``--update-results`` replaces the committed ``benchmarks/results/bench_decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any, Dict, Optional, Sequence


# idle OpenMP / OpenBLAS threads sleep instead of spinning into the next contender (before NumPy loads them)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import parse_with_output  # noqa: E402
from minitorch.attention.kv_cache import RingBufferKVCache, take_seq  # noqa: E402
from minitorch.attention.spec import make_spec  # noqa: E402


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _sync(kind: str) -> None:
    if kind == "cuda":
        from numba import cuda

        cuda.synchronize()


def _arrays(kind: str, rng: np.random.Generator, shape: tuple, dtype: Any) -> Any:
    x = rng.standard_normal(shape).astype(dtype)
    if kind == "cuda":
        from numba import cuda

        return cuda.to_device(x)
    return x


def bench(kind: str, capacity: int, B: int, H: int, Hkv: int, D: int, steps: int, recompute_steps: int,
          memory_factor: int, dtype: Any, block_size: Optional[int], head_tile: int) -> Dict[str, Any]:
    rng = np.random.default_rng(0)
    cache = RingBufferKVCache(B, Hkv, D, capacity, backend=kind, dtype=dtype, block_size=block_size,
                              head_tile_size=head_tile, tile_size=32 if kind == "cuda" else None)
    # prefill a full window, then warm up (compiles the kernels)
    cache.append(_arrays(kind, rng, (B, Hkv, capacity, D), dtype), _arrays(kind, rng, (B, Hkv, capacity, D), dtype))
    step_k = [_arrays(kind, rng, (B, Hkv, 1, D), dtype) for _ in range(8)]
    step_v = [_arrays(kind, rng, (B, Hkv, 1, D), dtype) for _ in range(8)]
    step_q = [_arrays(kind, rng, (B, H, 1, D), dtype) for _ in range(8)]
    for i in range(3):
        cache.append(step_k[i], step_v[i])
        cache.attend(step_q[i])
    _sync(kind)

    # ring cache decode
    t0 = time.perf_counter()
    for i in range(steps):
        cache.append(step_k[i % 8], step_v[i % 8])
        cache.attend(step_q[i % 8])
    _sync(kind)
    ring_s = (time.perf_counter() - t0) / steps
    # the memory-bandwidth yardstick: a NumPy copy of the bytes one decode step reads (every key and value slot),
    # best of a few, in this run
    storage = 2 * B * Hkv * capacity * D * np.dtype(dtype).itemsize
    src = np.ones(storage // np.dtype(dtype).itemsize, dtype)
    dst = np.empty_like(src)
    copy_s = float("inf")
    for _ in range(10):
        t1 = time.perf_counter()
        np.copyto(dst, src)
        copy_s = min(copy_s, time.perf_counter() - t1)
    del src, dst

    # unrotate + attend (chronological copy of the window every step)
    t0 = time.perf_counter()
    n_unrot = max(5, steps // 10)
    for i in range(n_unrot):
        cache.append(step_k[i % 8], step_v[i % 8])
        order = cache.chronological_slots()
        take_seq(cache.engine, cache.key_storage, order)
        take_seq(cache.engine, cache.value_storage, order)
        cache.attend(step_q[i % 8])
    _sync(kind)
    unrot_s = (time.perf_counter() - t0) / n_unrot

    # recompute: causal flash attention over the whole window, every step
    forward = cache.engine.forward
    blocks = cache.engine.default_blocks(D)
    qw = _arrays(kind, rng, (B, H, capacity, D), dtype)
    kw = _arrays(kind, rng, (B, Hkv, capacity, D), dtype)
    vw = _arrays(kind, rng, (B, Hkv, capacity, D), dtype)
    spec = make_spec(qw.shape, kw.shape, vw.shape, causal=True, window=capacity, default_blocks=blocks)
    forward(qw, kw, vw, None, spec)  # warm-up / compile
    _sync(kind)
    t0 = time.perf_counter()
    for _ in range(recompute_steps):
        spec = make_spec(qw.shape, kw.shape, vw.shape, causal=True, window=capacity, default_blocks=blocks)
        forward(qw, kw, vw, None, spec)
    _sync(kind)
    recompute_s = (time.perf_counter() - t0) / recompute_steps

    # memory: resident set after 1x and memory_factor x capacity decoded tokens
    mem = RingBufferKVCache(B, Hkv, D, capacity, backend=kind, dtype=dtype, block_size=block_size,
                            head_tile_size=head_tile, tile_size=32 if kind == "cuda" else None)
    rss = {}
    t0 = time.perf_counter()
    for n in range(memory_factor * capacity):
        mem.append(step_k[n % 8], step_v[n % 8])
        mem.attend(step_q[n % 8])
        if n + 1 == capacity:
            _sync(kind)
            rss["1x"] = rss_mib()
    _sync(kind)
    rss[f"{memory_factor}x"] = rss_mib()
    mem_s = time.perf_counter() - t0
    return {
        "backend": kind,
        "capacity": capacity, "batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": np.dtype(dtype).name,
        "block_size": block_size, "head_tile_size": head_tile,
        "ring_ms_per_token": ring_s * 1e3,
        "ring_tokens_per_s": 1.0 / ring_s,
        "ring_bytes_per_s": storage / ring_s,
        "numpy_copy_bytes_per_s": storage / copy_s,
        "fraction_of_copy_bandwidth": copy_s / ring_s,
        "unrotate_ms_per_token": unrot_s * 1e3,
        "recompute_ms_per_token": recompute_s * 1e3,
        "recompute_tokens_per_s": 1.0 / recompute_s,
        "speedup_vs_recompute": recompute_s / ring_s,
        "speedup_vs_unrotate": unrot_s / ring_s,
        "cache_storage_mib": storage / 2**20,
        "rss_mib": rss,
        "rss_growth_mib": rss[f"{memory_factor}x"] - rss["1x"],
        "memory_run_tokens": memory_factor * capacity,
        "memory_run_tokens_per_s": memory_factor * capacity / mem_s,
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--recompute-steps", type=int, default=2)
    p.add_argument("--memory-factor", type=int, default=10)
    p.add_argument("--block-size", type=int, default=None, help="slots per decode tile (default: the engine's)")
    p.add_argument("--head-tile", type=int, default=4)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backends", default="fast,cuda", help="comma-separated: fast, simple, cuda (skipped w/o GPU)")
    return parse_with_output(p, "bench_decode.json", argv)


def main() -> None:
    args = parse_args()
    results = []
    for kind in args.backends.split(","):
        if kind == "cuda":
            from numba import cuda

            if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or not cuda.is_available():
                print("cuda: no GPU available, skipped")
                continue
        r = bench(kind, args.capacity, args.batch, args.heads, args.kv_heads, args.head_dim, args.steps,
                  args.recompute_steps, args.memory_factor, np.dtype(args.dtype), args.block_size, args.head_tile)
        results.append(r)
        print(f"[{kind}] capacity {r['capacity']}, B={r['batch']} H={r['heads']} Hkv={r['kv_heads']} "
              f"D={r['head_dim']} {r['dtype']}")
        print(f"  ring cache decode : {r['ring_ms_per_token']:9.3f} ms/token  {r['ring_tokens_per_s']:10.1f} tokens/s  "
              f"{r['ring_bytes_per_s'] / 1e9:.1f} GB/s of cache read = {r['fraction_of_copy_bandwidth']:.0%} of a NumPy "
              f"copy of the same bytes ({r['numpy_copy_bytes_per_s'] / 1e9:.1f} GB/s)")
        print(f"  unrotate + attend : {r['unrotate_ms_per_token']:9.3f} ms/token  "
              f"({r['speedup_vs_unrotate']:.1f}x slower)")
        print(f"  recompute window  : {r['recompute_ms_per_token']:9.3f} ms/token  {r['recompute_tokens_per_s']:10.2f} "
              f"tokens/s  -> ring cache is {r['speedup_vs_recompute']:.0f}x faster")
        print(f"  cache storage {r['cache_storage_mib']:.1f} MiB; RSS after 1x capacity {r['rss_mib']['1x']:.1f} MiB, "
              f"after {args.memory_factor}x {r['rss_mib'][f'{args.memory_factor}x']:.1f} MiB "
              f"(growth {r['rss_growth_mib']:+.1f} MiB over {r['memory_run_tokens']} tokens)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": platform.platform(), "cpus": os.cpu_count(), "results": results}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
