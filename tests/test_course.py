"""The starter-code generator (``python -m minitorch.course make-student``): markers, stubs, the student tree.

Marker parsing and stubbing are checked in-process. The student tree is then generated for real and run in
subprocesses (with ``PYTHONPATH`` set to that tree): it imports, its test suite collects, and in a tree where a task
and every later one are stubs, that task's tests fail with its NotImplementedError while the tests of the tasks
before it pass (the course order). Module 5's regions are checked when present.

This file is left out of the student tree (``TEACHER_ONLY``): it needs the solution markers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch.course import (
    TEACHER_ONLY,
    MarkerError,
    all_regions,
    find_regions,
    main,
    make_student,
    registered_tasks,
    select_tasks,
    source_files,
    stub_source,
    task_key,
)

ROOT = Path(__file__).resolve().parent.parent
STUB = re.compile(r'raise NotImplementedError\(\s*"Task \d+\.\d+: ')

STUBBED_MODULES = (0, 1, 2, 3, 4, 5)
"""Modules whose every task must have a solution region (all of them: module 5's regions are in the attention code)."""


# ---------------------------------------------------------------------------------------------------------------------
# Markers and stubs, in-process
# ---------------------------------------------------------------------------------------------------------------------

EXAMPLE = '''\
def f(x):
    """Docstring stays."""
    # BEGIN SOLUTION task3_1: return twice x
    y = 2 * x
    return y
    # END SOLUTION


def factory():
    def kernel(a):
        s = "# BEGIN SOLUTION task9_9: inside a string, not a marker"
        # BEGIN SOLUTION task2_2: the kernel body
        return a + 1
        # END SOLUTION

    return kernel
'''


def test_stub_replaces_selected_regions_and_unmarks_the_rest() -> None:
    out, n = stub_source(EXAMPLE, "example.py", {"task3_1"})
    assert n == 1
    assert out == EXAMPLE.replace(
        '    # BEGIN SOLUTION task3_1: return twice x\n    y = 2 * x\n    return y\n    # END SOLUTION\n',
        '    # TODO: Task 3.1\n    raise NotImplementedError("Task 3.1: return twice x")\n',
    ).replace("        # BEGIN SOLUTION task2_2: the kernel body\n", "").replace("        # END SOLUTION\n", "")
    namespace: Dict[str, object] = {}
    exec(compile(out, "example.py", "exec"), namespace)
    with pytest.raises(NotImplementedError, match=r"^Task 3\.1: return twice x$"):
        namespace["f"](1)  # type: ignore[operator]
    assert namespace["factory"]()(1) == 2  # type: ignore[operator]

    both, n = stub_source(EXAMPLE, "example.py", {"task3_1", "task2_2"})
    assert n == 2 and 'raise NotImplementedError("Task 2.2: the kernel body")' in both
    namespace = {}
    exec(compile(both, "example.py", "exec"), namespace)
    kernel = namespace["factory"]()  # type: ignore[operator]  # the factory still builds its kernel
    with pytest.raises(NotImplementedError, match="Task 2.2"):
        kernel(1)


BAD_MARKERS: List[Tuple[str, str, int]] = [
    ("unclosed", "def f():\n    # BEGIN SOLUTION task1_1: x\n    return 1\n", 2),
    ("END without BEGIN", "def f():\n    return 1\n    # END SOLUTION\n", 3),
    ("nested", "def f():\n    # BEGIN SOLUTION task1_1: x\n    # BEGIN SOLUTION task1_2: y\n", 3),
    ("unknown task", "def f():\n    # BEGIN SOLUTION task7_7: x\n    return 1\n    # END SOLUTION\n", 2),
    ("no hint", "def f():\n    # BEGIN SOLUTION task1_1\n    return 1\n    # END SOLUTION\n", 2),
    ("typo", "def f():\n    # BEGIN SOLUTIONS task1_1: x\n    return 1\n    # END SOLUTION\n", 2),
    ("END indented differently", "def f():\n    # BEGIN SOLUTION task1_1: x\n    return 1\n# END SOLUTION\n", 4),
    (
        "region leaves its block",
        "class A:\n    def f(self):\n        # BEGIN SOLUTION task1_1: x\n        return 1\n\n    def g(self):\n"
        "        return 2\n        # END SOLUTION\n",
        6,
    ),
]


@pytest.mark.parametrize("source,line", [(s, n) for _, s, n in BAD_MARKERS], ids=[b[0] for b in BAD_MARKERS])
def test_malformed_markers_name_file_and_line(source: str, line: int) -> None:
    with pytest.raises(MarkerError, match=rf"^bad\.py:{line}: "):
        stub_source(source, "bad.py", {"task1_1"}, known={"task1_1", "task1_2"})


def test_a_stub_that_breaks_the_syntax_is_refused() -> None:
    source = "if x:\n    # BEGIN SOLUTION task1_1: x\n    pass\n    # END SOLUTION\nelse:\n    pass\n"
    assert stub_source(source, "ok.py", {"task1_1"})[1] == 1  # a raise is a statement: fine
    in_parentheses = "f = (\n    # BEGIN SOLUTION task1_1: x\n    1\n    # END SOLUTION\n)\n"
    with pytest.raises(MarkerError, match=r"^inside\.py:\d+: the file does not compile"):
        stub_source(in_parentheses, "inside.py", {"task1_1"})


def _marked_files() -> List[str]:
    return [r for r in source_files(ROOT) if r.endswith(".py") and r not in TEACHER_ONLY and "SOLUTION" in
            (ROOT / r).read_text(encoding="utf-8")]


@pytest.mark.parametrize("rel", _marked_files())
def test_markers_are_comments_only(rel: str) -> None:
    """With no task stubbed, a file is its source minus the marker lines; with all stubbed, one stub per region."""
    source = (ROOT / rel).read_text(encoding="utf-8")
    regions = find_regions(source, rel, set(registered_tasks(ROOT)))
    marker_lines = {r.begin for r in regions} | {r.end for r in regions}
    kept, n = stub_source(source, rel, set())
    assert n == 0
    assert kept.splitlines() == [ln for i, ln in enumerate(source.splitlines()) if i not in marker_lines]
    stubbed, n = stub_source(source, rel, {r.task for r in regions})
    assert n == len(regions) == len(STUB.findall(stubbed)) - len(STUB.findall(source))


def test_every_task_of_the_stubbed_modules_has_a_region() -> None:
    regions = all_regions(ROOT)
    tasks = registered_tasks(ROOT)
    by_task = {t: [r for r in regions if r.task == t] for t in tasks}
    missing = [t for t in tasks if task_key(t)[0] in STUBBED_MODULES and not by_task[t]]
    assert not missing, f"tasks without a solution region: {missing}"
    for r in regions:
        assert len(r.hint) >= 3, f"{r.where}: hint too short"
        begin_line = (ROOT / r.path).read_text(encoding="utf-8").splitlines()[r.begin]
        assert len(begin_line) <= 120, f"{r.where}: marker line longer than 120 characters"


@given(st.sets(st.sampled_from(["task0_1", "task1_2", "task2_4", "task3_1", "task3_2", "task10_1"])))
def test_select_tasks_keeps_course_order(chosen: set) -> None:
    available = ["task0_1", "task1_2", "task2_4", "task3_1", "task3_2", "task10_1"]
    assert select_tasks(available, sorted(chosen)) == sorted(chosen, key=task_key)
    assert select_tasks(available, ["task3"]) == ["task3_1", "task3_2"]
    assert select_tasks(available, start="task3_1") == ["task3_1", "task3_2", "task10_1"]
    assert select_tasks(available) == available
    with pytest.raises(ValueError, match="task4_4"):
        select_tasks(available, ["task4_4"])
    with pytest.raises(ValueError, match="not both"):
        select_tasks(available, ["task3_1"], start="task3_1")


def test_command_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    assert main(["make-student", str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["make-student", str(tmp_path / "new"), "--tasks", "task0_9"]) == 2
    assert "task0_9" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The student tree, end to end (subprocesses)
# ---------------------------------------------------------------------------------------------------------------------


def _run_pytest(tree: Path, *args: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tree), HYPOTHESIS_PROFILE="starter", MINITORCH_SKIP_LOWERING="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _outcomes(tree: Path, expr: str, report: Path) -> Dict[str, Tuple[Set[str], str]]:
    """Run the tests selected by marker expression `expr` in `tree`: node -> (its task markers, outcome). The
    outcome is 'passed', 'skipped', the "Task M.N" of the NotImplementedError it failed with, or the message."""
    _run_pytest(tree, "-m", expr, f"--junitxml={report}", "-o", "junit_family=xunit1")
    out: Dict[str, Tuple[Set[str], str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tasks = {t for p in case.iter("property") if p.get("name") == "tasks" for t in p.get("value", "").split()}
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is None:
            out[name] = (tasks, "skipped" if case.find("skipped") is not None else "passed")
            continue
        message = failure.get("message", "")
        task = re.search(r"NotImplementedError: (?:tid=.*?: )?(Task \d+\.\d+):", message)
        out[name] = (tasks, task.group(1) if task else message[:300])
    assert out, f"no test selected by {expr!r}"
    return out


@pytest.fixture(scope="module")
def student_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every task stubbed."""
    tree = tmp_path_factory.mktemp("student") / "minitorch-course"
    counts = make_student(tree, source=ROOT)
    assert counts and all(n > 0 for n in counts.values())
    return tree


def test_student_tree_has_stubs_and_no_solutions(student_tree: Path) -> None:
    regions = all_regions(ROOT)
    stubs = 0
    for rel in {r.path for r in regions}:
        text, solution = (student_tree / rel).read_text(encoding="utf-8"), (ROOT / rel).read_text(encoding="utf-8")
        assert find_regions(text, rel) == [], f"{rel} still has solution markers"
        new_lines = set(text.splitlines()) - set(solution.splitlines())
        assert all(len(line) <= 120 for line in new_lines), f"{rel}: a stub line is longer than 120 characters"
        stubs += len(STUB.findall(text)) - len(STUB.findall(solution))
    assert stubs == len(regions)
    for rel in TEACHER_ONLY:
        assert not (student_tree / rel).exists()
    assert (student_tree / "pytest.ini").read_text() == (ROOT / "pytest.ini").read_text()


def test_student_tree_imports_and_collects(student_tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(student_tree))
    res = subprocess.run(
        [sys.executable, "-c", "import minitorch; print(minitorch.__file__)"],
        cwd=student_tree, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve().is_relative_to(student_tree.resolve())

    collected = _run_pytest(student_tree, "--collect-only")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    files = {ln.split("::")[0] for ln in collected.stdout.splitlines() if "::" in ln}
    expected = {f"tests/{p.name}" for p in (student_tree / "tests").glob("test_*.py")}
    assert files == expected, f"test files that collect nothing: {expected - files}"


COURSE_ORDER_CASES: List[Tuple[str, bool]] = [("task2_1", True), ("task3_1", False)]
"""``(task, run the earlier tasks' tests too)``: modules 0-1 end to end, and the Numba stubs compiling.
``MINITORCH_COURSE_ORDER=all`` checks every task of the stubbed modules, earlier tests included (slow: the kernels
compile in every tree)."""
if os.environ.get("MINITORCH_COURSE_ORDER") == "all":
    COURSE_ORDER_CASES = [(t, True) for t in registered_tasks(ROOT) if task_key(t)[0] in STUBBED_MODULES]


@pytest.mark.parametrize("task,earlier_too", COURSE_ORDER_CASES, ids=[c[0] for c in COURSE_ORDER_CASES])
def test_course_order(task: str, earlier_too: bool, tmp_path: Path) -> None:
    """Stub `task` and every later one (a student who has done the tasks before it): `task`'s tests fail with its
    NotImplementedError (tests of provided code may pass), and the tests of earlier tasks pass."""
    tree = tmp_path / "tree"
    make_student(tree, start=task, source=ROOT)
    tasks = registered_tasks(ROOT)
    i = tasks.index(task)
    selected = tasks[: i + 1] if earlier_too else [task]
    later = " or ".join(tasks[i + 1 :]) or "no_such_marker"
    outcomes = _outcomes(tree, f"({' or '.join(selected)}) and not ({later})", tmp_path / "report.xml")
    title = "Task {}.{}".format(*task_key(task))
    own = {k: v for k, (marks, v) in outcomes.items() if task in marks}
    wrong = {k: v for k, v in own.items() if v not in ("passed", "skipped", title)}
    assert not wrong, f"{task}'s tests failed otherwise than with its NotImplementedError: {wrong}"
    assert title in own.values(), f"no test of {task} reaches its stubs: {own}"
    earlier = {k: v for k, (marks, v) in outcomes.items() if task not in marks}
    assert len(earlier) > 0 if earlier_too and i > 0 else not earlier
    failed = {k: v for k, v in earlier.items() if v not in ("passed", "skipped")}
    assert not failed, f"tests of tasks before {task} depend on it or a later task: {failed}"
