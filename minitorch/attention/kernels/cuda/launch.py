"""The CUDA engine's plumbing: a spec becomes kernel tiles, :class:`~.tiles.Flags` and a :class:`~.tiles.Config`,
and the launches of :mod:`.forward` and :mod:`.backward`; plus the array helpers of the caches.

```
forward(q, k, v, bias, spec) -> (out, lse)
backward(q, k, v, bias, out, lse, dout, spec, dlse=None) -> (dq, dk, dv, dbias)
```
``q, out, dout, dq``: ``(B, H, Nq, D)``; ``k, v, dk, dv``: ``(B, Hkv, Nk, D)``; ``lse, dlse``: ``(B, H, Nq)``;
``bias, dbias``: ``(Bb, Hb, Nqb, Nk)`` or ``None``. Device arrays of q's dtype (float32 or float64). Nothing of q,
k, v, out or the gradients goes through the host; the small metadata of a spec (positions, tile types, a key list
given as host arrays) is copied to the device once per spec and kept as long as the spec lives, so that backward
reuses forward's copies.

Tiles: the spec's ``(block_q, block_k)``. A kernel whose shared memory would exceed 48 KB at those sizes (the
backward kernels at D >= 64, float64, large D) runs sub-tiles: the tile is halved until it fits, and every sub-tile
takes the type of the spec's tile that contains it (:func:`fit_shape`). Tiles longer than the sequence are halved
too (decoding with Nq = 1 does not run 64-row tiles). At the default tiles on a GPU (:func:`smem_report`; threads
and register tiles from :func:`~.tiles.thread_grid`), float32:

    D = 64  (64 x 32):  forward 64x32  48896 B | dQ 32x32  46464 B | dK/dV 32 keys x 32 queries  46464 B
    D = 128 (32 x 32):  forward 32x32  41088 B | dQ 16x16  37312 B | dK/dV 16 keys x 16 queries  37312 B
    (forward D = 64: 16 x 8 threads of 4 x 4; D = 128: one K/V buffer, 8 x 8 threads of 4 x 4)
    decode, one query row, D = 64: split layout, 128 threads (32 groups x 4 lanes over d); 128-slot tiles (a ring
    cache's): one K/V buffer, 46264 B; 32-key tiles (a paged step at the default blocks): 26840 B

(the same numbers as ``ptxas -v`` reports for the sm_90 builds, :mod:`.ptx`).

Determinism: no float atomics anywhere; every sum runs in a fixed order.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
from numba import cuda

from ...mods import describe
from ...spec import AttentionSpec, check_backward
from ...tiling import TileOrder, default_block_sizes
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
    make_sinks_backward,
)
from .forward import (
    forward_smem_bytes,
    make_forward_k_major,
    make_forward_q_major,
    make_k_major_finish,
    make_k_major_init,
    make_merge,
)
from .memory import scratch, to_device_packed
from .tiles import (
    GPU_THREADS,
    MAX_THREADS,
    ROW_THREADS,
    SMEM_LIMIT,
    Config,
    Flags,
    TileShape,
    cached,
    grid1,
    numba_type,
)

DeviceArray = Any

_KERNELS: Dict[Tuple[Any, ...], Any] = {}
_DUMMY: Dict[Tuple[str, int], DeviceArray] = {}
_MEMO: "weakref.WeakKeyDictionary[AttentionSpec, Dict[Any, Any]]" = weakref.WeakKeyDictionary()
"""What the launchers derive from a spec (device copies of its metadata, kernel tiles), per spec object."""


# ---------------------------------------------------------------------------------------------------------------------
# Kernel tiles
# ---------------------------------------------------------------------------------------------------------------------


def fit_shape(
    rows: int, cols: int, n_rows: int, n_cols: int, D: int, itemsize: int, smem: Callable[[TileShape, int], int],
    max_threads: Tuple[int, int] = MAX_THREADS, accs: int = 1, split: bool = False,
) -> TileShape:
    """The kernel tile for a spec tile of ``rows x cols``: halve it while it is longer than the sequence (``n_rows``,
    ``n_cols``) or its shared memory exceeds :data:`SMEM_LIMIT` (with the forward's ``K_j`` and ``V_j`` in two
    buffers, else in one). Halving keeps every kernel tile inside one spec tile. ``split``: a tile of one row gets
    the split layout (the Q-major forward, :class:`~.tiles.TileShape`). Raises ``ValueError`` if no sub-tile fits
    (head dim too large)."""
    while rows % 2 == 0 and rows // 2 >= max(n_rows, 1):
        rows //= 2
    while cols % 2 == 0 and cols // 2 >= max(n_cols, 1):
        cols //= 2
    while True:
        for one_kv in (False, True):
            shape = TileShape.make(rows, cols, D, max_threads, accs, one_kv, split)
            if smem(shape, itemsize) <= SMEM_LIMIT:
                return shape
        if rows % 2 == 0 and (rows >= cols or cols % 2 != 0):
            rows //= 2
        elif cols % 2 == 0:
            cols //= 2
        else:
            raise ValueError(
                f"CUDA attention: head_dim={D} ({itemsize}-byte floats) does not fit {SMEM_LIMIT} bytes of shared "
                f"memory with any sub-tile of block sizes dividing ({rows}, {cols}); pass smaller block_q/block_k"
            )


def _key_entries(spec: AttentionSpec) -> int:
    """Length of the longest key sequence a kernel walks: ``Nk``, or a key list's capacity."""
    return int(spec.keys.kidx.shape[2]) if spec.keys is not None else spec.Nk


