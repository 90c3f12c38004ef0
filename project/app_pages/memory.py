"""Memory-and-speed page: standard vs flash attention memory, the benchmark suite's results, a tiny live run."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from typing import Any, Dict, List, Tuple

import numpy as np
import pandas as pd
import streamlit as st

from minitorch import SimpleBackend
from minitorch.attention.reference import naive_attention_float32, reference_attention
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import default_block_sizes

from .common import chart, cuda_available, fmt_bytes, line_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


# -- computed memory ---------------------------------------------------------------------------------------------------
def computed_memory(Ns: List[int], D: int, block_q: int, block_k: int) -> pd.DataFrame:
    """Extra floats per head beyond Q, K, V, O (which both need): standard keeps S and P, ``2 N^2``; flash keeps
    ``lse`` (N) and one tile's working set on chip: ``S_ij`` (Br x Bc), ``Q_i, O_i`` (2 Br x D), ``K_j, V_j``
    (2 Bc x D), ``m_i, l_i`` (2 Br)."""
    rows = []
    tile = block_q * block_k + 2 * block_q * D + 2 * block_k * D + 2 * block_q
    for N in Ns:
        rows.append({"N": N, "standard (S and P)": 2 * N * N, "flash (lse + one tile)": N + tile})
    return pd.DataFrame(rows)


# -- measured memory ---------------------------------------------------------------------------------------------------
def _peak(fn) -> int:
    """Peak bytes NumPy allocates while ``fn`` runs (NumPy reports its buffers to ``tracemalloc``)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@st.cache_data(show_spinner="measuring peak memory ...")
def measured_memory(Ns: Tuple[int, ...], D: int) -> pd.DataFrame:
    """tracemalloc peak of minitorch's tiled flash forward (SimpleBackend) vs minitorch's standard float32
    attention (``reference.naive_attention_float32``), causal, one head, float32."""
    rows = []
    for N in Ns:
        rng = np.random.default_rng(N)
        q, k, v = (rng.standard_normal((1, 1, N, D)).astype(np.float32) for _ in range(3))
        spec = make_spec(q.shape, k.shape, v.shape, causal=True, block_q=64, block_k=64)
        # tracemalloc sees the whole process: the minimum of a few runs leaves out other threads' allocations
        flash = min(_peak(lambda: SimpleBackend.attention.forward(q, k, v, None, spec)) for _ in range(2))
        naive = min(_peak(lambda: naive_attention_float32(q, k, v, causal=True)) for _ in range(2))
        rows.append({"N": N, "standard (measured)": naive, "flash, SimpleBackend (measured)": flash})
    return pd.DataFrame(rows)


# -- benchmark results ---------------------------------------------------------------------------------------------
def result_sets() -> List[Tuple[str, str]]:
    """``(label, summary.json path)`` of every suite run there is: the committed full and quick runs, then local runs
    (``python -m benchmarks`` without ``--update-results`` writes ``benchmarks/results/local/``)."""
    sets = [("full suite, committed", os.path.join(RESULTS, "suite")),
            ("quick suite, committed", os.path.join(RESULTS, "quick")),
            ("full suite, your run", os.path.join(RESULTS, "local", "suite")),
            ("quick suite, your run", os.path.join(RESULTS, "local", "quick"))]
    return [(f"{label} ({os.path.relpath(folder, ROOT)})", os.path.join(folder, "summary.json"))
            for label, folder in sets if os.path.exists(os.path.join(folder, "summary.json"))]


@st.cache_data(show_spinner=False)
def load_summary(path: str, mtime: float) -> Any:
    """The parsed ``summary.json`` (re-read when the file changes), or the error text of a broken file."""
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as err:  # a broken file is shown, never fatal
        return f"could not read {path}: {type(err).__name__}: {err}"


def _wide(rows: List[dict], x: str, series: Any, value: str) -> Tuple[pd.DataFrame, List[str]]:
    """Rows of one table -> one column per series label (``series(row)``) against ``x``, for `line_spec`."""
    df = pd.DataFrame([{x: r[x], "series": series(r), "value": r.get(value)} for r in rows])
    labels = list(dict.fromkeys(df["series"]))
    wide = df.pivot_table(index=x, columns="series", values="value", aggfunc="first").reset_index()
    return wide, labels


