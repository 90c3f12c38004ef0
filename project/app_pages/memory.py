"""Memory-and-speed page: standard vs flash attention memory, committed benchmark results, a tiny live run."""

from __future__ import annotations

import glob
import json
import os
import time
import tracemalloc
from typing import Any, List, Tuple

import numpy as np
import pandas as pd
import streamlit as st

from minitorch import SimpleBackend
from minitorch.attention.reference import naive_attention_float32, reference_attention
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import default_block_sizes

from .common import chart, cuda_available, fmt_bytes, line_spec, records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
X_CANDIDATES = ["n", "seq_len", "seqlen", "seq", "nk", "nq", "length", "capacity", "tokens", "context", "size",
                "t", "steps", "batch"]


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


# -- benchmark results -------------------------------------------------------------------------------------------------
def _tables(obj: Any, name: str) -> List[Tuple[str, pd.DataFrame]]:
    """Every list of records in a JSON document, flattened into tables (tolerant of any schema)."""
    out: List[Tuple[str, pd.DataFrame]] = []
    if isinstance(obj, list):
        if obj and all(isinstance(r, dict) for r in obj):
            out.append((name, pd.json_normalize(obj)))
        elif obj and all(isinstance(r, (int, float)) for r in obj):
            out.append((name, pd.DataFrame({name.split("/")[-1]: obj})))
        else:
            for i, r in enumerate(obj):
                out.extend(_tables(r, f"{name}[{i}]"))
    elif isinstance(obj, dict):
        scalars = {k: v for k, v in obj.items() if not isinstance(v, (dict, list))}
        nested = {k: v for k, v in obj.items() if isinstance(v, (dict, list))}
        # a dict of dicts that all look like records (e.g. {"N=128": {...}, ...}) is one table
        if nested and all(isinstance(v, dict) for v in nested.values()) and len(nested) > 1 and all(
            all(not isinstance(x, (dict, list)) for x in v.values()) for v in nested.values()
        ):
            df = pd.json_normalize([{"key": k, **v} for k, v in nested.items()])
            out.append((name, df))
            nested = {}
        if scalars and not nested:
            out.append((name, pd.DataFrame([scalars])))
        for k, v in nested.items():
            out.extend(_tables(v, f"{name}/{k}"))
    return out


@st.cache_data(show_spinner=False)
def load_results(mtimes: Tuple[Tuple[str, float], ...]) -> List[Tuple[str, Any]]:
    """``(file, parsed JSON or error text)`` for every ``benchmarks/results/*.json`` (re-read when files change)."""
    out = []
    for path, _ in mtimes:
        try:
            with open(path) as f:
                out.append((path, json.load(f)))
        except Exception as err:  # a broken file is shown, never fatal
            out.append((path, f"could not read: {type(err).__name__}: {err}"))
    return out


def _x_column(df: pd.DataFrame) -> str | None:
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    by_lower = {c.lower().split(".")[-1]: c for c in numeric}
    for cand in X_CANDIDATES:
        if cand in by_lower and df[by_lower[cand]].nunique() > 1:
            return by_lower[cand]
    return None


