"""minitorch.distributed over real MPI processes: ``mpiexec -n 4`` and ``-n 2`` run as subprocesses.

* Ring attention on P = 1, 2, 3, 4 ranks (one ``mpiexec -n 4`` run, see tests/distributed_worker.py) equals
  single-process ``flash_attention`` on the whole sequence: out, lse and the gradients of q, k, v, within 1e-12
  relative in float64; in float32 it obeys FlashAttention's rule against the float64 reference. Causal or not, both
  layouts, GQA/MQA, windows, N not divisible by 2P. Blocks the plan skips launch no kernel.
* A bad argument on one rank raises the same error on every rank; a rank that raises mid-ring makes ``mpiexec``
  exit non-zero at once (``abort_on_exception``), well inside the subprocess timeout.
* Data parallel: ``run_transformer.py --data-parallel`` on 2 ranks (12 steps, then ``--resume`` to 20) has the loss
  curve of 20 single-process steps on the same global batches.

Every subprocess gets ``PYTHONPATH`` = this checkout and a timeout; MPICH is asked to yield the CPU while waiting
(the ranks share 2 cores). Numba's disk cache is warmed in this process first, so the ranks load kernels instead
of compiling them four times at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="minitorch.distributed needs the 'dist' extra: pip install -e '.[dist]'")

import minitorch  # noqa: E402
from minitorch.attention.reference import reference_attention, reference_attention_backward  # noqa: E402
from minitorch.attention.ring_schedule import ring_plan  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, TESTS)
from distributed_worker import CASES, case_inputs, case_options  # noqa: E402
from test_attention_cpu import assert_matches, naive_float32  # noqa: E402

GROUPS = [(1, 0), (2, 0), (2, 1), (3, 1), (4, 0)]  # (P, group) files written by the 4-rank run
TIMEOUT = 240  # seconds per mpiexec run; a hang fails the test instead of stalling CI


def _mpiexec() -> str:
    """The mpiexec of this interpreter's MPI (the mpich wheel installs it next to python)."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = here if os.path.exists(here) else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec: pip install -e '.[dist]' installs MPICH's")
    return found


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MPIR_CVAR_CH4_PROGRESS_THROTTLE="1", MPIR_CVAR_ENABLE_HEAVY_YIELD="1")  # let waiting ranks yield
    return env


def _mpirun(n: int, args: List[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, *args], cwd=cwd, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)


def _warm_kernels() -> None:
    """Compile (or load) the float64 and float32 flash kernels here, once, into Numba's disk cache."""
    for dtype in (np.float64, np.float32):
        x = minitorch.from_numpy(np.ones((1, 1, 8, 4), dtype), backend=minitorch.FastTensorBackend).requires_grad_()
        minitorch.flash_attention(x, x, x, causal=True, q_positions=np.arange(8), k_positions=np.arange(8)
                                  ).sum().backward()


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("ring"))
    _warm_kernels()
    res = _mpirun(4, [os.path.join(TESTS, "distributed_worker.py"), "ring", out], REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single_process() -> Dict[str, Dict[str, np.ndarray]]:
    """Every case on one process: flash_attention (the tensor API) on the whole sequence, with autodiff."""
    results = {}
    for name in CASES:
        x = {key: minitorch.from_numpy(a, backend=minitorch.FastTensorBackend) for key, a in case_inputs(name).items()}
        for key in "qkv":
            x[key].requires_grad_()
        out, lse = minitorch.flash_attention(x["q"], x["k"], x["v"], return_lse=True, **case_options(name))
        (out * x["g"]).sum().backward()
        results[name] = {"out": out.to_numpy(), "lse": lse.to_numpy(),
                         **{f"d{key}": x[key].grad.to_numpy() for key in "qkv"}}
    return results


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), finite)
    return float(np.max(np.abs(got[finite] - want[finite])) / np.max(np.abs(want[finite])))


