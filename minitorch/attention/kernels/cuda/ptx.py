"""Compile the CUDA attention kernels for a GPU architecture without a GPU (``cuda.compile_ptx``), and read what the
assembler says about them.

The simulator (the tests) runs the kernels as Python, so code that only a real GPU rejects (a float64 constant in
a float32 kernel, a type Numba cannot lower, an unsupported intrinsic) would go unnoticed. This module lowers every
kernel variant to PTX for a compute capability (default ``(9, 0)``, Hopper) and checks that float32 kernels do no
float64 arithmetic; with ``ptxas`` on the ``PATH`` (or in ``$PTXAS``) it also assembles each one and reports
registers, spills and shared memory per thread block.

Needs no GPU, and must run without the simulator. Without NVVM (``pip install "numba-cuda[cu13]"`` brings it)
the kernels are lowered to LLVM IR only: typing and lowering errors and float64 arithmetic are still caught,
PTX-level ones are not. With ``nvdisasm`` as well (``pip install "cuda-toolkit[nvcc,nvdisasm]"``; both are in the
test extra) the report reads the SASS of each kernel: the FMA share of its hot loops (:func:`hot_loops`), local
memory and float64 instructions (:func:`instruction_stats`). ``scripts/kernel_report.py`` is the command line of
this module::

    python -m minitorch.attention.kernels.cuda.ptx [--all] [--ptxas] [--sass] [--auto] [--tensor] [--check] [--json P]

Without ``--all`` it compiles a representative set (every kernel, with every flag off and every flag on, float32,
plus the float64 forward; paged kernels are forward only); ``--all`` compiles every flag combination for float32
and float64 at the default tiles of ``D = 64`` and ``D = 128``.
"""

from __future__ import annotations

import argparse
import itertools
import json
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

from .... import cuda_ops, operators
from ...engine import AttentionEngine
from ...mods import score_mod_of
from ...tiling import default_block_sizes
from . import backward as bwd
from . import forward as fwd
from . import launch
from . import select as sel
from .tiles import GPU_THREADS, Config, Flags, TileShape

try:  # where a system CUDA toolkit is (comes with numba-cuda's cuda-pathfinder)
    from cuda.pathfinder import find_nvidia_binary_utility
except ImportError:  # pragma: no cover - an older numba-cuda
    find_nvidia_binary_utility = None