def kernel_shapes(spec: AttentionSpec, itemsize: int) -> Dict[str, TileShape]:
    """The kernel tiles of this spec: ``forward`` and ``dq`` (queries x keys), ``dkdv`` (keys x queries). The
    forward of one query row (decoding) runs the split layout in the Q-major order (the K-major order keeps one
    state per row in global memory, so it runs the plain layout)."""
    memo = _MEMO.setdefault(spec, {})
    key = ("shapes", itemsize)
    if key not in memo:
        bq, bk, D, n = spec.block_q, spec.block_k, spec.D, _key_entries(spec)
        q_major = TileOrder(spec.order) == TileOrder.Q_MAJOR
        memo[key] = {
            "forward": fit_shape(bq, bk, spec.Nq, n, D, itemsize, forward_smem_bytes, split=q_major),
            "dq": fit_shape(bq, bk, spec.Nq, n, D, itemsize, dq_smem_bytes),
            "dkdv": fit_shape(bk, bq, n, spec.Nq, D, itemsize, dkdv_smem_bytes, accs=2),
        }
    return memo[key]


def smem_report(D: int, dtype: Any = np.float32, block_q: Optional[int] = None, block_k: Optional[int] = None,
                N: int = 4096, max_threads: Tuple[int, int] = GPU_THREADS) -> Dict[str, Tuple[Tuple[int, int], int]]:
    """Kernel name -> ((rows, cols) of the kernel tile, shared-memory bytes) at the default CUDA tiles for ``D``,
    for the thread grid of a real GPU (``max_threads``; the simulator uses smaller blocks)."""
    dq, dk = default_block_sizes(D, "cuda")
    bq, bk = block_q or dq, block_k or dk
    size = np.dtype(dtype).itemsize
    out = {}
    for name, (r, c, fn) in {"forward": (bq, bk, forward_smem_bytes), "dq": (bq, bk, dq_smem_bytes),
                             "dkdv": (bk, bq, dkdv_smem_bytes)}.items():
        s = fit_shape(r, c, N, N, D, size, fn, max_threads, accs=2 if name == "dkdv" else 1)
        out[name] = ((s.R, s.C), fn(s, size))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# A spec as Flags and a Config
# ---------------------------------------------------------------------------------------------------------------------


def _dummy(dtype: Any, ndim: int) -> DeviceArray:
    """A ``(1,) * ndim`` device array standing in for an absent feature's array (never read)."""
    key = (np.dtype(dtype).name, ndim)
    if key not in _DUMMY:
        _DUMMY[key] = cuda.to_device(np.zeros((1,) * ndim, dtype=dtype))
    return _DUMMY[key]


