"""minitorch visualizer: see and play with every idea of the project.

    streamlit run project/app.py

Pages (sidebar, or by URL: ``?page=tiles``, ``online_softmax``, ``memory``, ``ring_buffer``, ``dma``, ``sandbox``,
``ring_attention``, ``paged``, ``mask_mod``):

* Tiles: the ``TileSchedule`` of an attention call (DENSE / TRIANGLE / SKIP), the Q-major and K-major processing
  orders step by step, and the bytes each order moves.
* Online softmax: one query row through the key tiles: running max, running sum, rescaled accumulator.
* Memory and speed: standard vs flash attention memory, the committed benchmark results, a tiny live run.
* Ring buffer: the ``RingBufferKVCache`` slots, pointers, wraparound and the newest query's attention.
* Dynamic Mask Attention: importance scores, selected keys and skipped tiles.
* Tensor sandbox: shape, strides, storage, permute/view, and the autodiff graph of a Scalar expression.
* Ring attention: a sequence split over ranks, the K/V blocks going around, computed and skipped chunk pairs, the
  LSE merge.
* Paged KV cache: the page pool, each sequence's block table, the free list, a fork sharing pages and
  copy-on-write, step by step.
* mask_mod: a mask as a Python function (causal, sliding window, prefix-LM, documents, dilated, your own), its block
  mask and the work it skips, checked against the reference.

Everything shown is computed by minitorch itself (``minitorch.attention.*``, ``TensorData``, ``Scalar``).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):  # minitorch (repo root) and app_pages (this folder), when not installed
    if _p not in sys.path:
        sys.path.insert(0, _p)

import streamlit as st  # noqa: E402

from app_pages import (  # noqa: E402
    common,
    dma,
    mask_mod,
    memory,
    online_softmax,
    paged,
    ring_attention,
    ring_buffer,
    sandbox,
    tiles,
)

# url key -> (title, module with render())
PAGES = {
    "tiles": ("Tiles", tiles),
    "online_softmax": ("Online softmax", online_softmax),
    "memory": ("Memory and speed", memory),
    "ring_buffer": ("Ring buffer", ring_buffer),
    "dma": ("Dynamic Mask Attention", dma),
    "sandbox": ("Tensor sandbox", sandbox),
    "ring_attention": ("Ring attention", ring_attention),
    "paged": ("Paged KV cache", paged),
    "mask_mod": ("mask_mod", mask_mod),
}
KEYS = list(PAGES)


def _on_page_change() -> None:
    st.query_params["page"] = st.session_state["page"]


def main() -> None:
    st.set_page_config(page_title="minitorch: flash attention visualizer", layout="wide")
    if "page" not in st.session_state:
        wanted = st.query_params.get("page", KEYS[0])
        st.session_state["page"] = wanted if wanted in PAGES else KEYS[0]
    st.sidebar.title("minitorch")
    st.sidebar.caption("Fused flash attention, ring-buffer KV cache and Dynamic Mask Attention, from scratch.")
    key = st.sidebar.radio(
        "Page", KEYS, key="page", format_func=lambda k: PAGES[k][0], on_change=_on_page_change
    )
    title, module = PAGES[key]
    st.title(title)
    module.render()
    common.cuda_note()


main()
