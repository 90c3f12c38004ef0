"""Paged KV cache: its memory against a contiguous cache, and paged attention's decode step against contiguous
flash decoding of the same tokens.

    python benchmarks/bench_paged.py [--seqs 64] [--min-len 16] [--max-len 4096] [--heads 8] [--kv-heads 2]
                                     [--head-dim 64] [--page-size 16] [--repeats 21] [--backends fast,cuda]

Everything is measured in one run, in one process (``OMP_WAIT_POLICY=PASSIVE`` set before anything is imported):

* **memory**: ``--seqs`` sequences with lengths drawn log-uniformly from ``[min_len, max_len]`` (long-tailed: most
  are short, a few long), appended token by token page by page to a ``PagedKVCache`` (pages of ``--page-size``), vs
  a contiguous cache ``(S, Hkv, L, D)`` that reserves the longest length for every sequence. Bytes in use, bytes
  that hold tokens, and the fraction wasted.
* **decode step**: one query per sequence; ``paged_attention`` (keys read in place through the block tables) vs the
  same engine's flash attention over the contiguous cache (left-aligned, the tail past each length masked as
  padding, so its padded tiles are skipped: the same tokens, the same tiles, the same split-K). Medians of
  interleaved repeats, of wall time and of the process's CPU time (which a shared machine's other jobs disturb
  less); both include their per-step host work (validation, tile classification).
* **bandwidth**: the K/V bytes a decode step reads, ``2 sum(lengths) Hkv D itemsize``, divided by its time, against
  NumPy copying the same number of bytes (``np.copyto``, one thread) in the same run; on a GPU a device-to-device
  copy of the same bytes.

The CPU engine uses Numba's threads (all cores); the NumPy copy one. The machine may be shared: the report says
the load average. Results go to ``benchmarks/results/local/bench_paged.json`` (``--update-results``: the committed
``benchmarks/results/bench_paged.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before NumPy / Numba start any thread pool
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # NumPy's OpenBLAS threads: no spinning after a product

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import gpu_name, machine_info, parse_with_output, write_json  # noqa: E402
from minitorch.attention.engine import engine_of  # noqa: E402
from minitorch.attention.kv_cache import resolve_backend  # noqa: E402
from minitorch.attention.paged import PagedKVCache, attend_pages  # noqa: E402
from minitorch.attention.spec import make_spec  # noqa: E402


def draw_lengths(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """``n`` lengths, log-uniform on ``[lo, hi]``: as many sequences between 16 and 32 tokens as between 2048 and
    4096, so most are short and a few dominate the memory a contiguous cache must reserve."""
    return np.exp(rng.uniform(np.log(lo), np.log(hi + 1), size=n)).astype(np.int64).clip(lo, hi)


def _sync(kind: str) -> None:
    if kind == "cuda":
        from numba import cuda

        cuda.synchronize()


def _interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, kind: str) -> Dict[str, Dict[str, float]]:
    """Time every function ``repeats`` times, round-robin (so that load changes hit all alike), after one warm-up:
    wall time, and the process's CPU time (all its threads; on a shared machine it does not count the time spent
    waiting for a core)."""
    wall: Dict[str, List[float]] = {name: [] for name in fns}
    cpu: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    _sync(kind)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(kind)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"median_s": statistics.median(wall[name]), "best_s": min(wall[name]),
                   "cpu_median_s": statistics.median(cpu[name])} for name in fns}


def bench(kind: str, S: int, min_len: int, max_len: int, H: int, Hkv: int, D: int, page_size: int, repeats: int,
          dtype: Any, seed: int = 0) -> Dict[str, Any]:
    backend = resolve_backend(kind)
    engine = engine_of(backend)
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(seed)
    lens = draw_lengths(rng, S, min_len, max_len)
    L = int(lens.max())

    # the contiguous cache: every sequence left-aligned in a slab of the longest length
    k_host = np.zeros((S, Hkv, L, D), dtype)
    v_host = np.zeros((S, Hkv, L, D), dtype)
    for s, n in enumerate(lens):
        k_host[s, :, :n] = rng.standard_normal((Hkv, n, D))
        v_host[s, :, :n] = rng.standard_normal((Hkv, n, D))
    # the paged cache: the same tokens, appended in chunks of up to 256 as a prefill would
    num_pages = int(sum(-(-lens // page_size)))
    cache = PagedKVCache(Hkv, D, page_size=page_size, num_pages=num_pages, backend=backend, dtype=dtype)
    ids = [cache.add_sequence() for _ in range(S)]
    t0 = time.perf_counter()
    for s, n in zip(ids, lens):
        for a in range(0, n, 256):
            b = min(a + 256, n)
            cache.append(s, k_host[s, :, a:b], v_host[s, :, a:b])
    _sync(kind)
    append_s = time.perf_counter() - t0
    table, seq_lens = cache.block_table(ids), cache.seq_lens(ids)

    token_bytes = 2 * int(lens.sum()) * Hkv * D * itemsize
    paged_bytes = 2 * cache.pages_in_use * page_size * Hkv * D * itemsize
    contiguous_bytes = 2 * S * L * Hkv * D * itemsize
    contiguous_cap_bytes = 2 * S * max_len * Hkv * D * itemsize

    # decode: one query per sequence, at its newest position
    q = engine.asarray(rng.standard_normal((S, H, 1, D)), dtype)
    k, v = engine.asarray(k_host, dtype), engine.asarray(v_host, dtype)
    pad = np.arange(L)[None, :] >= lens[:, None]
    blocks = engine.default_blocks(D)

    def paged() -> Any:
        return attend_pages(engine, q, cache.k_pages, cache.v_pages, table, seq_lens)

    def contiguous() -> Any:
        spec = make_spec(q.shape, k.shape, v.shape, causal=True, key_padding_mask=pad, default_blocks=blocks)
        return engine.forward(q, k, v, None, spec.replace(num_splits=engine.decode_splits(spec.Tc)))

    if kind == "cuda":
        from numba import cuda

        src = cuda.device_array(token_bytes // itemsize, dtype=dtype)
        dst = cuda.device_array(token_bytes // itemsize, dtype=dtype)

        def copy() -> None:
            dst.copy_to_device(src)
    else:
        src = np.ones(token_bytes // itemsize, dtype=dtype)
        dst = np.empty_like(src)

        def copy() -> None:
            np.copyto(dst, src)

    diff = float(np.max(np.abs(engine.to_host(paged()[0]).astype(np.float64) - engine.to_host(contiguous()[0]))))
    t = _interleaved({"paged": paged, "contiguous": contiguous, "copy": copy}, repeats, kind)
    paged_s, contig_s, copy_s = (t[n]["median_s"] for n in ("paged", "contiguous", "copy"))
    return {
        "backend": kind, "threads": _threads(kind), "seqs": S, "lengths": {"min": int(lens.min()),
        "median": float(np.median(lens)), "mean": float(lens.mean()), "max": L, "drawn_from": [min_len, max_len],
        "distribution": "log-uniform"}, "tokens": int(lens.sum()), "heads": H, "kv_heads": Hkv, "head_dim": D,
        "dtype": np.dtype(dtype).name, "page_size": page_size, "blocks": list(blocks),
        "memory": {
            "token_mib": token_bytes / 2**20, "paged_mib": paged_bytes / 2**20,
            "block_table_kib": table.nbytes / 2**10, "contiguous_longest_mib": contiguous_bytes / 2**20,
            "contiguous_max_len_mib": contiguous_cap_bytes / 2**20,
            "paged_waste": 1 - token_bytes / paged_bytes,
            "contiguous_longest_waste": 1 - token_bytes / contiguous_bytes,
            "contiguous_max_len_waste": 1 - token_bytes / contiguous_cap_bytes,
            "pages_in_use": cache.pages_in_use, "append_s": append_s,
        },
        "decode": {
            "paged_ms": paged_s * 1e3, "contiguous_ms": contig_s * 1e3, "paged_over_contiguous": paged_s / contig_s,
            "paged_best_ms": t["paged"]["best_s"] * 1e3, "contiguous_best_ms": t["contiguous"]["best_s"] * 1e3,
            "paged_cpu_ms": t["paged"]["cpu_median_s"] * 1e3,
            "contiguous_cpu_ms": t["contiguous"]["cpu_median_s"] * 1e3,
            "paged_over_contiguous_cpu": t["paged"]["cpu_median_s"] / t["contiguous"]["cpu_median_s"],
            "max_abs_diff_paged_vs_contiguous": diff, "repeats": repeats,
        },
        "bandwidth": {
            "kv_bytes_per_step": token_bytes, "paged_gb_s": token_bytes / paged_s / 1e9,
            "contiguous_gb_s": token_bytes / contig_s / 1e9, "copy_gb_s": token_bytes / copy_s / 1e9,
            "copy_ms": copy_s * 1e3, "paged_over_copy": (token_bytes / paged_s) / (token_bytes / copy_s),
            "copy": "device-to-device copy" if kind == "cuda" else "np.copyto, one thread",
        },
    }


def _threads(kind: str) -> Optional[int]:
    if kind == "cuda":
        return None
    import numba

    return int(numba.get_num_threads())


def report(r: Dict[str, Any]) -> None:
    m, d, b, ln = r["memory"], r["decode"], r["bandwidth"], r["lengths"]
    print(f"[{r['backend']}] {r['seqs']} sequences, lengths {ln['distribution']} in {ln['drawn_from']} (min "
          f"{ln['min']}, median {ln['median']:.0f}, mean {ln['mean']:.0f}, max {ln['max']}); H={r['heads']} "
          f"Hkv={r['kv_heads']} D={r['head_dim']} {r['dtype']}, pages of {r['page_size']}"
          + (f", {r['threads']} threads" if r["threads"] else ""))
    print(f"  KV memory: tokens {m['token_mib']:.1f} MiB | paged {m['paged_mib']:.1f} MiB ({m['paged_waste']:.1%} "
          f"wasted, {m['pages_in_use']} pages; block tables {m['block_table_kib']:.1f} KiB) | contiguous for the "
          f"longest {m['contiguous_longest_mib']:.1f} MiB ({m['contiguous_longest_waste']:.1%} wasted) | contiguous "
          f"for max_len {m['contiguous_max_len_mib']:.1f} MiB ({m['contiguous_max_len_waste']:.1%} wasted)")
    print(f"  decode step (median of {d['repeats']}, interleaved): paged {d['paged_ms']:.2f} ms, contiguous flash "
          f"{d['contiguous_ms']:.2f} ms -> {d['paged_over_contiguous']:.2f}x (best {d['paged_best_ms']:.2f} vs "
          f"{d['contiguous_best_ms']:.2f} ms; CPU time {d['paged_cpu_ms']:.2f} vs {d['contiguous_cpu_ms']:.2f} ms -> "
          f"{d['paged_over_contiguous_cpu']:.2f}x); max |paged - contiguous| "
          f"{d['max_abs_diff_paged_vs_contiguous']:.1e}")
    print(f"  bandwidth: {b['kv_bytes_per_step'] / 2**20:.1f} MiB of K/V per step: paged {b['paged_gb_s']:.2f} GB/s, "
          f"contiguous {b['contiguous_gb_s']:.2f} GB/s, {b['copy']} of the same bytes {b['copy_gb_s']:.2f} GB/s "
          f"({b['copy_ms']:.2f} ms) -> paged at {b['paged_over_copy']:.2f}x the copy's rate")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=31)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="fast,cuda", help="comma-separated: fast, simple, cuda (skipped w/o GPU)")
    return parse_with_output(p, "bench_paged.json", argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    results = []
    for kind in args.backends.split(","):
        if kind == "cuda" and gpu_name() is None:
            print("cuda: no GPU available, skipped")
            continue
        r = bench(kind, args.seqs, args.min_len, args.max_len, args.heads, args.kv_heads, args.head_dim,
                  args.page_size, args.repeats, np.dtype(args.dtype), args.seed)
        report(r)
        results.append(r)
    out = {"machine": machine_info(), "timing": "one process, OMP_WAIT_POLICY=PASSIVE, interleaved repeats, medians "
                                                "of wall and of process CPU time",
           "results": results}
    print(f"wrote {write_json(args.out, out)}")
    return out


if __name__ == "__main__":
    main()