ARCH = (9, 0)
DECODE_BLOCK = AttentionEngine.decode_block
"""Slots per key tile of a ring cache's decode step on CUDA (128)."""


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
    """``(name, kernel factory, argument types, dtype)`` of every kernel variant to compile (``decode``: the Q-major
    forward at one query row in the split layout, as a paged cache's decode step runs it at the default key tile
    and a ring cache's at its 128-slot tiles)."""
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
        shapes = {name: launch.fit_shape(r, c, 4096, 4096, D, np.dtype(dtype).itemsize, smem, GPU_THREADS, accs)
                  for name, (r, c, smem, accs) in {"forward": (*_blocks(D), fwd.forward_smem_bytes, 1),
                                                   "dq": (*_blocks(D), bwd.dq_smem_bytes, 1),
                                                   "dkdv": (*_blocks(D)[::-1], bwd.dkdv_smem_bytes, 2)}.items()}
        tag = f"{np.dtype(dtype).name} D={D}"
        for f in flag_sets:
            ftag = "".join(c if v else "-" for c, v in zip("blptdgmsca", f)) + ("e" if f.score_mod else "-")
            yield (f"fwd_q {tag} {ftag} {_sh(shapes['forward'])}",
                   lambda f=f, s=shapes["forward"], dt=dtype: fwd.make_forward_q_major(s, dt, f),
                   (x4, x4, x4, x5, x4, t8, i64, i64, i64, cfg), dtype)
            yield (f"fwd_k {tag} {ftag} {_sh(shapes['forward'])}",
                   lambda f=f, s=shapes["forward"], dt=dtype: fwd.make_forward_k_major(s, dt, f),
                   (x4, x4, x4, x4, x3, x3, t8, i64, i64, i64, cfg), dtype)
            if not (f.has_bias or f.has_dropout or f.has_segments):  # decode: one query row, split-K (ring or pages)
                for bk in sorted({_blocks(D)[1], DECODE_BLOCK}):  # a paged step's key tiles; a ring cache's slots
                    dec = launch.fit_shape(_blocks(D)[0], bk, 1, 4096, D, np.dtype(dtype).itemsize,
                                           fwd.forward_smem_bytes, GPU_THREADS, split=True)
                    yield (f"decode {tag} {ftag} {_sh(dec)}",
                           lambda f=f, s=dec, dt=dtype: fwd.make_forward_q_major(s, dt, f),
                           (x4, x4, x4, x5, x4, t8, i64, i64, i64, cfg), dtype)
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
        yield f"copy_range {tag}", lambda dt=dtype: launch._copy_range_kernel(dt), (x4, x4, i64, i64, i64), dtype
        for log in (False, True):
            yield (f"importance log={log} {tag}", lambda dt=dtype, lg=log: sel.make_importance(dt, lg),
                   (x4, _arr(dtype, 2), x1, x3, x3), dtype)
            yield (f"importance_du log={log} {tag}", lambda dt=dtype, lg=log: sel.make_importance_du(dt, lg),
                   (x3, x3, x3, x1, x3, x3), dtype)
        for n, (k, args) in enumerate(zip(("d_dt", "d_a", "dx"),
                                          ((x3, x4, _arr(dtype, 2)), (x3, x1), (x3, _arr(dtype, 2), x4)))):
            yield f"importance_{k} {tag}", lambda dt=dtype, n=n: sel.make_importance_grads(dt)[n], args, dtype
        a64 = lambda nd: _arr(np.int64, nd)  # noqa: E731
        a32 = lambda nd: _arr(np.int32, nd)  # noqa: E731
        yield (f"select_scan {tag} t{sel.SELECT_THREADS}", lambda dt=dtype: sel.make_select(dt)[0],
               (x3, a64(2), i64, a64(3), a32(3), a32(3)), dtype)
        yield (f"select_finish {tag} t{sel.SELECT_THREADS}", lambda dt=dtype: sel.make_select(dt)[1],
               (x3, a32(3), a64(3), a32(3), b1, i64, b1, ft, x3, a64(3), a64(3), a64(2)), dtype)
        yield (f"list_tile_types {tag}", lambda: sel.tile_types_kernel,
               (a64(3), a64(2), a64(3), i64, i64, b1, i64, i64, t8), dtype)


def _blocks(D: int) -> Tuple[int, int]:
    return default_block_sizes(D, "cuda")


def _sh(s: TileShape) -> str:
    """The kernel tile, the thread grid and the register tile: ``64x32 t16x8 r4x4``; the split layout's lanes per
    key too: ``1x128 t1x32x4 r1x4`` (32 groups of 4 lanes, each group 4 keys)."""
    return f"{s.R}x{s.C} t{s.TY}x{s.TX}" + (f"x{s.TD}" if s.split else "") + f" r{s.RM}x{s.RN}"


def _pretend_device(cc: Tuple[int, int]) -> None:
    """Device functions are compiled for the current device; without a GPU, say it is one of ``cc``."""
    import numba.cuda.dispatcher as dispatcher

    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=cc)


def assemble(ptx: str, cc: Tuple[int, int], ptxas: str, nvdisasm: Optional[str] = None) -> Tuple[Dict[str, int], str]:
    """Assemble the PTX's kernel with ``ptxas -v``: registers, spill bytes, stack frame and static shared memory,
    and (with ``nvdisasm``) the SASS of the cubin, else ``""``."""
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(path, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", "-o", cubin, path],
                             capture_output=True, text=True, check=True)
        sass = ""
        if nvdisasm:
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    text = res.stderr + res.stdout
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    info = {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "smem": num(r"(\d+) bytes smem")}
    return info, sass


