"""The package's import structure: no import cycles, dependencies from attention to the core only, and imports
inside functions only for optional dependencies.

The module graph is read from the source (``ast``): an edge ``a -> b`` for every module-level ``import`` of ``b`` in
``a`` (imports under ``if TYPE_CHECKING`` do not run and do not count). Then every module is imported in fresh
interpreters, in two orders, so that a module that only imports after some other one fails here.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "minitorch")

ALLOWED_CYCLES = [{"minitorch.tensor", "minitorch.tensor_functions"}]
"""MiniTorch's course structure: a Tensor's operators are Functions and Functions return Tensors. tensor.py imports
tensor_functions at its bottom, once Tensor exists. No other cycle is allowed."""

OPTIONAL = {"mpi4py", "torch", "matplotlib", "streamlit", "pandas", "PIL", "numba.cuda"}
"""Optional dependencies: the only imports allowed inside functions in the attention package. (``numba.cuda``'s
compiler and NVVM modules are the real GPU target, which Numba's CUDA simulator replaces: the sm_90 compile check
imports them when it runs.)"""


def modules() -> Dict[str, str]:
    """Module name -> file, for every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _targets(mods: Dict[str, str], name: str, node: ast.AST) -> List[str]:
    """The package modules an import statement of module ``name`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        pkg = name if mods[name].endswith("__init__.py") else name.rsplit(".", 1)[0]
        parts = pkg.split(".")
        base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for a in node.names:
        if f"{base}.{a.name}" in mods:
            out.append(f"{base}.{a.name}")
        elif base in mods:
            out.append(base)
    return out


def import_graph() -> Tuple[Dict[str, Set[str]], List[Tuple[str, int, str]]]:
    """``(edges of module-level imports, [(module, line, statement)] of imports inside functions)``."""
    mods = modules()
    graph: Dict[str, Set[str]] = {}
    inner: List[Tuple[str, int, str]] = []
    for name, path in mods.items():
        deps: Set[str] = set()

        def visit(body: List[ast.stmt], top: bool) -> None:
            for node in body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    if top:
                        deps.update(_targets(mods, name, node))
                    else:
                        inner.append((name, node.lineno, ast.unparse(node)))
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit(node.body, False)
                elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                    continue
                else:
                    for field in ("body", "orelse", "finalbody"):
                        visit(getattr(node, field, []) or [], top)
                    for handler in getattr(node, "handlers", []) or []:
                        visit(handler.body, top)

        visit(ast.parse(open(path, encoding="utf-8").read()).body, True)
        graph[name] = deps - {name}
    return graph, inner


def cycles(graph: Dict[str, Set[str]]) -> List[Set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[Set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph, _ = import_graph()
    assert len(graph) > 40  # the whole package was read
    found = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    assert found == [], f"import cycles: {found}"


def test_cycle_detection_sees_a_cycle() -> None:
    """The detector itself: a two-module and a three-module cycle in a small graph."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c", "a"}, "f": set()}
    assert sorted(sorted(c) for c in cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


CORE = {"operators", "autodiff", "scalar", "scalar_functions", "tensor_data", "tensor", "tensor_functions",
        "tensor_ops", "fast_ops", "cuda_ops", "nn", "fast_conv", "module", "optim", "datasets", "testing"}
"""The course modules: the tensor core that attention builds on."""


def test_attention_depends_on_the_core_never_the_reverse() -> None:
    graph, _ = import_graph()
    assert all(f"minitorch.{m}" in graph for m in CORE)
    core_to_attention = sorted((a, b) for a, deps in graph.items() for b in deps
                               if a.split(".", 1)[-1] in CORE and b.startswith("minitorch.attention"))
    assert core_to_attention == []


def test_attention_imports_inside_functions_only_optional_dependencies() -> None:
    _, inner = import_graph()
    bad = [(m, line, stmt) for m, line, stmt in inner if m.startswith("minitorch.attention")
           and not any(dep in stmt.split() or f"{dep}." in stmt for dep in OPTIONAL)]
    assert bad == [], bad


_IMPORT_ALL = """
import importlib, json, sys
names = json.loads(sys.argv[1])
for name in names:
    importlib.import_module(name)
print("OK", len(names))
"""


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Every module, in sorted order and in reverse order, each order in a fresh interpreter."""
    names = sorted(modules())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", _IMPORT_ALL, json.dumps(order)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for order in (names, names[::-1])]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == f"OK {len(names)}", err[-3000:]
