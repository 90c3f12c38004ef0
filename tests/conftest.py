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

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
