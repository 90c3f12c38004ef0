"""Compile the CUDA attention kernels for a GPU architecture without a GPU (``cuda.compile_ptx``), and read what the
assembler says about them.

The simulator (the tests) runs the kernels as Python, so code that only a real GPU rejects (a float64 constant in
a float32 kernel, a type Numba cannot lower, an unsupported intrinsic) would go unnoticed. This module lowers every
kernel variant to PTX for a compute capability (default ``(9, 0)``, Hopper) and checks that float32 kernels do no
float64 arithmetic; with ``ptxas`` on the ``PATH`` (or in ``$PTXAS``) it also assembles each one and reports
registers, spills and shared memory per thread block.

Needs no GPU, and must run without the simulator. Without NVVM (``pip install "numba-cuda[cu12]"`` or ``[cu13]``
brings it) the kernels are lowered to LLVM IR only: typing and lowering errors and float64 arithmetic are still
caught, PTX-level ones are not::

    python -m minitorch.attention.kernels.cuda.ptx [--all] [--ptxas]

Without ``--all`` it compiles a representative set (every kernel, with every flag off and every flag on, float32,
plus the float64 forward; paged kernels are forward only); ``--all`` compiles every flag combination for float32
and float64 at the default tiles of ``D = 64`` and ``D = 128``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types as pytypes
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numba
import numpy as np
from numba import cuda

from ...mods import score_mod_of
from ...tiling import default_block_sizes
from . import backward as bwd
from . import forward as fwd
from . import launch
from . import select as sel
from .tiles import Config, Flags, TileShape

ARCH = (9, 0)


def _typeof_config(dtype: Any) -> Any:
    """The numba type of a :class:`~.tiles.Config` with arrays of these dtypes (what a launch passes)."""
    i64, ft = np.int64, np.dtype(dtype).type
    cfg = Config(np.zeros((1, 1), i64), np.zeros((1, 1), i64), True, i64(-1), i64(0), np.zeros((1, 1, 1, 1), ft),
                 np.zeros((1, 1, 1), i64), np.zeros((1, 1), i64), np.zeros((1, 1), i64), i64(1), np.zeros(1, i64),
                 np.zeros((1, 1, 1), ft), np.zeros((1, 1, 1), i64), np.uint64(0), np.uint64(0), ft(1), ft(1),
                 np.zeros((1, 1), i64), np.zeros((1, 1), i64), np.zeros((1, 1, 1, 1), np.int32),
                 np.zeros((1, 1, 1), np.uint8), np.zeros(1, ft), np.zeros(1, ft), ft(1))
    return numba.typeof(cfg)


def _sample_mod(s, b, h, q_pos, k_pos):  # type: ignore[no-untyped-def]
    """A ``score_mod`` to lower the kernels with one (it stays in the score's dtype: float32 kernels must do no
    float64 arithmetic, and Numba computes ``float32 op int`` in float64)."""
    return s + s


def _sample_mod_grad(s, b, h, q_pos, k_pos):  # type: ignore[no-untyped-def]
    return s / s + s / s  # 2, in the score's dtype


def _arr(dtype: Any, ndim: int) -> Any:
    return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C")


def variants(full: bool) -> Iterator[Tuple[str, Callable[[], Any], Tuple[Any, ...], Any]]:
    """``(name, kernel factory, argument types, dtype)`` of every kernel variant to compile."""
    i64, b1 = numba.int64, numba.boolean
    dtypes = [np.float32, np.float64] if full else [np.float32]
    dims = [64, 128] if full else [64]
    # the key source and the original features (bias, list, pages, top-k, dropout): every combination
    all_flags = [Flags(*f) for f in itertools.product([False, True], repeat=5) if f[0] or not f[3]]  # top-k: bias
    off, on = Flags(*[False] * 5), Flags(*[True] * 5)
    # the attention variants (segments, block mask, sinks, softcap, ALiBi, a score_mod): all off, or all on
    variants_on = Flags(True, False, False, False, True, True, True, True, True, True,
                        score_mod_of(_sample_mod, _sample_mod_grad))
    all_flags.append(variants_on)
    flag_sets = all_flags if full else [off, on._replace(has_pages=False), on, variants_on]  # (paged: forward only)
    for dtype, D in itertools.product(dtypes, dims):
        x4, x5, x3, x1, t8 = _arr(dtype, 4), _arr(dtype, 5), _arr(dtype, 3), _arr(dtype, 1), _arr(np.int8, 4)
        cfg = _typeof_config(dtype)
        ft = numba.from_dtype(np.dtype(dtype))
        shapes = {name: launch.fit_shape(r, c, 4096, 4096, D, np.dtype(dtype).itemsize, smem, (16, 16))
                  for name, (r, c, smem) in {"forward": (*_blocks(D), fwd.forward_smem_bytes),
                                             "dq": (*_blocks(D), bwd.dq_smem_bytes),
                                             "dkdv": (*_blocks(D)[::-1], bwd.dkdv_smem_bytes)}.items()}
        tag = f"{np.dtype(dtype).name} D={D}"
        for f in flag_sets:
            ftag = "".join(c if v else "-" for c, v in zip("blptdgmsca", f)) + ("e" if f.score_mod else "-")
            yield (f"fwd_q {tag} {ftag} {_sh(shapes['forward'])}",
                   lambda f=f, s=shapes["forward"], dt=dtype: fwd.make_forward_q_major(s, dt, f),
                   (x4, x4, x4, x5, x4, t8, i64, i64, i64, cfg), dtype)
            yield (f"fwd_k {tag} {ftag} {_sh(shapes['forward'])}",
                   lambda f=f, s=shapes["forward"], dt=dtype: fwd.make_forward_k_major(s, dt, f),
                   (x4, x4, x4, x4, x3, x3, t8, i64, i64, i64, cfg), dtype)
            if f.has_pages:  # paged attention is forward only
                continue
            yield (f"dq {tag} {ftag} {_sh(shapes['dq'])}",
                   lambda f=f, s=shapes["dq"], dt=dtype: bwd.make_dq(s, dt, f),
                   (x4, x4, x4, x4, x3, x3, x3, b1, x4, x3, t8, i64, i64, cfg), dtype)
            modes = [bwd.DBIAS_ROWS, bwd.DBIAS_ROWSUM] if f.has_bias else [bwd.DBIAS_NONE]
            for mode in modes:
                yield (f"dkdv{mode} {tag} {ftag} {_sh(shapes['dkdv'])}",
                       lambda f=f, s=shapes["dkdv"], dt=dtype, m=mode: bwd.make_dkdv(s, dt, f, m),
                       (x4, x4, x4, x4, x3, x3, x4, x4, x4, t8, i64, i64, cfg), dtype)
        if D != dims[0]:
            continue
        yield f"k_major_init {tag}", lambda dt=dtype: fwd.make_k_major_init(dt), (x4, x3, x3, x1, b1), dtype
        yield f"sinks_backward {tag}", lambda dt=dtype: bwd.make_sinks_backward(dt), (x4, x4, x3, x3, b1, x1, x1), dtype
        yield f"k_major_finish {tag}", lambda dt=dtype: fwd.make_k_major_finish(dt), (x3, x3, x3), dtype
        yield f"merge {tag}", lambda dt=dtype: fwd.make_merge(dt), (x5, x4, x4, x3), dtype
        yield f"preprocess {tag}", lambda dt=dtype: bwd.make_preprocess(dt), (x4, x4, x3, b1, x3), dtype
        yield f"dbias_reduce {tag}", lambda dt=dtype: bwd.make_dbias_reduce(dt), (x4, x4), dtype
        yield f"fill {tag}", lambda dt=dtype: launch._fill_kernel(dt), (x1, ft), dtype
        yield (f"copy_rows {tag}", lambda dt=dtype: launch._copy_rows_kernel(dt),
               (x4, x4, _arr(np.int64, 1), _arr(np.int64, 1)), dtype)
        for log in (False, True):
            yield (f"importance log={log} {tag}", lambda dt=dtype, lg=log: sel.make_importance(dt, lg),
                   (x4, _arr(dtype, 2), x1, x3, x3), dtype)
            yield (f"importance_du log={log} {tag}", lambda dt=dtype, lg=log: sel.make_importance_du(dt, lg),
                   (x3, x3, x3, x1, x3, x3), dtype)
        for n, (k, args) in enumerate(zip(("d_dt", "d_a", "dx"),
                                          ((x3, x4, _arr(dtype, 2)), (x3, x1), (x3, _arr(dtype, 2), x4)))):
            yield f"importance_{k} {tag}", lambda dt=dtype, n=n: sel.make_importance_grads(dt)[n], args, dtype
        a64 = lambda nd: _arr(np.int64, nd)  # noqa: E731
        yield (f"select {tag}", lambda: sel.select_kernel,
               (x3, a64(2), i64, b1, i64, x3, a64(3), a64(3), a64(3), x3, a64(3), a64(3), a64(2), b1, ft), dtype)
        yield (f"list_tile_types {tag}", lambda: sel.tile_types_kernel,
               (a64(3), a64(2), a64(3), i64, i64, b1, i64, i64, t8), dtype)


def _blocks(D: int) -> Tuple[int, int]:
    return default_block_sizes(D, "cuda")


def _sh(s: TileShape) -> str:
    return f"{s.R}x{s.C}"


def _pretend_device(cc: Tuple[int, int]) -> None:
    """Device functions are compiled for the current device; without a GPU, say it is one of ``cc``."""
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)


def ptxas_info(ptx: str, cc: Tuple[int, int], ptxas: str) -> Dict[str, int]:
    """Registers, spill bytes and static shared memory of the PTX's kernel, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", "-o", os.path.join(tmp, "k.cubin"), path],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "smem": num(r"(\d+) bytes smem")}


