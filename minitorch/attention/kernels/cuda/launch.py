"""Launchers of the CUDA flash attention kernels: numba device arrays in, device arrays out (docs/internals.md).

```
forward(q, k, v, bias, spec) -> (out, lse)
backward(q, k, v, bias, out, lse, dout, spec) -> (dq, dk, dv, dbias)
```
``q, out, dout, dq``: ``(B, H, Nq, D)``; ``k, v, dk, dv``: ``(B, Hkv, Nk, D)``; ``lse``: ``(B, H, Nq)``; ``bias``,
``dbias``: ``(Bb, Hb, Nqb, Nk)`` or ``None``. All contiguous, dtype of ``q`` (float32 or float64). Nothing of q, k,
v, out or the gradients goes through the host; the small metadata (positions, tile types) is copied to the device
once per spec and cached in ``spec.extra["cuda"]``, so backward reuses forward's copies.

Tiles: the schedule's ``(block_q, block_k)`` (``default_block_sizes(D, "cuda")`` unless the call gave others). A
kernel whose shared memory would exceed 48 KB at those sizes (the backward kernels at D >= 64, float64, large D)
runs sub-tiles: the tile is halved until it fits, and every sub-tile takes the type of the schedule tile that
contains it. Tiles larger than the sequence are halved too (decoding with Nq = 1 does not run 64-row tiles).
At the default tiles on a GPU (16 x 16 threads; :func:`smem_report`), float32:

    D = 64  (64 x 32):  forward 64x32  41600 B | dQ 32x32  37632 B | dK/dV 32 keys x 32 queries  42112 B
    D = 128 (32 x 32):  forward 32x32  41472 B | dQ 16x16  34176 B | dK/dV 16 keys x 16 queries  35392 B

Determinism: no float atomics anywhere; dBias is reduced in a fixed order (see flash_backward.py).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
from numba import cuda

import weakref

from ...spec import AttentionSpec
from ...tiling import TileOrder
from .backward import (
    DBIAS_NONE,
    DBIAS_ROWS,
    DBIAS_ROWSUM,
    dkdv_smem_bytes,
    dq_smem_bytes,
    make_dbias_reduce,
    make_dkdv,
    make_dq,
    make_preprocess,
    make_zero4,
)
from .forward import (
    MAX_THREADS,
    SMEM_LIMIT,
    TileShape,
    forward_smem_bytes,
    make_forward_k_major,
    make_forward_q_major,
    make_k_major_finish,
    make_k_major_init,
)

DeviceArray = Any
ROW_THREADS = 128
"""Threads per block of the one-thread-per-row/element kernels (init, finish, preprocess, reductions)."""

_DUMMY: Dict[str, DeviceArray] = {}
_MEMO: "weakref.WeakKeyDictionary[AttentionSpec, Dict[Any, Any]]" = weakref.WeakKeyDictionary()
"""What a launcher derives from a spec (device copies of the positions and tile types, kernel tiles), per spec."""


def fit_shape(
    rows: int, cols: int, n_rows: int, n_cols: int, D: int, itemsize: int, smem: Callable[[TileShape, int], int],
    max_threads: Tuple[int, int] = MAX_THREADS,
) -> TileShape:
    """The kernel tile for a schedule tile of ``rows x cols``: halve it while it is larger than the sequence
    (``n_rows``, ``n_cols``) or its shared memory exceeds :data:`SMEM_LIMIT`. Halving keeps every kernel tile inside
    one schedule tile. Raises ``ValueError`` if no sub-tile fits (head dim too large)."""
    while rows % 2 == 0 and rows // 2 >= max(n_rows, 1):
        rows //= 2
    while cols % 2 == 0 and cols // 2 >= max(n_cols, 1):
        cols //= 2
    while True:
        shape = TileShape.make(rows, cols, D, max_threads)
        if smem(shape, itemsize) <= SMEM_LIMIT:
            return shape
        if rows % 2 == 0 and (rows >= cols or cols % 2 != 0):
            rows //= 2
        elif cols % 2 == 0:
            cols //= 2
        else:
            raise ValueError(
                f"CUDA attention: head_dim={D} ({itemsize}-byte floats) does not fit {SMEM_LIMIT} bytes of shared "
                f"memory with any sub-tile of block sizes dividing the schedule's; pass smaller block_q/block_k"
            )


def kernel_shapes(spec: AttentionSpec, itemsize: int) -> Dict[str, TileShape]:
    """The kernel tiles of every kernel for this spec: ``forward`` and ``dq`` (queries x keys), ``dkdv`` (keys x
    queries). Cached in ``spec.extra``."""
    memo = _MEMO.setdefault(spec, {})
    key = ("cuda_shapes", itemsize)
    if key not in memo:
        bq, bk, D = spec.block_q, spec.block_k, spec.D
        memo[key] = {
            "forward": fit_shape(bq, bk, spec.Nq, spec.Nk, D, itemsize, forward_smem_bytes),
            "dq": fit_shape(bq, bk, spec.Nq, spec.Nk, D, itemsize, dq_smem_bytes),
            "dkdv": fit_shape(bk, bq, spec.Nk, spec.Nq, D, itemsize, dkdv_smem_bytes),
        }
    return memo[key]


def smem_report(D: int, dtype: Any = np.float32, block_q: Optional[int] = None, block_k: Optional[int] = None,
                N: int = 4096, max_threads: Tuple[int, int] = (16, 16)) -> Dict[str, Tuple[Tuple[int, int], int]]:
    """Kernel name -> ((rows, cols) of the kernel tile, shared-memory bytes) at the default CUDA tiles for ``D``,
    for the thread grid of a real GPU (``max_threads``; the simulator uses smaller blocks)."""
    from ...tiling import default_block_sizes

    dq, dk = default_block_sizes(D, "cuda")
    bq, bk = block_q or dq, block_k or dk
    size = np.dtype(dtype).itemsize
    out = {}
    for name, (r, c, nr, nc, fn) in {
        "forward": (bq, bk, N, N, forward_smem_bytes),
        "dq": (bq, bk, N, N, dq_smem_bytes),
        "dkdv": (bk, bq, N, N, dkdv_smem_bytes),
    }.items():
        s = fit_shape(r, c, nr, nc, D, size, fn, max_threads)
        out[name] = ((s.R, s.C), fn(s, size))
    return out


def _meta(spec: AttentionSpec) -> Dict[str, DeviceArray]:
    """Positions and tile types on the device, copied once per spec."""
    memo = _MEMO.setdefault(spec, {})
    if "cuda" not in memo:
        memo["cuda"] = {
            "q_pos": cuda.to_device(np.ascontiguousarray(spec.q_pos, dtype=np.int64)),
            "k_pos_b": cuda.to_device(np.ascontiguousarray(spec.k_pos_b, dtype=np.int64)),
            "tile_types": cuda.to_device(np.ascontiguousarray(spec.tile_types, dtype=np.int8)),
        }
    return memo["cuda"]


def _dummy(dtype: np.dtype) -> DeviceArray:
    """A ``(1, 1, 1, 1)`` device array standing in for an absent bias (never read)."""
    if dtype.name not in _DUMMY:
        _DUMMY[dtype.name] = cuda.to_device(np.zeros((1, 1, 1, 1), dtype=dtype))
    return _DUMMY[dtype.name]


def _scalars(spec: AttentionSpec, dtype: np.dtype) -> Tuple[Any, ...]:
    """The runtime arguments shared by every kernel: ``block_q, block_k, scale, causal, window, sinks, seed,
    thr, rp``, typed so that no kernel does float64 or mixed signed/unsigned math by accident."""
    t = dtype.type
    rp = 1.0 / (1.0 - spec.dropout) if spec.dropout > 0 else 1.0
    return (
        np.int64(spec.block_q), np.int64(spec.block_k), t(spec.scale), bool(spec.causal), np.int64(spec.window),
        np.int64(spec.num_sinks), np.uint64(spec.seed & 0xFFFFFFFF), np.uint64(spec.drop_threshold), t(rp),
    )


def _check(name: str, arr: DeviceArray, shape: Tuple[int, ...], dtype: np.dtype) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"CUDA attention: {name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
    if np.dtype(arr.dtype) != dtype:
        raise TypeError(f"CUDA attention: {name} must have dtype {dtype}, got {np.dtype(arr.dtype)}")


def _grid1(n: int) -> Tuple[int, int]:
    return (max(1, -(-n // ROW_THREADS)), ROW_THREADS)


def forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, bias: Optional[DeviceArray],
            spec: AttentionSpec) -> Tuple[DeviceArray, DeviceArray]:
    """Flash attention forward on the GPU: ``(out (B, H, Nq, D), lse (B, H, Nq))``, in ``spec.order``."""
    dtype = np.dtype(q.dtype)
    B, H, Hkv, Nq, Nk, D = spec.B, spec.H, spec.Hkv, spec.Nq, spec.Nk, spec.D
    _check("q", q, (B, H, Nq, D), dtype)
    _check("k", k, (B, Hkv, Nk, D), dtype)
    _check("v", v, (B, Hkv, Nk, D), dtype)
    has_bias = bias is not None
    if has_bias:
        _check("attn_bias", bias, spec.bias_shape or tuple(bias.shape), dtype)
    out = cuda.device_array((B, H, Nq, D), dtype=dtype)
    lse = cuda.device_array((B, H, Nq), dtype=dtype)
    if B * H * Nq == 0:
        return out, lse
    meta = _meta(spec)
    shape = kernel_shapes(spec, dtype.itemsize)["forward"]
    args = _scalars(spec, dtype)
    has_dropout = spec.dropout > 0
    bias_arr = bias if has_bias else _dummy(dtype)
    Tr = -(-Nq // shape.R)
    Tc = -(-Nk // shape.C)
    block = (shape.TX, shape.TY)
    if TileOrder(spec.order) == TileOrder.Q_MAJOR:
        kernel = make_forward_q_major(shape, dtype, has_bias, has_dropout)
        kernel[(Tr, B * H), block](q, k, v, bias_arr, out, lse, meta["q_pos"], meta["k_pos_b"], meta["tile_types"],
                                   *args)
    else:
        # FlashAttention 1: the outer loop over key/value tiles is this host loop of launches (in stream order)
        l_buf = cuda.device_array((B, H, Nq), dtype=dtype)
        blocks, threads = _grid1(B * H * Nq)
        make_k_major_init(dtype)[blocks, threads](out, lse, l_buf)
        kernel = make_forward_k_major(shape, dtype, has_bias, has_dropout)
        for tk in range(Tc):
            kernel[(Tr, B * H), block](q, k, v, bias_arr, out, lse, l_buf, meta["q_pos"], meta["k_pos_b"],
                                       meta["tile_types"], np.int64(tk), *args)
        make_k_major_finish(dtype)[blocks, threads](lse, l_buf)
    return out, lse


def backward(q: DeviceArray, k: DeviceArray, v: DeviceArray, bias: Optional[DeviceArray], out: DeviceArray,
             lse: DeviceArray, dout: DeviceArray, spec: AttentionSpec
             ) -> Tuple[DeviceArray, DeviceArray, DeviceArray, Optional[DeviceArray]]:
    """Flash attention backward on the GPU: ``(dq, dk, dv, dbias)`` (``dbias`` None without a bias).

    Preprocess (``delta``), then the dK/dV kernel (with dBias), then the dQ kernel; deterministic.
    """
    dtype = np.dtype(q.dtype)
    B, H, Hkv, Nq, Nk, D = spec.B, spec.H, spec.Hkv, spec.Nq, spec.Nk, spec.D
    _check("q", q, (B, H, Nq, D), dtype)
    _check("k", k, (B, Hkv, Nk, D), dtype)
    _check("v", v, (B, Hkv, Nk, D), dtype)
    _check("out", out, (B, H, Nq, D), dtype)
    _check("dout", dout, (B, H, Nq, D), dtype)
    _check("lse", lse, (B, H, Nq), dtype)
    has_bias = bias is not None
    dq = cuda.device_array((B, H, Nq, D), dtype=dtype)
    dk = cuda.device_array((B, Hkv, Nk, D), dtype=dtype)
    dv = cuda.device_array((B, Hkv, Nk, D), dtype=dtype)
    dbias = None
    mode = DBIAS_NONE
    if has_bias:
        bshape = tuple(spec.bias_shape or bias.shape)
        _check("attn_bias", bias, bshape, dtype)
        Bb, Hb, Nqb, _ = bshape
        mode = DBIAS_ROWSUM if Nqb == 1 else DBIAS_ROWS
        Hi = H if Hb == H else Hkv
        dbi = cuda.device_array((B, Hi, Nqb, Nk), dtype=dtype)
        zero4 = make_zero4(dtype)
        if mode == DBIAS_ROWS:  # DBIAS_ROWSUM writes every element
            blocks, threads = _grid1(dbi.size)
            zero4[blocks, threads](dbi)
    meta = _meta(spec)
    shapes = kernel_shapes(spec, dtype.itemsize)
    args = _scalars(spec, dtype)
    has_dropout = spec.dropout > 0
    bias_arr = bias if has_bias else _dummy(dtype)

    if B * H * Nq > 0:
        delta = cuda.device_array((B, H, Nq), dtype=dtype)
        blocks, threads = _grid1(B * H * Nq)
        make_preprocess(dtype)[blocks, threads](out, dout, delta)
    else:
        delta = cuda.device_array((B, H, max(Nq, 1)), dtype=dtype)

    kv = shapes["dkdv"]
    if B * Hkv * Nk > 0:
        kernel = make_dkdv(kv, dtype, has_bias, has_dropout, mode)
        kernel[(-(-Nk // kv.R), B * Hkv), (kv.TX, kv.TY)](
            q, k, v, bias_arr, dout, lse, delta, dk, dv, dbi if has_bias else _dummy(dtype),
            meta["q_pos"], meta["k_pos_b"], meta["tile_types"], *args)

    qs = shapes["dq"]
    if B * H * Nq > 0:
        kernel = make_dq(qs, dtype, has_bias, has_dropout)
        kernel[(-(-Nq // qs.R), B * H), (qs.TX, qs.TY)](
            q, k, v, bias_arr, dout, lse, delta, dq, meta["q_pos"], meta["k_pos_b"], meta["tile_types"], *args)

    if has_bias:
        if (Bb, Hb) == (B, Hi):
            dbias = dbi
        else:
            dbias = cuda.device_array(bshape, dtype=dtype)
            blocks, threads = _grid1(dbias.size)
            make_dbias_reduce(dtype)[blocks, threads](dbi, dbias)
    return dq, dk, dv, dbias
