"""Paged KV cache page: the page pool, each sequence's block table, the free list, a fork sharing pages and
copy-on-write, step by step (a ``PagedKVCache`` you drive with buttons)."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import pandas as pd
import streamlit as st

from .common import chart, missing_module_note

HKV, H, D = 1, 2, 4  # one kv head read by two query heads (GQA), head dim 4

SCENARIO: List[Tuple[str, int, int]] = [
    ("add", -1, 0), ("append", 0, 6),  # A: 6 tokens
    ("add", -1, 0), ("append", 1, 3),  # B: 3 tokens
    ("fork", 0, 0),  # C = fork(A): shares A's pages
    ("append", 2, 1),  # C writes into the shared, partly filled last page: copy-on-write
    ("append", 0, 2),  # A's last page is its own again: written in place
    ("free", 1, 0),  # B's pages go back to the free list
    ("append", 2, 5),  # C grows into the freed page
    ("fork", 2, 0), ("append", 3, 2),  # D = fork(C): its last page is full, so nothing is copied
]
"""The guided tour: ``(operation, sequence id, tokens)``; ``-1``: no sequence."""


def name(sid: int) -> str:
    """Sequences are shown as letters: id 0 is A, 1 is B, ..."""
    return chr(ord("A") + sid % 26) + ("" if sid < 26 else str(sid // 26))


def tokens(sid: int, start: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Keys and values ``(Hkv, n, D)`` of tokens ``start ..`` of sequence ``sid`` (deterministic)."""
    rng = np.random.default_rng(1000 * sid + start)
    return rng.standard_normal((HKV, n, D)), rng.standard_normal((HKV, n, D))


def apply(cache: Any, op: str, sid: int, n: int) -> str:
    """Run one operation on the cache; return what happened, in words."""
    if op == "add":
        return f"add_sequence() -> {name(cache.add_sequence())}: an empty block table"
    if op == "fork":
        child = cache.fork(sid)
        return (f"fork({name(sid)}) -> {name(child)}: the same block table {cache.pages(child)}, every page's "
                f"reference count + 1, nothing copied")
    if op == "free":
        before = set(cache.free_pages)
        cache.free(sid)
        back = sorted(set(cache.free_pages) - before)
        return f"free({name(sid)}): pages {back} back on the free list (pages another sequence holds stay)"
    old, length = cache.pages(sid), int(cache.seq_lens([sid])[0])
    cache.append(sid, *tokens(sid, length, n))
    new = cache.pages(sid)
    words = f"append({name(sid)}, {n} token{'s' * (n != 1)}): tokens {length}..{length + n - 1}"
    if old and new[len(old) - 1] != old[-1]:
        words += (f"; its last page {old[-1]} was shared and partly filled, so it was copied to page "
                  f"{new[len(old) - 1]} first (copy-on-write)")
    if len(new) > len(old):
        words += f"; new pages {new[len(old):]} from the free list"
    return words