@pytest.mark.parametrize("P,group", GROUPS, ids=[f"P{p}-group{g}" for p, g in GROUPS])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ring_attention_equals_flash_attention(ring_run: str, single_process: Dict[str, Any], case: str, P: int,
                                               group: int) -> None:
    with np.load(os.path.join(ring_run, f"P{P}_g{group}.npz")) as z:
        got = {key.split("/")[1]: z[key] for key in z.files if key.startswith(case + "/")}
    want = single_process[case]
    inputs = case_inputs(case)
    opts = {k: v for k, v in case_options(case).items() if v is not None}
    dtype = np.dtype(CASES[case]["dtype"])
    ref_out, ref_lse = reference_attention(inputs["q"], inputs["k"], inputs["v"], **opts)
    ref_grads = reference_attention_backward(inputs["q"], inputs["k"], inputs["v"], inputs["g"], **opts)
    if dtype == np.float64:
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert got[key].dtype == dtype
            assert _rel_err(got[key], want[key]) <= 1e-12, key
        naive = (None, None, (None,) * 4)
    else:
        naive = naive_float32(inputs["q"], inputs["k"], inputs["v"], inputs["g"], None, opts)
    D = inputs["q"].shape[-1]
    assert_matches("out", got["out"], ref_out, naive[0], dtype, D)
    assert_matches("lse", got["lse"], ref_lse, naive[1], dtype, D)
    for key, ref, nv in zip(("dq", "dk", "dv"), ref_grads, naive[2]):
        assert_matches(key, got[key], ref, nv, dtype, D)
    # The blocks each rank computed and skipped are those of its plan, forward and backward: a skipped block (one
    # entirely in the future, or beyond the window) launched no kernel.
    c = CASES[case]
    for rank, counts in enumerate(got["blocks"]):
        plan = ring_plan(c["N"], P, rank, c["layout"], c["causal"], c.get("window"))
        skipped = sum(step.skipped for step in plan)
        assert list(counts) == [P - skipped, skipped] * 2


def test_contiguous_causal_skips_future_blocks(ring_run: str) -> None:
    """With the contiguous layout rank 0 holds the first chunk: every other block is in its future."""
    with np.load(os.path.join(ring_run, "P4_g0.npz")) as z:
        blocks = z["f64_causal_contiguous_gqa/blocks"]
    assert blocks[0].tolist() == [1, 3, 1, 3] and blocks[3].tolist() == [4, 0, 4, 0]
    with np.load(os.path.join(ring_run, "P4_g0.npz")) as z:
        assert (z["f64_causal_zigzag_gqa/blocks"][:, 1] == 0).all()  # zigzag: every block has work for every rank


def test_bad_argument_on_one_rank_fails_on_every_rank(ring_run: str) -> None:
    reports = []
    for rank in range(4):
        with open(os.path.join(ring_run, f"errors_rank{rank}.json")) as f:
            reports.append(json.load(f))
    expected = {
        "short_q_on_rank_2": ("ValueError", "rank 2 of 4: q_loc and k_loc must hold the same positions"),
        "short_shards_on_rank_2": ("ValueError", "the local sequence lengths [6, 6, 5, 6]"),
        "not_a_tensor_on_rank_1": ("TypeError", "rank 1 of 4: q_loc must be a minitorch Tensor"),
        "causal_differs_on_rank_3": ("ValueError", "same causal, got [False, False, False, True]"),
        "head_dim_differs_on_rank_0": ("ValueError", "rank 0 of 4: q and k must have the same head_dim"),
        "bad_layout": ("ValueError", "layout must be one of"),
        "sequence_too_short": ("ValueError", "it needs N >= 8"),
        "gather_short_shard_on_rank_1": ("ValueError", "the shard lengths [6, 5, 6, 6]"),
        "shard_too_short": ("ValueError", "it needs N >= 8"),
    }
    for name, (kind, text) in expected.items():
        for rank, report in enumerate(reports):
            assert report[name][0] == kind and text in report[name][1], (name, rank, report[name])
        assert len({r[name][1] for r in reports}) == 1, name  # the very same message everywhere
    for report in reports:  # nothing was left half done: a good call afterwards is right
        assert float(report["good_call_after_errors"][1]) < 1e-12


def test_data_parallel_helpers(ring_run: str) -> None:
    """broadcast_parameters copies rank 0's values; allreduce_gradients averages, counting a missing gradient as
    zero and leaving a parameter that no rank has a gradient for without one."""
    for rank in range(4):
        with open(os.path.join(ring_run, f"dp_rank{rank}.json")) as f:
            r = json.load(f)
        assert r["a_after_broadcast"] == [[0.0] * 3] * 2 and r["b_after_broadcast"] == [0.0, 1.0, 2.0, 3.0]
        assert r["a_grad"] == [[2.5] * 3] * 2  # mean of 1, 2, 3, 4
        assert r["b_grad"] == [2.0] * 4 and r["b_grad_dtype"] == "float32"  # 8 on rank 0, none elsewhere
        assert r["c_grad_is_none"]
        assert r["mismatch"][0] == "ValueError" and "ranks 0 and 1 hold different parameters" in r["mismatch"][1]


