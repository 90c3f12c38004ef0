"""Helpers shared by the visualizer's pages: colours, Vega-Lite charts, the CUDA note.

Charts are plain Vega-Lite dictionaries given to ``st.vega_lite_chart``: they are drawn by the browser, so the
server only builds a small dict (no image encoding, no schema validation) and every interaction stays fast.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import streamlit as st

from minitorch.attention.tiling import TileType

# One colour per TileType value (SKIP=0, DENSE=1, TRIANGLE=2), used by every tile picture.
TILE_COLORS: Dict[int, str] = {
    int(TileType.SKIP): "#e3e3e3",
    int(TileType.DENSE): "#4c78a8",
    int(TileType.TRIANGLE): "#f58518",
}
TILE_LABELS: Dict[int, str] = {int(t): t.name for t in TileType}
TILE_ORDER = [int(TileType.DENSE), int(TileType.TRIANGLE), int(TileType.SKIP)]
MAX_RECT_TILES = 4096  # above this many tiles, a grid is drawn as an image instead of a chart


def records(df: pd.DataFrame) -> List[Dict[str, Any]]:
    """DataFrame rows as JSON-friendly dicts (NaN/inf become None)."""
    clean = df.replace([np.inf, -np.inf], np.nan)
    return clean.astype(object).where(clean.notna(), None).to_dict("records")


def chart(spec: Dict[str, Any], target: Any = None, stretch: bool = False) -> None:
    """Show a Vega-Lite spec in ``target`` (a container / placeholder) or the page."""
    spec = dict(spec)
    spec.setdefault("autosize", {"type": "fit-x" if stretch else "pad", "contains": "padding"})
    if isinstance(spec.get("title"), str):
        spec["title"] = {"text": spec["title"], "anchor": "start", "fontSize": 13}
    (target or st).vega_lite_chart(spec=spec, width="stretch" if stretch else "content")


def tile_rgb(types: np.ndarray, alpha: Optional[np.ndarray] = None) -> np.ndarray:
    """An RGB image ``(Tr, Tc, 3)`` in [0, 1] of a ``TileType`` grid; ``alpha`` blends tiles towards white."""
    rgb = np.zeros(types.shape + (3,))
    for value, color in TILE_COLORS.items():
        rgb[types == value] = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    if alpha is not None:
        rgb = 1.0 - alpha[..., None] * (1.0 - rgb)
    return rgb


def tile_spec(
    types: np.ndarray,
    title: str = "",
    done: Optional[np.ndarray] = None,
    current: Optional[Sequence[int]] = None,
    numbers: Optional[Dict[tuple, int]] = None,
    x_title: str = "key tile j",
    y_title: str = "query tile i",
    size: int = 380,
) -> Dict[str, Any]:
    """A Vega-Lite picture of a ``TileType`` grid ``(Tr, Tc)``.

    ``done``: bool ``(Tr, Tc)``, tiles drawn faded where False; ``current``: ``(tq, tk)`` outlined in red;
    ``numbers``: ``{(tq, tk): n}`` printed on the tiles (the processing order, small grids only).
    """
    Tr, Tc = types.shape
    tq, tk = np.meshgrid(np.arange(Tr), np.arange(Tc), indexing="ij")
    t = types.ravel().astype(int)
    names = np.array([TILE_LABELS[k] for k in range(3)])[t]
    op = np.ones(t.size) if done is None else np.where(done.ravel(), 1.0, 0.28)
    num = np.full(t.size, -1)
    if numbers and Tr * Tc <= 400:
        for (a, b), n in numbers.items():
            num[a * Tc + b] = n
    cur = np.zeros(t.size, dtype=bool)
    if current is not None:
        cur[int(current[0]) * Tc + int(current[1])] = True
    values = [{"i": int(a), "j": int(b), "type": str(c), "o": float(d), "n": int(e), "cur": bool(f)}
              for a, b, c, d, e, f in zip(tq.ravel(), tk.ravel(), names, op, num, cur)]
    cell = max(3, min(40, size // max(Tr, Tc, 1)))
    small = max(Tr, Tc) <= 32
    x = {"field": "j", "type": "ordinal", "title": x_title, "axis": {"labels": small, "ticks": small, "labelAngle": 0}}
    y = {"field": "i", "type": "ordinal", "title": y_title, "axis": {"labels": small, "ticks": small}}
    layers: List[Dict[str, Any]] = [{
        "mark": {"type": "rect", "stroke": "white", "strokeWidth": 1 if Tr * Tc <= 4096 else 0},
        "encoding": {
            "x": x, "y": y,
            "color": {"field": "type", "type": "nominal", "legend": {"orient": "bottom", "title": None},
                      "scale": {"domain": [TILE_LABELS[k] for k in TILE_ORDER],
                                "range": [TILE_COLORS[k] for k in TILE_ORDER]}},
            "opacity": {"field": "o", "type": "quantitative", "legend": None, "scale": {"domain": [0, 1]}},
            "tooltip": [{"field": "i", "title": "query tile"}, {"field": "j", "title": "key tile"},
                        {"field": "type"}],
        },
    }]
    if (num >= 0).any():
        layers.append({"transform": [{"filter": "datum.n >= 0"}],
                       "mark": {"type": "text", "fontSize": 9, "color": "white"},
                       "encoding": {"x": x, "y": y, "text": {"field": "n", "type": "quantitative"}}})
    if cur.any():
        layers.append({"transform": [{"filter": "datum.cur"}],
                       "mark": {"type": "rect", "fill": None, "stroke": "#d62728", "strokeWidth": 3},
                       "encoding": {"x": x, "y": y}})
    return {"data": {"values": values}, "title": title, "width": cell * Tc, "height": cell * Tr, "layer": layers}


def show_tiles(types: np.ndarray, target: Any = None, **kwargs: Any) -> None:
    """Draw a tile grid: a chart, or for very large grids an image."""
    if types.size > MAX_RECT_TILES:
        done = kwargs.get("done")
        alpha = None if done is None else np.where(done, 1.0, 0.28)
        img = np.kron(tile_rgb(types, alpha), np.ones((max(1, 400 // max(types.shape)),) * 2 + (1,)))
        (target or st).image(img, caption=f"{kwargs.get('title', '')} ({types.shape[0]} x {types.shape[1]} tiles)",
                             clamp=True)
        return
    chart(tile_spec(types, **kwargs), target)


def line_spec(
    df: pd.DataFrame, x: str, ys: Sequence[str], title: str = "", x_title: Optional[str] = None,
    y_title: str = "", log_x: bool = False, log_y: bool = False, height: int = 300,
    dashed: Sequence[str] = (),
) -> Dict[str, Any]:
    """Lines of the columns ``ys`` of ``df`` against ``x`` (points marked), optionally on log axes."""
    values = records(df[[x, *ys]])
    scale_x = {"type": "log", "base": 2} if log_x else {"zero": False}
    scale_y = {"type": "log"} if log_y else {"zero": False}
    enc = {
        "x": {"field": x, "type": "quantitative", "title": x_title or x, "scale": scale_x},
        "y": {"field": "value", "type": "quantitative", "title": y_title, "scale": scale_y,
              "axis": {"format": "~s"}},
        "color": {"field": "series", "type": "nominal", "title": None, "sort": list(ys),
                  "legend": {"orient": "top-left", "fillColor": "white", "labelLimit": 400, "padding": 4}},
        "tooltip": [{"field": x, "type": "quantitative"}, {"field": "series"},
                    {"field": "value", "type": "quantitative", "format": ",.4~g"}],
    }
    if dashed:
        enc["strokeDash"] = {"condition": {"test": " || ".join(f"datum.series === {s!r}" for s in dashed),
                                           "value": [5, 3]}, "value": [1, 0]}
    return {
        "data": {"values": values}, "title": title, "height": height,
        "transform": [{"fold": list(ys), "as": ["series", "value"]}, {"filter": "isValid(datum.value)"}],
        "mark": {"type": "line", "point": True}, "encoding": enc,
    }


def fmt_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@st.cache_resource(show_spinner=False)
def cuda_available() -> bool:
    """``numba.cuda.is_available()`` (checked once per server process)."""
    try:
        from numba import config, cuda

        if getattr(config, "ENABLE_CUDASIM", 0):  # the simulator is not a GPU
            return False
        return bool(cuda.is_available())
    except Exception:  # pragma: no cover - numba without CUDA support
        return False


def cuda_note() -> None:
    """A note in the sidebar when the CUDA backend cannot run here."""
    if cuda_available():
        st.sidebar.success("CUDA GPU found: the CudaBackend kernels can run.")
    else:
        st.sidebar.info(
            "No CUDA GPU here (`numba.cuda.is_available()` is False): the app runs the SimpleBackend (NumPy) and "
            "FastTensorBackend (Numba CPU) kernels. The CUDA kernels use the same TileSchedule you see."
        )


def missing_module_note(module: str, err: BaseException, what: str) -> None:
    """A clear note for a page whose minitorch module is not importable yet."""
    st.warning(f"`{module}` is not available in this tree yet ({type(err).__name__}: {err}). {what}")
