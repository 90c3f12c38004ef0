"""Tiles page: the TileSchedule of an attention call, its processing orders and the bytes they move."""

from __future__ import annotations

import time
from typing import Optional, Tuple

import numpy as np
import pandas as pd
import streamlit as st

from minitorch.attention.kv_cache import held_positions, slot_of
from minitorch.attention.tiling import TileOrder, TileSchedule, TileType, standard_attention_hbm_bytes

from .common import chart, fmt_bytes, line_spec, show_tiles

BLOCKS = [4, 8, 16, 32, 64, 128]
POSITION_MODES = {
    "default": "default: keys 0..Nk-1, queries bottom-right aligned",
    "ring": "ring buffer, rotated (cache of Nk slots that has seen more tokens)",
    "partial": "ring buffer, partly filled (empty slots = -1)",
}
MAX_FRAMES = 24  # the play button animates at most this many frames
FRAME_SLEEP = 0.05


def ring_positions(Nq: int, capacity: int, seen: int, num_sinks: int) -> Tuple[np.ndarray, np.ndarray]:
    """Key positions of a ring-buffer cache's slots after ``seen`` tokens, and the ``Nq`` newest query positions.

    Uses the cache's own slot arithmetic (``minitorch.attention.kv_cache.slot_of`` / ``held_positions``).
    """
    held = held_positions(seen, capacity, num_sinks)
    k_pos = np.full(capacity, -1, dtype=np.int64)
    if held.size:
        k_pos[np.asarray(slot_of(held, capacity, num_sinks))] = held
    q_pos = seen - Nq + np.arange(Nq, dtype=np.int64)
    q_pos[q_pos < 0] = -1
    return q_pos, k_pos


@st.cache_data(show_spinner=False, max_entries=64)
def sweep(block_q: int, block_k: int, causal: bool, window: Optional[int], head_dim: int,
          num_sinks: int) -> pd.DataFrame:
    """Bytes moved and work skipped as ``N = Nq = Nk`` grows, all from ``TileSchedule``."""
    rows = []
    for N in [128, 256, 512, 1024, 2048, 4096, 8192]:
        s = TileSchedule(N, N, block_q, block_k, causal=causal, window=window, num_sinks=num_sinks)
        rows.append({
            "N": N,
            "flash Q-major": s.hbm_bytes(head_dim, order=TileOrder.Q_MAJOR),
            "flash K-major": s.hbm_bytes(head_dim, order=TileOrder.K_MAJOR),
            "standard": standard_attention_hbm_bytes(N, N, head_dim),
            "work skipped": s.skip_fraction(),
        })
    return pd.DataFrame(rows)


@st.cache_resource(show_spinner=False, max_entries=32)
def schedules(Nq: int, Nk: int, block_q: int, block_k: int, causal: bool, window: Optional[int], num_sinks: int,
              q_pos: Optional[tuple], k_pos: Optional[tuple]) -> Tuple[TileSchedule, TileSchedule, dict]:
    """The Q-major and K-major ``TileSchedule`` and the tiles each processes in order (``work()``), kept across
    reruns so that moving the step slider costs nothing."""
    kwargs = dict(causal=causal, window=window, q_positions=q_pos, k_positions=k_pos, num_sinks=num_sinks)
    sq = TileSchedule(Nq, Nk, block_q, block_k, order=TileOrder.Q_MAJOR, **kwargs)
    sk = TileSchedule(Nq, Nk, block_q, block_k, order=TileOrder.K_MAJOR, **kwargs)
    return sq, sk, {"q": sq.work(), "k": sk.work()}


def _grid(sched: TileSchedule, work: list, step: int, title: str, target) -> None:
    """The tile grid with the first ``step + 1`` processed tiles (``work = sched.work()``) in full colour and the
    current one outlined."""
    done = sched.types == TileType.SKIP
    numbers = {}
    for n, t in enumerate(work[: step + 1]):
        done[t.tq, t.tk] = True
        numbers[(t.tq, t.tk)] = n
    cur = (work[step].tq, work[step].tk) if work and 0 <= step < len(work) else None
    show_tiles(sched.types, target, title=title, done=done, current=cur, numbers=numbers,
               x_title=f"key tile j (Bc = {sched.block_k})", y_title=f"query tile i (Br = {sched.block_q})")


