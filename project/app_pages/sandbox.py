"""Tensor sandbox: TensorData shape/strides/storage, permute and view, and the autodiff graph of a Scalar expression."""

from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import streamlit as st

from minitorch.autodiff import central_difference
from minitorch.scalar import Scalar
from minitorch.tensor_data import IndexingError, TensorData

EXPRESSIONS = [
    "x * y + x.exp()",
    "(x * y).relu() + y.sigmoid()",
    "(x * x + y * y).log()",
    "(x - y) / (x + 3.0)",
    "x.sigmoid() * y + x * 2.0",
]
_FUNCS = {"exp": lambda s: s.exp(), "log": lambda s: s.log(), "relu": lambda s: s.relu(),
          "sigmoid": lambda s: s.sigmoid()}


def parse_ints(text: str) -> Tuple[int, ...]:
    """``"2, 3,4"`` -> ``(2, 3, 4)``; raises ValueError on anything else."""
    parts = [p for p in text.replace("(", "").replace(")", "").replace(" ", "").split(",") if p]
    if not parts:
        raise ValueError("give at least one number")
    return tuple(int(p) for p in parts)


def evaluate(expr: str, x: float, y: float) -> Tuple[Scalar, Scalar, Scalar]:
    """Evaluate ``expr`` on Scalars ``x`` and ``y`` (names: x, y, exp, log, relu, sigmoid; no builtins)."""
    xs, ys = Scalar(x, name="x"), Scalar(y, name="y")
    out = eval(compile(expr, "<expression>", "eval"), {"__builtins__": {}}, {"x": xs, "y": ys, **_FUNCS})
    if not isinstance(out, Scalar):
        raise TypeError(f"the expression must give a Scalar that depends on x or y, got {out!r}")
    return xs, ys, out


def scalar_dot(out: Scalar) -> str:
    """A Graphviz DOT string of the graph behind ``out``, walked through each Scalar's ``history``."""
    lines: List[str] = ["digraph G {", "rankdir=LR;", 'node [fontname="Helvetica", fontsize=10];']
    seen: Dict[int, str] = {}
    stack = [out]
    while stack:
        s = stack.pop()
        if s.unique_id in seen:
            continue
        node = f"v{s.unique_id}"
        seen[s.unique_id] = node
        h = s.history
        if h is None:
            label, style = f"const {s.data:.4g}", 'shape=box, style="rounded,dashed"'
        else:
            d = "" if s.derivative is None else f" | d = {s.derivative:.4g}"
            name = s.name if h.last_fn is None else ("out" if s is out else "")
            label = f"{name} {s.data:.4g}{d}".strip()
            fill = "#c6dbef" if h.last_fn is None else ("#fdd0a2" if s is out else "#f0f0f0")
            style = f'shape=record, style=filled, fillcolor="{fill}"'
        lines.append(f'{node} [label="{label}", {style}];')
        if h is not None and h.last_fn is not None:
            op = f"op{s.unique_id}"
            lines.append(f'{op} [label="{h.last_fn.__name__}", shape=ellipse, style=filled, fillcolor="#e5f5e0"];')
            lines.append(f"{op} -> {node};")
            for inp in h.inputs:
                lines.append(f"v{inp.unique_id} -> {op};")
                stack.append(inp)
    lines.append("}")
    return "\n".join(lines)