def test_failing_rank_aborts_all_ranks(tmp_path: Any) -> None:
    t0 = time.perf_counter()
    res = _mpirun(2, [os.path.join(TESTS, "distributed_worker.py"), "fail", str(tmp_path)], REPO)
    elapsed = time.perf_counter() - t0
    assert res.returncode != 0
    assert "simulated kernel failure on rank 1" in res.stderr and "aborting all ranks" in res.stderr
    assert not (tmp_path / "fail_not_reached.txt").exists()
    assert elapsed < TIMEOUT  # (subprocess.run raises TimeoutExpired before that if mpiexec hangs)


def test_readme_demo_runs() -> None:
    """``mpiexec -n 2 python -m minitorch.distributed.demo`` (the README's command, at a small size) agrees with one
    process."""
    res = _mpirun(2, ["-m", "minitorch.distributed.demo", "--n", "96", "--dim", "16", "--dtype", "float64",
                      "--layout", "contiguous", "--window", "40"], REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("max |ring - flash_attention"))
    errors = dict(part.strip().split(" ") for part in line.split(":", 1)[1].split(","))
    assert set(errors) == {"out", "dq", "dk", "dv"} and all(float(e) < 1e-12 for e in errors.values()), line


def test_one_rank_is_flash_attention_bit_for_bit() -> None:
    """``comm=MPI.COMM_SELF``: one rank, one kernel call on the whole sequence, the very same numbers."""
    from minitorch.distributed import MPI, gather_sequence, ring_attention, shard_sequence

    rng = np.random.default_rng(7)
    be = minitorch.FastTensorBackend
    q, k, v = (minitorch.from_numpy(rng.standard_normal((1, 2, 30, 8)), backend=be).requires_grad_() for _ in "qkv")
    ql, kl, vl = (shard_sequence(t, MPI.COMM_SELF) for t in (q, k, v))
    out, lse = ring_attention(ql, kl, vl, MPI.COMM_SELF, causal=True, window=9, return_lse=True)
    gather_sequence(out, MPI.COMM_SELF).sum().backward()
    grads = [t.grad.to_numpy() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out2, lse2 = minitorch.flash_attention(q, k, v, causal=True, window=9, return_lse=True)
    out2.sum().backward()
    assert np.array_equal(out.to_numpy(), out2.to_numpy()) and np.array_equal(lse.to_numpy(), lse2.to_numpy())
    for g, t in zip(grads, (q, k, v)):
        assert np.array_equal(g, t.grad.to_numpy())


def test_ring_attention_rejects_bad_arguments_in_process() -> None:
    from minitorch.distributed import MPI, ring_attention

    x = minitorch.from_numpy(np.zeros((1, 1, 6, 4)), backend=minitorch.FastTensorBackend)
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        ring_attention(x, x, x, comm="world")
    with pytest.raises(ValueError, match="window must be >= 0"):
        ring_attention(x, x, x, MPI.COMM_SELF, window=-2)
    with pytest.raises(ValueError, match="k_loc and v_loc must have the same shape"):
        ring_attention(x, x, minitorch.from_numpy(np.zeros((1, 1, 6, 3)), backend=minitorch.FastTensorBackend),
                       MPI.COMM_SELF)


def test_import_without_mpi4py_says_what_to_install() -> None:
    """``import minitorch`` never needs mpi4py; ``import minitorch.distributed`` without it names the extra."""
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import minitorch\n"
            "try:\n    import minitorch.distributed\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ImportError: minitorch.distributed needs mpi4py" in res.stdout
    assert "pip install 'minitorch[dist]'" in res.stdout


def test_data_parallel_training_equals_single_process(tmp_path: Any) -> None:
    """20 steps on 2 ranks (12, then --resume to 20) = 20 single-process steps on the same global batches."""
    sys.path.insert(0, os.path.join(REPO, "project"))
    import run_transformer

    common = ["--quick", "--steps", "20", "--gen-tokens", "0", "--eval-every", "0", "--plot", ""]
    single = run_transformer.main(common + ["--checkpoint", str(tmp_path / "single.npz")])  # also warms the cache
    script = os.path.join(REPO, "project", "run_transformer.py")
    ckpt = str(tmp_path / "dp.npz")
    first = _mpirun(2, [script, *common, "--data-parallel", "--checkpoint", ckpt, "--stop-after", "12"], REPO)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert run_transformer.read_checkpoint(ckpt)[0]["step"] == 12
    second = _mpirun(2, [script, *common, "--data-parallel", "--checkpoint", ckpt, "--resume"], REPO)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    meta, _ = run_transformer.read_checkpoint(ckpt)
    assert meta["step"] == 20
    assert second.stdout.count("[checkpoint]") == 1  # rank 0 alone writes (and prints)
    np.testing.assert_allclose(meta["history"]["train"], single["train_losses"], rtol=2e-6)
    assert single["train_losses"][-1] < single["train_losses"][0] - 0.3  # it trained