def _legend_below(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The legend under the plot, where it hides no line (two columns when there are many series)."""
    columns = 1 if len(spec["transform"][0]["fold"]) <= 3 else 2
    spec["encoding"]["color"]["legend"] = {"orient": "bottom", "columns": columns, "labelLimit": 300}
    return spec


def benchmark_charts(summary: Dict[str, Any]) -> List[Tuple[Dict[str, Any], str]]:
    """``(Vega-Lite spec, caption)`` for each table of a suite ``summary.json``: attention time vs N, peak memory
    vs N, decoding speed vs cache size, dynamic-mask-attention speedup vs selection ratio. Labels are the
    implementations' names from the file."""
    charts = []
    att = summary.get("attention") or {}
    if att.get("rows"):
        wide, labels = _wide(att["rows"], "N", lambda r: r["impl"], "median_ms")
        cfg = att.get("config", {})
        missing = "".join(f" {impl}: not measured ({why})." for impl, why in (att.get("not_measured") or {}).items())
        charts.append((_legend_below(line_spec(wide, "N", labels, title="attention time vs N", y_title="ms (median)",
                                               x_title="sequence length N", log_x=True, log_y=True,
                                               dashed=[lb for lb in labels if not lb.startswith("flash")])),
                       f"B={cfg.get('B')}, H={cfg.get('H')}, D={cfg.get('D')}, float32 CPU; "
                       f"{cfg.get('statistic', '')}. Dashed: the baselines.{missing}"))
    mem = summary.get("memory") or []
    if mem:
        cols = {"flash_fwd_bwd_extra_mib": "flash forward+backward",
                "naive_fwd_extra_mib": "standard attention forward",
                "score_matrix_mib": "one N x N score matrix (all heads)"}
        df = pd.DataFrame([{"N": r["N"], **{label: r.get(key) for key, label in cols.items()}} for r in mem])
        spec = line_spec(df, "N", list(cols.values()), title="peak memory beyond the inputs vs N",
                         y_title="MiB (peak resident, fresh process)", x_title="sequence length N", log_x=True,
                         log_y=True, dashed=[cols["score_matrix_mib"]])
        charts.append((_legend_below(spec),
                       "Extra peak resident memory of one call, each in a fresh process: flash attention's grows "
                       "like N (its tiles), standard attention's like N^2 (the score matrix, dashed)."))
    dec = summary.get("decode") or {}
    if dec.get("rows"):
        rows = [dict(r, kind=k, tps=r[f"{k}_tokens_per_s"]) for r in dec["rows"] for k in ("ring", "recompute")]
        names = {"ring": "ring-buffer KV cache", "recompute": "recompute the window"}
        wide, labels = _wide(rows, "capacity", lambda r: f"{names[r['kind']]} ({r['backend']})", "tps")
        charts.append((_legend_below(line_spec(wide, "capacity", labels, title="decoding one token at a time",
                                               y_title="tokens / s", x_title="cache size = attention window (tokens)",
                                               log_x=True, log_y=True,
                                               dashed=[lb for lb in labels if lb.startswith("recompute")])),
                       f"{dec.get('statistic', '')}. The cache reads its rotated slots in place: O(C) per token; "
                       "recomputing the window is O(C^2)."))
    dma = summary.get("dma") or {}
    if dma.get("rows"):
        rows = [dict(r, label=f"N={r['N']}{' causal' if r['causal'] else ''}") for r in dma["rows"]]
        wide, labels = _wide(rows, "ratio", lambda r: r["label"], "speedup_fwd")
        ideal = {"ideal 1/r": 1.0 / wide["ratio"]}
        if any(r["causal"] for r in rows):
            ideal["ideal causal 1/(2r)"] = 0.5 / wide["ratio"]
        wide = wide.assign(**ideal)
        spec = _legend_below(line_spec(wide, "ratio", labels + list(ideal), title="dynamic mask attention: speedup",
                                       y_title="dense flash time / DMA time (forward)",
                                       x_title="selection ratio r = keep_window_size / N", log_x=True, log_y=True,
                                       dashed=list(ideal)))
        spec["encoding"]["x"]["axis"] = {"values": sorted(set(wide["ratio"])), "format": "~g"}
        spec["encoding"]["y"]["axis"] = {"format": "~g"}  # 0.3, not SI's "300m"
        charts.append((spec,
                       f"{dma.get('statistic', '')}; ideal: {dma.get('ideal', '1/r')}."))
    return charts


def machine_caption(summary: Dict[str, Any]) -> str:
    m, peak = summary.get("machine") or {}, summary.get("matmul_peak") or {}
    text = (f"{m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, GPU: {m.get('gpu') or 'none'}; numpy "
            f"{m.get('numpy', '?')}, numba {m.get('numba', '?')}")
    if peak.get("gflops_best"):
        text += f"; NumPy float32 matmul peak {peak['gflops_best']:.0f} GFLOP/s"
    load = m.get("load_average")
    if load:
        text += f"; load average at the start {load[0]:.1f} (a shared machine: indicative numbers)"
    return text


def show_benchmark_results() -> None:
    sets = result_sets()
    if not sets:
        st.info("No suite results here (`benchmarks/results/suite/summary.json`). `python -m benchmarks --quick` "
                "writes them to `benchmarks/results/local/quick/`.")
        return
    label = st.selectbox("results", [lb for lb, _ in sets], key="bench_set")
    path = dict(sets)[label]
    summary = load_summary(path, os.path.getmtime(path))
    if isinstance(summary, str):
        st.warning(summary)
        return
    st.caption(machine_caption(summary))
    charts = benchmark_charts(summary)
    if not charts:
        st.info(f"`{os.path.relpath(path, ROOT)}` holds no benchmark tables.")
    for i in range(0, len(charts), 2):
        cols = st.columns(2)
        for col, (spec, caption) in zip(cols, charts[i:i + 2]):
            chart(spec, col, stretch=True)
            col.caption(caption)


# -- live run ----------------------------------------------------------------------------------------------------------
def live_run(N: int, D: int, H: int, use_fast: bool) -> pd.DataFrame:
    """Time minitorch's kernels on one tiny causal problem and compare each with the float64 reference."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, H, N, D))
    k = rng.standard_normal((1, H, N, D))
    v = rng.standard_normal((1, H, N, D))
    ref, _ = reference_attention(q, k, v, causal=True)
    rows = []

    def timed(name: str, fn) -> None:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        rows.append({"implementation": name, "time (ms)": 1e3 * dt, "max |out - float64 reference|":
                     float(np.max(np.abs(np.asarray(out) - ref)))})

    for order in ("q_major", "k_major"):
        spec = make_spec(q.shape, k.shape, v.shape, causal=True, order=order)
        timed(f"flash, SimpleBackend (NumPy), {order}", lambda: SimpleBackend.attention.forward(q, k, v, None, spec)[0])
    timed("standard attention, float64 reference (O(N^2))", lambda: reference_attention(q, k, v, causal=True)[0])
    if use_fast:
        from minitorch import FastTensorBackend

        spec = make_spec(q.shape, k.shape, v.shape, causal=True)
        FastTensorBackend.attention.forward(q, k, v, None, spec)  # compile (or load the cache) outside the timing
        timed("flash, FastTensorBackend (Numba CPU)", lambda: FastTensorBackend.attention.forward(q, k, v, None, spec)[0])
    return pd.DataFrame(rows)


def render() -> None:
    st.markdown(
        "Standard attention materializes the `N x N` scores `S` and probabilities `P`: memory grows as `N^2`. "
        "Flash attention keeps one tile on chip and one number (`lse`) per row: memory grows as `N`."
    )
    D = st.select_slider("head dim D", [16, 32, 64, 128], 64, key="mem_d")
    block_q, block_k = default_block_sizes(D, "fast")

    st.subheader("Standard vs flash attention memory, per head")
    Ns = [2 ** p for p in range(7, 17)]
    comp = computed_memory(Ns, D, block_q, block_k)
    measured = measured_memory((64, 128, 256, 512, 1024), 32)
    left, right = st.columns(2)
    comp_bytes = comp.assign(**{
        "standard: 2 N^2 floats": 4 * comp["standard (S and P)"],
        f"flash: N + one tile (Br={block_q}, Bc={block_k})": 4 * comp["flash (lse + one tile)"],
    })
    chart(line_spec(comp_bytes, "N", ["standard: 2 N^2 floats", f"flash: N + one tile (Br={block_q}, Bc={block_k})"],
                    title="computed extra memory beyond Q, K, V, O (float32)", y_title="bytes", log_x=True,
                    log_y=True, dashed=["standard: 2 N^2 floats"]), left, stretch=True)
    chart(line_spec(measured, "N", ["standard (measured)", "flash, SimpleBackend (measured)"],
                    title="measured peak allocation of the forward (causal, D=32)", y_title="peak bytes (tracemalloc)",
                    x_title="N", log_x=True, log_y=True, dashed=["standard (measured)"]), right, stretch=True)
    last = measured.iloc[-1]
    st.caption(
        f"At N = {int(last['N'])}: standard peaks at {fmt_bytes(last['standard (measured)'])}, flash at "
        f"{fmt_bytes(last['flash, SimpleBackend (measured)'])}. Measured with `tracemalloc` around "
        "`SimpleBackend.attention.forward` (minitorch/attention/kernels/simple/flash.py) and `minitorch.attention.reference.naive_attention_float32`."
    )

    st.subheader("Benchmark results (`python -m benchmarks`)")
    show_benchmark_results()

    st.subheader("Live run (tiny sizes)")
    c = st.columns(4)
    N = c[0].select_slider("N", [16, 32, 64, 128], 64, key="live_n")
    Dl = c[1].select_slider("D", [8, 16, 32], 16, key="live_d")
    H = c[2].select_slider("heads", [1, 2, 4], 2, key="live_h")
    use_fast = c[3].checkbox("also Numba CPU", False, key="live_fast",
                             help="the first run compiles (or loads the cache of) the Numba kernels: a few seconds")
    if st.button("Run", key="live_run"):
        st.session_state["live_result"] = ((N, Dl, H, use_fast), live_run(N, Dl, H, use_fast))
    if "live_result" in st.session_state:
        (n_, d_, h_, _), df = st.session_state["live_result"]
        st.caption(f"causal, B=1, H={h_}, N={n_}, D={d_}, float64")
        st.dataframe(df.style.format({"time (ms)": "{:.2f}", "max |out - float64 reference|": "{:.1e}"}),
                     hide_index=True)
    if not cuda_available():
        st.info("The CUDA backend is unavailable on this machine (`numba.cuda.is_available()` is False), so the "
                "live run uses the NumPy and Numba CPU kernels only.")
