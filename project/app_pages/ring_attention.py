"""Ring-attention page: how a sequence is split over ranks, which block each rank holds at each ring step, which
(query chunk, key chunk) pairs it computes or skips under each layout, and the LSE merge of two partial results.

Everything is computed by ``minitorch.attention.ring_schedule``, the plan that ``minitorch.distributed`` runs over
MPI; no MPI is needed here.
"""

from __future__ import annotations

import math

import numpy as np
import streamlit as st

from minitorch.attention.reference import reference_attention, reference_mask
from minitorch.attention.ring_schedule import (
    chunk_bounds,
    local_positions,
    lse_merge,
    num_chunks,
    rank_chunks,
    ring_plan,
)

from .common import chart

RANK_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d"]


def _ring_spec(P: int, step: int) -> dict:
    """The ranks on a circle; each shows whose K/V block it holds at ``step``; arrows to the next rank."""
    angle = [math.pi / 2 - 2 * math.pi * r / P for r in range(P)]
    nodes = [{"x": math.cos(a), "y": math.sin(a), "rank": f"rank {r}", "holds": f"K/V of {(r - step) % P}",
              "label": f"rank {r}\nholds {(r - step) % P}"} for r, a in enumerate(angle)]
    edges = [{"x": 0.78 * math.cos(angle[r]), "y": 0.78 * math.sin(angle[r]),
              "x2": 0.78 * math.cos(angle[(r + 1) % P]), "y2": 0.78 * math.sin(angle[(r + 1) % P])}
             for r in range(P)] if P > 1 else []
    axis = {"type": "quantitative", "axis": None, "scale": {"domain": [-1.5, 1.5]}}
    return {
        "width": 300, "height": 300, "title": f"step {step}: every rank sends its block to rank + 1",
        "layer": [
            {"data": {"values": edges}, "mark": {"type": "rule", "color": "#999", "strokeWidth": 2},
             "encoding": {"x": dict(axis, field="x"), "y": dict(axis, field="y"), "x2": {"field": "x2"},
                          "y2": {"field": "y2"}}},
            {"data": {"values": nodes}, "mark": {"type": "circle", "size": 2600, "opacity": 1},
             "encoding": {"x": dict(axis, field="x"), "y": dict(axis, field="y"),
                          "color": {"field": "rank", "type": "nominal", "legend": None,
                                    "scale": {"range": RANK_COLORS[:P]}},
                          "tooltip": [{"field": "rank"}, {"field": "holds"}]}},
            {"data": {"values": nodes}, "mark": {"type": "text", "color": "white", "fontSize": 11,
                                                 "lineBreak": "\n"},
             "encoding": {"x": dict(axis, field="x"), "y": dict(axis, field="y"), "text": {"field": "label"}}},
        ],
    }


