"""Compile report of every CUDA kernel for a Hopper GPU (sm_90), without a GPU.

    python scripts/kernel_report.py [--json PATH] [--attention] [--all] [--check] [--only TEXT]

Compiles the flash-attention kernels (forward in both orders, dQ, dK/dV, decode = the forward with one query row and
split-K, the merge, Dynamic Mask Attention's selection and importance) and, unless ``--attention``, the tensor
backend's map/zip/reduce/matmul, with ``cuda.compile_ptx``; assembles each with ``ptxas -v`` and disassembles it
with ``nvdisasm`` where those are installed (the test extra brings them). Per kernel: registers, spill bytes, stack
frame, static shared memory, local loads and stores, float64 instructions, and the FFMA share of the hot loops'
instructions (SASS; the PTX's ``fma.rn.f32`` share without ``nvdisasm``). ``--check`` exits 1 on a spill, local
memory, float64 in a float32 kernel, or a tile kernel's hot loops under the target (forward 50%, backward 40%).

The logic is :mod:`minitorch.attention.kernels.cuda.ptx`; this is its command line for the repository.
"""

import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # compile for the GPU (the simulator runs kernels as Python)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minitorch.attention.kernels.cuda import ptx  # noqa: E402


def main(argv: list) -> None:
    args = [a for a in argv if a != "--attention"]
    ptx.main(["--auto"] + ([] if "--attention" in argv else ["--tensor"]) + args)


if __name__ == "__main__":
    main(sys.argv[1:])
