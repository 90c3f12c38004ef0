"""The documentation runs as written, and points at files that exist.

* Every fenced ```python block of README.md, ASSIGNMENTS.md and docs/*.md runs as written, on its own (each block
  in a fresh namespace, so a block that needs an earlier block's imports fails), in one fresh Python process per
  file (Numba's disk cache, warm from the kernel tests, keeps it quick). A block fenced ```python gpu needs a CUDA
  GPU: it is compiled (syntax) everywhere and run only under ``MINITORCH_REAL_CUDA=1`` with a GPU. Snippets that
  are not programs (signatures, output) are fenced ```text.
* Nothing sends a reader to a file outside the repository.
* ``MINITORCH_REAL_CUDA=1 python -m pytest`` without a GPU stops with one line saying why.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from typing import List, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "ASSIGNMENTS.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs",
                                                                                                         "*.md")))
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^`\s]*)\s*(.*)$")

# Runs in the fresh process: exec each block in its own namespace; report which ran, and the first failure.
RUNNER = r"""
import json, os, sys, traceback
blocks, run_gpu = json.load(sys.stdin), os.environ.get("RUN_GPU_BLOCKS") == "1"
for line, tags, code in blocks:
    compiled = compile(code, f"<{sys.argv[1]} block at line {line}>", "exec")
    if "gpu" in tags and not run_gpu:
        print(f"compiled only (needs a GPU): block at line {line}", flush=True)
        continue
    try:
        exec(compiled, {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"FAILED: {sys.argv[1]}, the block at line {line}")
    print(f"ran: block at line {line}", flush=True)
"""


def python_blocks(path: str) -> List[Tuple[int, List[str], str]]:
    """``(line of the opening fence, tags after 'python', code)`` of every fenced python block of a Markdown file
    (``path`` relative to the repository root, or absolute)."""
    blocks, open_fence, lang, tags, start, code = [], None, "", [], 0, []
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            m = FENCE.match(line.rstrip("\n"))
            if open_fence is None and m:
                open_fence, lang, tags, start, code = m.group(1), m.group(2).lower(), m.group(3).split(), i, []
            elif open_fence is not None and m and m.group(1).startswith(open_fence) and not m.group(2):
                if lang in ("python", "py", "python3"):
                    blocks.append((start, tags, "".join(code)))
                open_fence = None
            elif open_fence is not None:
                code.append(line)
    assert open_fence is None, f"{path}: the fence opened at line {start} is never closed"
    return blocks


def _gpu_here() -> bool:
    if os.environ.get("MINITORCH_REAL_CUDA") != "1":
        return False
    from numba import cuda

    return bool(cuda.is_available())


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)])
def test_python_blocks_run_as_written(path: str) -> None:
    blocks = python_blocks(path)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg",
               RUN_GPU_BLOCKS="1" if _gpu_here() else "0")
    if env["RUN_GPU_BLOCKS"] == "0":
        env.pop("NUMBA_ENABLE_CUDASIM", None)  # the CPU blocks as a reader runs them: no simulator
    res = subprocess.run([sys.executable, "-c", RUNNER, path], input=json.dumps(blocks), capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reported = re.findall(r"block at line (\d+)", res.stdout)
    assert [int(n) for n in reported] == [line for line, _, _ in blocks], res.stdout


def test_block_finder(tmp_path) -> None:
    """The extraction itself: python blocks only (``python gpu`` tagged), nested and tilde fences, line numbers."""
    md = tmp_path / "x.md"
    md.write_text("x\n```python\na = 1\n```\n```bash\nls\n```\n````python gpu\n```text\n````\n~~~py\nb = 2\n~~~\n"
                  "```text\nc\n```\n")
    got = python_blocks(str(md))
    assert got == [(2, [], "a = 1\n"), (8, ["gpu"], "```text\n"), (11, [], "b = 2\n")]
    assert len(python_blocks("README.md")) >= 2 and len(python_blocks("ASSIGNMENTS.md")) >= 2


def test_real_cuda_without_a_gpu_stops_with_one_clear_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(MINITORCH_REAL_CUDA="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_operators.py"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    out = (res.stdout + res.stderr).strip()
    assert res.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert len(out.splitlines()) == 1, out
    assert out.startswith("Exit: MINITORCH_REAL_CUDA=1, but numba finds no usable CUDA GPU") and "unset it" in out
    assert "CudaSupportError" not in out and "passed" not in out


def test_real_cuda_and_the_simulator_contradict(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import real_cuda_problem

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    assert "NUMBA_ENABLE_CUDASIM=1 asks for the simulator" in real_cuda_problem()



def test_docs_and_docstrings_cite_no_file_outside_the_repository() -> None:
    """The design note the project started from is not in the repository: nothing may send a reader to it."""
    patterns = ["*.md", "docs/**/*.md", "minitorch/**/*.py", "project/**/*.py", "benchmarks/**/*.py",
                "scripts/**/*.py"]
    files = sorted({os.path.relpath(p, ROOT) for pat in patterns for p in glob.glob(os.path.join(ROOT, pat),
                                                                                     recursive=True)})
    assert "README.md" in files and "minitorch/__init__.py" in files
    cites = [f"{f}:{i}" for f in files
             for i, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8"), start=1) if "DESIGN.md" in line]
    assert cites == [], cites
