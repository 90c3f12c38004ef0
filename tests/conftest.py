"""Test configuration.

CI has no GPU, so the CUDA backend is tested in Numba's CUDA simulator. The simulator must be switched on before
numba is imported anywhere, which is why this happens here, at the very top of the test session. On a machine with a
real GPU, run the suite with ``MINITORCH_REAL_CUDA=1`` to use the device instead; without a usable GPU that stops the
session at once with one line saying why (rather than a ``CudaSupportError`` in every CUDA test).
"""
import os

import pytest

REAL_CUDA = os.environ.get("MINITORCH_REAL_CUDA", "0") == "1"
if not REAL_CUDA:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import sys  # noqa: E402
import threading  # noqa: E402
from typing import Any, List  # noqa: E402

from hypothesis import Phase, settings  # noqa: E402

from minitorch.tensor_ops import SimpleBackend, TensorBackend  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=10, deadline=None)
# Starter code (python -m minitorch.course make-student): most tests fail at once on a stub, so do not shrink or
# explain failures (minutes of tracing in total) and keep no example database.
settings.register_profile(
    "starter", max_examples=3, deadline=None, phases=[Phase.explicit, Phase.generate], database=None
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _atomic_simulator_shared_arrays() -> None:
    """Make the CUDA simulator's shared arrays race-free.

    The simulator gives all threads of a block the same shared array by keying it on the caller's file and line,
    created on the first call. The lookup and the creation are not atomic: when the interpreter switches threads
    between them (it does under load), two threads create an array each and one of them computes on a private copy
    that the others never see, giving wrong results a real GPU cannot produce (seen once in a kernel's first tile on
    a loaded machine). Same semantics here, with the lookup and the creation under one lock.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    import numpy as np
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    lock = threading.Lock()
    dynamic = kernelapi.FakeCUDAShared.array

    def array(self, shape, dtype, alignment=None):  # type: ignore[no-untyped-def]
        if shape == 0 or alignment is not None:  # dynamic shared memory (one buffer), or unsupported: as before
            return dynamic(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array


_atomic_simulator_shared_arrays()


def real_cuda_problem() -> str:
    """Why ``MINITORCH_REAL_CUDA=1`` cannot run here ('' when a CUDA GPU is usable)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1 asks for the simulator: unset one of the two"
    from numba import cuda

    if not cuda.is_available():
        return ("numba finds no usable CUDA GPU (numba.cuda.is_available() is False; numba.cuda.detect() says "
                "more): unset it to test the CUDA backend in Numba's simulator")
    return ""


def pytest_configure(config: pytest.Config) -> None:
    if REAL_CUDA:
        problem = real_cuda_problem()
        if problem:
            pytest.exit(f"MINITORCH_REAL_CUDA=1, but {problem}", returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_collection_modifyitems(items: list) -> None:
    """Record each test's course tasks (its task markers) as a junit-xml property named ``tasks``: the course
    generator's test reads them from the report of a run in a student tree (tests/test_course.py)."""
    for item in items:
        tasks = sorted({m.name for m in item.iter_markers() if m.name.startswith("task")})
        item.user_properties.append(("tasks", " ".join(tasks)))


BACKEND_TASKS = {"FastOps": ("task3_1", "task3_2"), "CudaOps": ("task3_3", "task3_4")}
"""A test run on a compiled backend also belongs to the tasks that write that backend's kernels (the course order:
an earlier task's tests must not need a later task's code)."""


def available_backends() -> List[TensorBackend]:
    """SimpleBackend, plus the Numba CPU and CUDA (simulator) backends when their modules import."""
    out = [SimpleBackend]
    try:
        from minitorch.fast_ops import FastTensorBackend

        out.append(FastTensorBackend)
    except Exception:  # numba missing
        pass
    try:
        from minitorch.cuda_ops import CudaBackend

        out.append(CudaBackend)
    except Exception:
        pass
    return out


BACKENDS = available_backends()


@pytest.fixture
def backends() -> List[TensorBackend]:
    """Every backend that imports."""
    return BACKENDS


@pytest.fixture(
    params=[
        pytest.param(b, id=b.name, marks=[getattr(pytest.mark, t) for t in BACKEND_TASKS.get(b.name, ())])
        for b in BACKENDS
    ]
)
def backend(request: Any) -> TensorBackend:
    """Each backend in turn; the compiled ones carry the task markers of their kernels (`BACKEND_TASKS`)."""
    return request.param
