"""The CUDA attention engine (minitorch/attention/kernels/cuda) against the float64 NumPy reference.

In CI these run in Numba's CUDA simulator (tests/conftest.py), which runs one Python thread per CUDA thread: sizes
are tiny (N <= 64, D <= 16, tiles <= 16, at most 2 heads, B <= 2) and every case checks forward and backward at
once. The ``gpu`` test at the end runs realistic shapes and is skipped unless a real GPU is present
(``MINITORCH_REAL_CUDA=1``). Everything the engine is configured for is tested here: both tile orders, split-K,
GQA, every bias shape, dropout, padding, positions with empty slots, the lse gradient, Dynamic Mask Attention (its
selection kernels and the whole call on CudaBackend), ring-cache decoding, the NaN contract, and a check that every
kernel lowers for a real GPU (sm_90) with no float64 arithmetic in float32 kernels.

Tolerances follow FlashAttention's rule for float32: the kernel's error against the float64 truth is at most
3x the error of standard attention computed in float32, plus a small floor. float64 must match tightly.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterator, Optional, Tuple

import numba
import numpy as np
import pytest
from numba import cuda

from minitorch.attention.dropout import dropout_mask
from minitorch.attention.kernels.cuda import launch as ops
from minitorch.attention.kernels.cuda.backward import dq_smem_bytes
from minitorch.attention.kernels.cuda.forward import forward_smem_bytes
from minitorch.attention.kernels.cuda.tiles import GPU_THREADS, SMEM_LIMIT, TileShape
from minitorch.attention.reference import (
    attention_probs,
    naive_attention_float32,
    reference_attention,
    reference_attention_backward,
    reference_mask,
)
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import TileOrder, TileType, default_block_sizes
from minitorch.cuda_ops import CudaBackend

ENGINE = CudaBackend.attention

pytestmark = [pytest.mark.cuda, pytest.mark.task5_4]

SPEC_KEYS = ("causal", "scale", "window", "key_padding_mask", "dropout", "seed", "q_positions", "k_positions",
             "block_q", "block_k", "order", "num_sinks", "num_splits")
REF_KEYS = ("causal", "scale", "window", "key_padding_mask", "attn_bias", "dropout", "seed", "q_positions",
            "k_positions", "num_sinks")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(B: int, H: int, Hkv: int, Nq: int, Nk: int, D: int, dtype: Any, seed: int = 0,
                bias_shape: Optional[Tuple[int, ...]] = None) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)
    out = {
        "q": rng.standard_normal((B, H, Nq, D)).astype(dtype),
        "k": rng.standard_normal((B, Hkv, Nk, D)).astype(dtype),
        "v": rng.standard_normal((B, Hkv, Nk, D)).astype(dtype),
        "dout": rng.standard_normal((B, H, Nq, D)).astype(dtype),
        "bias": None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype),
    }
    return out


def cuda_spec(x: Dict[str, Any], **opts: Any) -> Any:
    """The spec of a call on ``x`` with the CUDA engine's default tiles."""
    bias = x["bias"]
    return make_spec(x["q"].shape, x["k"].shape, x["v"].shape, bias_shape=None if bias is None else bias.shape,
                     default_blocks=ENGINE.default_blocks(x["q"].shape[3]),
                     **{k: opts[k] for k in SPEC_KEYS if k in opts})


def run_cuda(x: Dict[str, Any], backward: bool = True, dlse: Optional[np.ndarray] = None,
             **opts: Any) -> Dict[str, Any]:
    """Forward (and backward) through the engine, device arrays in and out; results back as NumPy."""
    bias = x["bias"]
    spec = cuda_spec(x, **opts)
    dq_, dk_, dv_ = (cuda.to_device(x[n]) for n in ("q", "k", "v"))
    db_ = None if bias is None else cuda.to_device(bias)
    out, lse = ENGINE.forward(dq_, dk_, dv_, db_, spec)
    res = {"spec": spec, "out": out.copy_to_host(), "lse": lse.copy_to_host()}
    if backward:
        g = ENGINE.backward(dq_, dk_, dv_, db_, out, lse, cuda.to_device(x["dout"]), spec,
                            None if dlse is None else cuda.to_device(dlse))
        res.update(dq=g[0].copy_to_host(), dk=g[1].copy_to_host(), dv=g[2].copy_to_host(),
                   dbias=None if g[3] is None else g[3].copy_to_host())
    return res


