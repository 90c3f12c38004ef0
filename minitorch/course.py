"""Student starter code from the solution: ``python -m minitorch.course make-student OUTDIR``.

The repository *is* the solution. Each task's solution is fenced in the source by two comment lines::

    def mul(x: float, y: float) -> float:
        \"\"\"$f(x, y) = x * y$\"\"\"
        # BEGIN SOLUTION task0_1: multiply x by y
        return x * y
        # END SOLUTION

``make-student`` copies the repository and replaces every region of a selected task by a stub at the indentation
of its BEGIN line (signature, docstring and everything outside the region stay)::

    def mul(x: float, y: float) -> float:
        \"\"\"$f(x, y) = x * y$\"\"\"
        # TODO: Task 0.1
        raise NotImplementedError("Task 0.1: multiply x by y")

The marker syntax, in full:

* ``# BEGIN SOLUTION <task>: <hint>`` opens a region and ``# END SOLUTION`` closes it. Each is a comment alone on
  its line (only indentation before the ``#``); the same text inside a string is not a marker.
* ``<task>`` is a task marker registered in ``pytest.ini`` (``task<module>_<n>``, e.g. ``task3_1``, ``task5_2``);
  ``<hint>`` is one line telling the student what to write: the stub raises
  ``NotImplementedError("Task 3.1: <hint>")``.
* ``END`` has the indentation of its ``BEGIN``, and every line between them is blank or indented at least as deep:
  a region is a run of statements of one block (a whole body, or its tail, or a stretch in the middle).
* Regions do not nest. A task may have any number of regions, in any ``.py`` file (package, tests, scripts).
* Regions of tasks that are not selected keep their code; only the two marker lines are removed.

Stubs must leave ``import minitorch`` working: fence code that runs when it is *called*, never code that runs at
import (a backend's ``TensorBackend(ops)`` builds its kernels at import, so a kernel factory keeps its ``return``
and only the kernel's body is fenced). ``make-student`` checks that every stubbed file still compiles.

A stub in a CUDA kernel raises in Numba's CUDA simulator (the test default, see ``tests/conftest.py``); on a real
GPU a kernel cannot raise, so a stubbed kernel leaves its output unwritten and the tests fail on the values.

Commands::

    python -m minitorch.course make-student OUTDIR [--tasks task3_1,task3_2 | --from task3_1] [--source DIR]
    python -m minitorch.course list [--source DIR]          # every region: task, file:line, hint

``--tasks`` stubs the given tasks (a bare module, ``task3``, means all its tasks); ``--from T`` stubs ``T`` and
every later task (a student who has done everything before ``T``); neither stubs every task that has a region.
"""

from __future__ import annotations

import argparse
import configparser
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

BEGIN_RE = re.compile(r"^# BEGIN SOLUTION (?P<task>task\d+_\d+): (?P<hint>\S.*?)\s*$")
END_RE = re.compile(r"^# END SOLUTION\s*$")
TASK_RE = re.compile(r"^task(\d+)_(\d+)$")

STUB_LINE_LENGTH = 120
"""A stub's ``raise`` longer than this is written over three lines."""

TEACHER_ONLY = ("tests/test_course.py",)
"""Files left out of the student tree (the generator's own test needs the solution markers)."""

_SKIP_DIRS = {
    ".git", ".hypothesis", ".pytest_cache", ".venv", "__pycache__", "build", "checkpoints", "dist", "outputs"
}
"""Directories not copied when the source is not a git checkout (a git checkout copies what git tracks)."""


class MarkerError(ValueError):
    """A malformed solution region; the message names the file and line."""


@dataclass(frozen=True)
class Region:
    """One fenced solution: ``lines[begin]`` is the BEGIN comment, ``lines[end]`` the END comment (0-based)."""

    path: str
    task: str
    hint: str
    begin: int
    end: int
    indent: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.begin + 1}"


def task_key(task: str) -> Tuple[int, int]:
    """Course order of a task marker: ``task3_1 -> (3, 1)``."""
    m = TASK_RE.match(task)
    if m is None:
        raise ValueError(f"not a task marker: {task!r} (expected task<module>_<n>, e.g. task3_1)")
    return int(m.group(1)), int(m.group(2))


def task_title(task: str) -> str:
    """``task3_1 -> 'Task 3.1'``."""
    module, n = task_key(task)
    return f"Task {module}.{n}"