def ptxas_info(ptx: str, cc: Tuple[int, int], ptxas: str) -> Dict[str, int]:
    """Registers, spill bytes and static shared memory of the PTX's kernel, from ``ptxas -v``."""
    return assemble(ptx, cc, ptxas)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Reading the instructions: loops, FMA share, float64, local memory
# ---------------------------------------------------------------------------------------------------------------------

# (instruction, label, branch target) patterns of the two listings
_SASS = (re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)[^;]*;"), re.compile(r"^(\.L_x_\d+):"),
         re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)"))
_PTX = (re.compile(r"^\s+(?:@!?%p\d+\s+)?([a-z][a-z0-9_.]*)[^;]*;"), re.compile(r"^(\$L__\w+):"),
        re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);"))


def _listing(code: str, sass: bool) -> Tuple[List[Tuple[str, str]], Dict[str, int]]:
    """``(opcode, line)`` of every instruction (no NOPs), and the instruction index of every label."""
    ins_re, label_re, _ = _SASS if sass else _PTX
    ins: List[Tuple[str, str]] = []
    labels: Dict[str, int] = {}
    for ln in code.splitlines():
        m = label_re.match(ln)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = ins_re.match(ln)
        if m and m.group(1) != "NOP" and not ln.lstrip().startswith((".", "//")):
            ins.append((m.group(1), ln))
    return ins, labels


def _is_fma(op: str, sass: bool) -> bool:
    return op.startswith("FFMA") if sass else op.startswith("fma.rn.f32")


def _is_float64(op: str, line: str, sass: bool) -> bool:
    if sass:  # DFMA, DADD, DMUL, DSETP, DMNMX ..., conversions to or from F64
        return op[:2] in ("DF", "DA", "DM", "DS") or ".F64" in op
    return ".f64" in line and not line.lstrip().startswith((".reg", "//"))


_TRANSCENDENTAL = ("ex2", "lg2", "tanh", "sin", "cos", "rsqrt", "sqrt.approx", "rcp.approx")

TIGHT = 256
"""Most instructions of a hot loop: the products' loops are about 100-200 (a few unrolled steps); a longer innermost
loop is per-pair code that a score modification left rolled (run once per pair, not once per ``d``)."""


def hot_loops(code: str, sass: bool) -> List[Dict[str, Any]]:
    """The tight innermost loops (a backward branch and its target, containing no other loop, at most
    :data:`TIGHT` instructions) that do float32 FMAs: ``{"instructions", "ffma", "share", "lds", "mufu"}`` each,
    most FMAs first. In a tile kernel those without a transcendental (``mufu``: ``exp``, ``log``, ``tanh`` ...) are
    the products of the register tiles (``Q K^T``, ``P V``, ...): their FMA share is how much of the issue slots do
    the math. A loop with ``exp`` is per-pair code the compiler left rolled (unrolled, it is in no loop)."""
    ins, labels = _listing(code, sass)
    bra = (_SASS if sass else _PTX)[2]
    loops = []
    for i, (_, line) in enumerate(ins):
        m = bra.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            loops.append((labels[m.group(1)], i))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    out = []
    for a, b in sorted(set(inner)):
        body = ins[a:b + 1]
        if len(body) > TIGHT:
            continue
        ffma = sum(_is_fma(op, sass) for op, _ in body)
        if ffma:
            lds = sum(op.startswith("LDS") if sass else op.startswith("ld.shared") for op, _ in body)
            mufu = sum(op.startswith("MUFU") if sass else op.startswith(_TRANSCENDENTAL) for op, _ in body)
            out.append({"instructions": len(body), "ffma": ffma, "share": round(ffma / len(body), 3), "lds": lds,
                        "mufu": mufu})
    return sorted(out, key=lambda d: -d["ffma"])


