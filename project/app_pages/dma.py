"""Dynamic Mask Attention page: importance, per-query top-k selection, skipped tiles (minitorch.attention.dma)."""

from __future__ import annotations

import numpy as np
import streamlit as st

from .common import chart, missing_module_note, show_tiles

B, H, HKV = 1, 2, 1


@st.cache_data(show_spinner=False, max_entries=32)
def compute(N: int, D: int, keep: int, causal: bool, block: int, a: float, spread: float, log_space: bool,
            seed: int) -> dict:
    """Everything the page shows, from minitorch.attention.dma (SimpleBackend) and the float64 reference."""
    from minitorch.attention import dma
    from minitorch.attention.importance import importance
    from minitorch.attention.reference import reference_dma
    from minitorch.attention.selection import kept_dense, select_numpy
    from minitorch.attention.spec import make_dma_spec
    from minitorch.attention.tiling import TileSchedule
    from minitorch.tensor_functions import from_numpy
    from minitorch.tensor_ops import SimpleBackend

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, N, D))
    k = rng.standard_normal((B, HKV, N, D))
    v = rng.standard_normal((B, HKV, N, D))
    dt_proj = spread * rng.standard_normal((HKV, HKV * D))
    a_coef = np.full(HKV, a)
    z, _ = importance(v, dt_proj, a_coef, log_space)
    res = {"z": z[0, 0]}
    for compact in (True, False):
        spec = make_dma_spec(q.shape, k.shape, v.shape, dt_proj.shape, a_coef.shape, keep_window_size=keep,
                                 causal=causal, block_q=block, block_k=block, log_space=log_space, compact=compact)
        sel = select_numpy(z, spec)
        count = int(sel.counts[0, 0])
        types = sel.types[0, 0][:, : -(-count // block)] if count else sel.types[0, 0][:, :0]
        res["compact" if compact else "sequence"] = {"types": types, "count": count}
        if compact:
            res["kept"] = kept_dense(sel, z, spec)[0, 0]
            res["thr_val"] = sel.thr_val[0, 0]
    ref_out, _, _, ref_mask, _ = reference_dma(q, k, v, dt_proj, a_coef, keep, causal, log_space=log_space)
    out = dma.flash_dma_attention(from_numpy(q, backend=SimpleBackend), from_numpy(k, backend=SimpleBackend),
                                  from_numpy(v, backend=SimpleBackend), dt_proj, a_coef, keep_window_size=keep,
                                  causal=causal, log_space=log_space, block_q=block, block_k=block)
    res["out_diff"] = float(np.max(np.abs(out.to_numpy() - ref_out)))
    res["mask_matches"] = bool(np.array_equal(res["kept"], ref_mask[0, 0]))
    flash = TileSchedule(N, N, block, block, causal=causal)
    res["flash_work"] = len(flash.work())
    res["flash_tiles"] = flash.Tr * flash.Tc
    res["visible"] = int(round(flash.visible_fraction() * N * N))
    return res


def render() -> None:
    try:
        from minitorch.attention import dma  # noqa: F401
    except Exception as err:  # the DMA module not landed yet
        missing_module_note("minitorch.attention.dma", err, "The Dynamic Mask Attention page needs it.")
        return

    st.markdown(
        "Dynamic Mask Attention gives every key one **importance** `z_j = exp(a * softplus(concat_heads(v_j) @ "
        "dt_proj))`. Each query keeps only the `keep_window_size` most important keys it can see (ties: lower index "
        "wins) and adds `z_j` to their scores. Selected keys are scattered, so the kernels tile a **compacted list** "
        "of the keys some query keeps: whole key tiles are skipped and work scales with `Nq x keep` instead of "
        "`Nq x Nk`."
    )
    sb = st.sidebar
    sb.subheader("DMA settings")
    c = sb.columns(2)
    N = c[0].select_slider("N = Nq = Nk", [16, 32, 64, 128, 256], 128, key="dma_n")
    block = c[1].select_slider("block (Br = Bc)", [4, 8, 16, 32], 8, key="dma_block")
    keep = sb.slider("keep_window_size", 1, N, min(16, N), key="dma_keep")
    a = c[0].slider("a_coef", 0.1, 3.0, 1.0, 0.1, key="dma_a")
    spread = c[1].slider("dt_proj scale", 0.0, 2.0, 0.5, 0.1, key="dma_spread")
    D = c[0].select_slider("head dim D", [4, 8, 16], 8, key="dma_d")
    seed = c[1].number_input("seed", 0, 10_000, 0, key="dma_seed")
    causal = c[0].checkbox("causal", True, key="dma_causal")
    log_space = c[1].checkbox("log-space z", False, key="dma_log")

    r = compute(N, D, keep, causal, block, a, spread, log_space, int(seed))
    kept = r["kept"]
    comp, seq = r["compact"], r["sequence"]
    comp_work = int(np.count_nonzero(comp["types"]))
    seq_work = int(np.count_nonzero(seq["types"]))
    ratio = kept.sum() / max(r["visible"], 1)

    m = st.columns(6)
    m[0].metric("kept pairs", f"{ratio:.1%}", help="kept (query, key) pairs / visible pairs")
    m[1].metric("tiles (compacted)", comp_work,
                help="tiles of the compacted key list that are not SKIP (Selection.types)")
    m[2].metric("tiles (key sequence)", seq_work, help="compact=False: textbook block sparsity")
    m[3].metric("flash tiles", r["flash_work"], help="TileSchedule(...).work(): no selection")
    m[5].metric("tiles skipped", f"{1 - comp_work / max(r['flash_work'], 1):.0%}",
                help="flash attention tiles the DMA kernels skip (compacted list)")
    m[4].metric("tile speedup", f"{r['flash_work'] / max(comp_work, 1):.2f}x",
                help="flash attention tiles / DMA tiles (compacted list): the work the selection saves")

    left, right = st.columns(2)
    z = r["z"]
    order = np.argsort(-z, kind="stable")
    top = np.zeros(N, dtype=bool)
    top[order[:keep]] = True
    chart({
        "data": {"values": [{"j": j, "z": float(z[j]), "top": "top-k overall" if top[j] else "other"}
                            for j in range(N)]},
        "title": f"importance z_j per key (red: the {keep} largest overall)", "height": 280, "mark": "bar",
        "encoding": {"x": {"field": "j", "type": "ordinal", "title": "key j",
                           "axis": {"labels": N <= 64, "labelAngle": 0}},
                     "y": {"field": "z", "type": "quantitative", "title": "importance z_j"},
                     "color": {"field": "top", "type": "nominal", "title": None, "legend": {"orient": "bottom"},
                               "scale": {"domain": ["top-k overall", "other"], "range": ["#d62728", "#4c78a8"]}},
                     "tooltip": [{"field": "j"}, {"field": "z", "format": ".4f"}]},
    }, left, stretch=True)
    ii, jj = np.nonzero(kept)
    if ii.size <= 8192:
        cells = [{"i0": a - 0.5, "i1": a + 0.5, "j0": b - 0.5, "j1": b + 0.5, "i": int(a), "j": int(b)}
                 for a, b in zip(ii.tolist(), jj.tolist())]
        grid = [{"t": float(t)} for t in np.arange(0, N + 1, block) - 0.5]
        dom = {"domain": [-0.5, N - 0.5], "nice": False, "zero": False}
        chart({
            "title": "selected keys per query (kept_dense); orange: tile boundaries", "height": 300, "width": 300,
            "layer": [
                {"data": {"values": cells}, "mark": {"type": "rect", "color": "#08519c"},
                 "encoding": {"x": {"field": "j0", "type": "quantitative", "title": "key j", "scale": dom},
                              "x2": {"field": "j1"},
                              "y": {"field": "i0", "type": "quantitative", "title": "query i",
                                    "scale": {**dom, "reverse": True}},
                              "y2": {"field": "i1"},
                              "tooltip": [{"field": "i", "title": "query"}, {"field": "j", "title": "key"}]}},
                {"data": {"values": grid}, "mark": {"type": "rule", "color": "#f58518", "opacity": 0.7},
                 "encoding": {"x": {"field": "t", "type": "quantitative"}}},
                {"data": {"values": grid}, "mark": {"type": "rule", "color": "#f58518", "opacity": 0.7},
                 "encoding": {"y": {"field": "t", "type": "quantitative"}}},
            ],
        }, right)
    else:  # many kept pairs: an image (rows = queries, columns = keys)
        img = np.where(kept, 0.2, 1.0)
        right.image(np.kron(img, np.ones((max(1, 300 // N),) * 2)), clamp=True,
                    caption="selected keys per query (kept_dense): rows = queries, columns = keys")

    c1, c2 = st.columns(2)
    show_tiles(comp["types"], c1, title=f"compacted key list ({comp['count']} keys some query keeps)",
               x_title="tile of the compacted list", size=300)
    show_tiles(seq["types"], c2, title="key sequence (compact=False)", x_title="key tile", size=300)
    st.markdown(
        f"On the raw key sequence (`compact=False`) the kernel would visit {seq_work} tiles, against "
        f"{r['flash_work']} for flash attention with the same mask: kept keys are scattered, so few key tiles are "
        f"empty. The compacted list holds the {comp['count']} of the {N} keys that some query keeps; its "
        f"{comp_work} visited tiles are the work the DMA kernels do: **{1 - comp_work / max(r['flash_work'], 1):.0%} "
        f"of flash attention's tiles skipped**."
    )
    m = st.columns(2)
    m[0].metric("flash_dma_attention vs float64 reference (max diff)", f"{r['out_diff']:.1e}")
    m[1].metric("selection == reference_dma_mask", "yes" if r["mask_matches"] else "NO")