def show_table(name: str, df: pd.DataFrame, key: str) -> None:
    st.markdown(f"`{name}`: {len(df)} record(s)")
    st.dataframe(df, hide_index=True)
    x = _x_column(df)
    numeric = [c for c in df.columns if c != x and pd.api.types.is_numeric_dtype(df[c])
               and not pd.api.types.is_bool_dtype(df[c]) and df[c].notna().any()]
    if not numeric:
        return
    if x is None:  # nothing varies like a size: compare the chosen numeric fields side by side
        _bars(df, numeric, key)
        return
    cats = [c for c in df.columns if df[c].dtype == object and 1 < df[c].nunique() <= 12
            and df[c].map(lambda v: isinstance(v, str)).all()]
    metric = st.selectbox("metric to chart", numeric, key=f"{key}_metric")
    color = st.selectbox("one line per", ["(none)"] + cats, key=f"{key}_color") if cats else "(none)"
    data = df[[x, metric] + ([color] if color != "(none)" else [])].dropna(subset=[x, metric])
    pos_x = bool((data[x] > 0).all()) and data[x].max() / max(data[x].min(), 1e-12) > 16
    pos_y = bool((data[metric] > 0).all()) and data[metric].max() / max(data[metric].min(), 1e-300) > 100
    enc = {
        "x": {"field": x, "type": "quantitative", "scale": {"type": "log", "base": 2} if pos_x else {"zero": False}},
        "y": {"field": metric, "type": "quantitative", "scale": {"type": "log"} if pos_y else {"zero": False}},
        "tooltip": [{"field": c} for c in data.columns],
    }
    if color != "(none)":
        enc["color"] = {"field": color, "type": "nominal", "legend": {"orient": "bottom"}}
    chart({"data": {"values": records(data)}, "mark": {"type": "line", "point": True}, "encoding": enc,
           "height": 260}, stretch=True)


def _bars(df: pd.DataFrame, numeric: List[str], key: str) -> None:
    timing = [c for c in numeric if any(t in c.lower() for t in ("ms", "time", "sec"))]
    cols = st.multiselect("fields to compare", numeric, default=timing[:6] or numeric[:3], key=f"{key}_fields")
    if not cols:
        return
    labels = [c for c in df.columns if df[c].dtype == object and df[c].map(lambda v: isinstance(v, str)).all()]
    label = labels[0] if labels else None
    rows = []
    for i, r in df.iterrows():
        for c in cols:
            if pd.notna(r[c]):
                rows.append({"field": c, "value": float(r[c]), "record": str(r[label]) if label else f"record {i}"})
    y = {"field": "field", "type": "nominal", "title": None, "sort": cols, "axis": {"labelLimit": 260}}
    x = {"field": "value", "type": "quantitative", "title": None}
    chart({"data": {"values": rows}, "height": {"step": 22},
           "layer": [
               {"mark": "bar",
                "encoding": {"y": y, "yOffset": {"field": "record"}, "x": x,
                             "color": {"field": "record", "type": "nominal", "legend": {"orient": "bottom"}},
                             "tooltip": [{"field": "record"}, {"field": "field"},
                                         {"field": "value", "format": ",.4~g"}]}},
               {"mark": {"type": "text", "align": "left", "dx": 3},
                "encoding": {"y": y, "yOffset": {"field": "record"}, "x": x,
                             "text": {"field": "value", "format": ",.4~g"}}},
           ]}, stretch=True)


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
        cpu.forward(q, k, v, None, spec)  # compile (or load the cache) outside the timing
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

    st.subheader("Committed benchmark results (`benchmarks/results/*.json`)")
    files = sorted(glob.glob(os.path.join(RESULTS, "*.json")))
    pngs = sorted(glob.glob(os.path.join(RESULTS, "*.png")))
    if not files and not pngs:
        st.info("No benchmark results committed yet (`benchmarks/results/` is empty). Run e.g. "
                "`python benchmarks/bench_decode.py` to produce `benchmarks/results/bench_decode.json`.")
    docs = load_results(tuple((f, os.path.getmtime(f)) for f in files))
    for i, (path, doc) in enumerate(docs):
        with st.expander(os.path.basename(path), expanded=i == 0):
            if isinstance(doc, str):
                st.warning(doc)
                continue
            tables = _tables(doc, os.path.basename(path))
            if not tables:
                st.json(doc)
            for j, (name, df) in enumerate(tables):
                try:
                    show_table(name, df, key=f"bench_{i}_{j}")
                except Exception as err:  # any schema: show the raw table rather than fail
                    st.caption(f"(could not chart {name}: {err})")
    for png in pngs:
        st.image(png, caption=os.path.basename(png))

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