def _is_device(x: Any) -> bool:
    return hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray)


def on_device(x: Any, dtype: Any) -> DeviceArray:
    """``x`` as a device array of ``dtype`` (no copy for a device array, which must already have it)."""
    if _is_device(x):
        if np.dtype(x.dtype) != np.dtype(dtype):
            raise TypeError(f"CUDA attention: a device array of dtype {np.dtype(x.dtype)} where {np.dtype(dtype)} is "
                            f"needed")
        return x
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


def _all_on_device(arrays: Dict[str, Tuple[Any, Any]]) -> Dict[str, DeviceArray]:
    """``name -> (array, dtype)`` on the device: device arrays as they are, the host ones in one copy."""
    out = {name: on_device(a, dt) for name, (a, dt) in arrays.items() if _is_device(a)}
    host = {name: a_dt for name, a_dt in arrays.items() if not _is_device(a_dt[0])}
    if host:
        out.update(to_device_packed(host))
    return out


def _metadata(spec: AttentionSpec) -> Dict[str, Any]:
    """Positions, tile types and the key list / block table / top-k thresholds of a spec on the device, copied once
    per spec, in one host-to-device copy (a decode step builds a new spec each token)."""
    memo = _MEMO.setdefault(spec, {})
    if "meta" not in memo:
        i64 = np.int64
        arrays = {"q_pos_b": (spec.q_pos_b, i64), "k_pos_b": (spec.k_pos_b, i64),
                  "tile_types": (spec.kernel_tiles(), np.int8)}
        if spec.keys is not None:
            arrays.update(kidx=(spec.keys.kidx, i64), counts=(spec.keys.counts, i64))
        if spec.pages is not None:
            arrays.update(block_table=(spec.pages.block_table, i64), lengths=(spec.pages.lengths, i64))
        if spec.topk is not None:
            arrays["thr_idx"] = (spec.topk.thr_idx, i64)
        if spec.q_seg is not None:
            arrays.update(q_seg=(spec.q_seg, i64), k_seg=(spec.k_seg, i64))
        if spec.block_mask is not None:
            bm = spec.block_mask  # (the bits' shape gives the block mask's tiles: at least one slot)
            arrays.update(bm_index=(bm.index, np.int32),
                          bm_bits=(bm.bits if bm.bits.size else np.zeros((1, bm.block_q, bm.block_k)), np.uint8))
        meta = _all_on_device(arrays)
        if spec.topk is not None:
            meta["thr_val"] = spec.topk.thr_val  # converted with the kernel's dtype in _config
        memo["meta"] = meta
    return memo["meta"]


def device_positions(spec: AttentionSpec) -> DeviceArray:
    """``spec.k_pos_b`` on the device (memoized with the spec)."""
    return _metadata(spec)["k_pos_b"]


def spec_flags(spec: AttentionSpec, has_bias: bool) -> Flags:
    """The compile-time :class:`Flags` of a spec's kernels (``has_bias``: a bias is passed)."""
    return Flags(has_bias, spec.keys is not None, spec.pages is not None, spec.topk is not None, spec.dropout > 0,
                 spec.q_seg is not None, spec.block_mask is not None, spec.sinks is not None, spec.softcap > 0,
                 spec.alibi is not None, spec.score_mod)


def make_config(spec: AttentionSpec, bias: Optional[DeviceArray], dtype: np.dtype) -> Tuple[Flags, Config, DeviceArray]:
    """The spec as compile-time :class:`Flags`, a run-time :class:`Config` (typed: no float64 or mixed
    signed/unsigned arithmetic in a float32 kernel), and the kernels' tile types ``(B, 1 or Hkv, Tr, Tc)``.

    Everything but the bias is built once per (spec, dtype): a call that reuses its spec (backward after forward,
    a decode step of a cached spec) copies nothing to the device."""
    has_bias = bias is not None
    if spec.topk is not None and not has_bias:
        raise ValueError("CUDA attention: a top-k keep rule needs its importance as the bias (B, Hkv, 1, Nk)")
    cfg = _config(spec, dtype)
    if has_bias:
        cfg = cfg._replace(bias=bias)
    return spec_flags(spec, has_bias), cfg, _metadata(spec)["tile_types"]


