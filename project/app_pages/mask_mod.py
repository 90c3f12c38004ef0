"""mask_mod page: a mask written as a Python function, its block mask (DENSE / TRIANGLE / SKIP), the work it skips,
and flash attention with it checked against the float64 reference (minitorch.attention.block_mask)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import numpy as np
import streamlit as st

from .common import show_tiles

PRESETS: Dict[str, Tuple[str, str]] = {
    # name: (the mask_mod's expression in b, h, q, k and the widgets' values W, P, L, d; what it is)
    "causal": ("k <= q", "a query sees the keys at or before it"),
    "sliding window": ("(k <= q) & (q - k < W)", "causal, and at most W positions back (Longformer, Mistral)"),
    "prefix-LM": ("(k <= q) | (k < P)", "the first P positions (the prompt) see each other both ways; causal after"),
    "document masking": ("(q // L) == (k // L)",
                         "packed documents of L tokens: a query sees its own document only (segment ids do this "
                         "with any lengths: q_segment_ids / k_segment_ids)"),
    "dilated": ("(k <= q) & ((q - k) % d == 0)", "causal, every d-th key (dilated / strided attention)"),
    "custom": ("(k <= q) & ((q - k < 16) | (k % 64 < 4))", "type any expression of b, h, q, k (and np, W, P, L, d)"),
}
BLOCKS = [4, 8, 16, 32, 64]


def make_mask_mod(expr: str, W: int, P: int, L: int, d: int) -> Callable[..., Any]:
    """``lambda b, h, q, k: <expr>`` with the widgets' values and NumPy in scope. The expression is the visualizer
    user's own (a local app); it sees no builtins but ``abs``, ``min``, ``max``."""
    scope = {"__builtins__": {"abs": abs, "min": min, "max": max}, "np": np, "W": W, "P": P, "L": L, "d": d}
    fn = eval(compile(f"lambda b, h, q, k: {expr}", "<mask_mod>", "eval"), scope)  # noqa: S307 (the user's own)
    fn.__qualname__ = "mask_mod"
    return fn


@st.cache_data(show_spinner=False, max_entries=32)
def compute(expr: str, N: int, block: int, W: int, P: int, L: int, d: int, seed: int) -> Dict[str, Any]:
    """The block mask of the expression, and flash attention with it (SimpleBackend, float64) against the float64
    reference; ``{"error": ...}`` when the expression is not a valid mask_mod."""
    import minitorch
    from minitorch.attention import block_mask_from
    from minitorch.attention.reference import reference_attention

    try:
        fn = make_mask_mod(expr, W, P, L, d)
        bm = block_mask_from(fn, 1, 1, N, N, block, block)
    except Exception as err:  # a typo in the expression: shown, not raised
        return {"error": f"{type(err).__name__}: {err}"}
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 2, N, 8)) for _ in range(3))
    be = minitorch.SimpleBackend
    out = minitorch.flash_attention(*(minitorch.from_numpy(x, backend=be) for x in (q, k, v)), mask_mod=bm)
    ref, _ = reference_attention(q, k, v, mask_mod=fn)
    dense = bm.visible()
    return {"types": bm.types[0, 0], "counts": bm.counts(), "skip": bm.skip_fraction(),
            "visible": float(dense.mean()) if dense.size else 0.0, "dense": dense,
            "diff": float(np.max(np.abs(out.to_numpy() - ref))), "partial_bytes": int(bm.bits.nbytes)}


def render() -> None:
    st.markdown(
        "A **mask_mod** is a Python function `mask_mod(b, h, q_pos, k_pos) -> bool` (True: the query may see the "
        "key), as in FlexAttention. `block_mask_from` evaluates it once over the positions, vectorized, and "
        "classifies every tile: **DENSE** (all pairs visible: no test in the kernel), **TRIANGLE** (some: its bits "
        "are kept and tested pair by pair) or **SKIP** (none: never loaded). Nothing is compiled for a new mask. "
        "`q.flash_attention(k, v, mask_mod=...)` ANDs it with every other mask (causal, window, padding, segments)."
    )
    sb = st.sidebar
    sb.subheader("mask_mod settings")
    preset = sb.selectbox("mask", list(PRESETS), key="mm_preset")
    c = sb.columns(2)
    N = c[0].select_slider("N = Nq = Nk", [32, 64, 128, 256, 512], 256, key="mm_n")
    block = c[1].select_slider("block (Br = Bc)", BLOCKS, 16, key="mm_block")
    W = c[0].slider("window W", 1, 256, 48, key="mm_w")
    P = c[1].slider("prefix P", 0, 256, 64, key="mm_p")
    L = c[0].slider("document length L", 1, 256, 80, key="mm_l")
    d = c[1].slider("dilation d", 1, 16, 3, key="mm_d")
    expr, what = PRESETS[preset]
    if preset == "custom":
        expr = sb.text_input("mask_mod(b, h, q, k) =", expr, key="mm_expr")
    st.code(f"mask_mod = lambda b, h, q, k: {expr}", language="python")
    st.caption(what)

    r = compute(expr, N, block, W, P, L, d, 0)
    if "error" in r:
        st.error(f"Not a mask_mod: {r['error']}")
        return
    counts = r["counts"]
    m = st.columns(6)
    for col, name in zip(m, ("DENSE", "TRIANGLE", "SKIP")):
        col.metric(f"{name} tiles", counts[name])
    m[3].metric("work skipped", f"{r['skip']:.1%}", help="pairs in SKIP tiles / all pairs (BlockMask.skip_fraction)")
    m[4].metric("visible pairs", f"{r['visible']:.1%}", help="pairs the mask lets through / all pairs")
    m[5].metric("bits kept", f"{r['partial_bytes']} B", help="one byte per pair of the TRIANGLE tiles only")
    left, right = st.columns(2)
    show_tiles(r["types"], left, title="block mask (tiles the kernels visit)",
               x_title=f"key tile j (Bc = {block})", y_title=f"query tile i (Br = {block})")
    img = np.where(r["dense"], 0.15, 1.0)
    right.image(np.kron(img, np.ones((max(1, 380 // N),) * 2)), clamp=True,
                caption="the mask pair by pair (dark: visible), rebuilt from the tiles and bits")
    st.metric("flash_attention(mask_mod=...) vs float64 reference (max diff)", f"{r['diff']:.1e}",
              help="SimpleBackend flash attention with this block mask against the dense float64 reference "
                   "evaluating the same function")