def instruction_stats(code: str, sass: bool) -> Dict[str, Any]:
    """Counts over the whole kernel: instructions, float32 FMAs, float64 instructions, local loads and stores
    (register spills or local arrays the compiler could not keep in registers); the FMA share of the products'
    loops together (``hot_ffma_share``: :func:`hot_loops` without a transcendental) and of every tight FMA loop
    (``loops_ffma_share``)."""
    ins, _ = _listing(code, sass)
    local_ld = ("LDL",) if sass else ("ld.local",)
    local_st = ("STL",) if sass else ("st.local",)
    loops = hot_loops(code, sass)
    products = [lp for lp in loops if not lp["mufu"]]
    share = lambda ls: round(sum(lp["ffma"] for lp in ls) / n, 3) if (n := sum(lp["instructions"] for lp in ls)) \
        else None  # noqa: E731
    return {
        "listing": "SASS" if sass else "PTX",
        "instructions": len(ins),
        "ffma": sum(_is_fma(op, sass) for op, _ in ins),
        "float64": sum(_is_float64(op, line, sass) for op, line in ins),
        "local_loads": sum(op.startswith(local_ld) for op, _ in ins),
        "local_stores": sum(op.startswith(local_st) for op, _ in ins),
        "hot_ffma_share": share(products),
        "loops_ffma_share": share(loops),
        "hot_loops": loops,
    }


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
        bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")
        return cuda.compile_ptx(kernel.py_func, argtypes, cc=cc, launch_bounds=bounds)[0]
    from numba.cuda import compiler

    return compiler.compile_cuda(kernel.py_func, numba.types.void, argtypes, cc=cc).library.get_llvm_str()


def float64_ops(code: str, ptx: bool) -> List[str]:
    """Lines of PTX (or LLVM IR) doing float64 arithmetic or conversions: a float32 kernel must have none."""
    if ptx:
        return [ln.strip() for ln in code.splitlines() if ".f64" in ln and not ln.strip().startswith((".reg", "//"))]
    return [ln.strip() for ln in code.splitlines()
            if (" double " in ln or "fpext" in ln) and not ln.lstrip().startswith(("declare", ";"))]


def tensor_variants() -> Iterator[Tuple[str, Callable[[], Any], Tuple[Any, ...], Any]]:
    """The tensor backend's kernels (:mod:`minitorch.cuda_ops`): map, zip, reduce, the tiled matmul, the fill and
    Adam's update, float32."""

    i32, i64, b1 = _arr(np.int32, 1), numba.int64, numba.boolean
    x1, f32 = _arr(np.float32, 1), numba.float32
    dev = cuda_ops._device_fn
    yield ("tensor_map relu float32", lambda: cuda_ops.tensor_map(dev(operators.relu)),
           (x1, i32, i32, i64, x1, i32, i32, b1), np.float32)
    yield ("tensor_zip mul float32", lambda: cuda_ops.tensor_zip(dev(operators.mul)),
           (x1, i32, i32, i64, x1, i32, i32, x1, i32, i32, b1), np.float32)
    yield ("tensor_reduce add float32", lambda: cuda_ops.tensor_reduce(dev(operators.add), 1024, np.float32),
           (x1, i32, i32, i64, x1, i32, i32, i64, f32), np.float32)
    yield ("tensor_matmul float32", lambda: cuda_ops.tensor_matrix_multiply(32, np.float32),
           (x1, x1, x1) + (i64,) * 9, np.float32)
    yield "tensor_fill float32", lambda: cuda_ops.fill_kernel, (x1, i64, f32), np.float32
    yield "tensor_adam float32", lambda: cuda_ops.adam_kernel, (x1,) * 5 + (i64,) + (f32,) * 8, np.float32


