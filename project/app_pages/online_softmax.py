"""Online-softmax page: one query row through the key tiles (minitorch.attention.online_softmax)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from minitorch.attention.online_softmax import online_softmax_trace
from minitorch.attention.reference import reference_attention
from minitorch.attention.kernels.simple.flash import forward as simple_forward
from minitorch.attention.spec import make_spec

from .common import chart

PATTERNS = {
    "random": "random scores",
    "rising": "rising scores (the max keeps growing: a rescale at every tile)",
    "spike": "one late spike (a big rescale near the end)",
    "masked": "causal-style: the last third of the keys masked",
}


def make_row(Nk: int, D: int, pattern: str, seed: int):
    """A query ``q (D,)``, keys and values ``(Nk, D)`` and a score bias ``(Nk,)`` (``-inf`` = masked)."""
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=D), rng.normal(size=(Nk, D)), rng.normal(size=(Nk, D))
    bias = np.zeros(Nk)
    if pattern == "rising":
        bias = np.linspace(0.0, 6.0, Nk)
    elif pattern == "spike":
        bias[int(0.8 * Nk)] = 6.0
    elif pattern == "masked":
        bias[Nk - Nk // 3:] = -np.inf
    return q, k, v, bias


def render() -> None:
    st.markdown(
        "Flash attention never holds a whole row of scores. For each query row it keeps a running max **m**, a "
        "running sum **l** of `exp(s - m)` and an unnormalized output **acc**; when a new key tile raises the max, "
        "the old `l` and `acc` are rescaled by `alpha = exp(m_old - m_new)`. At the end `acc / l` is exactly "
        "`softmax(s) @ V`. The steps below come from `minitorch.attention.online_softmax.online_softmax_trace`."
    )
    sb = st.sidebar
    sb.subheader("Online-softmax settings")
    c = sb.columns(2)
    Nk = c[0].slider("Nk (keys)", 2, 128, 32, key="os_nk")
    block_k = c[1].select_slider("Bc (keys per tile)", [1, 2, 4, 8, 16, 32], 8, key="os_bk")
    D = c[0].select_slider("head dim D", [2, 4, 8, 16], 4, key="os_d")
    seed = c[1].number_input("seed", 0, 10_000, 0, key="os_seed")
    pattern = sb.selectbox("scores", list(PATTERNS), format_func=PATTERNS.get, key="os_pattern")

    q, k, v, bias = make_row(Nk, D, pattern, int(seed))
    scale = 1.0 / math.sqrt(D)
    scores = scale * (k @ q) + bias  # the row S_i = scale * q . k_j + bias_j
    trace = online_softmax_trace(scores, v, block_k)
    n = len(trace.steps)
    step = 0
    if n > 1:
        step = st.slider("after key tile", 0, n - 1, n // 2, key="os_step")
    else:
        st.caption("One key tile holds every key: the online softmax is a single step.")
    st_ = trace.steps[step]

    # -- scores and running max --------------------------------------------------------------------------------------
    left, right = st.columns([3, 2])
    state = np.where(np.arange(Nk) < st_.k_start, "seen", np.where(np.arange(Nk) < st_.k_end, "current tile",
                                                                        "not yet"))
    bars = [{"j": j, "x0": j - 0.42, "x1": j + 0.42, "score": float(scores[j]) if np.isfinite(scores[j]) else None,
             "state": str(state[j]) if np.isfinite(scores[j]) else "masked (-inf)"} for j in range(Nk)]
    rules = [{"x0": s.k_start - 0.5, "x1": s.k_end - 0.5, "m": s.m, "tile": s.tile}
             for s in trace.steps[: step + 1] if np.isfinite(s.m)]
    x = {"field": "x0", "type": "quantitative", "title": "key j", "scale": {"domain": [-0.5, Nk - 0.5], "nice": False}}
    chart({
        "title": "scores of one query row; black: running max m after each tile",
        "height": 260,
        "layer": [
            {"data": {"values": bars}, "transform": [{"filter": "isValid(datum.score)"}],
             "mark": {"type": "bar"},
             "encoding": {"x": x, "x2": {"field": "x1"},
                          "y": {"field": "score", "type": "quantitative", "title": "score s_j"},
                          "color": {"field": "state", "type": "nominal", "title": None,
                                    "scale": {"domain": ["seen", "current tile", "not yet", "masked (-inf)"],
                                              "range": ["#4c78a8", "#d62728", "#c7c7c7", "#ffffff"]},
                                    "legend": {"orient": "bottom"}},
                          "tooltip": [{"field": "j"}, {"field": "score", "format": ".4f"}, {"field": "state"}]}},
            {"data": {"values": rules}, "mark": {"type": "rule", "color": "black", "strokeWidth": 2.5},
             "encoding": {"x": x, "x2": {"field": "x1"}, "y": {"field": "m", "type": "quantitative"},
                          "tooltip": [{"field": "tile"}, {"field": "m", "format": ".4f"}]}},
        ],
    }, left, stretch=True)
    stats = [{"tile": s.tile, "l (running sum)": s.l, "m (running max)": s.m if np.isfinite(s.m) else None,
              "current": s.tile == step} for s in trace.steps]
    tx = {"field": "tile", "type": "quantitative", "title": "key tile", "axis": {"tickMinStep": 1}}
    chart({
        "title": "running statistics after each tile", "height": 260, "data": {"values": stats},
        "layer": [
            {"mark": {"type": "line", "point": True, "color": "#4c78a8"},
             "encoding": {"x": tx, "y": {"field": "l (running sum)", "type": "quantitative",
                                         "axis": {"titleColor": "#4c78a8"}}}},
            {"mark": {"type": "line", "point": True, "color": "black", "strokeDash": [4, 2]},
             "encoding": {"x": tx, "y": {"field": "m (running max)", "type": "quantitative"}}},
            {"transform": [{"filter": "datum.current"}], "mark": {"type": "rule", "color": "#d62728"},
             "encoding": {"x": tx}},
        ],
        "resolve": {"scale": {"y": "independent"}},
    }, right, stretch=True)

    m = st.columns(4)
    m[0].metric("running max m", f"{st_.m:.4f}" if np.isfinite(st_.m) else "-inf",
                f"{st_.m - st_.m_prev:+.4f}" if np.isfinite(st_.m_prev) and np.isfinite(st_.m) else None)
    m[1].metric("rescale alpha = exp(m_prev - m)", f"{st_.alpha:.4f}")
    m[2].metric("running sum l", f"{st_.l:.4f}")
    m[3].metric("keys seen", f"{st_.k_end} / {Nk}")
    st.markdown(f"**acc** (unnormalized, D={D}): `{np.array2string(st_.acc, precision=4)}`  \n"
                f"**acc / l** (output so far): `{np.array2string(st_.out, precision=4)}`")

    with st.expander("every step", expanded=False):
        df = pd.DataFrame([{
            "tile": s.tile, "keys": f"{s.k_start}:{s.k_end}", "max(s_j)": float(np.max(s.scores)),
            "m_prev": s.m_prev, "m": s.m, "alpha": s.alpha, "sum(p_j)": float(s.p.sum()), "l": s.l,
            "acc[0]": float(s.acc[0]), "out[0]": float(s.out[0]),
        } for s in trace.steps])
        st.dataframe(df, hide_index=True)

    # -- exact match with the full softmax ---------------------------------------------------------------------------
    st.subheader("At the end: exactly the full softmax")
    ref_out, ref_lse = reference_attention(q[None, None, None], k[None, None], v[None, None], scale=scale,
                                           attn_bias=bias[None, None, None])
    diff = float(np.max(np.abs(trace.output - ref_out[0, 0, 0])))
    lse_diff = abs(trace.lse - float(ref_lse[0, 0, 0])) if np.isfinite(trace.lse) else 0.0
    # The SimpleBackend kernel (tiled NumPy flash attention) on the same row, with the same Bc.
    spec = make_spec((1, 1, 1, D), (1, 1, Nk, D), (1, 1, Nk, D), scale=scale, bias_shape=(1, 1, 1, Nk),
                     block_q=1, block_k=block_k)
    kern_out, _ = simple_forward(q[None, None, None], k[None, None], v[None, None], bias[None, None, None], spec)
    kern_diff = float(np.max(np.abs(kern_out[0, 0, 0] - ref_out[0, 0, 0])))
    m = st.columns(3)
    m[0].metric("max |online - full softmax|", f"{diff:.2e}",
                help="online_softmax_trace(...).output vs minitorch.attention.reference.reference_attention (float64)")
    m[1].metric("|lse - reference lse|", f"{lse_diff:.2e}", help="m + log(l) vs the reference log-sum-exp")
    m[2].metric("SimpleBackend kernel vs reference", f"{kern_diff:.2e}",
                help="the SimpleBackend engine (attention/kernels/simple/flash.py) on the same row with the same Bc")
    st.caption(f"online output `{np.array2string(trace.output, precision=5)}` | reference "
               f"`{np.array2string(ref_out[0, 0, 0], precision=5)}`")
