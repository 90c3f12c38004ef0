"""Test configuration.

CI has no GPU, so the CUDA backend is tested in Numba's CUDA simulator. The simulator must be switched on before
numba is imported anywhere, which is why this happens here, at the very top of the test session. On a machine with a
real GPU, run the suite with ``MINITORCH_REAL_CUDA=1`` to use the device instead.
"""
import os

if os.environ.get("MINITORCH_REAL_CUDA", "0") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None)
settings.register_profile("dev", max_examples=10, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
