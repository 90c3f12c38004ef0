"""Test configuration.

CI has no GPU, so the CUDA backend is tested in Numba's CUDA simulator. The simulator must be switched on before
numba is imported anywhere, which is why this happens here, at the very top of the test session. On a machine with a
real GPU, run the suite with ``MINITORCH_REAL_CUDA=1`` to use the device instead.
"""
import os

if os.environ.get("MINITORCH_REAL_CUDA", "0") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from typing import Any, List  # noqa: E402

import pytest  # noqa: E402
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