def render() -> None:
    sections = {"tensor": "TensorData: shape, strides, storage", "graph": "Autodiff graph (Scalar)"}
    if "sb_section" not in st.session_state:
        wanted = st.query_params.get("section", "tensor")
        st.session_state["sb_section"] = wanted if wanted in sections else "tensor"
    section = st.radio("section", list(sections), format_func=sections.get, horizontal=True, key="sb_section",
                       label_visibility="collapsed")
    if section == "tensor":
        st.markdown(
            "A tensor is a flat **storage** plus a **shape** and **strides**: element `index` lives at "
            "`sum(index[d] * strides[d])`. `permute` only reorders shape and strides (no copy); `view` needs the "
            "row-major (contiguous) layout."
        )
        c = st.columns(3)
        shape_text = c[0].text_input("shape", "2, 3, 4", key="sb_shape")
        order_text = c[1].text_input("permute order", "2, 0, 1", key="sb_order")
        view_text = c[2].text_input("view as", "6, 4", key="sb_view")
        try:
            shape = parse_ints(shape_text)
            if any(d < 1 for d in shape) or math.prod(shape) > 4096:
                raise ValueError("dims must be >= 1 and the size at most 4096")
        except ValueError as err:
            st.error(f"shape: {err}")
            return
        td = TensorData(np.arange(math.prod(shape), dtype=np.float64), shape)
        try:
            perm = td.permute(*parse_ints(order_text))
            perm_err = None
        except (ValueError, IndexingError) as err:
            perm, perm_err = td, str(err)
        cols = st.columns(2)
        for col, name, t in ((cols[0], "original", td), (cols[1], "permuted", perm)):
            col.markdown(f"**{name}**: shape `{t.shape}`, strides `{t.strides}`, contiguous `{t.is_contiguous()}`")
        if perm_err:
            cols[1].error(perm_err)
        st.markdown("**storage** (shared by both): `" + " ".join(f"{v:g}" for v in td._storage[:64])
                    + (" ..." if td.size > 64 else "") + "`")
        rows = []
        for n, idx in enumerate(perm.indices()):
            if n >= 48:
                break
            rows.append({"index (permuted)": str(idx), "storage position": perm.index(idx), "value": perm.get(idx)})
        left, right = st.columns([2, 3])
        left.dataframe(pd.DataFrame(rows), hide_index=True, height=300)
        right.markdown("**permuted, printed** (`TensorData.to_string()`)")
        right.code(perm.to_string()[:3000])
        try:
            from minitorch.tensor_functions import tensor

            t = tensor(np.arange(math.prod(shape), dtype=np.float64).reshape(shape).tolist())
            pt = t.permute(*parse_ints(order_text))
            vshape = parse_ints(view_text)
            try:
                vt = pt.view(*vshape)
                st.success(f"`t.permute{tuple(parse_ints(order_text))}.view{vshape}`: shape {vt.shape}, strides "
                           f"{vt._tensor.strides}")
            except Exception as err:
                st.warning(f"`t.permute(...).view{vshape}` fails: {err}")
                vt = pt.contiguous().view(*vshape)
                st.caption(f"`.contiguous().view{vshape}` copies first: shape {vt.shape}, strides {vt._tensor.strides}")
        except Exception as err:
            st.info(f"view playground unavailable: {type(err).__name__}: {err}")

    else:
        st.markdown(
            "Every arithmetic operation on `Scalar`s records a `ScalarHistory` (the function and its inputs). "
            "`backward()` walks that graph in reverse topological order and applies the chain rule."
        )
        c = st.columns([3, 1, 1])
        preset = c[0].selectbox("expression", EXPRESSIONS + ["custom"], key="sb_expr")
        x = c[1].number_input("x", value=1.5, step=0.5, key="sb_x")
        y = c[2].number_input("y", value=-0.5, step=0.5, key="sb_y")
        expr = preset
        if preset == "custom":
            expr = st.text_input("custom expression in x, y (methods: exp, log, relu, sigmoid)", "x * x * y",
                                  key="sb_custom")
        try:
            xs, ys, out = evaluate(expr, float(x), float(y))
            out.backward()
        except Exception as err:
            st.error(f"could not evaluate `{expr}`: {type(err).__name__}: {err}")
            return
        st.graphviz_chart(scalar_dot(out))

        def f(a: float, b: float) -> float:
            return evaluate(expr, a, b)[2].data

        m = st.columns(4)
        m[0].metric("value", f"{out.data:.6g}")
        m[1].metric("d out / dx (backward)", f"{(xs.derivative or 0.0):.6g}",
                    f"central difference {central_difference(f, float(x), float(y), arg=0):.6g}", delta_color="off")
        m[2].metric("d out / dy (backward)", f"{(ys.derivative or 0.0):.6g}",
                    f"central difference {central_difference(f, float(x), float(y), arg=1):.6g}", delta_color="off")
        m[3].metric("nodes", sum(1 for line in scalar_dot(out).splitlines() if line.startswith("v") and "[" in line))