def nvvm_available() -> bool:
    """Can this machine lower LLVM IR to PTX (NVVM installed)?"""
    from numba.cuda.cudadrv import nvvm

    try:
        return bool(nvvm.is_available())
    except Exception:  # pragma: no cover - a broken installation counts as absent
        return False


def lower(kernel: Any, argtypes: Tuple[Any, ...], cc: Tuple[int, int], ptx: bool) -> str:
    """The kernel's PTX for ``cc`` (``ptx``: needs NVVM), or else its LLVM IR (type-checked and lowered for the GPU
    target, which needs no NVVM)."""
    if ptx:
        return cuda.compile_ptx(kernel.py_func, argtypes, cc=cc)[0]
    from numba.cuda import compiler

    return compiler.compile_cuda(kernel.py_func, numba.types.void, argtypes, cc=cc).library.get_llvm_str()


def float64_ops(code: str, ptx: bool) -> List[str]:
    """Lines of PTX (or LLVM IR) doing float64 arithmetic or conversions: a float32 kernel must have none."""
    if ptx:
        return [ln.strip() for ln in code.splitlines() if ".f64" in ln and not ln.strip().startswith((".reg", "//"))]
    return [ln.strip() for ln in code.splitlines()
            if (" double " in ln or "fpext" in ln) and not ln.lstrip().startswith(("declare", ";"))]


