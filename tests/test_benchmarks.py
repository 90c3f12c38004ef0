"""The benchmark scripts: where they write (never over the committed results unless asked) and what their tables say
(units, and why a column is empty). No timing here: benchmarks measure, tests check behaviour.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import bench_attention, bench_decode, bench_dma, bench_paged, run  # noqa: E402
from benchmarks.common import LOCAL_RESULTS_DIR, RESULTS_DIR  # noqa: E402

SCRIPTS = [(bench_attention, "bench_attention.json"), (bench_decode, "bench_decode.json"),
           (bench_dma, "bench_dma.json"), (bench_paged, "bench_paged.json")]


@pytest.mark.parametrize("script,name", SCRIPTS, ids=[n for _, n in SCRIPTS])
def test_scripts_write_the_local_folder_unless_asked_to_update_the_committed_results(script: Any, name: str,
                                                                                       tmp_path: Any) -> None:
    assert script.parse_args([]).out == os.path.join(LOCAL_RESULTS_DIR, name)
    assert script.parse_args(["--update-results"]).out == os.path.join(RESULTS_DIR, name)
    assert script.parse_args(["--out", str(tmp_path / "x.json")]).out == str(tmp_path / "x.json")
    with pytest.raises(SystemExit):  # both: ambiguous
        script.parse_args(["--out", str(tmp_path / "x.json"), "--update-results"])


def test_suite_writes_the_local_folder_unless_asked_to_update_the_committed_results(tmp_path: Any) -> None:
    assert run.parse_args(["--quick"]).out_dir == os.path.join(LOCAL_RESULTS_DIR, "quick")
    assert run.parse_args([]).out_dir == os.path.join(LOCAL_RESULTS_DIR, "suite")
    assert run.parse_args(["--quick", "--update-results"]).out_dir == os.path.join(RESULTS_DIR, "quick")
    assert run.parse_args(["--update-results"]).out_dir == os.path.join(RESULTS_DIR, "suite")
    assert run.parse_args(["--out-dir", str(tmp_path)]).out_dir == str(tmp_path)
    with pytest.raises(SystemExit):
        run.parse_args(["--out-dir", str(tmp_path), "--update-results"])
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "attention,bogus"])


@pytest.mark.skipif(shutil.which("git") is None or not os.path.isdir(os.path.join(ROOT, ".git"))
                    and not os.path.isfile(os.path.join(ROOT, ".git")), reason="not a git checkout")
def test_git_ignores_the_local_results_folder() -> None:
    local = os.path.relpath(os.path.join(LOCAL_RESULTS_DIR, "quick", "summary.json"), ROOT)
    committed = os.path.relpath(os.path.join(RESULTS_DIR, "quick", "summary.json"), ROOT)
    check = lambda path: subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode  # noqa: E731
    assert check(local) == 0 and check(committed) == 1


def test_dma_table_writes_ms() -> None:
    row = {"N": 1024, "causal": False, "ratio": 0.2, "keep": 205, "dense_fwd_s": 0.0123, "dma_fwd_s": 0.004,
           "speedup_fwd": 3.07, "speedup_fwd_cpu": 3.1, "dense_fwd_bwd_s": 0.0456, "dma_fwd_bwd_s": 0.0171,
           "speedup_fwd_bwd": 2.67, "speedup_fwd_bwd_cpu": 2.7, "target": (3.3, 4.0), "select_s": 0.0006,
           "listed_keys": 205, "peak_numpy_bytes_dense": 3 * 2**20, "peak_numpy_bytes_dma": 4 * 2**20,
           "score_matrix_bytes": 16 * 2**20, "dma_index_order_fwd_s": 0.011}
    line = bench_dma.table_row(row)
    for ms in ("12 ms", "4 ms", "46 ms", "17 ms", "0.6 ms", "index-order fwd 11 ms"):
        assert ms in line, (ms, line)
    assert "m " not in line.replace(" ms", "").replace("ms ", "")  # no bare "m" for milliseconds
    assert len(line.split("|")[0]) == len(bench_dma.table_header().split("|")[0])  # columns line up


def test_attention_table_says_why_torch_columns_are_empty(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as without the package
    torch, why = bench_attention.try_torch()
    assert torch is None and "torch is not installed" in why and ".[bench]" in why
    notes = bench_attention.not_measured([512, 1024], naive_max_n=512)
    assert set(notes) == set(bench_attention.TORCH_IMPLS) | {"numpy naive fwd"}
    t = {"best_s": 0.01, "median_s": 0.01, "cpu_s": 0.01, "runs": 3, "gflops": 10.0}
    results = {512: {"flash fwd": t, "numpy naive fwd": t}, 1024: {"flash fwd": t}}
    bench_attention.print_table(results, notes)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("N "))
    assert "torch sdpa fwd" in header  # the columns are there, empty ("-"), and the reason is printed
    assert ("- torch sdpa fwd, torch sdpa causal fwd, torch sdpa fwd+bwd, torch sdpa causal fwd+bwd: torch is not "
            "installed") in out
    assert "- numpy naive fwd: not run above N = 512" in out


def test_attention_ceiling_is_each_forward_share_of_the_gemm_rate(capsys: Any) -> None:
    t = {"best_s": 0.01, "median_s": 0.01, "cpu_s": 0.01, "runs": 3}
    results = {1024: {"flash fwd": dict(t, gflops=80.0), "torch sdpa fwd": dict(t, gflops=60.0)}}
    bench_attention.print_ceiling(results, 100.0)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith("1024"))
    assert row.split()[1:] == ["80%", "60%", "-", "-"]  # flash, SDPA, and the causal columns not measured