def _config(spec: AttentionSpec, dtype: np.dtype) -> Config:
    """The :class:`Config` of a spec's kernels in ``dtype``, with a dummy bias (built once per spec and dtype; its
    float arrays, the top-k thresholds, sinks and ALiBi slopes, in one copy)."""
    memo = _MEMO.setdefault(spec, {})
    key = ("config", dtype.name)
    if key not in memo:
        memo[key] = _build_config(spec, dtype)
    return memo[key]


def _build_config(spec: AttentionSpec, dtype: np.dtype) -> Config:
    meta = _metadata(spec)
    ft = dtype.type
    has_list, has_topk, has_pages = spec.keys is not None, spec.topk is not None, spec.pages is not None
    has_seg, has_bm = spec.q_seg is not None, spec.block_mask is not None
    floats = {name: (a, dtype) for name, a in (("thr_val", meta.get("thr_val")), ("sinks", spec.sinks),
                                               ("alibi", spec.alibi)) if a is not None}
    floats = _all_on_device(floats)
    return Config(
        meta["q_pos_b"], meta["k_pos_b"], bool(spec.causal), np.int64(spec.window), np.int64(spec.num_sinks),
        _dummy(dtype, 4),
        meta["kidx"] if has_list else _dummy(np.int64, 3), meta["counts"] if has_list else _dummy(np.int64, 2),
        meta["block_table"] if has_pages else _dummy(np.int64, 2),
        np.int64(spec.pages.page_size if has_pages else 1), meta["lengths"] if has_pages else _dummy(np.int64, 1),
        floats["thr_val"] if has_topk else _dummy(dtype, 3),
        meta["thr_idx"] if has_topk else _dummy(np.int64, 3),
        np.uint64(spec.seed), np.uint64(spec.drop_threshold), ft(1.0 / (1.0 - spec.dropout)), ft(spec.scale),
        meta["q_seg"] if has_seg else _dummy(np.int64, 2), meta["k_seg"] if has_seg else _dummy(np.int64, 2),
        meta["bm_index"] if has_bm else _dummy(np.int32, 4), meta["bm_bits"] if has_bm else _dummy(np.uint8, 3),
        floats["sinks"] if spec.sinks is not None else _dummy(dtype, 1),
        floats["alibi"] if spec.alibi is not None else _dummy(dtype, 1), ft(spec.softcap),
    )


def _check(name: str, arr: DeviceArray, shape: Tuple[int, ...], dtype: np.dtype) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"CUDA attention: {name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")
    if np.dtype(arr.dtype) != dtype:
        raise TypeError(f"CUDA attention: {name} must have dtype {dtype}, got {np.dtype(arr.dtype)}")


def _inputs(q: Any, k: Any, v: Any, bias: Any, spec: AttentionSpec) -> Tuple[Any, ...]:
    """q, k, v (and the bias, in its 4-D shape) as checked device arrays; their dtype."""
    dtype = np.dtype(q.dtype)
    numba_type(dtype)  # float32 or float64, else a TypeError naming the dtype
    B, H, Hkv, Nq, Nk, D = spec.B, spec.H, spec.Hkv, spec.Nq, spec.Nk, spec.D
    q, k, v = (on_device(x, dtype) for x in (q, k, v))
    _check("q", q, (B, H, Nq, D), dtype)
    if spec.pages is not None:  # the page pools (num_pages, Hkv, page_size, D)
        _check("k", k, (k.shape[0], Hkv, spec.pages.page_size, D), dtype)
        _check("v", v, tuple(k.shape), dtype)
    else:
        _check("k", k, (B, Hkv, Nk, D), dtype)
        _check("v", v, (B, Hkv, Nk, D), dtype)
    if bias is not None:
        shape = spec.bias_shape if spec.bias_shape is not None else tuple(bias.shape)
        bias = on_device(bias, dtype)
        if bias.size != int(np.prod(shape)):
            raise ValueError(f"CUDA attention: attn_bias must have shape {tuple(shape)}, got {tuple(bias.shape)}")
        bias = bias.reshape(tuple(shape))
        _check("attn_bias", bias, shape, dtype)
    return q, k, v, bias, dtype