def registered_tasks(root: Path) -> List[str]:
    """The task markers registered in ``pytest.ini`` of `root`, in course order.

    Raises:
        ValueError: when `root` has no ``pytest.ini`` (not the minitorch repository).
    """
    if not (root / "pytest.ini").is_file():
        raise ValueError(f"{root} has no pytest.ini: not the minitorch repository (pass --source)")
    cfg = configparser.ConfigParser()
    cfg.read(root / "pytest.ini")
    names = [line.split(":")[0].strip() for line in cfg.get("pytest", "markers", fallback="").splitlines()]
    return sorted((n for n in names if TASK_RE.match(n)), key=task_key)


# ---------------------------------------------------------------------------------------------------------------------
# Finding and replacing regions
# ---------------------------------------------------------------------------------------------------------------------


def _comment_lines(source: str) -> Dict[int, str]:
    """0-based line number -> text, for every comment that stands alone on its line (strings are not comments)."""
    out: Dict[int, str] = {}
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip() == "":
            out[tok.start[0] - 1] = tok.string
    return out


def find_regions(source: str, path: str, known: Optional[Set[str]] = None) -> List[Region]:
    """The solution regions of one file, in order.

    Raises:
        MarkerError: naming ``path:line`` for a marker that is malformed, unknown (not in `known`), nested, unclosed
            or unopened, or a region line indented less than its BEGIN.
    """
    lines = source.splitlines()
    regions: List[Region] = []
    open_: Optional[Tuple[int, str, str, str]] = None  # (line, task, hint, indent)
    for i, text in sorted(_comment_lines(source).items()):
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        if "SOLUTION" not in text:
            continue
        begin, end = BEGIN_RE.match(text), END_RE.match(text)
        if begin is None and end is None:
            raise MarkerError(f"{path}:{i + 1}: malformed solution marker {text!r} "
                              "(expected '# BEGIN SOLUTION taskM_N: hint' or '# END SOLUTION')")
        if begin is not None:
            if open_ is not None:
                raise MarkerError(f"{path}:{i + 1}: BEGIN inside the region opened at line {open_[0] + 1}")
            task = begin.group("task")
            if known is not None and task not in known:
                raise MarkerError(f"{path}:{i + 1}: {task} is not a task registered in pytest.ini")
            open_ = (i, task, begin.group("hint"), indent)
            continue
        if open_ is None:
            raise MarkerError(f"{path}:{i + 1}: END SOLUTION without a BEGIN")
        start, task, hint, begin_indent = open_
        if indent != begin_indent:
            raise MarkerError(f"{path}:{i + 1}: END is not indented like its BEGIN at line {start + 1}")
        for j in range(start + 1, i):
            if lines[j].strip() and not lines[j].startswith(begin_indent):
                raise MarkerError(f"{path}:{j + 1}: line indented less than the BEGIN at line {start + 1}")
        regions.append(Region(path, task, hint, start, i, begin_indent))
        open_ = None
    if open_ is not None:
        raise MarkerError(f"{path}:{open_[0] + 1}: BEGIN SOLUTION {open_[1]} is never closed")
    return regions


def _string_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stub_source(source: str, path: str, tasks: Set[str], known: Optional[Set[str]] = None) -> Tuple[str, int]:
    """`source` with the regions of `tasks` replaced by stubs and the markers of all other regions removed.

    Returns:
        ``(new source, number of regions stubbed)``.

    Raises:
        MarkerError: for malformed markers (see `find_regions`) or a stubbed file that no longer compiles.
    """
    regions = find_regions(source, path, known)
    if not regions:
        return source, 0
    lines = source.splitlines(keepends=True)
    out: List[str] = []
    pos = 0
    stubbed = 0
    for r in regions:
        out.extend(lines[pos : r.begin])
        if r.task in tasks:
            title = task_title(r.task)
            message = _string_literal(f"{title}: {r.hint}")
            out.append(f"{r.indent}# TODO: {title}\n")
            raise_line = f"{r.indent}raise NotImplementedError({message})\n"
            if len(raise_line) > STUB_LINE_LENGTH:
                raise_line = f"{r.indent}raise NotImplementedError(\n{r.indent}    {message}\n{r.indent})\n"
            out.append(raise_line)
            stubbed += 1
        else:
            out.extend(lines[r.begin + 1 : r.end])
        pos = r.end + 1
    out.extend(lines[pos:])
    result = "".join(out)
    try:
        compile(result, path, "exec")
    except SyntaxError as e:
        raise MarkerError(f"{path}:{e.lineno}: the file does not compile after stubbing: {e.msg}") from None
    return result, stubbed


# ---------------------------------------------------------------------------------------------------------------------
# The repository
# ---------------------------------------------------------------------------------------------------------------------


def default_source() -> Path:
    """The repository this package lives in (the directory above ``minitorch/``)."""
    return Path(__file__).resolve().parent.parent


