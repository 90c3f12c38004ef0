"""Ring-buffer page: a RingBufferKVCache you can append to, its slots, pointers and the newest query's attention."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from .common import chart, missing_module_note

B, HKV, H, D = 1, 1, 2, 8  # one sequence, one kv head shared by two query heads (GQA), head dim 8


def _token(p: int) -> tuple[np.ndarray, np.ndarray]:
    """Key and value of the token at position ``p`` (deterministic, so a rerun shows the same cache)."""
    rng = np.random.default_rng(1000 + p)
    return rng.standard_normal((B, HKV, 1, D)), rng.standard_normal((B, HKV, 1, D))


def _query(t: int) -> np.ndarray:
    """The query of the newest position ``t``: ``(B, H, 1, D)``; it resembles a few earlier keys."""
    rng = np.random.default_rng(7 + t)
    q = rng.standard_normal((B, H, 1, D))
    for p in (t, max(t - 3, 0), 0):  # look a bit like the newest key, one a few steps back, and the first one
        q += 0.8 * _token(p)[0][:, :1].repeat(H, axis=1)
    return q


def _append(cache, n: int) -> None:
    """Append ``n`` tokens in one chunk (positions continue from ``cache.seen``)."""
    if n <= 0:
        return
    ks, vs = zip(*(_token(cache.seen + i) for i in range(n)))
    cache.append(np.concatenate(ks, axis=2), np.concatenate(vs, axis=2))


def _slots_spec(cache, visible_mask: np.ndarray) -> dict:
    """The slots as a strip: role colour, absolute position, read and write pointers."""
    C, s = cache.capacity, cache.num_sinks
    pos = cache.positions
    newest = cache.seen - 1
    rows = []
    for j in range(C):
        if pos[j] < 0:
            role = "empty"
        elif j < s:
            role = "sink"
        elif pos[j] == newest:
            role = "newest"
        else:
            role = "ring"
        ptr = []
        if j == cache.write_ptr:
            ptr.append("write")
        if j == cache.read_ptr and cache.seen > s:
            ptr.append("read")
        rows.append({"slot": j, "row": "slots", "role": role, "label": "-" if pos[j] < 0 else f"p={pos[j]}",
                     "o": 1.0 if (visible_mask[j] or pos[j] < 0) else 0.4, "visible": bool(visible_mask[j])})
        if ptr:
            rows.append({"slot": j, "row": "pointers", "role": None, "label": "^ " + " & ".join(ptr), "o": 1.0,
                         "visible": False})
    x = {"field": "slot", "type": "ordinal", "title": "slot", "axis": {"labelAngle": 0, "orient": "top"}}
    y = {"field": "row", "type": "ordinal", "title": None, "sort": ["slots", "pointers"], "axis": None}
    return {
        "data": {"values": rows}, "height": 90, "width": max(300, 60 * C),
        "title": "slots: absolute position held by each (purple: sinks, blue: ring, green: newest)",
        "layer": [
            {"transform": [{"filter": "datum.row === 'slots'"}], "mark": {"type": "rect", "stroke": "white"},
             "encoding": {"x": x, "y": y,
                          "color": {"field": "role", "type": "nominal", "title": None, "legend": {"orient": "right"},
                                    "scale": {"domain": ["sink", "ring", "newest", "empty"],
                                              "range": ["#9467bd", "#4c78a8", "#2ca02c", "#eeeeee"]}},
                          "opacity": {"field": "o", "type": "quantitative", "legend": None,
                                      "scale": {"domain": [0, 1]}},
                          "tooltip": [{"field": "slot"}, {"field": "label", "title": "position"},
                                      {"field": "role"}, {"field": "visible", "title": "visible to newest query"}]}},
            {"mark": {"type": "text", "fontSize": 11},
             "encoding": {"x": x, "y": y, "text": {"field": "label"},
                          "color": {"condition": {"test": "datum.row === 'pointers'", "value": "#d62728"},
                                    "value": "black"}}},
        ],
    }


def _timeline_spec(cache, slot_of) -> dict:
    """Every position seen so far against its slot: the wraparound."""
    p = np.arange(cache.seen)
    slots = np.asarray(slot_of(p, cache.capacity, cache.num_sinks)) if cache.seen else np.zeros(0, dtype=int)
    held = np.isin(p, cache.positions)
    values = [{"position": int(a), "slot": int(b), "state": "held" if c else "overwritten"}
              for a, b, c in zip(p, slots, held)]
    return {
        "data": {"values": values}, "height": 260, "title": "slot_of(p): positions wrap around the ring",
        "mark": {"type": "circle", "size": 60},
        "encoding": {"x": {"field": "position", "type": "quantitative", "title": "position p"},
                     "y": {"field": "slot", "type": "quantitative", "title": "slot",
                           "scale": {"domain": [-0.5, cache.capacity - 0.5], "nice": False}},
                     "color": {"field": "state", "type": "nominal", "title": None, "legend": {"orient": "bottom"},
                               "scale": {"domain": ["held", "overwritten"], "range": ["#4c78a8", "#c7c7c7"]}},
                     "tooltip": [{"field": "position"}, {"field": "slot"}, {"field": "state"}]},
    }


def _weights_spec(weights: np.ndarray, positions: np.ndarray) -> dict:
    values = [{"slot": f"{j} (p={p})" if p >= 0 else f"{j} (empty)", "j": j, "head": f"head {h}",
               "weight": float(weights[0, h, 0, j])}
              for h in range(weights.shape[1]) for j, p in enumerate(positions)]
    order = [v["slot"] for v in values[: len(positions)]]
    return {
        "data": {"values": values}, "height": 260, "title": "attention weights of the newest query, in slot order",
        "mark": "bar",
        "encoding": {"x": {"field": "slot", "type": "ordinal", "sort": order, "title": "slot (position)",
                           "axis": {"labelAngle": -45}},
                     "xOffset": {"field": "head"},
                     "y": {"field": "weight", "type": "quantitative", "title": "softmax weight"},
                     "color": {"field": "head", "type": "nominal", "title": None, "legend": {"orient": "bottom"}},
                     "tooltip": [{"field": "slot"}, {"field": "head"}, {"field": "weight", "format": ".4f"}]},
    }


def render() -> None:
    try:
        from minitorch.attention.kv_cache import RingBufferKVCache, slot_of
        from minitorch.attention.reference import reference_attention
        from minitorch.attention.masks import visible
    except Exception as err:  # the cache module not landed yet
        missing_module_note("minitorch.attention.kv_cache", err, "The Ring buffer page needs RingBufferKVCache.")
        return

    st.markdown(
        "`RingBufferKVCache` keeps the keys and values of the last `capacity - sinks` tokens (plus the first "
        "`sinks` tokens, forever) in fixed memory. Position `p` goes to slot `p % capacity` (with sinks: "
        "`s + (p - s) % (capacity - s)`), every slot records its absolute position, and attention masks by "
        "position, so the decode step reads the rotated slots in place."
    )
    sb = st.sidebar
    sb.subheader("Ring-buffer settings")
    capacity = sb.slider("capacity (slots)", 2, 24, 8, key="rb_capacity")
    sinks = sb.slider("attention sinks", 0, 3, 1, key="rb_sinks")
    chunk = sb.slider("chunk size", 1, 16, 3, key="rb_chunk")
    sinks = min(sinks, capacity - 1)

    config = (capacity, sinks)
    if st.session_state.get("rb_config") != config:
        cache = RingBufferKVCache(B, HKV, D, capacity, num_sinks=sinks, backend="simple")
        _append(cache, capacity + 2)  # start past the first wraparound, so there is something to see
        st.session_state["rb_cache"], st.session_state["rb_config"] = cache, config
    cache = st.session_state["rb_cache"]

    b = st.columns(4)
    if b[0].button("Append 1 token", key="rb_append1"):
        _append(cache, 1)
    if b[1].button(f"Append a chunk of {chunk}", key="rb_append_chunk"):
        _append(cache, chunk)
    if b[2].button("Reset (empty)", key="rb_reset"):
        cache.reset()
    b[3].caption(f"B={B}, Hkv={HKV}, H={H} (GQA), D={D}, SimpleBackend")

    m = st.columns(6)
    m[0].metric("seen (next position)", cache.seen)
    m[1].metric("length (held)", cache.length)
    m[2].metric("write_ptr", cache.write_ptr)
    m[3].metric("read_ptr", cache.read_ptr)
    m[4].metric("window", cache.window, help="capacity - sinks: the ring keeps exactly the last `window` tokens")
    m[5].metric("wraparounds", max(0, (cache.seen - sinks)) // cache.window if cache.window else 0)

    positions = cache.positions
    if cache.seen == 0:
        chart(_slots_spec(cache, np.zeros(capacity, dtype=bool)))
        st.info("The cache is empty: append tokens.")
        return

    t = cache.seen - 1  # the newest position: the query of the next decode step
    vis = visible(np.int64(t), positions, True, cache.window, cache.num_sinks)
    chart(_slots_spec(cache, vis))
    st.caption(f"Chronological order of the slots (`chronological_slots()`): {cache.chronological_slots().tolist()}")

    q = _query(t)
    weights = cache.attention_weights(q)  # (B, H, 1, capacity), float64, slot order
    out = cache.attend(q)  # the decode kernel over the rotated slots
    k_slots, v_slots = cache.key_storage, cache.value_storage
    ref, _ = reference_attention(q, k_slots, v_slots, causal=True, window=cache.window, q_positions=[t],
                                 k_positions=positions, num_sinks=cache.num_sinks)
    left, right = st.columns(2)
    chart(_weights_spec(weights, positions), left, stretch=True)
    chart(_timeline_spec(cache, slot_of), right, stretch=True)

    seen_keys = sorted(int(p) for p in positions[vis])
    st.markdown(f"**The decode step for the query at position {t} attends to positions** {seen_keys} "
                f"({len(seen_keys)} keys: the sinks plus the last {cache.window}).")
    m = st.columns(2)
    m[0].metric("decode kernel vs float64 reference (max diff)",
                f"{float(np.max(np.abs(np.asarray(out) - ref))):.1e}",
                help="cache.attend(q) (decode kernel on the rotated slots) vs reference_attention with the slots' "
                     "positions")
    m[1].metric("weights sum (per head)", ", ".join(f"{w:.3f}" for w in weights[0, :, 0].sum(-1)))
    df = pd.DataFrame({
        "slot": np.arange(capacity),
        "position": positions,
        "role": ["sink" if j < cache.num_sinks and positions[j] >= 0 else ("empty" if positions[j] < 0 else "ring")
                 for j in range(capacity)],
        "visible to newest query": vis,
        **{f"weight head {h}": weights[0, h, 0] for h in range(H)},
    })
    with st.expander("slot table"):
        st.dataframe(df, hide_index=True)