def compile_all(full: bool = False, cc: Tuple[int, int] = ARCH, ptxas: Optional[str] = None,
                out: Any = sys.stdout) -> List[Tuple[str, Dict[str, int]]]:
    """Lower every variant of :func:`variants` for ``cc`` (to PTX when NVVM is installed, else to LLVM IR); raise
    ``AssertionError`` on float64 arithmetic in a float32 kernel. Returns ``(name, ptxas info or {})`` per
    kernel."""
    if numba.config.ENABLE_CUDASIM:
        raise RuntimeError("compile the kernels with the CUDA simulator switched off (NUMBA_ENABLE_CUDASIM=0)")
    _pretend_device(cc)
    to_ptx = nvvm_available()
    print("target:", "PTX" if to_ptx else "LLVM IR (NVVM not installed)", file=out, flush=True)
    results = []
    for name, factory, argtypes, dtype in variants(full):
        code = lower(factory(), argtypes, cc, to_ptx)
        if np.dtype(dtype) == np.float32:
            bad = float64_ops(code, to_ptx)
            assert not bad, f"{name}: float64 arithmetic in a float32 kernel: {bad[:3]}"
        info = ptxas_info(code, cc, ptxas) if (ptxas and to_ptx) else {}
        results.append((name, info))
        print(name, " ".join(f"{k}={v}" for k, v in info.items()), file=out, flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every flag combination, float32 and float64, D=64/128")
    parser.add_argument("--ptxas", action="store_true", help="assemble with ptxas (from $PTXAS or the PATH)")
    args = parser.parse_args(argv)
    ptxas = None
    if args.ptxas:
        ptxas = os.environ.get("PTXAS") or shutil.which("ptxas")
        if ptxas is None:
            raise SystemExit("ptxas not found: set PTXAS or put it on the PATH")
    results = compile_all(args.all, ARCH, ptxas)
    print(f"COMPILED {len(results)} kernels for sm_{ARCH[0]}{ARCH[1]}" + ("" if nvvm_available() else " (LLVM IR)"))


if __name__ == "__main__":
    main()