def tool_candidates(name: str) -> List[str]:
    """Where ``ptxas`` or ``nvdisasm`` may be, in order: ``$PTXAS`` / ``$NVDISASM``; the CUDA wheels next to this
    interpreter's NVVM (``pip install "cuda-toolkit[nvcc,nvdisasm]"``, the test extra); ``cuda.pathfinder``'s
    (a system toolkit); the ``PATH``'s."""
    found = [os.environ.get(name.upper(), "")]
    for base in sys.path:
        for sub in ("nvidia/cu13/bin", "nvidia/cuda_nvcc/bin", "nvidia/cuda_nvdisasm/bin", "nvidia/cu12/bin"):
            found.append(os.path.join(base, sub, name))
    if find_nvidia_binary_utility is not None:
        try:
            found.append(find_nvidia_binary_utility(name) or "")
        except Exception:  # pragma: no cover - a broken toolkit installation counts as absent
            pass
    found.append(shutil.which(name) or "")
    out: List[str] = []
    for path in found:
        if path and os.path.isfile(path) and os.access(path, os.X_OK) and path not in out:
            out.append(path)
    return out


def _probe_kernel(a):  # type: ignore[no-untyped-def]
    a[0] = 1.0


def find_tool(name: str, cc: Tuple[int, int] = ARCH) -> Optional[str]:
    """The first of :func:`tool_candidates` that works: a ``ptxas`` must assemble the PTX of this interpreter's NVVM
    (a toolkit older than NVVM rejects its PTX version), checked on a one-line kernel."""
    paths = tool_candidates(name)
    if name != "ptxas" or not paths or not nvvm_available():
        return paths[0] if paths else None
    probe = cuda.compile_ptx(_probe_kernel, (_arr(np.float32, 1),), cc=cc)[0]
    for path in paths:
        try:
            assemble(probe, cc, path)
            return path
        except (subprocess.CalledProcessError, OSError):
            continue
    return None


def compile_all(full: bool = False, cc: Tuple[int, int] = ARCH, ptxas: Optional[str] = None,
                out: Any = sys.stdout, nvdisasm: Optional[str] = None, tensor: bool = False,
                only: Optional[str] = None) -> List[Dict[str, Any]]:
    """Lower every variant of :func:`variants` (and with ``tensor`` :func:`tensor_variants`; with ``only``, those
    whose name contains it) for ``cc``: to PTX when NVVM is installed, else to LLVM IR. Raise ``AssertionError``
    on float64 arithmetic in a float32 kernel. With ``ptxas``, assemble each (registers, spills, shared memory);
    with ``nvdisasm`` too, read the SASS (:func:`instruction_stats`), else the PTX.

    Returns one record per kernel: ``name``, ``dtype`` and what was measured."""
    if numba.config.ENABLE_CUDASIM:
        raise RuntimeError("compile the kernels with the CUDA simulator switched off (NUMBA_ENABLE_CUDASIM=0)")
    _pretend_device(cc)
    to_ptx = nvvm_available()
    print("target:", "PTX" if to_ptx else "LLVM IR (NVVM not installed)", file=out, flush=True)
    records = []
    for name, factory, argtypes, dtype in itertools.chain(variants(full), tensor_variants() if tensor else ()):
        if only and only not in name:
            continue
        code = lower(factory(), argtypes, cc, to_ptx)
        if np.dtype(dtype) == np.float32:
            bad = float64_ops(code, to_ptx)
            assert not bad, f"{name}: float64 arithmetic in a float32 kernel: {bad[:3]}"
        rec: Dict[str, Any] = {"name": name, "dtype": np.dtype(dtype).name}
        sass = ""
        if ptxas and to_ptx:
            info, sass = assemble(code, cc, ptxas, nvdisasm)
            rec.update(info)
        if to_ptx:
            rec.update(instruction_stats(sass or code, bool(sass)))
        records.append(rec)
        print(format_record(rec), file=out, flush=True)
    return records


def format_record(rec: Dict[str, Any]) -> str:
    """One line of the report."""
    parts = [rec["name"]]
    for k in ("registers", "spill_stores", "spill_loads", "stack", "smem", "local_loads", "local_stores", "float64"):
        if k in rec:
            parts.append(f"{k}={rec[k]}")
    if rec.get("hot_ffma_share") is not None:
        loops = " ".join(f"{lp['ffma']}/{lp['instructions']}" + ("e" if lp["mufu"] else "") for lp in rec["hot_loops"])
        parts.append(f"ffma_hot={rec['hot_ffma_share']:.0%} all_loops={rec['loops_ffma_share']:.0%} "
                     f"({rec['listing']} loops ffma/ins, e: with exp/log: {loops})")
    return " ".join(parts)