def source_files(root: Path) -> List[str]:
    """Relative paths of the files to copy: what git tracks plus untracked files it does not ignore, in a git
    checkout; otherwise every file outside build, cache and VCS directories."""
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        )
        names = sorted({n for n in res.stdout.decode().split("\0") if n and (root / n).is_file()})
        if names:
            return names
    except (OSError, subprocess.CalledProcessError):
        pass
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for f in filenames:
            if not f.endswith((".pyc", ".nbi", ".nbc")):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def all_regions(root: Path) -> List[Region]:
    """Every solution region of the repository at `root`, checked against the tasks of its ``pytest.ini``."""
    known = set(registered_tasks(root))
    regions: List[Region] = []
    for rel in source_files(root):
        if rel.endswith(".py") and rel not in TEACHER_ONLY:
            regions.extend(find_regions((root / rel).read_text(encoding="utf-8"), rel, known))
    return regions


def select_tasks(
    available: Sequence[str], tasks: Optional[Iterable[str]] = None, start: Optional[str] = None
) -> List[str]:
    """The tasks to stub, in course order: `tasks` (``taskM`` means all of module M's), or `start` and every later
    task, or everything `available`.

    Raises:
        ValueError: naming a task that has no region.
    """
    if tasks is not None and start is not None:
        raise ValueError("give --tasks or --from, not both")
    if start is not None:
        if start not in available:
            raise ValueError(f"--from {start}: no solution region has that task; tasks: {', '.join(available)}")
        return [t for t in available if task_key(t) >= task_key(start)]
    if tasks is None:
        return list(available)
    chosen: Set[str] = set()
    for t in tasks:
        t = t.strip()
        module = re.fullmatch(r"task(\d+)", t)
        picked = [a for a in available if module and task_key(a)[0] == int(module.group(1))] or (
            [t] if t in available else []
        )
        if not picked:
            raise ValueError(f"--tasks {t}: no solution region has that task; tasks: {', '.join(available)}")
        chosen.update(picked)
    return sorted(chosen, key=task_key)


def make_student(
    outdir: Path,
    tasks: Optional[Iterable[str]] = None,
    start: Optional[str] = None,
    source: Optional[Path] = None,
) -> Dict[str, int]:
    """Copy the repository at `source` to `outdir` with the selected tasks stubbed (see the module docstring).

    Args:
        outdir: the student tree; must not exist or be empty.
        tasks: tasks to stub (``None``: every task that has a region).
        start: stub this task and every later one instead.
        source: the solution repository (default: the one this package lives in).

    Returns:
        Regions stubbed per task.

    Raises:
        MarkerError: a malformed region (nothing is written then).
        ValueError: an unknown task, or a non-empty `outdir`.
    """
    root = Path(source) if source is not None else default_source()
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()):
        raise ValueError(f"{outdir} exists and is not empty")
    regions = all_regions(root)  # validates every marker before anything is written
    available = sorted({r.task for r in regions}, key=task_key)
    chosen = set(select_tasks(available, tasks, start))
    known = set(registered_tasks(root))
    files: Dict[str, bytes] = {}
    counts = {t: 0 for t in sorted(chosen, key=task_key)}
    for rel in source_files(root):
        if rel in TEACHER_ONLY:
            continue
        data = (root / rel).read_bytes()
        if rel.endswith(".py"):
            text, _ = stub_source(data.decode("utf-8"), rel, chosen, known)
            data = text.encode("utf-8")
        files[rel] = data
    for r in regions:
        if r.task in chosen:
            counts[r.task] += 1
    for rel, data in files.items():
        dest = outdir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        shutil.copymode(root / rel, dest)
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minitorch.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-student", help="write the student starter code to OUTDIR")
    make.add_argument("outdir", type=Path)
    which = make.add_mutually_exclusive_group()
    which.add_argument("--tasks", help="comma-separated tasks to stub, e.g. task3_1,task3_2 or task3 (default: all)")
    which.add_argument("--from", dest="start", help="stub this task and every later one, e.g. task2_1")
    make.add_argument("--source", type=Path, default=None, help="the solution repository (default: this one)")
    lister = sub.add_parser("list", help="list every solution region: task, file:line, hint")
    lister.add_argument("--source", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            root = args.source if args.source is not None else default_source()
            for r in sorted(all_regions(root), key=lambda r: (task_key(r.task), r.path, r.begin)):
                print(f"{r.task:8} {r.where:40} {r.hint}")
            return 0
        tasks = args.tasks.split(",") if args.tasks else None
        counts = make_student(args.outdir, tasks=tasks, start=args.start, source=args.source)
    except (MarkerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, n in counts.items():
        print(f"{task_title(task)}: {n} stub{'s' if n != 1 else ''}")
    print(f"student tree written to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
