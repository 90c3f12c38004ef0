"""The visualizer (project/app.py) and the online-softmax trace it shows (minitorch/attention/online_softmax.py).

Every page runs without an exception on its defaults and after changing each main widget (Streamlit's AppTest runs
the script in-process, no browser); shown numbers are checked against minitorch's own computation.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from minitorch.attention.online_softmax import online_softmax_trace, softmax_row

APP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "project", "app.py")
if os.path.dirname(APP) not in sys.path:  # the app's page modules (project/app_pages), for their helpers
    sys.path.insert(0, os.path.dirname(APP))
PAGES = ["tiles", "online_softmax", "memory", "ring_buffer", "dma", "sandbox", "ring_attention", "paged", "mask_mod"]


# ---------------------------------------------------------------------------------------------------------------------
# online_softmax_trace
# ---------------------------------------------------------------------------------------------------------------------


def _softmax64(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    e = np.exp(s - s[np.isfinite(s)].max())
    return e / e.sum()


@pytest.mark.parametrize("Nk,block_k", [(1, 1), (7, 3), (32, 8), (33, 8), (16, 64), (50, 1)])
def test_online_softmax_matches_float64_softmax(Nk: int, block_k: int) -> None:
    rng = np.random.default_rng(Nk * 100 + block_k)
    s = 3.0 * rng.standard_normal(Nk) + np.linspace(0, 5, Nk)  # a rising trend: the max moves, rescales happen
    v = rng.standard_normal((Nk, 5))
    tr = online_softmax_trace(s, v, block_k)
    p = _softmax64(s)
    np.testing.assert_allclose(tr.output, p @ v, rtol=1e-12, atol=1e-13)
    assert tr.lse == pytest.approx(np.log(np.exp(s - s.max()).sum()) + s.max(), rel=1e-13)
    assert len(tr.steps) == math.ceil(Nk / block_k)
    # running max is the prefix max, l the prefix sum of exp(s - m), acc the prefix sum of exp(s - m) v
    for st in tr.steps:
        pre = s[: st.k_end]
        assert st.m == pytest.approx(pre.max())
        assert st.l == pytest.approx(np.exp(pre - pre.max()).sum(), rel=1e-12)
        np.testing.assert_allclose(st.acc, np.exp(pre - pre.max()) @ v[: st.k_end], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(st.out, _softmax64(pre) @ v[: st.k_end], rtol=1e-11, atol=1e-12)
        assert st.alpha == pytest.approx(math.exp(st.m_prev - st.m) if np.isfinite(st.m_prev) else 0.0)
    np.testing.assert_allclose(softmax_row(s), p, rtol=1e-13)


def test_online_softmax_masked_keys() -> None:
    rng = np.random.default_rng(0)
    s = rng.standard_normal(12)
    s[[0, 1, 2, 3, 9]] = -np.inf  # the whole first tile masked, and one more key
    v = rng.standard_normal((12, 3))
    tr = online_softmax_trace(s, v, 4)
    assert tr.steps[0].l == 0.0 and not np.isfinite(tr.steps[0].m)
    np.testing.assert_array_equal(tr.steps[0].out, np.zeros(3))
    np.testing.assert_allclose(tr.output, _softmax64(s) @ v, rtol=1e-12, atol=1e-13)
    # every key masked: zeros and lse = -inf, as the kernels
    tr = online_softmax_trace(np.full(5, -np.inf), v[:5], 2)
    np.testing.assert_array_equal(tr.output, np.zeros(3))
    assert tr.lse == -np.inf
    np.testing.assert_array_equal(softmax_row(np.full(5, -np.inf)), np.zeros(5))


def test_online_softmax_agrees_with_simple_kernel() -> None:
    """The trace and the SimpleBackend flash kernel compute the same row."""
    from minitorch.attention.kernels.simple.flash import forward
    from minitorch.attention.spec import make_spec

    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((1, 1, 1, 4)), rng.standard_normal((1, 1, 21, 4)), rng.standard_normal((1, 1, 21, 4))
    out, lse = forward(q, k, v, None, make_spec(q.shape, k.shape, v.shape, block_q=1, block_k=5))
    tr = online_softmax_trace(0.5 * (k[0, 0] @ q[0, 0, 0]), v[0, 0], 5)
    np.testing.assert_allclose(tr.output, out[0, 0, 0], rtol=1e-12)
    assert tr.lse == pytest.approx(float(lse[0, 0, 0]), rel=1e-12)


@pytest.mark.parametrize("bad", [dict(scores_row=np.zeros((2, 2))), dict(values=np.zeros((3, 2))), dict(block_k=0)])
def test_online_softmax_rejects_bad_input(bad: dict) -> None:
    args = dict(scores_row=np.zeros(4), values=np.zeros((4, 2)), block_k=2)
    args.update(bad)
    with pytest.raises(ValueError):
        online_softmax_trace(**args)


# ---------------------------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------------------------

AppTest = pytest.importorskip("streamlit.testing.v1").AppTest


def _app(page: str) -> "AppTest":
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = page
    at.run()
    _ok(at)
    return at


def _ok(at: "AppTest") -> None:
    assert not at.exception, [e.value for e in at.exception]


def _metric(at: "AppTest", label: str) -> str:
    for m in at.metric:
        if m.label == label:
            return m.value
    raise AssertionError(f"no metric {label!r}; have {[m.label for m in at.metric]}")


@pytest.mark.parametrize("page", PAGES)
def test_every_page_runs_on_defaults(page: str) -> None:
    at = _app(page)
    assert at.title[0].value  # the page drew its title
    assert at.session_state["page"] == page


def test_sidebar_navigation() -> None:
    at = _app("tiles")
    for page in PAGES[1:]:
        at.sidebar.radio(key="page").set_value(page).run()
        _ok(at)
        assert at.query_params["page"] == [page] or at.query_params["page"] == page


def _tile_counts_match(at: "AppTest", **kwargs) -> None:
    from minitorch.attention.tiling import TileSchedule

    c = TileSchedule(**kwargs).counts()
    for name in ("DENSE", "TRIANGLE", "SKIP"):
        assert int(_metric(at, f"{name} tiles")) == c[name], name


def test_tiles_page_widgets_and_counts() -> None:
    at = _app("tiles")
    _tile_counts_match(at, Nq=128, Nk=128, block_q=16, block_k=16, causal=True)
    at.slider(key="tiles_nq").set_value(100).run()
    at.slider(key="tiles_nk").set_value(200).run()
    at.select_slider(key="tiles_bq").set_value(32).run()
    at.select_slider(key="tiles_bk").set_value(8).run()
    at.select_slider(key="tiles_d").set_value(128).run()
    _ok(at)
    _tile_counts_match(at, Nq=100, Nk=200, block_q=32, block_k=8, causal=True)
    at.checkbox(key="tiles_use_window").check().run()
    at.slider(key="tiles_window").set_value(40).run()
    at.number_input(key="tiles_sinks").set_value(4).run()
    _ok(at)
    _tile_counts_match(at, Nq=100, Nk=200, block_q=32, block_k=8, causal=True, window=40, num_sinks=4)
    at.checkbox(key="tiles_causal").uncheck().run()
    _ok(at)
    _tile_counts_match(at, Nq=100, Nk=200, block_q=32, block_k=8, causal=False, window=40, num_sinks=4)
    at.slider(key="tiles_step").set_value(3).run()
    _ok(at)
    # the play button walks to the last step (small grid: few frames)
    at.slider(key="tiles_nq").set_value(32).run()
    at.slider(key="tiles_nk").set_value(32).run()
    at.button(key="tiles_play").click().run()
    _ok(at)
    assert float(_metric(at, "work skipped").rstrip("%")) >= 0


def test_tiles_page_ring_positions() -> None:
    from minitorch.attention.kv_cache import held_positions, slot_of

    at = _app("tiles")
    at.selectbox(key="tiles_positions").select("ring").run()
    _ok(at)
    at.slider(key="tiles_rot").set_value(50).run()
    _ok(at)
    seen = 128 + 50
    held = held_positions(seen, 128)
    k_pos = np.full(128, -1)
    k_pos[slot_of(held, 128)] = held
    q_pos = np.arange(seen - 128, seen)
    _tile_counts_match(at, Nq=128, Nk=128, block_q=16, block_k=16, causal=True, q_positions=q_pos, k_positions=k_pos)
    assert int(_metric(at, "SKIP tiles")) > 0
    at.selectbox(key="tiles_positions").select("partial").run()
    at.slider(key="tiles_fill").set_value(0).run()  # an empty cache: every tile SKIP, no step slider
    _ok(at)
    assert int(_metric(at, "SKIP tiles")) == 64
    at.selectbox(key="tiles_positions").select("default").run()
    at.slider(key="tiles_nq").set_value(10).run()  # a single tile: no step slider either
    at.slider(key="tiles_nk").set_value(10).run()
    _ok(at)
    assert _metric(at, "tiles (Tr x Tc)") == "1 x 1"


def test_online_softmax_page_shows_exact_match() -> None:
    from app_pages.online_softmax import make_row

    at = _app("online_softmax")
    for pattern in ("rising", "spike", "masked", "random"):
        at.selectbox(key="os_pattern").select(pattern).run()
        _ok(at)
    at.slider(key="os_nk").set_value(6).run()  # one tile: a single step, no step slider
    _ok(at)
    at.slider(key="os_nk").set_value(40).run()
    at.select_slider(key="os_bk").set_value(4).run()
    at.select_slider(key="os_d").set_value(8).run()
    at.number_input(key="os_seed").set_value(5).run()
    at.slider(key="os_step").set_value(2).run()
    _ok(at)
    assert _metric(at, "keys seen") == "12 / 40"
    shown = float(_metric(at, "max |online - full softmax|"))
    q, k, v, bias = make_row(40, 8, "random", 5)
    s = (k @ q) / math.sqrt(8) + bias
    expected = float(np.max(np.abs(online_softmax_trace(s, v, 4).output - _softmax64(s) @ v)))
    assert shown < 1e-12 and expected < 1e-12
    assert shown == pytest.approx(expected, abs=1e-15)
    # after step 2 the running max is the max of the first 12 scores
    assert float(_metric(at, "running max m")) == pytest.approx(s[:12].max(), abs=1e-4)


def test_memory_page_live_run() -> None:
    at = _app("memory")
    at.select_slider(key="mem_d").set_value(32).run()
    at.select_slider(key="live_n").set_value(32).run()
    at.select_slider(key="live_d").set_value(8).run()
    at.select_slider(key="live_h").set_value(1).run()
    at.button(key="live_run").click().run()
    _ok(at)
    df = at.dataframe[-1].value
    assert "implementation" in df.columns
    assert (df["max |out - float64 reference|"] < 1e-10).all()


def _charts(at: "AppTest") -> dict:
    """``{title: Vega-Lite spec}`` of the charts a page drew."""
    specs = [json.loads(e.proto.spec) for e in at.get("vega_lite_chart")]
    return {(sp.get("title") or {}).get("text"): sp for sp in specs}


def test_memory_page_charts_the_suite_results_with_their_labels() -> None:
    """The committed results as a few charts whose series are the names in summary.json (``flash fwd``, ...), never
    ``record 0`` nor fields such as load averages; with the pandas this install resolved (3.x: str columns)."""
    from app_pages import memory

    at = _app("memory")
    sets = at.selectbox(key="bench_set").options
    assert sets[:2] == ["full suite, committed (benchmarks/results/suite)",
                        "quick suite, committed (benchmarks/results/quick)"]
    for label in sets[:2]:
        at.selectbox(key="bench_set").select(label).run()
        _ok(at)
        folder = label.split("(")[1].rstrip(")")
        with open(os.path.join(os.path.dirname(os.path.dirname(APP)), folder, "summary.json")) as f:
            summary = json.load(f)
        charts = _charts(at)
        series = {title: spec["transform"][0]["fold"] for title, spec in charts.items() if title}
        assert series["attention time vs N"] == list(dict.fromkeys(r["impl"] for r in summary["attention"]["rows"]))
        assert series["peak memory beyond the inputs vs N"][:2] == ["flash forward+backward",
                                                                    "standard attention forward"]
        assert series["decoding one token at a time"] == ["ring-buffer KV cache (fast)", "recompute the window (fast)"]
        assert "ideal 1/r" in series["dynamic mask attention: speedup"]
        text = json.dumps(list(charts.values()))
        assert "record 0" not in text and "load" not in text
    # the data behind a chart is the file's: the attention chart's median times per N and implementation
    spec, _ = memory.benchmark_charts(summary)[0]
    got = {(v["N"], name): v[name] for v in spec["data"]["values"] for name in spec["transform"][0]["fold"]
           if v.get(name) is not None}
    want = {(r["N"], r["impl"]): r["median_ms"] for r in summary["attention"]["rows"]}
    assert got == pytest.approx(want)


def test_memory_page_without_or_with_a_broken_summary(tmp_path, monkeypatch) -> None:
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "summary.json").write_text("{not json")
    at = AppTest.from_function(_memory_page_only, default_timeout=60, args=(str(tmp_path), os.path.dirname(APP)))
    at.run()
    _ok(at)
    assert any("could not read" in w.value for w in at.warning)
    (tmp_path / "quick" / "summary.json").unlink()
    at.run()
    _ok(at)
    assert any("No suite results here" in i.value for i in at.info)


def _memory_page_only(results: str, project: str) -> None:
    """Run as its own script by AppTest.from_function: only its arguments are available."""
    import os
    import sys

    sys.path.insert(0, project)
    sys.path.insert(0, os.path.dirname(project))
    from app_pages import memory

    memory.RESULTS = results
    memory.render()


def test_ring_buffer_page_buttons_match_cache() -> None:
    from minitorch.attention.kv_cache import RingBufferKVCache

    at = _app("ring_buffer")
    ref = RingBufferKVCache(1, 1, 8, 8, num_sinks=1)

    def check() -> None:
        _ok(at)
        for label, value in (("seen (next position)", ref.seen), ("length (held)", ref.length),
                             ("write_ptr", ref.write_ptr), ("read_ptr", ref.read_ptr)):
            assert int(_metric(at, label)) == value, label

    def append(n: int) -> None:
        z = np.zeros((1, 1, n, 8))
        ref.append(z, z)

    append(10)
    check()
    at.button(key="rb_append1").click().run()
    append(1)
    check()
    at.slider(key="rb_chunk").set_value(5).run()
    at.button(key="rb_append_chunk").click().run()
    append(5)
    check()
    assert float(_metric(at, "decode kernel vs float64 reference (max diff)")) < 1e-12
    at.button(key="rb_reset").click().run()
    ref.reset()
    check()
    at.button(key="rb_append1").click().run()
    append(1)
    check()
    at.slider(key="rb_capacity").set_value(5).run()
    at.slider(key="rb_sinks").set_value(0).run()
    _ok(at)
    assert int(_metric(at, "seen (next position)")) == 7  # a new cache, pre-filled with capacity + 2 tokens
    assert int(_metric(at, "window")) == 5


def test_dma_page_widgets() -> None:
    at = _app("dma")
    assert _metric(at, "selection == reference_dma_mask") == "yes"
    assert float(_metric(at, "flash_dma_attention vs float64 reference (max diff)")) < 1e-10
    at.select_slider(key="dma_n").set_value(64).run()
    at.slider(key="dma_keep").set_value(8).run()
    at.select_slider(key="dma_block").set_value(16).run()
    at.checkbox(key="dma_causal").uncheck().run()
    _ok(at)
    # non-causal: every query keeps the same 8 keys, so the compacted list is one tile column
    from minitorch.attention.tiling import TileSchedule

    assert int(_metric(at, "flash tiles")) == len(TileSchedule(64, 64, 16, 16).work())
    assert int(_metric(at, "tiles (compacted)")) == 4
    assert _metric(at, "kept pairs") == f"{8 / 64:.1%}"
    at.checkbox(key="dma_log").check().run()
    at.slider(key="dma_a").set_value(2.0).run()
    at.slider(key="dma_spread").set_value(1.5).run()
    at.select_slider(key="dma_d").set_value(16).run()
    at.number_input(key="dma_seed").set_value(3).run()
    _ok(at)
    assert _metric(at, "selection == reference_dma_mask") == "yes"


def test_sandbox_page_widgets() -> None:
    at = _app("sandbox")
    at.text_input(key="sb_shape").input("3, 4").run()
    at.text_input(key="sb_order").input("1, 0").run()
    at.text_input(key="sb_view").input("12").run()
    _ok(at)
    assert at.warning  # a transposed 3x4 cannot be viewed as 12 without contiguous()
    at.text_input(key="sb_order").input("0, 0").run()  # not a permutation: an error message, no crash
    _ok(at)
    assert at.error
    at.text_input(key="sb_shape").input("two").run()
    _ok(at)
    at.text_input(key="sb_shape").input("2, 3, 4").run()
    at.text_input(key="sb_order").input("2, 0, 1").run()
    at.radio(key="sb_section").set_value("graph").run()
    _ok(at)
    assert at.get("graphviz_chart")
    for expr in ("(x * y).relu() + y.sigmoid()", "(x * x + y * y).log()"):
        at.selectbox(key="sb_expr").select(expr).run()
        _ok(at)
    at.number_input(key="sb_x").set_value(2.0).run()
    at.number_input(key="sb_y").set_value(3.0).run()
    at.selectbox(key="sb_expr").select("custom").run()
    at.text_input(key="sb_custom").input("x * x * y").run()
    _ok(at)
    assert float(_metric(at, "d out / dx (backward)")) == pytest.approx(2 * 2.0 * 3.0)
    assert float(_metric(at, "d out / dy (backward)")) == pytest.approx(4.0)
    at.text_input(key="sb_custom").input("__import__('os')").run()  # no builtins: an error message
    _ok(at)
    assert at.error


def test_ring_attention_page_layouts_and_merge() -> None:
    from minitorch.attention.reference import reference_mask
    from minitorch.attention.ring_schedule import local_positions, ring_plan

    def balance(N: int, P: int, layout: str, causal: bool = True, window=None) -> str:  # type: ignore[no-untyped-def]
        work = []
        for r in range(P):
            q = local_positions(N, P, r, layout)
            work.append(sum(reference_mask(1, len(q), len(local_positions(N, P, s.kv_rank, layout)), causal, window, q,
                                           local_positions(N, P, s.kv_rank, layout)).sum()
                            for s in ring_plan(N, P, r, layout, causal, window)))
        return f"{max(work) / np.mean(work):.2f}"

    at = _app("ring_attention")
    assert _metric(at, "busiest rank / mean") == balance(64, 4, "zigzag") == "1.00"
    assert _metric(at, "blocks skipped") == "0 of 16"
    at.radio(key="ra_layout").set_value("contiguous").run()
    _ok(at)
    assert _metric(at, "busiest rank / mean") == balance(64, 4, "contiguous")
    assert float(_metric(at, "busiest rank / mean")) > 1.5
    assert _metric(at, "blocks skipped") == "6 of 16"  # rank r skips the P-1-r blocks of its future
    at.slider(key="ra_step").set_value(3).run()
    at.slider(key="ra_n").set_value(45).run()  # not divisible by P: chunks differ by one
    at.checkbox(key="ra_use_window").check().run()
    at.slider(key="ra_window").set_value(5).run()
    _ok(at)
    assert _metric(at, "busiest rank / mean") == balance(45, 4, "contiguous", window=5)
    assert _metric(at, "visible pairs (all ranks)") == str(int(reference_mask(1, 45, 45, True, 5).sum()))
    at.checkbox(key="ra_causal").uncheck().run()
    at.slider(key="ra_p").set_value(1).run()  # one rank: no step slider, nothing travels
    _ok(at)
    assert _metric(at, "blocks skipped") == "0 of 1"
    at.slider(key="ra_na").set_value(3).run()
    at.slider(key="ra_nb").set_value(20).run()
    at.number_input(key="ra_seed").set_value(4).run()
    _ok(at)
    assert float(_metric(at, "max |merged - full softmax|")) < 1e-12
    assert float(_metric(at, "|merged lse - full lse|")) < 1e-12


def test_paged_page_steps_match_cache() -> None:
    """The guided tour of the paged page: after every step the page's counts are those of a PagedKVCache driven
    by the same operations; the fork shares pages, the copy-on-write and the reuse of freed pages are shown; the
    paged attention it shows matches the float64 reference. Restart and the settings start over."""
    from app_pages import paged as page

    from minitorch.attention.paged import PagedKVCache

    at = _app("paged")
    ref = PagedKVCache(page.HKV, page.D, page_size=4, num_pages=12, backend="simple", dtype=np.float64)
    for step, (op, sid, n) in enumerate(page.SCENARIO):
        at.button(key="pg_next").click().run()
        _ok(at)
        page.apply(ref, op, sid, n)
        assert int(_metric(at, "pages in use")) == ref.pages_in_use, step
        assert int(_metric(at, "free pages")) == ref.num_free_pages, step
        if op == "fork":
            assert "nothing copied" in at.info[0].value
        if step == 5:
            assert "copy-on-write" in at.info[0].value
        if step == 8:  # C grew into the pages B freed
            assert set(ref.pages(2)) & {2}
    assert float(_metric(at, "paged attention of the newest tokens vs float64 reference (max diff)")) < 1e-12
    assert at.button(key="pg_next").disabled
    at.button(key="pg_restart").click().run()
    _ok(at)
    assert int(_metric(at, "pages in use")) == 0
    at.slider(key="pg_page_size").set_value(2).run()
    for _ in range(4):
        at.button(key="pg_next").click().run()
    _ok(at)
    assert int(_metric(at, "pages in use")) == 5  # A: 6 tokens in 3 pages, B: 3 tokens in 2
    deep = AppTest.from_file(APP, default_timeout=60)  # a link into the tour: ?page=paged&step=6
    deep.query_params["page"], deep.query_params["step"] = "paged", "6"
    deep.run()
    _ok(deep)
    ref = PagedKVCache(page.HKV, page.D, page_size=4, num_pages=12, backend="simple", dtype=np.float64)
    for op, sid, n in page.SCENARIO[:6]:
        page.apply(ref, op, sid, n)
    assert int(_metric(deep, "pages in use")) == ref.pages_in_use and "copy-on-write" in deep.info[0].value


def _block_counts_match(at: "AppTest", fn, N: int, block: int) -> None:
    from minitorch.attention import block_mask_from

    bm = block_mask_from(fn, 1, 1, N, N, block, block)
    for name, n in bm.counts().items():
        assert int(_metric(at, f"{name} tiles")) == n, name
    assert _metric(at, "work skipped") == f"{bm.skip_fraction():.1%}"


def test_mask_mod_page_presets_and_custom_expression() -> None:
    at = _app("mask_mod")
    _block_counts_match(at, lambda b, h, q, k: k <= q, 256, 16)  # the default: causal
    assert float(_metric(at, "flash_attention(mask_mod=...) vs float64 reference (max diff)")) < 1e-10
    at.selectbox(key="mm_preset").set_value("document masking").run()
    at.slider(key="mm_l").set_value(64).run()
    at.select_slider(key="mm_block").set_value(32).run()
    _ok(at)
    _block_counts_match(at, lambda b, h, q, k: (q // 64) == (k // 64), 256, 32)
    assert int(_metric(at, "TRIANGLE tiles")) == 0  # documents aligned with the tiles: dense blocks only
    at.selectbox(key="mm_preset").set_value("dilated").run()
    at.slider(key="mm_d").set_value(4).run()
    at.select_slider(key="mm_n").set_value(64).run()
    _ok(at)
    _block_counts_match(at, lambda b, h, q, k: (k <= q) & ((q - k) % 4 == 0), 64, 32)
    assert float(_metric(at, "flash_attention(mask_mod=...) vs float64 reference (max diff)")) < 1e-10
    at.selectbox(key="mm_preset").set_value("custom").run()
    at.text_input(key="mm_expr").input("(k <= q) & (k % 8 == 0)").run()
    _ok(at)
    _block_counts_match(at, lambda b, h, q, k: (k <= q) & (k % 8 == 0), 64, 32)
    at.text_input(key="mm_expr").input("(k <= q) and (q - k < 4)").run()  # Python `and` on arrays: a clear error
    _ok(at)
    assert at.error and "not `and`" in at.error[0].value
    at.text_input(key="mm_expr").input("q +* k").run()  # a syntax error: shown, not raised
    _ok(at)
    assert at.error and "SyntaxError" in at.error[0].value