HOT_FFMA_TARGET = {"fwd_q": 0.5, "fwd_k": 0.5, "dq": 0.4, "dkdv": 0.4}
"""The least FMA share of the products' loops (SASS, :func:`instruction_stats`) of the float32 tile kernels with a
register tile of at least 4 x 4: forward 50%, backward 40%."""


def problems(records: List[Dict[str, Any]]) -> List[str]:
    """What an attention kernel of the report must not have: spills, a stack frame or local memory traffic, float64
    instructions in a float32 kernel; a float32 tile kernel whose SASS hot loops are under
    :data:`HOT_FFMA_TARGET`."""
    out = []
    for rec in records:
        if rec["name"].startswith("tensor_"):  # reported, not checked: the course's kernels (zip keeps its three
            continue  # MAX_DIMS index arrays in local memory)
        f32 = rec["dtype"] == "float32"
        for k in ("spill_stores", "spill_loads", "stack", "local_loads", "local_stores") + (("float64",) if f32 else ()):
            if rec.get(k):
                out.append(f"{rec['name']}: {k}={rec[k]}")
        tile = re.search(r" r(\d+)x(\d+)", rec["name"])
        full = tile is not None and int(tile.group(1)) * int(tile.group(2)) >= 16  # a 4 x 4 register tile or more
        target = HOT_FFMA_TARGET.get(rec["name"].split()[0].rstrip("012")) if full else None
        share = rec.get("hot_ffma_share")
        if f32 and target and rec.get("listing") == "SASS" and share is not None and share < target:
            out.append(f"{rec['name']}: hot-loop FFMA share {share:.0%} < {target:.0%}")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every flag combination, float32 and float64, D=64/128")
    parser.add_argument("--ptxas", action="store_true", help="assemble with ptxas (find_tool: $PTXAS, the wheels, PATH)")
    parser.add_argument("--sass", action="store_true", help="with --ptxas: read the SASS (nvdisasm) for FFMA shares")
    parser.add_argument("--auto", action="store_true", help="ptxas and nvdisasm where found, else without them")
    parser.add_argument("--tensor", action="store_true", help="also the tensor backend's map/zip/reduce/matmul")
    parser.add_argument("--only", default=None, help="only the kernels whose name contains this")
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill, local memory, float64 in float32, "
                        "or a hot-loop FFMA share under the target")
    parser.add_argument("--json", default=None, help="write the records to this JSON file")
    args = parser.parse_args(argv)
    ptxas = nvdisasm = None
    if args.ptxas or args.auto:
        ptxas = find_tool("ptxas")
        if ptxas is None and not args.auto:
            raise SystemExit("ptxas not found: set PTXAS, or pip install 'cuda-toolkit[nvcc]'")
        if args.sass or args.auto:
            nvdisasm = find_tool("nvdisasm")
        print(f"ptxas: {ptxas or 'not found (no registers, spills, SASS)'}\n"
              f"nvdisasm: {nvdisasm or 'not found (FFMA shares from the PTX)'}", flush=True)
    records = compile_all(args.all, ARCH, ptxas, nvdisasm=nvdisasm, tensor=args.tensor, only=args.only)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"arch": f"sm_{ARCH[0]}{ARCH[1]}", "nvvm": nvvm_available(), "ptxas": ptxas,
                       "nvdisasm": nvdisasm, "kernels": records}, fh, indent=1)
    print(f"COMPILED {len(records)} kernels for sm_{ARCH[0]}{ARCH[1]}" + ("" if nvvm_available() else " (LLVM IR)"))
    bad = problems(records) if args.check else []
    for line in bad:
        print("PROBLEM", line)
    if bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