def _expand(x: np.ndarray, H: int) -> np.ndarray:
    return np.repeat(x, H // x.shape[1], axis=1)


def naive_backward_float32(x: Dict[str, Any], **opts: Any) -> Tuple[np.ndarray, ...]:
    """Standard attention backward computed entirely in float32 (the error baseline for the gradients)."""
    f = np.float32
    q, k, v, do = (np.asarray(x[n], dtype=f) for n in ("q", "k", "v", "dout"))
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = f(1.0 / math.sqrt(D) if opts.get("scale") is None else opts["scale"])
    ke, ve = _expand(k, H), _expand(v, H)
    mask = reference_mask(B, Nq, Nk, opts.get("causal", False), opts.get("window"), opts.get("q_positions"),
                          opts.get("k_positions"), opts.get("key_padding_mask"), opts.get("num_sinks", 0))[:, None]
    s = scale * (q @ np.swapaxes(ke, -1, -2))
    bias = x["bias"]
    if bias is not None:
        s = s + (_expand(bias.astype(f), H) if bias.shape[1] not in (1, H) else bias.astype(f))
    s = np.where(mask, s, f(-np.inf))
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, f(0))
    e = np.where(mask, np.exp(s - m), f(0))
    l = e.sum(-1, keepdims=True)
    p = np.where(l > 0, e / np.where(l > 0, l, f(1)), f(0))
    p_ = opts.get("dropout", 0.0)
    keep = (dropout_mask(opts.get("seed", 0), p.shape, p_) / f(1 - p_)).astype(f) if p_ > 0 else f(1)
    dv = np.swapaxes(p * keep, -1, -2) @ do
    dp = (do @ np.swapaxes(ve, -1, -2)) * keep
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = scale * (ds @ ke)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q)
    dk = dk.reshape(B, Hkv, H // Hkv, Nk, D).sum(2)
    dv = dv.reshape(B, Hkv, H // Hkv, Nk, D).sum(2)
    dbias = None
    if bias is not None:
        dbias = ds
        if bias.shape[1] not in (1, H):
            dbias = dbias.reshape(B, bias.shape[1], H // bias.shape[1], Nq, Nk).sum(2)
        for ax in range(4):
            if bias.shape[ax] == 1 and dbias.shape[ax] != 1:
                dbias = dbias.sum(ax, keepdims=True)
    return dq, dk, dv, dbias


def lse_gradient_reference(x: Dict[str, Any], dlse: np.ndarray, **opts: Any) -> Tuple[np.ndarray, ...]:
    """float64 gradients of ``sum(lse * dlse)``: ``d lse_i / d s_ij = P_ij``, so ``dS = P * dlse_i``."""
    ref_opts = {k: opts[k] for k in ("causal", "scale", "window", "key_padding_mask", "q_positions", "k_positions",
                                     "num_sinks") if k in opts}
    p, _, _ = attention_probs(x["q"], x["k"], attn_bias=x["bias"], **ref_opts)
    q, k = (np.asarray(x[n], dtype=np.float64) for n in ("q", "k"))
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if opts.get("scale") is None else opts["scale"]
    ds = p * dlse[..., None]
    dq = scale * np.einsum("bhij,bhjd->bhid", ds, _expand(k, H))
    dk = (scale * np.einsum("bhij,bhid->bhjd", ds, q)).reshape(B, Hkv, H // Hkv, Nk, D).sum(2)
    return dq, dk, np.zeros_like(dk)


def _err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    fin = np.isfinite(b)
    assert np.array_equal(np.isfinite(a), fin), "inf/NaN pattern differs from the reference"
    return float(np.max(np.abs(a[fin] - b[fin]), initial=0.0))


def check_against_reference(x: Dict[str, Any], res: Dict[str, Any], **opts: Any) -> None:
    """out, lse (and the gradients, when computed) vs the float64 reference, by FlashAttention's rule in float32."""
    ref_opts = {k: opts[k] for k in REF_KEYS if k in opts}
    ref_opts["attn_bias"] = x["bias"]
    ref_out, ref_lse = reference_attention(x["q"], x["k"], x["v"], **ref_opts)
    f64 = x["q"].dtype == np.float64
    for name, arr in res.items():
        if isinstance(arr, np.ndarray):
            assert not np.isnan(arr).any(), f"NaN in {name}"
            assert arr.dtype == x["q"].dtype, f"{name} has dtype {arr.dtype}"
    if f64:
        tol = {"out": 1e-10, "lse": 1e-10}
    else:
        naive = naive_attention_float32(x["q"], x["k"], x["v"], **ref_opts)
        floor = 2e-6
        tol = {"out": 3 * _err(naive, ref_out) + floor, "lse": 1e-5 * max(1.0, float(np.max(np.abs(ref_lse[np.isfinite(ref_lse)]), initial=1.0)))}
    assert _err(res["out"], ref_out) <= tol["out"], ("out", _err(res["out"], ref_out), tol["out"])
    assert _err(res["lse"], ref_lse) <= tol["lse"], ("lse", _err(res["lse"], ref_lse), tol["lse"])
    if "dq" not in res:
        return
    ref_g = reference_attention_backward(x["q"], x["k"], x["v"], x["dout"], **ref_opts)
    naive_g = None if f64 else naive_backward_float32(x, **opts)
    for i, name in enumerate(("dq", "dk", "dv", "dbias")):
        if ref_g[i] is None:
            assert res[name] is None
            continue
        assert res[name].shape == ref_g[i].shape, (name, res[name].shape, ref_g[i].shape)
        err = _err(res[name], ref_g[i])
        if f64:
            bound = 1e-10 * max(1.0, float(np.abs(ref_g[i]).max(initial=0.0)))
        else:
            bound = 3 * _err(naive_g[i], ref_g[i]) + 1e-5 * max(1.0, float(np.abs(ref_g[i]).max(initial=0.0)))
        assert err <= bound, (name, err, bound)


# ---------------------------------------------------------------------------------------------------------------------
# Geometry and shared memory (pure Python, instant)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernel_tiles_fit_shared_memory(D: int, dtype: Any) -> None:
    """Every kernel's tile fits 48 KB, divides the schedule tile, and gives each thread a 2-D register tile."""
    report = ops.smem_report(D, dtype)
    bq, bk = default_block_sizes(D, "cuda")
    for name, ((R, C), nbytes) in report.items():
        assert nbytes <= SMEM_LIMIT, (name, D, nbytes)
        rows, cols = (bk, bq) if name == "dkdv" else (bq, bk)
        assert rows % R == 0 and cols % C == 0, (name, R, C)
    shape = TileShape.make(64, 32, 64, max_threads=(16, 16))
    assert (shape.TY, shape.TX, shape.RM, shape.RN, shape.DPT, shape.DP) == (16, 8, 4, 4, 8, 64)
    assert shape.CP == 40  # P's rows padded: a warp's 4 rows x 8 columns hit 32 different banks


def test_forward_runs_the_default_tiles_float32() -> None:
    """float32 forward runs the schedule's own tiles at D = 64 and 128 (only backward needs sub-tiles)."""
    for D in (64, 128):
        assert ops.smem_report(D, np.float32)["forward"][0] == default_block_sizes(D, "cuda")
    # the table in launch.py's docstring (what ptxas reports for the sm_90 builds)
    assert ops.smem_report(64) == {"forward": ((64, 32), 48896), "dq": ((32, 32), 46464), "dkdv": ((32, 32), 46464)}
    assert ops.smem_report(128) == {"forward": ((32, 32), 41088), "dq": ((16, 16), 37312), "dkdv": ((16, 16), 37312)}
    assert dq_smem_bytes(TileShape.make(16, 16, 128, (16, 16)), 4) <= SMEM_LIMIT


def test_one_kv_buffer_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where two K/V buffers would not fit (large D on a GPU), the forward keeps K_j and V_j in one buffer (one
    barrier more): the same results. Forced here with a shared-memory limit between the two layouts' sizes; V
    holds a NaN in a masked key (the careful product of a TRIANGLE tile reads the refilled buffer)."""
    x = make_inputs(1, 1, 1, 8, 8, 8, np.float32, seed=5)
    x["v"][0, 0, 7, 2] = np.nan  # key 7: masked for every row but the last (causal)
    two, one = (forward_smem_bytes(TileShape.make(8, 8, 8, one_kv=kv), 4) for kv in (False, True))
    assert one < two
    monkeypatch.setattr(ops, "SMEM_LIMIT", one)
    opts = dict(causal=True, block_q=8, block_k=8)
    res = run_cuda(x, backward=False, **opts)
    assert ops.kernel_shapes(res["spec"], 4)["forward"].one_kv
    assert np.isnan(res["out"][0, 0, 7]).any() and not np.isnan(res["out"][0, 0, :7]).any()
    x["v"][0, 0, 7, 2] = 0.0
    check_against_reference(x, run_cuda(x, backward=False, **opts), **opts)


def test_fit_shape_shrinks_to_the_sequence_and_to_shared_memory() -> None:
    s = ops.fit_shape(64, 64, 1, 100, 64, 4, forward_smem_bytes)  # decode: one query row
    assert s.R == 1 and s.C == 64
    # the split layout of a GPU decode step: 128 threads, 32 groups of 4 lanes (16 d each), 4 keys per group;
    # one K/V buffer: two would not fit beside the groups' merge buffer
    s = ops.fit_shape(64, 128, 1, 4096, 64, 4, forward_smem_bytes, GPU_THREADS, split=True)
    assert (s.R, s.C, s.TX, s.TD, s.LX, s.threads, s.RN, s.DPT, s.DP1, s.one_kv) == \
        (1, 128, 32, 4, 128, 128, 4, 16, 68, True)
    assert forward_smem_bytes(s, 4) <= SMEM_LIMIT
    # the groups of a warp reading one d of their rows hit 32 different banks (row stride DP1 = DP + TD)
    assert len({(tx * s.DP1 + td) % 32 for tx in range(32 // s.TD) for td in range(s.TD)}) == 32
    with pytest.raises(ValueError, match="head_dim"):
        ops.fit_shape(3, 3, 100, 100, 8192, 8, forward_smem_bytes)


# ---------------------------------------------------------------------------------------------------------------------
# Simulator cases: forward and backward against the reference
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
def test_dense_float32(order: TileOrder) -> None:
    """No mask, Nq != Nk, partial last tiles, D not a multiple of the thread grid."""
    x = make_inputs(1, 2, 2, 12, 20, 6, np.float32, seed=1)
    opts = dict(block_q=8, block_k=8, order=order)
    res = run_cuda(x, **opts)
    check_against_reference(x, res, **opts)


@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
def test_causal_skips_tiles_float64(order: TileOrder) -> None:
    """Causal attention: the schedule has SKIP tiles (never loaded) and DENSE ones; float64 matches tightly."""
    x = make_inputs(2, 1, 1, 24, 24, 8, np.float64, seed=2)
    opts = dict(causal=True, block_q=8, block_k=8, order=order)
    res = run_cuda(x, **opts)
    counts = res["spec"].schedule.counts()
    assert counts["SKIP"] > 0 and counts["DENSE"] > 0 and counts["TRIANGLE"] > 0, counts
    check_against_reference(x, res, **opts)


def test_causal_window_gqa_bias_per_kv_head() -> None:
    """GQA (H=2, Hkv=1) with a sliding window and a bias shared by the group (1, Hkv, Nq, Nk) -> dBias summed."""
    x = make_inputs(1, 2, 1, 16, 24, 8, np.float32, seed=3, bias_shape=(1, 1, 16, 24))
    opts = dict(causal=True, window=7, block_q=8, block_k=8)
    res = run_cuda(x, **opts)
    assert res["spec"].schedule.counts()["SKIP"] > 0
    check_against_reference(x, res, **opts)


@pytest.mark.parametrize(
    "Hkv, bias_shape, order",
    [(2, (2, 2, 8, 16), TileOrder.Q_MAJOR),  # full bias: dBias written in place
     (1, (1, 2, 1, 16), TileOrder.K_MAJOR),  # per query head under GQA, broadcast over batch and rows
     (2, (2, 1, 8, 16), TileOrder.Q_MAJOR)],  # broadcast over heads: per-kv-head buffer + head reduction
)
def test_bias_gradient(Hkv: int, bias_shape: Tuple[int, ...], order: TileOrder) -> None:
    """dBias summed over exactly the broadcast dims (deterministic, no atomics)."""
    x = make_inputs(2, 2, Hkv, 8, 16, 4, np.float64, seed=4, bias_shape=bias_shape)
    opts = dict(block_q=8, block_k=8, order=order)
    res = run_cuda(x, **opts)
    check_against_reference(x, res, **opts)


def test_padding_and_fully_masked_batch_row() -> None:
    """key_padding_mask (True = padding); batch row 1 is all padding: zeros, lse -inf, zero gradients, no NaN."""
    x = make_inputs(2, 1, 1, 8, 16, 8, np.float32, seed=5)
    pad = np.zeros((2, 16), dtype=bool)
    pad[0, [3, 9, 10, 15]] = True
    pad[1, :] = True
    opts = dict(key_padding_mask=pad, block_q=8, block_k=8)
    res = run_cuda(x, **opts)
    assert (res["spec"].tile_types[1] == TileType.SKIP).all()
    assert np.all(res["out"][1] == 0) and np.all(np.isneginf(res["lse"][1]))
    assert np.all(res["dq"][1] == 0) and np.all(res["dk"][1] == 0) and np.all(res["dv"][1] == 0)
    check_against_reference(x, res, **opts)


@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
def test_positions_with_empty_slots(order: TileOrder) -> None:
    """Rotated ring-buffer-like key positions with empty (-1) slots, and query rows at position -1 (fully masked)."""
    x = make_inputs(1, 2, 2, 8, 16, 8, np.float64, seed=6)
    k_pos = np.array([8, 9, 10, 11, -1, -1, 2, 3, 4, 5, 6, 7, 12, 13, 14, -1])
    q_pos = np.array([7, 8, -1, 10, 11, 12, -1, 14])
    opts = dict(causal=True, window=6, q_positions=q_pos, k_positions=k_pos, block_q=8, block_k=4, order=order)
    res = run_cuda(x, **opts)
    dead = q_pos < 0
    assert np.all(res["out"][:, :, dead] == 0) and np.all(np.isneginf(res["lse"][:, :, dead]))
    assert np.all(res["dq"][:, :, dead] == 0)
    check_against_reference(x, res, **opts)


def test_num_sinks_window() -> None:
    """Attention sinks: keys below num_sinks ignore the window (the ring-buffer cache's prefill)."""
    x = make_inputs(1, 1, 1, 16, 32, 4, np.float32, seed=7)
    opts = dict(causal=True, window=5, num_sinks=2, block_q=8, block_k=8)
    res = run_cuda(x, **opts)
    check_against_reference(x, res, **opts)


@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
def test_dropout_mask_matches_cpu(order: TileOrder) -> None:
    """Dropout regenerates dropout_mask(seed) bit for bit: float64 outputs and gradients equal the reference's."""
    x = make_inputs(1, 2, 1, 8, 16, 4, np.float64, seed=8)
    opts = dict(dropout=0.3, seed=1234, causal=True, block_q=8, block_k=8, order=order)
    res = run_cuda(x, backward=order == TileOrder.Q_MAJOR, **opts)
    check_against_reference(x, res, **opts)
    # a different seed gives different outputs (the mask really depends on the seed)
    other = reference_attention(x["q"], x["k"], x["v"], causal=True, dropout=0.3, seed=1235)[0]
    assert np.abs(other - res["out"]).max() > 1e-3


def test_more_queries_than_keys_and_subtiles() -> None:
    """Nq > Nk (queries bottom-right aligned: early ones see nothing), a block longer than the sequence (the spec
    clamps block_k = 16 to Nk = 5, an odd tile the kernels run as it is), a bias broadcast over rows."""
    x = make_inputs(1, 1, 1, 12, 5, 8, np.float32, seed=9, bias_shape=(1, 1, 1, 5))
    opts = dict(causal=True, block_q=8, block_k=16)
    res = run_cuda(x, **opts)
    assert ops.kernel_shapes(res["spec"], 4)["forward"].C == res["spec"].block_k == 5
    assert np.all(np.isneginf(res["lse"][0, 0, :7]))
    check_against_reference(x, res, **opts)


@pytest.mark.parametrize("Nq, Nk, order", [(4, 0, TileOrder.K_MAJOR), (0, 4, TileOrder.Q_MAJOR)])
def test_empty_sequences(Nq: int, Nk: int, order: TileOrder) -> None:
    """No keys: zeros and lse -inf; no queries: empty outputs and zero dK, dV, dBias."""
    x = make_inputs(1, 1, 1, Nq, Nk, 4, np.float64, bias_shape=(1, 1, 1, Nk))
    res = run_cuda(x, block_q=4, block_k=4, order=order)
    assert np.all(res["out"] == 0) and np.all(np.isneginf(res["lse"]))
    check_against_reference(x, res, block_q=4, block_k=4, order=order)


def test_subtiles_when_shared_memory_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tiny shared-memory budget every kernel halves its tiles; results are unchanged."""
    monkeypatch.setattr(ops, "SMEM_LIMIT", 2500)
    x = make_inputs(1, 2, 1, 16, 16, 8, np.float64, seed=10)
    opts = dict(causal=True, block_q=16, block_k=16)
    res = run_cuda(x, **opts)
    shapes = ops.kernel_shapes(res["spec"], 8)
    assert all(s.R < 16 or s.C < 16 for s in shapes.values()), shapes
    check_against_reference(x, res, **opts)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_split_k_and_lse_gradient(dtype: Any) -> None:
    """Q-major split-K (3 splits over 4 key tiles: one split gets none of a query tile's visible tiles) merged by
    lse equals the reference; the gradient of the lse output (``dlse``) is ``P * dlse`` through dQ and dK."""
    x = make_inputs(1, 2, 1, 8, 32, 4, dtype, seed=12, bias_shape=(1, 1, 1, 32))
    opts = dict(causal=True, window=12, block_q=8, block_k=8, num_splits=3)
    res = run_cuda(x, **opts)
    check_against_reference(x, res, **opts)
    dlse = np.random.default_rng(13).standard_normal((1, 2, 8)).astype(dtype)
    x0 = dict(x, dout=np.zeros_like(x["dout"]))
    got = run_cuda(x0, dlse=dlse, **opts)
    want = lse_gradient_reference(x0, dlse, **opts)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for name, ref in zip(("dq", "dk", "dv"), want):
        np.testing.assert_allclose(got[name], ref, atol=tol * max(1.0, float(np.abs(ref).max())), err_msg=name)
    # d lse / d bias = P summed over rows (every row sums to dlse): the bias gradient sums P * dlse over queries
    p, _, _ = attention_probs(x["q"], x["k"], causal=True, window=12, attn_bias=x["bias"])
    np.testing.assert_allclose(got["dbias"], (p * dlse[..., None]).sum(axis=(1, 2))[:, None, None],
                               atol=tol * 10)


# ---------------------------------------------------------------------------------------------------------------------
# The NaN contract: a key (or query) that a query does not see is never read for it
# ---------------------------------------------------------------------------------------------------------------------


def _poisoned(x: Dict[str, Any], nan_keys: Any, inf_keys: Any, nan_queries: Any) -> Dict[str, Any]:
    """``x`` with NaN in some key rows of k and v, Inf in others, and NaN in some query rows of q and dout."""
    y = {n: (None if a is None else a.copy()) for n, a in x.items()}
    for rows, value in ((nan_keys, np.nan), (inf_keys, np.inf)):
        y["k"][:, :, rows] = value
        y["v"][:, :, rows] = -value
    y["q"][:, :, nan_queries] = np.nan
    y["dout"][:, :, nan_queries] = np.nan
    return y


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the simulator's NumPy scalars warn on NaN; a GPU does not
@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
def test_invisible_nan_changes_nothing(order: TileOrder) -> None:
    """NaN and Inf in padded keys, causal-future keys, empty slots (position -1), out-of-window keys and in a query
    at position -1 change no output and no gradient (forward and backward, float64, GQA, bias, dropout)."""
    B, H, Hkv, Nq, Nk, D = 1, 2, 1, 8, 16, 4
    x = make_inputs(B, H, Hkv, Nq, Nk, D, np.float64, seed=14, bias_shape=(1, 1, Nq, Nk))
    k_pos = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -1, -1, 30, 31])  # 12, 13 empty; 14, 15 in the future
    q_pos = np.array([6, 7, 8, 9, 10, 11, -1, 12])  # row 6 is empty
    pad = np.zeros((B, Nk), dtype=bool)
    pad[:, 3] = True  # padding
    opts = dict(causal=True, window=6, q_positions=q_pos, k_positions=k_pos, key_padding_mask=pad, block_q=4,
                block_k=4, order=order, dropout=0.2, seed=3)
    clean = run_cuda(x, **opts)
    check_against_reference(x, clean, **opts)
    # key 0 is outside every window (a row at position p sees keys above p - 6), key 3 is padding
    dirty = run_cuda(_poisoned(x, nan_keys=[0, 12, 14], inf_keys=[3, 13, 15], nan_queries=[6]), **opts)
    for name in ("out", "lse", "dq", "dk", "dv", "dbias"):  # (keys nobody sees have gradient 0 either way)
        np.testing.assert_array_equal(dirty[name], clean[name], err_msg=name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_visible_nan_propagates() -> None:
    """NaN in a key a row sees makes exactly the rows that see it NaN (out and lse; PyTorch's rule: ``exp(NaN)`` is
    NaN); rows that do not see it are unchanged."""
    x = make_inputs(1, 1, 1, 8, 8, 4, np.float32, seed=15)
    opts = dict(causal=True, block_q=4, block_k=4)
    clean = run_cuda(x, backward=False, **opts)
    y = dict(x, k=x["k"].copy())
    y["k"][:, :, 5] = np.nan  # seen by rows 5, 6, 7 (causal)
    got = run_cuda(y, backward=False, **opts)
    sees = np.arange(8) >= 5
    assert np.isnan(got["out"][0, 0, sees]).all() and np.isnan(got["lse"][0, 0, sees]).all()
    np.testing.assert_array_equal(got["out"][0, 0, ~sees], clean["out"][0, 0, ~sees])


# ---------------------------------------------------------------------------------------------------------------------
# Ring-cache decoding: split-K over the slots (the engine's forward with slot positions)
# ---------------------------------------------------------------------------------------------------------------------


def test_split_k_decode_over_slots_matches_reference() -> None:
    """One query over rotated slots with empty ones full of NaN: 3 splits of 2 slots (one all-SKIP), dropout, GQA."""
    rng = np.random.default_rng(4)
    B, H, Hkv, D, C = 1, 2, 1, 3, 6
    q = rng.standard_normal((B, H, 1, D))
    k, v = rng.standard_normal((B, Hkv, C, D)), rng.standard_normal((B, Hkv, C, D))
    pos = np.array([20, 21, -1, -1, 10, 23])  # split [20, 21] DENSE, [-1, -1] SKIP, [10, 23] TRIANGLE
    kn, vn = k.copy(), v.copy()
    kn[:, :, 2:4] = np.nan
    vn[:, :, 2:4] = np.nan
    q_pos = np.array([23])
    for extra in (dict(), dict(dropout=0.4, seed=3)):
        spec = make_spec(q.shape, k.shape, v.shape, causal=True, window=6, q_positions=q_pos, k_positions=pos,
                         block_q=1, block_k=2, num_splits=ENGINE.decode_splits(3), **extra)
        assert spec.num_splits == 3
        assert list(spec.tile_types[0, 0]) == [TileType.DENSE, TileType.SKIP, TileType.TRIANGLE]
        ref, ref_lse = reference_attention(q, k, v, causal=True, window=6, q_positions=q_pos, k_positions=pos,
                                           **extra)
        out, lse = ENGINE.forward(*(cuda.to_device(a) for a in (q, kn, vn)), None, spec)
        np.testing.assert_allclose(out.copy_to_host(), ref, atol=1e-12)
        np.testing.assert_allclose(lse.copy_to_host(), ref_lse, atol=1e-12)


@pytest.mark.task5_5  # the ring-buffer cache, on the GPU
def test_ring_cache_decodes_after_wraparound_and_reset() -> None:
    """RingBufferKVCache on CudaBackend: decoding past the wrap boundary equals windowed causal attention with the
    sinks, and after reset() the stale (NaN) slots are never read, also on the multi-token path."""
    from minitorch.attention.kv_cache import RingBufferKVCache

    rng = np.random.default_rng(6)
    B, H, Hkv, D, C, sinks = 1, 2, 1, 3, 4, 1
    N = 2 * C + 1
    q, k, v = (rng.standard_normal((B, n, N, D)) for n in (H, Hkv, Hkv))
    ref, _ = reference_attention(q, k, v, causal=True, window=C - sinks, num_sinks=sinks)
    cache = RingBufferKVCache(B, Hkv, D, C, num_sinks=sinks, backend="cuda", block_size=2, tile_size=2)
    for t in range(N):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        out = cache.attend(q[:, :, t : t + 1])
        np.testing.assert_allclose(ENGINE.to_host(out), ref[:, :, t : t + 1], atol=1e-12, err_msg=f"step {t}")
    cache.append(np.full((B, Hkv, 1, D), np.nan), np.full((B, Hkv, 1, D), np.nan))  # stale NaN in a slot
    cache.reset()
    cache.append(k[:, :, :2], v[:, :, :2])  # two tokens: the other slots still hold old (and NaN) values
    ref2, _ = reference_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], causal=True, window=C - sinks,
                                  num_sinks=sinks)
    np.testing.assert_allclose(ENGINE.to_host(cache.attend(q[:, :, :2])), ref2, atol=1e-12)
    cache.append(k[:, :, 2:3], v[:, :, 2:3])
    ref3, _ = reference_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=True, window=C - sinks,
                                  num_sinks=sinks)
    np.testing.assert_allclose(ENGINE.to_host(cache.attend(q[:, :, 2:3])), ref3[:, :, 2:3], atol=1e-12)


@pytest.mark.task5_5  # the ring-buffer cache, on the GPU
def test_decode_steps_reuse_scratch_and_copy_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ring-cache decode steps on the device: the split-K partials live in scratch buffers that every step reuses
    (none allocated per step), each output stays what it was when later steps run (no output is scratch), a step
    copies one buffer to the device (its spec's metadata) and an append of device arrays copies none."""
    from minitorch.attention.kernels.cuda import memory
    from minitorch.attention.kv_cache import RingBufferKVCache

    rng = np.random.default_rng(8)
    B, H, Hkv, D, C, N = 1, 2, 1, 4, 6, 8
    q, k, v = (rng.standard_normal((B, n, N, D)) for n in (H, Hkv, Hkv))
    ref, _ = reference_attention(q, k, v, causal=True, window=C)
    steps = [[cuda.to_device(np.ascontiguousarray(a[:, :, t : t + 1])) for a in (q, k, v)] for t in range(N)]
    cache = RingBufferKVCache(B, Hkv, D, C, backend="cuda", dtype=np.float64, block_size=2)  # 3 splits of 2 slots
    copies: list = []
    real = cuda.to_device
    monkeypatch.setattr(cuda, "to_device", lambda a, *args, **kw: copies.append(np.shape(a)) or real(a, *args, **kw))
    outs, kept = [], None
    for t, (qt, kt, vt) in enumerate(steps):
        copies.clear()
        cache.append(kt, vt)
        assert copies == [], f"step {t}: append copied {copies}"
        outs.append(cache.attend(qt))
        if t > 0:  # (the first step also makes the dummy arrays of absent features, once per process)
            assert len(copies) == 1, f"step {t}: {copies}"
        buffers = memory.scratch_buffers()
        part = {key: buffers[key] for key in buffers if key in (("out_p", "<f8"), ("lse_p", "<f8"))}
        assert len(part) == 2
        if kept is not None:
            assert all(part[key] is kept[key] for key in part), f"step {t}: scratch reallocated"
        kept = part
    for t, out in enumerate(outs):
        np.testing.assert_allclose(ENGINE.to_host(out), ref[:, :, t : t + 1], atol=1e-12, err_msg=f"step {t}")


def test_write_rows_by_runs_and_by_list() -> None:
    """The caches' row copies: runs of consecutive rows by their bounds, scattered rows by an index list."""
    assert ops.row_runs(np.array([5, 0, 1, 2]), np.array([0, 1, 2, 3])).tolist() == [[5, 0, 1], [0, 1, 3]]
    rng = np.random.default_rng(3)
    dst, src = rng.standard_normal((2, 1, 10, 3)), rng.standard_normal((2, 1, 7, 3))
    for dst_rows, src_rows in (([5, 0, 1, 2], [0, 1, 2, 3]), ([9, 1, 7, 3, 5, 0, 2], [6, 5, 4, 3, 2, 1, 0])):
        assert (len(ops.row_runs(np.array(dst_rows), np.array(src_rows))) <= ops.MAX_RUNS) == (len(dst_rows) == 4)
        want = dst.copy()
        want[:, :, dst_rows] = src[:, :, src_rows]
        got = cuda.to_device(dst)
        ops.write_rows(got, cuda.to_device(src), np.array(dst_rows), np.array(src_rows))
        np.testing.assert_array_equal(got.copy_to_host(), want)


# ---------------------------------------------------------------------------------------------------------------------
# Dynamic Mask Attention: the selection kernels, and the whole call on CudaBackend
# ---------------------------------------------------------------------------------------------------------------------


def _dma_inputs(B: int, H: int, Hkv: int, Nq: int, Nk: int, D: int, seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"q": rng.standard_normal((B, H, Nq, D)), "k": rng.standard_normal((B, Hkv, Nk, D)),
            "v": rng.standard_normal((B, Hkv, Nk, D)), "dt": rng.standard_normal((Hkv, Hkv * D)) * 0.5,
            "a": rng.standard_normal(Hkv), "dout": rng.standard_normal((B, H, Nq, D))}


@pytest.mark.task5_6  # the DMA selection, on the GPU
@pytest.mark.parametrize("causal", [False, True])
def test_dma_selection_kernels_match_the_cpu(causal: bool) -> None:
    """The CUDA importance, selection and list-tile-type kernels give the NumPy engine's arrays (same z, same
    thresholds, lifetimes, compacted list and tile types), with ties and padding."""
    from minitorch.attention.importance import importance
    from minitorch.attention.selection import select_numpy
    from minitorch.attention.spec import make_dma_spec

    x = _dma_inputs(2, 2, 2, 20, 24, 4, seed=16)
    x["v"] = np.round(x["v"])  # integer values: z takes few values, many exact ties
    pad = np.zeros((2, 24), dtype=bool)
    pad[1, [2, 7, 20]] = True
    dspec = make_dma_spec(x["q"].shape, x["k"].shape, x["v"].shape, x["dt"].shape, x["a"].shape,
                          keep_window_size=5, causal=causal, key_padding_mask=pad, block_q=8, block_k=4)
    z, _ = importance(x["v"], x["dt"], x["a"], False)
    zc, _ = ENGINE.importance(*(cuda.to_device(x[n]) for n in ("v", "dt", "a")), False)
    np.testing.assert_allclose(zc.copy_to_host(), z, rtol=1e-14)
    got = ENGINE.select(cuda.to_device(z), dspec).host()
    want = select_numpy(z, dspec)
    assert (got.block_q, got.block_k) == (want.block_q, want.block_k) == (8, 4)
    for name in ("thr_val", "thr_idx", "evict", "counts", "types"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for b in range(2):  # only the listed entries of kidx are defined
        for g in range(2):
            c = want.counts[b, g]
            np.testing.assert_array_equal(got.kidx[b, g, :c], want.kidx[b, g, :c])


SELECTION_CASES = [  # (B, Hkv, Nq, Nk, keep, causal, compact): the scan in more than one chunk and block of keys
    (1, 1, 40, 40, 1, True, True),  # keep = 1, causal: the best key so far
    (1, 2, 12, 9, 12, True, True),  # keep >= Nk, more queries than keys (rows before the first key keep nothing)
    (2, 1, 7, 19, 3, False, True),  # not causal; batch row 1 all padding: keeps nothing
    (1, 1, 5, 11, 4, True, False),  # the list is the key sequence itself
]


@pytest.mark.task5_6
def test_dma_selection_edge_cases_match_the_cpu() -> None:
    """The parallel selection gives the serial heap sweep's arrays exactly on z with many ties and padding: keep = 1,
    keep >= Nk, Nq > Nk, a batch row of padding only, compact=False; z increasing (every key enters and leaves)."""
    from minitorch.attention.selection import select_numpy
    from minitorch.attention.spec import make_dma_spec

    rng = np.random.default_rng(21)
    for B, Hkv, Nq, Nk, keep, causal, compact in SELECTION_CASES:
        z = rng.integers(0, 3, size=(B, Hkv, Nk)).astype(np.float64)  # three values: ties everywhere
        if Nk == 40:
            z[0, 0] = np.sort(z[0, 0])  # non-decreasing: each key beats or ties every earlier one
        pad = rng.random((B, Nk)) < 0.3
        pad[:, 0] = False
        if B == 2:
            pad[1] = True
        dspec = make_dma_spec((B, Hkv, Nq, 2), (B, Hkv, Nk, 2), (B, Hkv, Nk, 2), (Hkv, 2 * Hkv), (Hkv,),
                              keep_window_size=keep, causal=causal, key_padding_mask=pad, block_q=4, block_k=4,
                              compact=compact)
        got = ENGINE.select(cuda.to_device(z), dspec).host()
        want = select_numpy(z, dspec)
        case = f"case {(B, Hkv, Nq, Nk, keep, causal, compact)}"
        for name in ("thr_val", "thr_idx", "evict", "counts"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{case}: {name}")
        for b in range(B):
            for g in range(Hkv):
                c = want.counts[b, g]
                np.testing.assert_array_equal(got.kidx[b, g, :c], want.kidx[b, g, :c], err_msg=case)
        if B == 2:
            assert want.counts[1].max() == 0 and (want.thr_idx[1] == -1).all()  # the case tests what it says


def test_flash_dma_attention_on_cuda_backend() -> None:
    """flash_dma_attention on CudaBackend (selection, key list, z as bias, top-k rule, dropout, padding, GQA):
    output and every gradient (q, k, v, dt_proj, a_coef) match the float64 DMA oracle. (Not a task 5.6 test: the
    GPU's selection does not run the heap sweep; the two tests above hold it to that sweep.)"""
    from minitorch.attention.dma import flash_dma_attention
    from minitorch.attention.reference import reference_dma, reference_dma_backward
    from minitorch.tensor_functions import from_numpy

    x = _dma_inputs(1, 2, 1, 9, 13, 4, seed=17)
    pad = np.zeros((1, 13), dtype=bool)
    pad[0, [4, 11]] = True
    opts = dict(keep_window_size=4, causal=True, key_padding_mask=pad, dropout=0.2, seed=9)
    ts = [from_numpy(x[n].copy(), backend=CudaBackend, requires_grad=True) for n in ("q", "k", "v", "dt", "a")]
    out = flash_dma_attention(*ts, keep_window_size=4, causal=True, key_padding_mask=pad, dropout_p=0.2, seed=9,
                              block_q=4, block_k=4)
    (out * from_numpy(x["dout"], backend=CudaBackend)).sum().backward()
    args = [x[n] for n in ("q", "k", "v", "dt", "a")]
    want = (reference_dma(*args, **opts)[0],) + reference_dma_backward(*args, x["dout"], **opts)
    got = (out.to_numpy(),) + tuple(t.grad.to_numpy() for t in ts)
    for name, g, w in zip(("out", "dq", "dk", "dv", "d_dt", "d_a"), got, want):
        np.testing.assert_allclose(g, w, atol=1e-10 * max(1.0, float(np.abs(w).max())), err_msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# Every kernel lowers for a real GPU (sm_90): the kernel report (no float64 in float32, no spill, no local memory)
# ---------------------------------------------------------------------------------------------------------------------

SKIP_LOWERING = os.environ.get("MINITORCH_SKIP_LOWERING") == "1"
_LOWERING: Dict[str, Any] = {}


def _spawn_lowering() -> Tuple["subprocess.Popen[str]", str]:
    """``python scripts/kernel_report.py --attention --check --json PATH`` (no simulator): PTX for sm_90 when NVVM
    is installed, else LLVM IR lowered for the GPU target; assembled and disassembled where ``ptxas`` and
    ``nvdisasm`` are found (the test extra installs them). No GPU needed either way."""
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(tempfile.mkdtemp(prefix="kernel_report"), "report.json")
    cmd = [sys.executable, os.path.join(root, "scripts", "kernel_report.py"), "--attention", "--check", "--json", path]
    return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), path


@pytest.fixture(scope="module", autouse=True)
def _lowering(request: pytest.FixtureRequest) -> Iterator[None]:
    """Start the report subprocess with the module's first test, so that it overlaps the others."""
    if not SKIP_LOWERING and any(item.name == "test_kernels_lower_for_sm90" for item in request.session.items):
        _LOWERING["proc"] = _spawn_lowering()
    yield
    started = _LOWERING.pop("proc", None)
    if started is not None:
        started[0].kill()
        started[0].communicate()


@pytest.mark.skipif(SKIP_LOWERING, reason="MINITORCH_SKIP_LOWERING=1")
def test_kernels_lower_for_sm90() -> None:
    """Every attention kernel (each tile kernel with every flag off, every flag on and the variants on, and every
    row kernel) type-checks and lowers for compute capability 9.0 with no float64 arithmetic in float32: catches
    code that only the simulator accepts. With ptxas: no spill and no stack frame; with nvdisasm: no local memory
    and no float64 instruction in the SASS, and the hot loops of the 4 x 4 register tiles at least 50% FFMA
    (forward) and 40% (backward). Runs in a subprocess without the simulator, started with the module's first
    test."""
    proc, path = _LOWERING.pop("proc", None) or _spawn_lowering()
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0 and "AttributeError" in err and ("compile_cuda" in err or "get_current_device" in err):
        pytest.skip("numba-cuda internals changed: " + err[-300:])
    assert proc.returncode == 0 and "COMPILED" in out, (out[-3000:], err[-3000:])
    assert "float64 arithmetic" not in err
    with open(path) as fh:
        report = json.load(fh)
    names = [rec["name"].split()[0] for rec in report["kernels"]]
    for kind in ("fwd_q", "fwd_k", "decode", "dq", "dkdv0", "dkdv1", "dkdv2", "merge", "select_scan", "select_finish"):
        assert kind in names, kind
    if report["ptxas"] and report["nvdisasm"]:  # the SASS was read: the tile kernels' products were found
        plain = [rec for rec in report["kernels"] if " ----------- " in rec["name"] and "decode" not in rec["name"]]
        assert len(plain) == 4 and all(rec["hot_loops"] and rec["listing"] == "SASS" for rec in plain), plain


# Real GPU: realistic shapes (skipped in the simulator)
# ---------------------------------------------------------------------------------------------------------------------

REAL_GPU = (not numba.config.ENABLE_CUDASIM) and cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not REAL_GPU, reason="needs a real CUDA GPU (run with MINITORCH_REAL_CUDA=1)")
@pytest.mark.parametrize(
    "B, H, Hkv, N, D, causal, bias, order",
    [(2, 4, 4, 1024, 64, True, False, TileOrder.Q_MAJOR),
     (1, 4, 2, 1024, 128, False, True, TileOrder.Q_MAJOR),
     (1, 4, 1, 512, 64, True, True, TileOrder.K_MAJOR),
     (1, 2, 2, 1000, 128, True, False, TileOrder.K_MAJOR)],
)
def test_real_gpu_large(B: int, H: int, Hkv: int, N: int, D: int, causal: bool, bias: bool, order: TileOrder) -> None:
    x = make_inputs(B, H, Hkv, N, N, D, np.float32, seed=11, bias_shape=(1, Hkv, N, N) if bias else None)
    opts = dict(causal=causal, order=order)
    res = run_cuda(x, **opts)
    check_against_reference(x, res, **opts)
    again = run_cuda(x, **opts)  # deterministic: bit-identical gradients
    for name in ("dq", "dk", "dv"):
        assert np.array_equal(res[name], again[name]), name