def pool_spec(cache: Any) -> Dict[str, Any]:
    """The pool: one column per page, one cell per row of a page, coloured by the sequences that hold it."""
    ps = cache.page_size
    holders: Dict[Tuple[int, int], List[str]] = {}  # (page, row) -> the sequences whose token is there
    token: Dict[Tuple[int, int], int] = {}  # ... and which token it is (the same for all: shared pages are prefixes)
    for sid in cache.sequences:
        for j in range(int(cache.seq_lens([sid])[0])):
            cell = (cache.pages(sid)[j // ps], j % ps)
            holders.setdefault(cell, []).append(name(sid))
            token[cell] = j
    refs = cache.page_refcounts
    values = []
    for p in range(cache.num_pages):
        for r in range(ps):
            who = holders.get((p, r), [])
            state = "free" if refs[p] == 0 else ("shared" if refs[p] > 1 else "own")
            if refs[p] and not who:
                state = "unused row"
            values.append({"page": p, "row": r, "state": state, "refcount": int(refs[p]),
                           "label": f"{','.join(who)}:{token[(p, r)]}" if who else "",
                           "holders": ", ".join(who) or "-"})
    return {
        "data": {"values": values}, "width": max(300, 46 * cache.num_pages), "height": 24 * ps + 20,
        "title": "the page pool: one cell per row of a page, labelled sequence(s):token",
        "layer": [
            {"mark": {"type": "rect", "stroke": "white"},
             "encoding": {"x": {"field": "page", "type": "ordinal", "axis": {"labelAngle": 0, "orient": "top"}},
                          "y": {"field": "row", "type": "ordinal", "title": "row in page"},
                          "color": {"field": "state", "type": "nominal", "title": None,
                                    "scale": {"domain": ["own", "shared", "unused row", "free"],
                                              "range": ["#4c78a8", "#e45756", "#c6dbef", "#eeeeee"]}},
                          "tooltip": [{"field": "page"}, {"field": "row"}, {"field": "holders"},
                                      {"field": "refcount"}]}},
            {"mark": {"type": "text", "fontSize": 10},
             "encoding": {"x": {"field": "page", "type": "ordinal"}, "y": {"field": "row", "type": "ordinal"},
                          "text": {"field": "label"}}},
        ],
    }


def render() -> None:
    try:
        from minitorch.attention.paged import PagedKVCache
        from minitorch.attention.reference import reference_paged_attention
    except Exception as err:  # the paged module not landed yet
        missing_module_note("minitorch.attention.paged", err, "The Paged KV cache page needs PagedKVCache.")
        return

    st.markdown(
        "`PagedKVCache` keeps the keys and values of many sequences in **one pool of pages** of `page_size` tokens "
        "(vLLM's PagedAttention). A sequence's **block table** lists its pages: token `j` is row `j % page_size` of "
        "page `block_table[j // page_size]`. Pages come from a **free list** as a sequence grows, so at most one "
        "page per sequence is partly empty. `fork` shares every page (a reference count per page); the first "
        "append to a shared, partly filled last page copies it (**copy-on-write**). `paged_attention` reads the "
        "keys in place through the block tables."
    )
    sb = st.sidebar
    sb.subheader("Paged cache settings")
    page_size = sb.slider("page_size (tokens per page)", 2, 8, 4, key="pg_page_size")
    num_pages = sb.slider("num_pages (pool)", 6, 24, 12, key="pg_num_pages")

    config = (page_size, num_pages)
    if st.session_state.get("pg_config") != config:
        st.session_state["pg_cache"] = PagedKVCache(HKV, D, page_size=page_size, num_pages=num_pages,
                                                    backend="simple", dtype=np.float64)
        st.session_state["pg_config"], st.session_state["pg_step"], st.session_state["pg_log"] = config, 0, []
    cache, log = st.session_state["pg_cache"], st.session_state["pg_log"]

    def run(op: str, sid: int, n: int) -> None:
        try:
            log.append(apply(cache, op, sid, n))
        except Exception as err:  # out of pages: the cache is unchanged, say why
            log.append(f"{op}({name(sid) if sid >= 0 else ''}) failed, nothing changed: {err}")

    def next_step() -> None:  # a callback: it runs before the page is drawn, so the button shows the new count
        run(*SCENARIO[st.session_state["pg_step"]])
        st.session_state["pg_step"] += 1

    if st.session_state["pg_step"] == 0 and not log:  # a link may start the tour part way: ?page=paged&step=6
        for _ in range(min(int(st.query_params.get("step", 0) or 0), len(SCENARIO))):
            next_step()
    step = st.session_state["pg_step"]
    b = st.columns(3)
    b[0].button(f"Next step ({step}/{len(SCENARIO)})", key="pg_next", disabled=step >= len(SCENARIO),
                on_click=next_step)
    if b[1].button("Restart", key="pg_restart"):
        st.session_state.pop("pg_config")
        st.rerun()
    b[2].caption(f"Hkv={HKV}, H={H} (GQA), D={D}, SimpleBackend")

    live = cache.sequences
    with st.expander("your own operations", expanded=False):
        c = st.columns(4)
        who = c[0].selectbox("sequence", live, format_func=name, key="pg_who") if live else None
        n = c[1].number_input("tokens", 1, 3 * page_size, 3, key="pg_n")
        if c[2].button("new sequence", key="pg_add"):
            run("add", -1, 0)
        if who is not None and c[2].button("append", key="pg_append"):
            run("append", who, int(n))
        if who is not None and c[3].button("fork", key="pg_fork"):
            run("fork", who, 0)
        if who is not None and c[3].button("free", key="pg_free"):
            run("free", who, 0)
    live = cache.sequences

    m = st.columns(5)
    m[0].metric("pages in use", cache.pages_in_use)
    m[1].metric("free pages", cache.num_free_pages)
    stored = sum(int(x) for x in cache.seq_lens(live)) if live else 0
    m[2].metric("tokens (all sequences)", stored)
    m[3].metric("rows used in held pages", f"{len(set(_rows(cache)))}/{cache.pages_in_use * page_size}",
                help="a shared row counts once; the rest is the unused tail of last pages")
    longest = int(cache.seq_lens(live).max()) if live else 0
    m[4].metric("a contiguous cache", f"{len(live) * longest} rows",
                help="a contiguous cache reserves the longest sequence's length for every sequence")
    if log:
        st.info(log[-1])
    chart(pool_spec(cache))
    st.caption(f"free list (taken from the left): {cache.free_pages}")
    if not live:
        st.write("No sequences yet: press **Next step**.")
        return
    st.dataframe(pd.DataFrame({"sequence": [name(s) for s in live], "length": cache.seq_lens(live),
                               "block table (pages, in token order)": [str(cache.pages(s)) for s in live]}),
                 hide_index=True)

    ids = [s for s in live if cache.seq_lens([s])[0] > 0]
    if ids:  # the decode step of every sequence at once, read through the block tables
        q = np.random.default_rng(len(log)).standard_normal((len(ids), H, 1, D))
        out = cache.attend(q, ids)
        ref, _ = reference_paged_attention(q, cache.k_pages, cache.v_pages, cache.block_table(ids),
                                           cache.seq_lens(ids))
        st.metric("paged attention of the newest tokens vs float64 reference (max diff)",
                  f"{float(np.max(np.abs(np.asarray(out) - ref))):.1e}",
                  help="cache.attend(q, ids): one call for every sequence, keys read in place through the block "
                       "tables; the reference gathers each sequence's keys out of its pages first")
    with st.expander("what happened, step by step"):
        st.write("\n".join(f"{i + 1}. {line}" for i, line in enumerate(log)) or "nothing yet")


def _rows(cache: Any) -> List[int]:
    """The pool rows (``page * page_size + row``) holding a token of each sequence, shared rows repeated."""
    ps = cache.page_size
    return [cache.pages(s)[j // ps] * ps + j % ps for s in cache.sequences
            for j in range(int(cache.seq_lens([s])[0]))]
