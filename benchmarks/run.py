"""The benchmark suite: flash attention, ring-buffer decoding and dynamic mask attention, with derived metrics.

    python -m benchmarks                      # full sizes (about 10 minutes on a 2-core CPU)
    python -m benchmarks --quick              # small sizes (a few minutes)
    python -m benchmarks --only attention,dma # a subset (attention, memory, decode, dma; ops is opt-in)
    python -m benchmarks --update-results     # replace the committed results (the others go to results/local/)

Each benchmark is a script of ``benchmarks/`` run in a subprocess (its output streams through, prefixed), writing
its own JSON; a missing or failing script is reported and skipped. This driver then adds what makes the numbers
comparable across benchmarks and machines:

* **matmul peak**: NumPy float32 ``n x n`` matmul GFLOP/s on this machine, the yardstick: the best of 10 runs after
  a warm-up, measured at the start and at the end, the larger taken (a ceiling: background load can only lower it);
* **throughput** in tokens/s (query rows per second for attention, generated tokens per second for decoding);
* **achieved FLOP rate** and **fraction of the matmul peak** (attention ``4 B H N^2 D`` per forward, half when
  causal, 3.5x for forward+backward; decoding ``4 B H C D`` per token over a cache of ``C`` slots);
* **scaling with sequence length**: N doubles from 512; the exponent ``log2(t(2N) / t(N))`` is 2 for quadratic work;
* **peak memory vs N**: extra resident memory of flash forward+backward against standard attention (which stores
  the ``N x N`` scores), each measured in a fresh process;
* **sparsity efficiency** of dynamic mask attention: speedup over dense flash attention divided by the ideal
  speedup ``1/r`` (``1/(2r)`` causal) at keep ratio ``r``.

Results: ``benchmarks/results/local/suite/`` (``--quick``: ``.../local/quick/``), a folder git ignores: each
script's JSON, ``summary.json`` (machine: CPU model, cores, GPU name; all derived tables) and PNG plots (speed and
memory vs N, decode tokens/s vs cache size, speedup vs selection ratio). ``--update-results`` writes the committed
``benchmarks/results/suite/`` (``quick/``) instead, the numbers the README and the visualizer show. The scripts' own
default outputs are left untouched.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a file: python benchmarks/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import (LOCAL_RESULTS_DIR, RESULTS_DIR, ROOT, machine_info, matmul_peak, peak_memory_probe,
                                   read_json, scaling, write_json)
else:
    from .common import (LOCAL_RESULTS_DIR, RESULTS_DIR, ROOT, machine_info, matmul_peak, peak_memory_probe, read_json,
                         scaling, write_json)

BENCH_DIR = os.path.join(ROOT, "benchmarks")


# =====================================================================================================================
# Sizes
# =====================================================================================================================


@dataclass
class Sizes:
    attention_ns: List[int]
    attention_repeats: int
    memory_ns: List[int]
    decode_capacities: List[int]
    decode_steps: int
    dma_sizes: List[int]
    dma_ratios: List[float]
    dma_causal: str
    dma_repeats: int
    matmul_n: int
    heads: int = 4
    head_dim: int = 64


QUICK = Sizes(attention_ns=[512, 1024, 2048], attention_repeats=3, memory_ns=[512, 1024, 2048, 4096],
              decode_capacities=[512, 1024, 2048], decode_steps=50,
              dma_sizes=[512, 1024, 2048], dma_ratios=[0.2, 0.1, 0.05], dma_causal="no", dma_repeats=3,
              matmul_n=1024)
FULL = Sizes(attention_ns=[512, 1024, 2048, 4096, 8192], attention_repeats=3,
             memory_ns=[512, 1024, 2048, 4096, 8192], decode_capacities=[512, 1024, 2048, 4096], decode_steps=100,
             dma_sizes=[1024, 2048, 4096], dma_ratios=[0.2, 0.1, 0.05, 0.025], dma_causal="both", dma_repeats=2,
             matmul_n=2048)


# =====================================================================================================================
# Running the scripts
# =====================================================================================================================


@dataclass
class Outcome:
    name: str
    status: str  # ok | missing | failed | skipped
    seconds: float = 0.0
    message: str = ""
    json_paths: List[str] = field(default_factory=list)


def run_script(tag: str, script: str, args: List[str], log_path: str, timeout: float) -> Tuple[int, str]:
    """Run ``benchmarks/<script> args`` with this Python, streaming its output with a ``[tag]`` prefix into the
    terminal and ``log_path``. Returns the exit code (124 on timeout) and the last lines of output."""
    cmd = [sys.executable, os.path.join(BENCH_DIR, script)] + args
    print(f"[{tag}] $ {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])}",
          flush=True)
    tail: List[str] = []
    start = time.perf_counter()
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                print(f"[{tag}] {line.rstrip()}", flush=True)
                tail = (tail + [line.rstrip()])[-15:]
                if time.perf_counter() - start > timeout:
                    raise subprocess.TimeoutExpired(cmd, timeout)
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            tail.append(f"timed out after {timeout:.0f} s")
            rc = 124
    return rc, "\n".join(tail)


def _bench(name: str, script: str, runs: List[List[str]], out_dir: str, timeout: float) -> Outcome:
    """Run one script once per argument list (each list ends with its JSON path after ``--out``/``--json``)."""
    path = os.path.join(BENCH_DIR, script)
    if not os.path.exists(path):
        msg = f"benchmarks/{script} not found: skipped (not written yet?)"
        print(f"[{name}] {msg}")
        return Outcome(name, "missing", message=msg)
    t0 = time.perf_counter()
    out = Outcome(name, "ok")
    for i, args in enumerate(runs):
        log = os.path.join(out_dir, "logs", f"{name}{'' if len(runs) == 1 else f'_{i}'}.log")
        json_path = args[-1]
        if os.path.exists(json_path):
            os.remove(json_path)  # never read a previous run's numbers
        rc, tail = run_script(name, script, args, log, timeout)
        if rc != 0 or not os.path.exists(json_path):
            out.status = "failed"
            out.message = f"exit code {rc}; last output:\n{tail}"
            print(f"[{name}] FAILED (exit code {rc}); log: {os.path.relpath(log, ROOT)}")
            break
        out.json_paths.append(json_path)
    out.seconds = time.perf_counter() - t0
    return out


# =====================================================================================================================
# Derived metrics
# =====================================================================================================================


def _wall(x: Any) -> Optional[float]:
    """A time that may be stored as a number or as ``[wall, cpu]``."""
    if isinstance(x, (list, tuple)):
        return float(x[0]) if x else None
    return None if x is None else float(x)


def attention_flops(impl: str, B: int, H: int, N: int, D: int) -> float:
    fwd = 4.0 * B * H * N * N * D
    if "bwd" in impl:
        return 3.5 * fwd
    return fwd / 2 if "causal" in impl else fwd


def derive_attention(raw: Dict[str, Any], peak: float) -> Dict[str, Any]:
    cfg = raw.get("config", {})
    B, H, D = int(cfg.get("B", 1)), int(cfg.get("H", 4)), int(cfg.get("D", 64))
    rows, by_impl = [], {}
    for n_str, impls in sorted(raw.get("results", {}).items(), key=lambda kv: int(kv[0])):
        N = int(n_str)
        for impl, t in impls.items():
            med = t.get("median_s", t.get("best_s"))
            if not med:
                continue
            gflops = attention_flops(impl, B, H, N, D) / med / 1e9
            row = {"impl": impl, "N": N, "median_ms": med * 1e3, "best_ms": t.get("best_s", med) * 1e3,
                   "tokens_per_s": B * N / med, "gflops": gflops, "fraction_of_peak": gflops / peak if peak else None}
            rows.append(row)
            by_impl.setdefault(impl, []).append(row)
    scale = {impl: scaling([r["N"] for r in rs], [r["median_ms"] for r in rs]) for impl, rs in by_impl.items()}
    return {"config": {"B": B, "H": H, "D": D, "statistic": "median of repeats after a warm-up"}, "rows": rows,
            "time_scaling": scale, "script_memory": raw.get("memory"), "machine": raw.get("machine"),
            "not_measured": raw.get("not_measured") or {}}


def derive_decode(raws: List[Dict[str, Any]], peak: float) -> Dict[str, Any]:
    rows = []
    for raw in raws:
        for r in raw.get("results", []):
            C, B, H, D = r["capacity"], r.get("batch", 1), r["heads"], r["head_dim"]
            ms = r["ring_ms_per_token"]
            gflops = 4.0 * B * H * C * D / (ms / 1e3) / 1e9
            rows.append({
                "backend": r.get("backend"), "capacity": C, "H": H, "D": D,
                "ring_tokens_per_s": r["ring_tokens_per_s"], "ring_ms_per_token": ms,
                "recompute_tokens_per_s": r.get("recompute_tokens_per_s"),
                "speedup_vs_recompute": r.get("speedup_vs_recompute"),
                "gflops": gflops, "fraction_of_peak": gflops / peak if peak else None,
                "cache_storage_mib": r.get("cache_storage_mib"), "rss_growth_mib": r.get("rss_growth_mib"),
                "rss_mib": r.get("rss_mib"),
            })
    rows.sort(key=lambda r: (str(r["backend"]), r["capacity"]))
    scale = {}
    for backend in sorted({str(r["backend"]) for r in rows}):
        rs = [r for r in rows if str(r["backend"]) == backend]
        caps = [r["capacity"] for r in rs]
        scale[backend] = {
            "ring_ms_per_token": scaling(caps, [r["ring_ms_per_token"] for r in rs]),
            "recompute_ms_per_token": scaling(caps, [1e3 / r["recompute_tokens_per_s"]
                                                     if r["recompute_tokens_per_s"] else None for r in rs]),
        }
    return {"rows": rows, "time_scaling": scale,
            "statistic": "mean time per token over the decode steps (ring), mean of the recompute steps"}


def derive_dma(raw: Dict[str, Any], peak: float) -> Dict[str, Any]:
    rows = []
    for r in raw.get("results", []):
        N, ratio, causal = r["N"], r["ratio"], bool(r["causal"])
        H, D = r.get("H", 4), r.get("D", 64)
        dense_f, dma_f = _wall(r.get("dense_fwd_s")), _wall(r.get("dma_fwd_s"))
        dense_fb, dma_fb = _wall(r.get("dense_fwd_bwd_s")), _wall(r.get("dma_fwd_bwd_s"))
        ideal = 1.0 / (2 * ratio) if causal else 1.0 / ratio
        sp_f = dense_f / dma_f if dense_f and dma_f else None
        sp_fb = dense_fb / dma_fb if dense_fb and dma_fb else None
        keep = r.get("keep", ratio * N)
        useful = 4.0 * H * N * keep * D  # the forward FLOPs of the kept keys only
        rows.append({
            "N": N, "causal": causal, "ratio": ratio, "keep": keep,
            "dense_fwd_ms": dense_f * 1e3 if dense_f else None, "dma_fwd_ms": dma_f * 1e3 if dma_f else None,
            "speedup_fwd": sp_f, "speedup_fwd_bwd": sp_fb, "ideal_speedup": ideal,
            "sparsity_efficiency_fwd": sp_f / ideal if sp_f else None,
            "sparsity_efficiency_fwd_bwd": sp_fb / ideal if sp_fb else None,
            "dma_tokens_per_s": N / dma_f if dma_f else None,
            "dma_useful_gflops": useful / dma_f / 1e9 if dma_f else None,
            "fraction_of_peak": useful / dma_f / 1e9 / peak if dma_f and peak else None,
            "peak_mib_dense": (r.get("peak_numpy_bytes_dense") or 0) / 2**20,
            "peak_mib_dma": (r.get("peak_numpy_bytes_dma") or 0) / 2**20,
            "target": r.get("target"),
        })
    return {"rows": rows, "statistic": "best of the script's repeats (wall time), selection included",
            "ideal": "1/r without causal, 1/(2r) causal"}


def memory_sweep(ns: List[int], H: int, D: int, timeout: float) -> List[Dict[str, Any]]:
    """Extra peak resident memory of flash forward+backward and of standard attention forward at each N (float32,
    B=1), each in a fresh process, next to the size of one dense score matrix ``H N^2`` floats."""
    setup_common = f"""
        import numpy as np
        from minitorch.attention.kernels.cpu import flash as cpu
        from minitorch.attention.spec import make_spec
        H, D, N = {H}, {D}, {{N}}
        rng = np.random.default_rng(0)
        q, k, v, do = (rng.standard_normal((1, H, N, D), dtype=np.float32) for _ in range(4))
    """
    flash_setup = setup_common + """
        t = np.ones((1, 1, 8, D), np.float32)
        s0 = make_spec(t.shape, t.shape, t.shape)
        o0, l0 = cpu.forward(t, t, t, None, s0)
        cpu.backward(t, t, t, None, o0, l0, t, s0)  # compile / load the kernels before measuring
        spec = make_spec(q.shape, k.shape, v.shape)
    """
    flash_run = """
        out, lse = cpu.forward(q, k, v, None, spec)
        grads = cpu.backward(q, k, v, None, out, lse, do, spec)
    """
    naive_run = """
        s = (q * np.float32(1.0 / np.sqrt(D))) @ np.swapaxes(k, -1, -2)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out = s @ v
    """
    rows = []
    for N in ns:
        row: Dict[str, Any] = {"N": N, "score_matrix_mib": H * N * N * 4 / 2**20,
                               "inputs_mib": 4 * H * N * D * 4 / 2**20}
        for name, setup, run in (("flash_fwd_bwd", flash_setup, flash_run), ("naive_fwd", setup_common, naive_run)):
            res = peak_memory_probe(setup.replace("{N}", str(N)), run, timeout=timeout)
            row[f"{name}_extra_mib"] = res.get("extra_mib")
            if "error" in res:
                row[f"{name}_error"] = res["error"][-300:]
        print(f"[memory] N={N:6d}  flash fwd+bwd +{_fmt(row['flash_fwd_bwd_extra_mib'])} MiB   standard attention "
              f"fwd +{_fmt(row['naive_fwd_extra_mib'])} MiB   (one score matrix {row['score_matrix_mib']:.0f} MiB)",
              flush=True)
        rows.append(row)
    return rows


# =====================================================================================================================
# Plots
# =====================================================================================================================


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attention(att: Dict[str, Any], memory: List[Dict[str, Any]], peak: float, path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    by_impl: Dict[str, List[Dict[str, Any]]] = {}
    for r in att["rows"]:
        by_impl.setdefault(r["impl"], []).append(r)
    ax = axes[0]
    for impl, rs in by_impl.items():
        ax.loglog([r["N"] for r in rs], [r["median_ms"] for r in rs], "o-", label=impl, base=2)
    if by_impl:
        first = next(iter(by_impl.values()))
        n0, t0 = first[0]["N"], first[0]["median_ms"]
        ns = [r["N"] for r in first]
        ax.loglog(ns, [t0 * (n / n0) ** 2 for n in ns], "k:", lw=1, label="~N^2", base=2)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("time (ms, median)")
    ax.set_title("speed vs N")
    ax.legend(fontsize=7)
    ax = axes[1]
    for impl, rs in by_impl.items():
        ax.semilogx([r["N"] for r in rs], [r["gflops"] for r in rs], "o-", label=impl, base=2)
    if peak:
        ax.axhline(peak, color="k", ls="--", lw=1, label=f"NumPy matmul peak {peak:.0f}")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("GFLOP/s")
    ax.set_title("achieved FLOP rate")
    ax.legend(fontsize=7)
    ax = axes[2]
    if memory:
        ns = [m["N"] for m in memory]
        for key, label in (("flash_fwd_bwd_extra_mib", "flash fwd+bwd (extra peak RSS)"),
                           ("naive_fwd_extra_mib", "standard attention fwd (extra peak RSS)"),
                           ("score_matrix_mib", "one N x N score matrix (H heads)"),
                           ("inputs_mib", "q, k, v, dO")):
            vals = [m.get(key) for m in memory]
            pts = [(n, max(v, 0.1)) for n, v in zip(ns, vals) if v is not None]
            if pts:
                ax.loglog(*zip(*pts), "o-" if "extra" in key else ":", label=label, base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("MiB")
        ax.set_title("peak memory vs N")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    cfg = att["config"]
    fig.suptitle(f"attention, CPU float32, B={cfg['B']} H={cfg['H']} D={cfg['D']}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_decode(dec: Dict[str, Any], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for backend in sorted({str(r["backend"]) for r in dec["rows"]}):
        rs = [r for r in dec["rows"] if str(r["backend"]) == backend]
        caps = [r["capacity"] for r in rs]
        ax.loglog(caps, [r["ring_tokens_per_s"] for r in rs], "o-", base=2, label=f"{backend}: ring-buffer cache")
        ax.loglog(caps, [r["recompute_tokens_per_s"] for r in rs], "s--", base=2,
                  label=f"{backend}: recompute the window")
    ax.set_xlabel("cache size = attention window (tokens)")
    ax.set_ylabel("tokens / s")
    ax.set_title("decoding one token at a time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_dma(dma: Dict[str, Any], path: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    groups: Dict[Any, List[Dict[str, Any]]] = {}
    for r in dma["rows"]:
        groups.setdefault((r["N"], r["causal"]), []).append(r)
    for ax, key, title in ((axes[0], "speedup_fwd", "forward"), (axes[1], "speedup_fwd_bwd", "forward+backward")):
        ratios = sorted({r["ratio"] for r in dma["rows"]})
        for (N, causal), rs in sorted(groups.items()):
            rs = sorted(rs, key=lambda r: r["ratio"])
            ax.loglog([r["ratio"] for r in rs], [r[key] for r in rs], "o-", label=f"N={N}{' causal' if causal else ''}")
        if ratios:
            ax.loglog(ratios, [1 / r for r in ratios], "k:", lw=1, label="ideal 1/r")
            if any(r["causal"] for r in dma["rows"]):
                ax.loglog(ratios, [1 / (2 * r) for r in ratios], "k--", lw=0.8, label="ideal causal 1/(2r)")
        ax.axhline(1.0, color="gray", lw=0.8)
        if ratios:
            ax.set_xticks(ratios)
            ax.set_xticklabels([f"{r:g}" for r in ratios])
            ax.minorticks_off()
        ax.set_xlabel("selection ratio r = keep_window_size / N")
        ax.set_ylabel("speedup over dense flash attention")
        ax.set_title(f"dynamic mask attention, {title} (selection included)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# =====================================================================================================================
# Report
# =====================================================================================================================


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def print_report(summary: Dict[str, Any]) -> None:
    m = summary["machine"]
    peak = summary["matmul_peak"]
    print("\n" + "=" * 100)
    print(f"machine: {m['cpu_model']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; load average at start "
          f"{', '.join(f'{x:.1f}' for x in (m.get('load_average') or []))}")
    print(f"matmul peak (NumPy float32 {peak['n']}^3): {peak['gflops_best']:.1f} GFLOP/s, the best of 10 runs at the "
          f"start ({peak['best_at_start']:.1f}) and 10 at the end ({peak['best_at_end']:.1f}); '% peak' = a kernel's "
          f"median GFLOP/s over it")
    att = summary.get("attention")
    if att:
        print(f"\nATTENTION (B={att['config']['B']} H={att['config']['H']} D={att['config']['D']}, float32, median)")
        print(f"{'impl':<22}{'N':>7}{'ms':>11}{'tokens/s':>12}{'GFLOP/s':>10}{'% peak':>8}{'t(2N)/t(N)':>12}")
        for impl in dict.fromkeys(r["impl"] for r in att["rows"]):
            rs = [r for r in att["rows"] if r["impl"] == impl]
            sc = {s["to"]: s for s in att["time_scaling"].get(impl, [])}
            for r in rs:
                s = sc.get(r["N"])
                grow = f"{s['ratio']:.2f} (N^{s['exponent']:.2f})" if s else ""
                print(f"{impl:<22}{r['N']:>7}{r['median_ms']:>11.2f}{r['tokens_per_s']:>12,.0f}{r['gflops']:>10.1f}"
                      f"{100 * (r['fraction_of_peak'] or 0):>7.0f}%{grow:>18}")
        for impl, why in att.get("not_measured", {}).items():
            print(f"{impl:<22}  not measured: {why}")
    mem = summary.get("memory")
    if mem:
        print("\nPEAK MEMORY beyond inputs (MiB, fresh process per point)")
        print(f"{'N':>7}{'flash fwd+bwd':>15}{'standard fwd':>14}{'N x N scores':>14}")
        for r in mem:
            print(f"{r['N']:>7}{_fmt(r.get('flash_fwd_bwd_extra_mib')):>15}{_fmt(r.get('naive_fwd_extra_mib')):>14}"
                  f"{r['score_matrix_mib']:>14.0f}")
        ns = [r["N"] for r in mem]
        for key, label in (("flash_fwd_bwd_extra_mib", "flash"), ("naive_fwd_extra_mib", "standard")):
            sc = scaling(ns, [r.get(key) for r in mem])
            if sc:
                growth = ", ".join(f"{s['to']}: N^{s['exponent']:.2f}" for s in sc)
                print(f"  memory growth exponent, {label}: {growth}")
    dec = summary.get("decode")
    if dec:
        print("\nDECODE (one token at a time over a full cache)")
        print(f"{'backend':<8}{'cache':>7}{'ring tok/s':>12}{'recompute tok/s':>17}{'speedup':>9}{'GFLOP/s':>9}"
              f"{'% peak':>8}{'cache MiB':>10}{'RSS growth':>11}")
        for r in dec["rows"]:
            print(f"{str(r['backend']):<8}{r['capacity']:>7}{r['ring_tokens_per_s']:>12,.1f}"
                  f"{_fmt(r['recompute_tokens_per_s'], ',.2f'):>17}{_fmt(r['speedup_vs_recompute'], '.0f'):>8}x"
                  f"{r['gflops']:>9.2f}{100 * (r['fraction_of_peak'] or 0):>7.1f}%{_fmt(r['cache_storage_mib']):>10}"
                  f"{_fmt(r['rss_growth_mib'], '+.1f'):>11}")
        for backend, sc in dec["time_scaling"].items():
            ring = ", ".join(f"{s['to']}: C^{s['exponent']:.2f}" for s in sc["ring_ms_per_token"])
            rec = ", ".join(f"{s['to']}: C^{s['exponent']:.2f}" for s in sc["recompute_ms_per_token"])
            print(f"  time-per-token growth, {backend}: ring {ring or '-'}; recompute {rec or '-'}")
    dma = summary.get("dma")
    if dma:
        print("\nDYNAMIC MASK ATTENTION vs dense flash attention (best of repeats; selection included)")
        print(f"{'N':>6}{'causal':>7}{'ratio':>7}{'dense ms':>10}{'DMA ms':>9}{'speedup':>9}{'f+b':>7}{'ideal':>7}"
              f"{'efficiency':>11}{'useful GF/s':>12}{'MiB dense':>10}{'MiB DMA':>9}")
        for r in dma["rows"]:
            print(f"{r['N']:>6}{str(r['causal']):>7}{r['ratio']:>7.3f}{_fmt(r['dense_fwd_ms']):>10}"
                  f"{_fmt(r['dma_fwd_ms']):>9}{_fmt(r['speedup_fwd'], '.2f'):>8}x"
                  f"{_fmt(r['speedup_fwd_bwd'], '.2f'):>6}x"
                  f"{r['ideal_speedup']:>6.3g}x{100 * (r['sparsity_efficiency_fwd'] or 0):>10.0f}%"
                  f"{_fmt(r['dma_useful_gflops']):>12}{r['peak_mib_dense']:>10.1f}{r['peak_mib_dma']:>9.1f}")
    print("\nstatus: " + ", ".join(f"{o['name']} {o['status']} ({o['seconds']:.0f} s)" for o in summary["outcomes"]))
    for o in summary["outcomes"]:
        if o["status"] in ("missing", "failed"):
            print(f"  {o['name']}: {o['message']}")
    print(f"results: {os.path.relpath(summary['out_dir'], ROOT)}/summary.json; plots: "
          + ", ".join(os.path.relpath(p, ROOT) for p in summary.get("plots", [])))


# =====================================================================================================================
# Main
# =====================================================================================================================


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    p.add_argument("--only", default="attention,memory,decode,dma",
                   help="comma-separated subset of: attention, memory (peak memory vs N), decode, dma, ops")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out-dir", default=None,
                       help="default: benchmarks/results/local/suite (or .../local/quick), ignored by git")
    where.add_argument("--update-results", action="store_true",
                       help="replace the committed results, benchmarks/results/suite (or .../quick)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the attention benchmark")
    p.add_argument("--timeout", type=float, default=None, help="seconds per script run (default 900, quick 300)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(wanted) - {"attention", "memory", "decode", "dma", "ops"}
    if unknown:
        p.error(f"--only: unknown benchmark(s) {sorted(unknown)}")
    args.only = wanted
    if args.out_dir is None:  # a quick or local run never replaces the committed results unless asked to
        args.out_dir = os.path.join(RESULTS_DIR if args.update_results else LOCAL_RESULTS_DIR,
                                    "quick" if args.quick else "suite")
    args.out_dir = os.path.abspath(args.out_dir)
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    out_dir = args.out_dir
    timeout = args.timeout or (300.0 if args.quick else 900.0)
    wanted = args.only
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()

    info = machine_info()
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}, load average "
          f"{info['load_average']}")
    peak = matmul_peak(sizes.matmul_n, repeats=10)
    print(f"matmul peak: NumPy float32 {sizes.matmul_n}^3: {peak['gflops_best']:.1f} GFLOP/s (best of "
          f"{peak['runs']}; median {peak['gflops_median']:.1f})", flush=True)
    H, D = sizes.heads, sizes.head_dim
    summary: Dict[str, Any] = {"suite": "quick" if args.quick else "full", "machine": info, "matmul_peak": peak,
                               "sizes": sizes.__dict__, "out_dir": out_dir, "outcomes": [], "plots": []}

    raws: Dict[str, Any] = {}

    def record(o: Outcome) -> Outcome:
        summary["outcomes"].append(o.__dict__)
        return o

    if "attention" in wanted:
        ns = sizes.attention_ns
        o = record(_bench("attention", "bench_attention.py", [[
            "--min-n", str(min(ns)), "--max-n", str(max(ns)), "--threads", str(args.threads), "--heads", str(H),
            "--head-dim", str(D), "--repeats", str(sizes.attention_repeats), "--memory-n", "0",
            "--out", os.path.join(out_dir, "bench_attention.json")]], out_dir, timeout))
        if o.status == "ok":
            raws["attention"] = read_json(o.json_paths[0]) or {}
    if "memory" in wanted:
        t0 = time.perf_counter()
        summary["memory"] = memory_sweep(sizes.memory_ns, H, D, timeout)
        record(Outcome("memory", "ok", time.perf_counter() - t0))
    if "decode" in wanted:
        runs = [["--capacity", str(c), "--heads", str(H), "--kv-heads", str(H), "--head-dim", str(D),
                 "--steps", str(sizes.decode_steps), "--recompute-steps", "3", "--memory-factor", "2",
                 "--backends", "fast,cuda", "--out", os.path.join(out_dir, f"bench_decode_c{c}.json")]
                for c in sizes.decode_capacities]
        o = record(_bench("decode", "bench_decode.py", runs, out_dir, timeout))
        if o.json_paths:
            raws["decode"] = [read_json(j) or {} for j in o.json_paths]
    if "dma" in wanted:
        o = record(_bench("dma", "bench_dma.py", [[
            "--sizes", *map(str, sizes.dma_sizes), "--ratios", *map(str, sizes.dma_ratios),
            "--causal", sizes.dma_causal, "--heads", str(H), "--kv-heads", str(max(1, H // 2)),
            "--head-dim", str(D), "--repeats", str(sizes.dma_repeats),
            "--out", os.path.join(out_dir, "bench_dma.json")]], out_dir, timeout))
        if o.status == "ok":
            raws["dma"] = read_json(o.json_paths[0]) or {}
    if "ops" in wanted:
        o = record(_bench("ops", "bench_ops.py", [["--repeats", "3" if args.quick else "7",
                                                    "--json", os.path.join(out_dir, "bench_ops.json")]],
                          out_dir, timeout))
        if o.status == "ok":
            summary["ops"] = read_json(o.json_paths[0])

    # The peak again at the end: the larger best of the two is the ceiling (a busy core can only lower it).
    peak_start, peak_end = peak, matmul_peak(sizes.matmul_n, repeats=10)
    peak = max(peak_start, peak_end, key=lambda p: p["gflops_best"])
    summary["matmul_peak"] = dict(peak, best_at_start=peak_start["gflops_best"], best_at_end=peak_end["gflops_best"])
    pk = peak["gflops_best"]
    if "attention" in raws:
        summary["attention"] = derive_attention(raws["attention"], pk)
    if "decode" in raws:
        summary["decode"] = derive_decode(raws["decode"], pk)
    if "dma" in raws:
        summary["dma"] = derive_dma(raws["dma"], pk)

    if not args.no_plots:
        plot_dir = os.path.join(out_dir, "plots")
        os.makedirs(plot_dir, exist_ok=True)
        makers: List[Callable[[], str]] = []
        if summary.get("attention") or summary.get("memory"):
            att = summary.get("attention") or {"rows": [], "config": {"B": 1, "H": H, "D": D}}
            makers.append(lambda: plot_attention(att, summary.get("memory") or [], pk,
                                                 os.path.join(plot_dir, "attention_speed_memory_vs_n.png")))
        if summary.get("decode"):
            makers.append(lambda: plot_decode(summary["decode"], os.path.join(plot_dir, "decode_vs_cache_size.png")))
        if summary.get("dma"):
            makers.append(lambda: plot_dma(summary["dma"], os.path.join(plot_dir, "dma_speedup_vs_ratio.png")))
        for make in makers:
            try:
                summary["plots"].append(make())
            except Exception as e:  # a plot must never lose the numbers
                print(f"plot failed: {type(e).__name__}: {e}")
    summary["total_seconds"] = time.perf_counter() - t_start
    write_json(os.path.join(out_dir, "summary.json"), summary)
    print_report(summary)
    return summary


if __name__ == "__main__":
    main()