def _pairs_spec(N: int, P: int, layout: str, causal: bool, window, step: int) -> tuple[dict, np.ndarray, int]:
    """The attention matrix at chunk granularity: the rank that computes each (query chunk, key chunk) and at which
    step; grey: skipped (no visible pair). Returns the chart, the visible pairs per rank, and the skipped blocks."""
    C = num_chunks(P, layout)
    values, work, skipped = [], np.zeros(P, dtype=np.int64), 0
    for r in range(P):
        q_pos = local_positions(N, P, r, layout)
        for s in ring_plan(N, P, r, layout, causal, window):
            skipped += s.skipped
            k_pos = local_positions(N, P, s.kv_rank, layout)
            work[r] += int(reference_mask(1, len(q_pos), len(k_pos), causal, window, q_pos, k_pos).sum())
            for qc, kc, computed in s.pairs:
                values.append({"q chunk": qc, "k chunk": kc, "rank": f"rank {r}" if computed else "skipped",
                               "step": s.step if computed else -1, "kv of": s.kv_rank,
                               "o": 1.0 if (not computed or s.step <= step) else 0.25,
                               "current": computed and s.step == step})
    cell = max(14, min(44, 360 // C))
    x = {"field": "k chunk", "type": "ordinal", "title": "key chunk", "axis": {"labelAngle": 0}}
    y = {"field": "q chunk", "type": "ordinal", "title": "query chunk"}
    domain = [f"rank {r}" for r in range(P)] + ["skipped"]
    spec = {
        "data": {"values": values}, "width": cell * C, "height": cell * C,
        "title": "who computes each chunk pair, and at which step (faded: later steps)",
        "layer": [
            {"mark": {"type": "rect", "stroke": "white"},
             "encoding": {"x": x, "y": y,
                          "color": {"field": "rank", "type": "nominal", "title": None, "legend": {"orient": "bottom"},
                                    "scale": {"domain": domain, "range": RANK_COLORS[:P] + ["#e3e3e3"]}},
                          "opacity": {"field": "o", "type": "quantitative", "legend": None,
                                      "scale": {"domain": [0, 1]}},
                          "tooltip": [{"field": "q chunk"}, {"field": "k chunk"}, {"field": "rank"},
                                      {"field": "step"}, {"field": "kv of", "title": "block of rank"}]}},
            {"transform": [{"filter": "datum.step >= 0"}], "mark": {"type": "text", "color": "white", "fontSize": 10},
             "encoding": {"x": x, "y": y, "text": {"field": "step"}}},
            {"transform": [{"filter": "datum.current"}],
             "mark": {"type": "rect", "fill": None, "stroke": "black", "strokeWidth": 2},
             "encoding": {"x": x, "y": y}},
        ],
    }
    return spec, work, skipped


def _merge_demo(seed: int, n_a: int, n_b: int, D: int = 4) -> dict:
    """One query row over two key blocks: each block's partial (out, lse), their merge, the full softmax."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, 1, 1, D))
    k, v = rng.standard_normal((1, 1, n_a + n_b, D)), rng.standard_normal((1, 1, n_a + n_b, D))
    out_a, lse_a = reference_attention(q, k[:, :, :n_a], v[:, :, :n_a])
    out_b, lse_b = reference_attention(q, k[:, :, n_a:], v[:, :, n_a:])
    out, lse = lse_merge(out_a, lse_a, out_b, lse_b)
    full_out, full_lse = reference_attention(q, k, v)
    return {"a": (out_a[0, 0, 0], float(lse_a[0, 0, 0])), "b": (out_b[0, 0, 0], float(lse_b[0, 0, 0])),
            "merged": (out[0, 0, 0], float(lse[0, 0, 0])), "full": (full_out[0, 0, 0], float(full_lse[0, 0, 0]))}


def render() -> None:
    st.markdown(
        "When one machine cannot hold a sequence, **ring attention** splits it over `P` processes (ranks). Each "
        "keeps its queries; the key/value blocks travel around a ring, one hop per step, while every rank attends "
        "its queries to the block it holds and merges the result into its running output by log-sum-exp. The "
        "backward pass is a ring too: dK/dV travel with their block and arrive home at the end. "
        "`minitorch.distributed.ring_attention` runs this plan over MPI (`mpiexec -n 4 python -m "
        "minitorch.distributed.demo`)."
    )
    sb = st.sidebar
    sb.subheader("Ring settings")
    c = sb.columns(2)
    P = c[0].slider("ranks P", 1, 8, 4, key="ra_p")
    N = c[1].slider("sequence N", 2 * P, 256, max(2 * P, 64), key="ra_n")
    layout = sb.radio("layout", ["zigzag", "contiguous"], key="ra_layout", horizontal=True)
    causal = sb.checkbox("causal", True, key="ra_causal")
    use_window = sb.checkbox("sliding window", False, key="ra_use_window")
    window = sb.slider("window", 1, N, max(1, N // 4), key="ra_window") if use_window else None

    step = st.slider("ring step", 0, P - 1, 0, key="ra_step") if P > 1 else 0
    b = chunk_bounds(N, num_chunks(P, layout))
    left, right = st.columns([2, 3])
    chart(_ring_spec(P, step), left)
    pairs, work, skipped = _pairs_spec(N, P, layout, causal, window, step)
    chart(pairs, right)
    held = [", ".join(f"chunk {ch} = {b[ch]}:{b[ch + 1]}" for ch in rank_chunks(P, r, layout)) for r in range(P)]
    st.caption("Positions held: " + " | ".join(f"rank {r}: {h}" for r, h in enumerate(held)))

    m = st.columns(4)
    m[0].metric("visible pairs (all ranks)", f"{int(work.sum())}")
    m[1].metric("busiest rank / mean", f"{work.max() / max(work.mean(), 1e-9):.2f}",
                help="1.00 is perfect balance; under a causal mask the contiguous layout leaves rank 0 idle")
    m[2].metric("blocks skipped", f"{skipped} of {P * P}", help="blocks with no visible pair: no kernel launch")
    m[3].metric("positions per rank", f"{max(len(local_positions(N, P, r, layout)) for r in range(P))}",
                help="memory per rank is O(N/P): its own queries, keys and values, the block in use and the one "
                     "arriving")
    chart({"data": {"values": [{"rank": f"rank {r}", "pairs": int(w)} for r, w in enumerate(work)]},
           "height": 160, "title": "work per rank: visible (query, key) pairs", "mark": "bar",
           "encoding": {"x": {"field": "rank", "type": "ordinal", "axis": {"labelAngle": 0}, "title": None},
                        "y": {"field": "pairs", "type": "quantitative"},
                        "color": {"field": "rank", "type": "nominal", "legend": None,
                                  "scale": {"range": RANK_COLORS[:P]}}}}, stretch=True)

    st.subheader("The LSE merge of two partial results")
    st.markdown(
        "A block's partial result for a query row is its softmax-normalised output over the block's keys, `out_b`, "
        "and the log-sum-exp of their scores, `lse_b`. Two partials over disjoint keys combine exactly: "
        "`lse = log(exp(lse_a) + exp(lse_b))`, `out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b`."
    )
    c = st.columns(3)
    n_a = c[0].slider("keys in block a", 1, 32, 8, key="ra_na")
    n_b = c[1].slider("keys in block b", 1, 32, 8, key="ra_nb")
    seed = c[2].number_input("seed", 0, 10_000, 0, key="ra_seed")
    res = _merge_demo(int(seed), n_a, n_b)
    rows = [{"result": name, "lse": lse, **{f"out[{d}]": float(o[d]) for d in range(len(o))}}
            for name, (o, lse) in (("block a", res["a"]), ("block b", res["b"]), ("merged", res["merged"]),
                                   ("full softmax", res["full"]))]
    st.dataframe(rows, hide_index=True)
    m = st.columns(2)
    m[0].metric("max |merged - full softmax|", f"{float(np.max(np.abs(res['merged'][0] - res['full'][0]))):.1e}")
    m[1].metric("|merged lse - full lse|", f"{abs(res['merged'][1] - res['full'][1]):.1e}")
