"""CUDA flash attention kernels (minitorch/cuda_kernels) against the float64 NumPy reference.

In CI these run in Numba's CUDA simulator (tests/conftest.py), which runs one Python thread per CUDA thread: sizes
are tiny (N <= 64, D <= 16, tiles <= 16, at most 2 heads, B <= 2) and every case checks forward and backward at
once. The ``gpu`` test at the end runs realistic shapes and is skipped unless a real GPU is present
(``MINITORCH_REAL_CUDA=1``).

Tolerances follow FlashAttention's rule for float32: the kernel's error against the float64 truth is at most
3x the error of standard attention computed in float32, plus a small floor. float64 must match tightly.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numba
import numpy as np
import pytest
from numba import cuda

from minitorch.attention.dropout import dropout_mask
from minitorch.attention.reference import (
    naive_attention_float32,
    reference_attention,
    reference_attention_backward,
    reference_mask,
)
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import TileOrder, TileType, default_block_sizes
from minitorch.cuda_kernels import cuda_kernel_ops as ops
from minitorch.cuda_kernels.flash_backward import dkdv_smem_bytes, dq_smem_bytes
from minitorch.cuda_kernels.flash_forward import SMEM_LIMIT, TileShape, forward_smem_bytes

pytestmark = [pytest.mark.cuda, pytest.mark.task5_4]

SPEC_KEYS = ("causal", "scale", "window", "key_padding_mask", "dropout", "seed", "q_positions", "k_positions",
             "block_q", "block_k", "order", "num_sinks")
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


def run_cuda(x: Dict[str, Any], backward: bool = True, **opts: Any) -> Dict[str, Any]:
    """Forward (and backward) through the launchers, device arrays in and out; results back as NumPy."""
    bias = x["bias"]
    spec = make_spec(x["q"].shape, x["k"].shape, x["v"].shape, backend_kind="cuda",
                     bias_shape=None if bias is None else bias.shape, **{k: opts[k] for k in SPEC_KEYS if k in opts})
    dq_, dk_, dv_ = (cuda.to_device(x[n]) for n in ("q", "k", "v"))
    db_ = None if bias is None else cuda.to_device(bias)
    out, lse = ops.forward(dq_, dk_, dv_, db_, spec)
    res = {"spec": spec, "out": out.copy_to_host(), "lse": lse.copy_to_host()}
    if backward:
        g = ops.backward(dq_, dk_, dv_, db_, out, lse, cuda.to_device(x["dout"]), spec)
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
    assert (shape.TY, shape.TX, shape.RM, shape.RN, shape.DP) == (16, 16, 4, 2, 64)


def test_forward_runs_the_default_tiles_float32() -> None:
    """float32 forward runs the schedule's own tiles at D = 64 and 128 (only backward needs sub-tiles)."""
    for D in (64, 128):
        assert ops.smem_report(D, np.float32)["forward"][0] == default_block_sizes(D, "cuda")
    # the table in cuda_kernel_ops.py's docstring
    assert ops.smem_report(64) == {"forward": ((64, 32), 41600), "dq": ((32, 32), 37632), "dkdv": ((32, 32), 42112)}
    assert ops.smem_report(128) == {"forward": ((32, 32), 41472), "dq": ((16, 16), 34176), "dkdv": ((16, 16), 35392)}
    assert dq_smem_bytes(TileShape.make(16, 16, 128, (16, 16)), 4) <= SMEM_LIMIT


def test_fit_shape_shrinks_to_the_sequence_and_to_shared_memory() -> None:
    s = ops.fit_shape(64, 64, 1, 100, 64, 4, forward_smem_bytes)  # decode: one query row
    assert s.R == 1 and s.C == 64
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
    """Nq > Nk (queries bottom-right aligned: early ones see nothing), and kernel tiles smaller than the schedule's
    (Nk = 5 < block_k = 16 runs 8-wide sub-tiles that take the type of the schedule tile)."""
    x = make_inputs(1, 1, 1, 12, 5, 8, np.float32, seed=9, bias_shape=(1, 1, 1, 5))
    opts = dict(causal=True, block_q=8, block_k=16)
    res = run_cuda(x, **opts)
    assert ops.kernel_shapes(res["spec"], 4)["forward"].C == 8
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


# ---------------------------------------------------------------------------------------------------------------------
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