def _step_text(sched: TileSchedule, work: list, step: int) -> str:
    if not work:
        return "No tile to process: every tile is SKIP."
    t = work[min(step, len(work) - 1)]
    head = (f"step {step}: query tile {t.tq} (rows {t.q_start}:{t.q_end}) x key tile {t.tk} "
            f"(cols {t.k_start}:{t.k_end}), **{t.type.name}**")
    if sched.order == TileOrder.Q_MAJOR:
        return head + ". On chip: Q_i, O_i, m_i, l_i for the whole inner loop; loads K_j, V_j."
    return head + ". On chip: K_j, V_j; loads Q_i, O_i, l_i, m_i from main memory and writes O_i, l_i, m_i back."


def render() -> None:
    st.markdown(
        "Flash attention cuts the `Nq x Nk` score matrix into tiles of `Br x Bc` and visits them one by one. "
        "`TileSchedule` (the same object the CPU and CUDA kernels take their tiles from) classifies each tile: "
        "**DENSE** (no mask needed), **TRIANGLE** (masked element by element) or **SKIP** (never loaded)."
    )
    sb = st.sidebar
    sb.subheader("Tiles settings")
    c = sb.columns(2)
    Nq = c[0].slider("Nq (queries)", 1, 1024, 128, key="tiles_nq")
    Nk = c[1].slider("Nk (keys)", 1, 1024, 128, key="tiles_nk")
    block_q = c[0].select_slider("Br (block_q)", BLOCKS, 16, key="tiles_bq")
    block_k = c[1].select_slider("Bc (block_k)", BLOCKS, 16, key="tiles_bk")
    D = c[0].select_slider("head dim D", [16, 32, 64, 128], 64, key="tiles_d")
    num_sinks = c[1].number_input("attention sinks", 0, 64, 0, key="tiles_sinks",
                                  help="keys at positions < sinks ignore the window")
    causal = c[0].checkbox("causal", True, key="tiles_causal")
    use_window = c[1].checkbox("sliding window", False, key="tiles_use_window")
    window = sb.slider("window W", 1, 1024, 48, key="tiles_window", disabled=not use_window)
    mode = sb.selectbox("positions", list(POSITION_MODES), format_func=POSITION_MODES.get, key="tiles_positions")
    window_arg = int(window) if use_window else None

    q_pos = k_pos = None
    if mode != "default":
        if mode == "ring":
            extra = sb.slider("tokens seen beyond the capacity (rotation)", 0, 2 * Nk, Nk // 3 + 1, key="tiles_rot")
            seen = Nk + extra
        else:
            seen = sb.slider("tokens seen (fill)", 0, Nk, max(1, (2 * Nk) // 3), key="tiles_fill")
        sinks_here = min(int(num_sinks), Nk - 1)
        q_pos, k_pos = ring_positions(Nq, Nk, seen, sinks_here)
        st.caption(f"Ring-buffer positions ({seen} tokens seen, slots from `kv_cache.slot_of`): keys "
                   f"{k_pos[:20].tolist()}{' ...' if Nk > 20 else ''}; queries {q_pos[0]}..{q_pos[-1]}")

    sched_q, sched_k, work = schedules(
        Nq, Nk, block_q, block_k, causal, window_arg, int(num_sinks),
        None if q_pos is None else tuple(q_pos.tolist()), None if k_pos is None else tuple(k_pos.tolist()),
    )
    counts = sched_q.counts()

    m = st.columns(6)
    m[0].metric("tiles (Tr x Tc)", f"{sched_q.Tr} x {sched_q.Tc}")
    m[1].metric("DENSE tiles", counts["DENSE"])
    m[2].metric("TRIANGLE tiles", counts["TRIANGLE"])
    m[3].metric("SKIP tiles", counts["SKIP"])
    m[4].metric("work skipped", f"{sched_q.skip_fraction():.1%}",
                help="TileSchedule.skip_fraction(): score entries in SKIP tiles")
    m[5].metric("pairs visible", f"{sched_q.visible_fraction():.1%}", help="TileSchedule.visible_fraction()")

    # -- processing order -----------------------------------------------------------------------------------------
    st.subheader("Processing order")
    n_work = len(work["q"])
    step = 0
    if n_work == 0:
        st.info("Every tile is SKIP: the kernel has nothing to do (each query row outputs zeros).")
    row = st.columns([6, 1], vertical_alignment="bottom")
    if n_work > 1:
        step = row[0].slider("step", 0, n_work - 1, (n_work - 1) // 3, key="tiles_step",
                             help="the tiles visited so far are in full colour; the current one is outlined in red")
    play = row[1].button("Play", key="tiles_play", disabled=n_work < 2, help="animate from this step to the end")
    col_q, col_k = st.columns(2)
    col_q.markdown("**Q-major** (FlashAttention 2): outer loop over query tiles")
    col_k.markdown("**K-major** (FlashAttention 1): outer loop over key/value tiles")
    ph = {"q": (col_q.empty(), col_q.empty()), "k": (col_k.empty(), col_k.empty())}

    def draw(s: int) -> None:
        for key, sched, name in (("q", sched_q, "Q-major"), ("k", sched_k, "K-major")):
            _grid(sched, work[key], s, f"{name}: step {s} of {max(n_work - 1, 0)}", ph[key][0])
            ph[key][1].markdown(_step_text(sched, work[key], s))

    if play and n_work:
        frames = np.unique(np.linspace(step, n_work - 1, min(MAX_FRAMES, n_work - step)).astype(int))
        for s in frames:
            draw(int(s))
            time.sleep(FRAME_SLEEP)
    else:
        draw(step)

    # -- bytes ----------------------------------------------------------------------------------------------------
    st.subheader("Bytes moved between main memory and on-chip memory (forward, float32)")
    bq = sched_q.hbm_bytes(D, order=TileOrder.Q_MAJOR)
    bk = sched_q.hbm_bytes(D, order=TileOrder.K_MAJOR)
    bs = standard_attention_hbm_bytes(Nq, Nk, D)
    m = st.columns(3)
    m[0].metric("flash, Q-major", fmt_bytes(bq), f"{bq / bs:.2f}x standard", delta_color="off")
    m[1].metric("flash, K-major", fmt_bytes(bk), f"{bk / bs:.2f}x standard", delta_color="off")
    m[2].metric("standard attention", fmt_bytes(bs), help="reads Q, K, V; writes and re-reads S and P; writes O")
    st.caption("`TileSchedule.hbm_bytes(D, order=...)` vs `standard_attention_hbm_bytes(Nq, Nk, D)`. K-major "
               "re-reads and re-writes O, l, m for every visited tile; Q-major keeps them on chip.")

    df = sweep(block_q, block_k, causal, window_arg, D, int(num_sinks))
    left, right = st.columns([3, 2])
    chart(line_spec(df, "N", ["standard", "flash K-major", "flash Q-major"], log_x=True, log_y=True,
                    title="bytes moved as N grows (your blocks, masks and D)", x_title="N = Nq = Nk",
                    y_title="bytes", dashed=["standard"]), left, stretch=True)
    table = df.copy()
    for col in ("flash Q-major", "flash K-major", "standard"):
        table[col] = table[col].map(fmt_bytes)
    table["work skipped"] = table["work skipped"].map(lambda x: f"{x:.1%}")
    right.dataframe(table, hide_index=True)
    with st.expander("the schedule as text (`TileSchedule.to_text()`: # DENSE, / TRIANGLE, . SKIP)"):
        st.code(f"{sched_q!r}\n\n{sched_q.to_text() if sched_q.Tr * sched_q.Tc <= 4096 else '(too large to print)'}")
        st.caption(f"Q-major visits {n_work} tiles; K-major visits the same {n_work} tiles in another order.")