# ---------------------------------------------------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------------------------------------------------


@contextmanager
def _user_functions(spec: AttentionSpec) -> Iterator[None]:
    """A user's ``score_mod`` is compiled into the kernels at their first launch (on a GPU) or run in them (the
    simulator): if that fails, a ``TypeError`` that names the function, not an error from deep in a kernel."""
    if spec.score_mod is None:
        yield
        return
    try:
        yield
    except Exception as e:  # the user's code: a Numba typing error on a GPU, any Python error in the simulator
        mod = spec.score_mod
        names = f"score_mod {describe(mod.fn)}" + (f" (or score_mod_grad {describe(mod.grad)})" if mod.grad else "")
        first = str(e).splitlines()[0] if str(e) else ""
        raise TypeError(f"{names} failed in the CUDA kernels: {type(e).__name__}: {first}") from e


def forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, bias: Optional[DeviceArray],
            spec: AttentionSpec) -> Tuple[DeviceArray, DeviceArray]:
    """Flash attention forward on the GPU (:func:`_forward`); a user's ``score_mod`` that fails names itself."""
    with _user_functions(spec):
        return _forward(q, k, v, bias, spec)


def backward(q: DeviceArray, k: DeviceArray, v: DeviceArray, bias: Optional[DeviceArray], out: DeviceArray,
             lse: DeviceArray, dout: DeviceArray, spec: AttentionSpec, dlse: Optional[DeviceArray] = None
             ) -> Tuple[DeviceArray, DeviceArray, DeviceArray, Optional[DeviceArray]]:
    """Flash attention backward on the GPU (:func:`_backward`); a user's ``score_mod`` that fails names itself."""
    with _user_functions(spec):
        return _backward(q, k, v, bias, out, lse, dout, spec, dlse)


def _forward(q: DeviceArray, k: DeviceArray, v: DeviceArray, bias: Optional[DeviceArray],
             spec: AttentionSpec) -> Tuple[DeviceArray, DeviceArray]:
    """Flash attention forward on the GPU: ``(out (B, H, Nq, D), lse (B, H, Nq))``.

    ``spec.order`` picks Q-major (FlashAttention-2; with ``spec.num_splits > 1`` split-K, merged by lse) or K-major
    (FlashAttention-1: one launch per key tile, in order). Allocates ``out`` and ``lse`` (returned); the split-K
    partials and K-major's running ``m, l`` are scratch (:mod:`.memory`), reused by the next call."""
    q, k, v, bias, dtype = _inputs(q, k, v, bias, spec)
    B, H, Nq, D = spec.B, spec.H, spec.Nq, spec.D
    if B * H * Nq == 0:
        return cuda.device_array((B, H, Nq, D), dtype=dtype), cuda.device_array((B, H, Nq), dtype=dtype)
    flags, cfg, tiles = make_config(spec, bias, dtype)
    shape = kernel_shapes(spec, dtype.itemsize)["forward"]
    blocks = (np.int64(spec.block_q), np.int64(spec.block_k))
    Tr = -(-Nq // shape.R)
    threads = (shape.LX, shape.TY)
    if TileOrder(spec.order) == TileOrder.K_MAJOR:
        out = cuda.device_array((B, H, Nq, D), dtype=dtype)
        lse = cuda.device_array((B, H, Nq), dtype=dtype)
        m_buf = scratch("m_buf", (B, H, Nq), dtype)
        l_buf = scratch("l_buf", (B, H, Nq), dtype)
        rows = grid1(B * H * Nq)
        make_k_major_init(dtype)[rows](out, m_buf, l_buf, cfg.sinks, flags.has_sinks)
        kernel = make_forward_k_major(shape, dtype, flags)
        for tk in range(-(-_key_entries(spec) // shape.C)):  # FA1's outer loop over key tiles: launches in order
            kernel[(Tr, B * H), threads](q, k, v, out, m_buf, l_buf, tiles, *blocks, np.int64(tk), cfg)
        make_k_major_finish(dtype)[rows](lse, m_buf, l_buf)
        return out, lse
    S = spec.num_splits
    out = cuda.device_array((B, H, Nq, D), dtype=dtype)
    lse = cuda.device_array((B, H, Nq), dtype=dtype)
    if S == 1:  # the kernel writes the outputs themselves
        out_p, lse_p = out.reshape((B, H, 1, Nq, D)), lse.reshape((B, H, 1, Nq))
    else:  # partials of the S splits: scratch, merged into the outputs
        out_p, lse_p = scratch("out_p", (B, H, S, Nq, D), dtype), scratch("lse_p", (B, H, S, Nq), dtype)
    make_forward_q_major(shape, dtype, flags)[(Tr * S, B * H), threads](q, k, v, out_p, lse_p, tiles, *blocks,
                                                                        np.int64(S), cfg)
    if S > 1:
        make_merge(dtype)[grid1(B * H * Nq * D)](out_p, lse_p, out, lse)
    return out, lse


def _backward(q: DeviceArray, k: DeviceArray, v: DeviceArray, bias: Optional[DeviceArray], out: DeviceArray,
              lse: DeviceArray, dout: DeviceArray, spec: AttentionSpec, dlse: Optional[DeviceArray] = None
              ) -> Tuple[DeviceArray, DeviceArray, DeviceArray, Optional[DeviceArray]]:
    """Flash attention backward on the GPU: ``(dq, dk, dv, dbias)`` (``dbias`` None without a bias).

    Preprocess (``delta = rowsum(dO O) - dlse``), the dQ kernel (which also refines delta by the row sums of dS),
    then the dK/dV kernel (with dBias, written at the key rows of the key source); deterministic. Allocates what it
    returns; ``delta`` and a bias gradient before its reduction are scratch (:mod:`.memory`).
    """
    check_backward(spec)
    q, k, v, bias, dtype = _inputs(q, k, v, bias, spec)
    B, H, Hkv, Nq, Nk, D = spec.B, spec.H, spec.Hkv, spec.Nq, spec.Nk, spec.D
    out, dout, lse = (on_device(x, dtype) for x in (out, dout, lse))
    _check("out", out, (B, H, Nq, D), dtype)
    _check("dout", dout, (B, H, Nq, D), dtype)
    _check("lse", lse, (B, H, Nq), dtype)
    has_dlse = dlse is not None
    if has_dlse:
        dlse = on_device(dlse, dtype)
        _check("dlse", dlse, (B, H, Nq), dtype)
    else:
        dlse = _dummy(dtype, 3)
    flags, cfg, tiles = make_config(spec, bias, dtype)
    shapes = kernel_shapes(spec, dtype.itemsize)
    blocks = (np.int64(spec.block_q), np.int64(spec.block_k))

    # dK, dV, dBias buffers; a key list leaves the keys in no list untouched: their gradients are 0
    zero_kv = flags.has_list or Nq == 0
    dk = zeros((B, Hkv, Nk, D), dtype) if zero_kv else cuda.device_array((B, Hkv, Nk, D), dtype=dtype)
    dv = zeros((B, Hkv, Nk, D), dtype) if zero_kv else cuda.device_array((B, Hkv, Nk, D), dtype=dtype)
    mode, dbi = DBIAS_NONE, _dummy(dtype, 4)
    if bias is not None:
        Bb, Hb, Nqb, _ = bias.shape
        mode = DBIAS_ROWSUM if Nqb == 1 else DBIAS_ROWS
        dbi_shape = (B, H if Hb == H else Hkv, Nqb, Nk)  # per query head, or summed over each group
        returned = tuple(bias.shape) == dbi_shape  # else summed into dbias below: scratch
        dbi = cuda.device_array(dbi_shape, dtype=dtype) if returned else scratch("dbias", dbi_shape, dtype)
        if mode == DBIAS_ROWS or zero_kv:
            fill_zero(dbi)

    dq = cuda.device_array((B, H, Nq, D), dtype=dtype)
    delta_kv = scratch("delta_kv", (B, H, Nq), dtype)
    delta = scratch("delta", (B, H, Nq), dtype)
    if B * H * Nq > 0:
        make_preprocess(dtype)[grid1(B * H * Nq)](out, dout, dlse, has_dlse, delta)
        sq = shapes["dq"]
        make_dq(sq, dtype, flags)[(-(-Nq // sq.R), B * H), (sq.LX, sq.TY)](
            q, k, v, dout, lse, delta, dlse, has_dlse, dq, delta_kv, tiles, *blocks, cfg)
    sk = shapes["dkdv"]
    if B * Hkv * Nk > 0 and Nq > 0:
        make_dkdv(sk, dtype, flags, mode)[(-(-_key_entries(spec) // sk.R), B * Hkv), (sk.LX, sk.TY)](
            q, k, v, dout, lse, delta_kv if spec.rows_complete else delta, dk, dv, dbi, tiles, *blocks, cfg)

    dbias = None
    if bias is not None:
        if tuple(bias.shape) == tuple(dbi.shape):
            dbias = dbi
        else:
            dbias = cuda.device_array(tuple(bias.shape), dtype=dtype)
            if dbias.size > 0:
                make_dbias_reduce(dtype)[grid1(dbias.size)](dbi, dbias)
    return dq, dk, dv, dbias


def sinks_backward(out: DeviceArray, lse: DeviceArray, dout: Optional[DeviceArray], dlse: Optional[DeviceArray],
                   spec: AttentionSpec) -> DeviceArray:
    """The gradient of the learnable sinks ``(H,)`` on the device (:func:`.backward.make_sinks_backward`)."""
    dtype = np.dtype(out.dtype)
    dsinks = cuda.device_array((spec.H,), dtype=dtype)
    dout_ = on_device(dout, dtype) if dout is not None else fill_zero(scratch("dout", tuple(out.shape), dtype))
    dlse_ = on_device(dlse, dtype) if dlse is not None else _dummy(dtype, 3)
    if spec.H > 0:  # (the sinks on the device: the forward's copy)
        make_sinks_backward(dtype)[grid1(spec.H)](out, dout_, lse, dlse_, dlse is not None,
                                                  _config(spec, dtype).sinks, dsinks)
    return dsinks


def decode_splits(n_tiles: int) -> int:
    """Split-K parts of a single-query decode over ``n_tiles`` key tiles: one per tile (FlashDecoding), so that a
    GPU has ``B * H * n_tiles`` blocks to run instead of ``B * H``."""
    return max(1, int(n_tiles))


# ---------------------------------------------------------------------------------------------------------------------
# Arrays: zeros and row copies (the caches' slot writes)
# ---------------------------------------------------------------------------------------------------------------------


def _fill_kernel(dtype: Any) -> Any:
    """``kernel(a, x)``: ``a[n] = x`` for a 1-D array, one thread per element."""

    def build() -> Any:
        def fill(a, x):  # type: ignore[no-untyped-def]
            n = cuda.grid(1)
            if n < a.shape[0]:
                a[n] = x

        return cuda.jit(fill)

    return cached(_KERNELS, ("fill", np.dtype(dtype).name), build)


def fill(a: DeviceArray, x: Any) -> DeviceArray:
    """``a[...] = x`` on the device (a contiguous device array); returns ``a``."""
    dtype = np.dtype(a.dtype)
    if a.size > 0:
        _fill_kernel(dtype)[grid1(a.size)](a.reshape(a.size), dtype.type(x))
    return a


def fill_zero(a: DeviceArray) -> DeviceArray:
    """``a[...] = 0`` on the device (a contiguous device array); returns ``a``."""
    return fill(a, 0)


def zeros(shape: Tuple[int, ...], dtype: Any) -> DeviceArray:
    """A zero-filled device array (filled on the device: nothing crosses from the host)."""
    return fill_zero(cuda.device_array(tuple(int(s) for s in shape), dtype=np.dtype(dtype)))


def _copy_range_kernel(dtype: Any) -> Any:
    """``kernel(dst, src, d0, s0, n)``: ``dst[b, h, d0 + r, d] = src[b, h, s0 + r, d]`` for ``r < n``, one thread
    per element (a run of rows: its bounds are scalars, nothing to copy to the device first)."""

    def build() -> Any:
        def copy_range(dst, src, d0, s0, n):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            B, H, _, D = dst.shape
            if idx < B * H * n * D:
                d = idx % D
                r = (idx // D) % n
                h = (idx // (D * n)) % H
                b = idx // (D * n * H)
                dst[b, h, d0 + r, d] = src[b, h, s0 + r, d]

        return cuda.jit(copy_range)

    return cached(_KERNELS, ("copy_range", np.dtype(dtype).name), build)


MAX_RUNS = 4
"""Most runs of consecutive rows :func:`write_rows` copies with one launch each (more: one index-list kernel)."""


def row_runs(dst_rows: np.ndarray, src_rows: np.ndarray) -> np.ndarray:
    """``(dst_start, src_start, length)`` of each maximal run in which both row lists go up by one, in order."""
    dst_rows, src_rows = np.asarray(dst_rows, np.int64), np.asarray(src_rows, np.int64)
    if len(dst_rows) == 0:
        return np.zeros((0, 3), np.int64)
    cut = np.nonzero((np.diff(dst_rows) != 1) | (np.diff(src_rows) != 1))[0] + 1
    starts = np.concatenate([[0], cut])
    lengths = np.diff(np.concatenate([starts, [len(dst_rows)]]))
    return np.stack([dst_rows[starts], src_rows[starts], lengths], axis=1)


def _copy_rows_kernel(dtype: Any) -> Any:
    """``kernel(dst, src, dst_rows, src_rows)``: ``dst[b, h, dst_rows[n], d] = src[b, h, src_rows[n], d]``, one
    thread per element."""

    def build() -> Any:
        def copy_rows(dst, src, dst_rows, src_rows):  # type: ignore[no-untyped-def]
            idx = cuda.grid(1)
            B, H, _, D = dst.shape
            N = dst_rows.shape[0]
            if idx < B * H * N * D:
                d = idx % D
                n = (idx // D) % N
                h = (idx // (D * N)) % H
                b = idx // (D * N * H)
                dst[b, h, dst_rows[n], d] = src[b, h, src_rows[n], d]

        return cuda.jit(copy_rows)

    return cached(_KERNELS, ("copy_rows", np.dtype(dtype).name), build)


def write_rows(dst: DeviceArray, src: Any, dst_rows: np.ndarray, src_rows: np.ndarray) -> None:
    """``dst[:, :, dst_rows[n]] = src[:, :, src_rows[n]]`` for 4-D ``(B, H, N, D)`` device arrays, in place.

    The caches write runs of consecutive rows (a ring cache's append: one run, two where it wraps around; a page:
    one): up to :data:`MAX_RUNS` runs are copied with their bounds as kernel arguments, so an append copies nothing
    from the host but its keys and values; other row lists go to the device in one copy."""
    dtype = np.dtype(dst.dtype)
    src = on_device(src, dtype)
    n = int(dst.shape[0] * dst.shape[1] * len(dst_rows) * dst.shape[3])
    if n == 0:
        return
    runs = row_runs(dst_rows, src_rows)
    if len(runs) <= MAX_RUNS:
        B, H, _, D = dst.shape
        for d0, s0, length in runs:
            _copy_range_kernel(dtype)[grid1(int(B * H * length * D))](dst, src, np.int64(d0), np.int64(s0),
                                                                       np.int64(length))
        return
    rows = to_device_packed({"dst": (dst_rows, np.int64), "src": (src_rows, np.int64)})
    _copy_rows_kernel(dtype)[grid1(n)](dst, src, rows["dst"], rows["src"])


def take_rows(src: DeviceArray, rows: np.ndarray) -> DeviceArray:
    """``src[:, :, rows]`` as a new device array."""
    B, H, _, D = src.shape
    dst = cuda.device_array((B, H, len(rows), D), dtype=src.dtype)
    write_rows(dst, src, np.arange(len(rows), dtype=np.int64), rows)
    return dst
