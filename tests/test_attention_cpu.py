"""The fused Numba CPU flash attention (``minitorch/attention/kernels/cpu/flash.py``) against the float64 NumPy reference.

Correctness follows FlashAttention's rule. float64 kernels must match the float64 reference to 1e-10 (relative to the
largest reference value). float32 kernels may err at most 3x as much as standard attention computed in float32
(``naive``), plus a small floor: ``max|kernel - ref64| <= 3 max|naive32 - ref64| + 1e-5 sqrt(D) max(1, max|ref64|)``.
(The floor grows with sqrt(D), see :func:`assert_matches`.) The reference never shares code with the kernels; it
builds its own masks from the positions.

Markers: ``task5_2`` (forward), ``task5_3`` (backward).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from typing import Any, Dict, Optional, Tuple

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitorch.attention.kernels.cpu import flash as cpu
from minitorch.attention.dropout import dropout_mask
from minitorch.attention.reference import (
    reference_attention,
    reference_attention_backward,
    reference_mask,
)
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import TileOrder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [1, 2, 17, 37, 97, 113, 127, 130]
HEAD_DIMS = [1, 3, 7, 16, 33, 64, 128]
HEADS = [(1, 1), (4, 1), (4, 2), (8, 8)]
BLOCKS = [(None, None), (16, 16), (32, 64), (13, 7), (64, 32), (8, 128)]
MAX_WORK = 2_000_000  # B * H * Nq * Nk * D per example, to keep the suite fast
F64_TOL = 1e-10

# ----------------------------------------------------------------------------------------------------------------
# Helpers: run the kernels, the reference and the float32 baseline on one case
# ----------------------------------------------------------------------------------------------------------------

REF_KEYS = ("causal", "scale", "window", "key_padding_mask", "dropout", "seed", "q_positions", "k_positions",
            "num_sinks")


def make_inputs(B, H, Hkv, Nq, Nk, D, dtype, rng, bias_shape=None, logit_scale=1.0):  # type: ignore[no-untyped-def]
    q = (rng.standard_normal((B, H, Nq, D)) * logit_scale).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    dout = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(dtype)
    return q, k, v, dout, bias


def run_kernels(q, k, v, dout, bias, opts: Dict[str, Any], backward: bool = True):  # type: ignore[no-untyped-def]
    spec = make_spec(
        q.shape, k.shape, v.shape, bias_shape=None if bias is None else bias.shape, **opts
    )
    out, lse = cpu.forward(q, k, v, bias, spec)
    grads = cpu.backward(q, k, v, bias, out, lse, dout, spec) if backward else None
    return out, lse, grads


def ref_options(opts: Dict[str, Any]) -> Dict[str, Any]:
    return {key: opts[key] for key in REF_KEYS if key in opts}


def _expand_kv(x: np.ndarray, H: int) -> np.ndarray:
    return np.repeat(x, H // x.shape[1], axis=1)


def _sum_to(x: np.ndarray, shape: Tuple[int, ...], H: int) -> np.ndarray:
    shape4 = (1,) * (4 - len(shape)) + tuple(shape)
    if shape4[1] not in (1, H):
        B, _, Nq, Nk = x.shape
        x = x.reshape(B, shape4[1], H // shape4[1], Nq, Nk).sum(axis=2)
    for ax in range(4):
        if shape4[ax] == 1 and x.shape[ax] != 1:
            x = x.sum(axis=ax, keepdims=True)
    return x.reshape(shape)


def naive_float32(q, k, v, dout, bias, opts, p_from_lse=False):  # type: ignore[no-untyped-def]
    """Standard attention, forward and backward, computed in float32 only: the error baseline of the rule.

    ``p_from_lse``: the backward recomputes ``P = exp(S - lse)`` from the float32 ``lse``, as FlashAttention's does.
    """
    f32 = np.float32
    q32, k32, v32, do32 = (np.asarray(x, dtype=f32) for x in (q, k, v, dout))
    B, H, Nq, D = q32.shape
    Nk = k32.shape[2]
    scale = f32(opts.get("scale") or 1.0 / math.sqrt(D))
    ke, ve = _expand_kv(k32, H), _expand_kv(v32, H)
    mask = reference_mask(
        B, Nq, Nk, opts.get("causal", False), opts.get("window"), opts.get("q_positions"), opts.get("k_positions"),
        opts.get("key_padding_mask"), opts.get("num_sinks", 0),
    )[:, None]
    s = scale * (q32 @ np.swapaxes(ke, -1, -2))
    if bias is not None:
        b4 = np.asarray(bias, dtype=f32).reshape((1,) * (4 - bias.ndim) + bias.shape)
        s = s + (b4 if b4.shape[1] in (1, H) else _expand_kv(b4, H))
    s = np.where(mask, s, f32(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, f32(0))
    e = np.where(mask, np.exp(s - m), f32(0))
    l = e.sum(axis=-1, keepdims=True)
    p = np.where(l > 0, e / np.where(l > 0, l, f32(1)), f32(0))
    with np.errstate(divide="ignore"):
        lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(l[..., 0]), f32(-np.inf))
    if p_from_lse:
        p = np.where(mask, np.exp(s - np.where(np.isfinite(lse), lse, f32(0))[..., None]), f32(0))
    p_drop = opts.get("dropout", 0.0)
    keep = (dropout_mask(opts.get("seed", 0), p.shape, p_drop) / f32(1 - p_drop)).astype(f32) if p_drop > 0 else f32(1)
    z = p * keep
    out = (e / np.where(l > 0, l, f32(1)) * keep) @ ve
    dv = np.swapaxes(z, -1, -2) @ do32
    dp = (do32 @ np.swapaxes(ve, -1, -2)) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * (ds @ ke)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q32)
    Hkv = k32.shape[1]
    dk = dk.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dv = dv.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dbias = None if bias is None else _sum_to(ds, bias.shape, H)
    return out, lse, (dq, dk, dv, dbias)


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def assert_matches(  # type: ignore[no-untyped-def]
    name: str, got: np.ndarray, ref: np.ndarray, naive: Optional[np.ndarray], dtype, D: int = 16
) -> None:
    """``got`` vs the float64 reference: tight for float64, FlashAttention's rule for float32.

    The float32 floor, ``1e-5 sqrt(D) max(1, max|ref|)``, is the rounding of a length-D float32 dot product; it only
    matters where the baseline happens to be exact (e.g. one key: ``dS = P (dP - delta)`` cancels exactly in the
    textbook formula, but ``dP = dO . v`` and ``delta = dO . O`` are two differently rounded dot products here).
    """
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != reference {ref.shape}"
    assert got.dtype == np.dtype(dtype), f"{name}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    ref_inf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(got), ref_inf), f"{name}: -inf entries differ from the reference"
    assert not np.isnan(got).any(), f"{name}: NaN"
    finite = ~ref_inf
    got_f, ref_f = got[finite], ref[finite]
    scale = max(1.0, float(np.max(np.abs(ref_f)))) if ref_f.size else 1.0
    err = _max_err(got_f, ref_f)
    if np.dtype(dtype) == np.float64:
        tol = F64_TOL * scale
    else:
        naive_err = _max_err(np.asarray(naive)[finite], ref_f)
        tol = 3 * naive_err + 1e-5 * math.sqrt(max(D, 1)) * scale
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g}"


def check_case(q, k, v, dout, bias, opts, backward=True):  # type: ignore[no-untyped-def]
    """Run kernels, reference and (float32) baseline; compare out, lse and, if asked, every gradient."""
    dtype = q.dtype
    out, lse, grads = run_kernels(q, k, v, dout, bias, opts, backward)
    ropts = ref_options(opts)
    ref_out, ref_lse = reference_attention(q, k, v, attn_bias=bias, **ropts)
    naive = naive_float32(q, k, v, dout, bias, opts) if dtype == np.float32 else (None, None, (None,) * 4)
    D = q.shape[-1]
    assert_matches("out", out, ref_out, naive[0], dtype, D)
    assert_matches("lse", lse, ref_lse, naive[1], dtype, D)
    if backward:
        ref_grads = reference_attention_backward(q, k, v, dout, attn_bias=bias, **ropts)
        for name, got, ref, nv in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, naive[2]):
            if ref is None:
                assert got is None, f"{name} should be None without a bias"
                continue
            assert_matches(name, got, ref, nv, dtype, D)
    return out, lse, grads


# ----------------------------------------------------------------------------------------------------------------
# The hypothesis grid
# ----------------------------------------------------------------------------------------------------------------

_size = st.one_of(st.sampled_from(SIZES), st.integers(1, 130))


def _bias_shapes(B: int, H: int, Hkv: int, Nq: int, Nk: int):  # type: ignore[no-untyped-def]
    return [(B, H, Nq, Nk), (1, H, Nq, Nk), (B, 1, Nq, Nk), (1, 1, Nq, Nk), (B, Hkv, Nq, Nk), (1, 1, 1, Nk),
            (B, H, 1, Nk), (1, Hkv, 1, Nk), (Nq, Nk), (Nk,)]


@st.composite
def attention_cases(draw):  # type: ignore[no-untyped-def]
    """A random attention call: shapes, dtype, and any combination of the options."""
    Nq, Nk = draw(_size), draw(_size)
    D = draw(st.sampled_from(HEAD_DIMS))
    H, Hkv = draw(st.sampled_from(HEADS))
    B = draw(st.sampled_from([1, 2]))
    # keep the work modest: drop the batch, then heads, then head dim
    if B * H * Nq * Nk * D > MAX_WORK:
        B = 1
    if B * H * Nq * Nk * D > MAX_WORK:
        H, Hkv = (4, 2) if H == 8 else (H, Hkv)
    while B * H * Nq * Nk * D > MAX_WORK and D > 16:
        D //= 2
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    opts: Dict[str, Any] = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        opts["window"] = draw(st.integers(1, Nk + 4))
        opts["num_sinks"] = draw(st.sampled_from([0, 0, 1, 3]))
    if draw(st.integers(0, 3)) == 0:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        pad = rng.random((B, Nk)) < 0.3
        if draw(st.booleans()):
            pad[0] = True  # a batch row with every key padded: all its rows see nothing
        opts["key_padding_mask"] = pad
    if draw(st.integers(0, 3)) == 0:
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        opts["k_positions"] = np.where(rng.random(Nk) < 0.1, -1, rng.permutation(Nk) + 3)
        opts["q_positions"] = np.where(rng.random(Nq) < 0.1, -1, rng.integers(0, Nk + 6, Nq))
    bias_shape = None
    if draw(st.integers(0, 2)) == 0:
        bias_shape = draw(st.sampled_from(_bias_shapes(B, H, Hkv, Nq, Nk)))
    if draw(st.integers(0, 3)) == 0:
        opts["dropout"] = draw(st.sampled_from([0.1, 0.3, 0.5]))
        opts["seed"] = draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        opts["scale"] = draw(st.sampled_from([0.05, 0.3, 1.0]))
    opts["order"] = draw(st.sampled_from([TileOrder.Q_MAJOR, TileOrder.K_MAJOR]))
    opts["block_q"], opts["block_k"] = draw(st.sampled_from(BLOCKS))
    seed = draw(st.integers(0, 2**16))
    return (B, H, Hkv, Nq, Nk, D, dtype, bias_shape, seed), opts


GRID = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.task5_2
@GRID
@given(attention_cases())
def test_forward_matches_reference(case) -> None:  # type: ignore[no-untyped-def]
    (B, H, Hkv, Nq, Nk, D, dtype, bias_shape, seed), opts = case
    q, k, v, dout, bias = make_inputs(B, H, Hkv, Nq, Nk, D, dtype, np.random.default_rng(seed), bias_shape)
    check_case(q, k, v, dout, bias, opts, backward=False)


@pytest.mark.task5_3
@GRID
@given(attention_cases())
def test_backward_matches_reference(case) -> None:  # type: ignore[no-untyped-def]
    (B, H, Hkv, Nq, Nk, D, dtype, bias_shape, seed), opts = case
    q, k, v, dout, bias = make_inputs(B, H, Hkv, Nq, Nk, D, dtype, np.random.default_rng(seed), bias_shape)
    out, lse, grads = check_case(q, k, v, dout, bias, opts, backward=True)
    for g in grads:
        assert g is None or np.isfinite(g).all()


# ----------------------------------------------------------------------------------------------------------------
# Every option alone, and all of them together, in both orders and dtypes
# ----------------------------------------------------------------------------------------------------------------

B0, H0, HKV0, NQ0, NK0, D0 = 2, 4, 2, 37, 53, 16
_PAD = np.random.default_rng(1).random((B0, NK0)) < 0.3
_KPOS = np.where(np.arange(NK0) % 11 == 5, -1, np.random.default_rng(2).permutation(NK0))
_QPOS = np.where(np.arange(NQ0) % 9 == 4, -1, np.random.default_rng(3).integers(0, NK0 + 5, NQ0))
OPTION_SETS = {
    "none": {},
    "causal": {"causal": True},
    "window": {"window": 9},
    "causal_window": {"causal": True, "window": 7},
    "sinks": {"causal": True, "window": 5, "num_sinks": 3},
    "padding": {"key_padding_mask": _PAD},
    "positions": {"q_positions": _QPOS, "k_positions": _KPOS},
    "scale": {"scale": 0.7},
    "dropout": {"dropout": 0.25, "seed": 1234},
    "bias": {},  # with a full bias, below
    "everything": {"causal": True, "window": 11, "num_sinks": 2, "key_padding_mask": _PAD, "q_positions": _QPOS,
                   "k_positions": _KPOS, "dropout": 0.2, "seed": 99, "scale": 0.4},
}


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_each_option(name: str, dtype, order) -> None:  # type: ignore[no-untyped-def]
    bias_shape = (B0, H0, NQ0, NK0) if name in ("bias", "everything") else None
    q, k, v, dout, bias = make_inputs(B0, H0, HKV0, NQ0, NK0, D0, dtype, np.random.default_rng(7), bias_shape)
    opts = dict(OPTION_SETS[name], order=order, block_q=16, block_k=8)
    check_case(q, k, v, dout, bias, opts)


@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", ["BHQK", "1HQK", "B1QK", "11QK", "BKvQK", "111K", "BH1K", "1Kv1K", "QK", "K"])
def test_bias_broadcast_shapes(shape: str, dtype) -> None:  # type: ignore[no-untyped-def]
    """Every broadcast shape of ``attn_bias`` (kv-head biases included) and its summed gradient."""
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 29, 41, 8
    shapes = dict(zip(["BHQK", "1HQK", "B1QK", "11QK", "BKvQK", "111K", "BH1K", "1Kv1K", "QK", "K"],
                      _bias_shapes(B, H, Hkv, Nq, Nk)))
    q, k, v, dout, bias = make_inputs(B, H, Hkv, Nq, Nk, D, dtype, np.random.default_rng(11), shapes[shape])
    check_case(q, k, v, dout, bias, {"causal": True, "block_q": 8, "block_k": 16})


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("blocks", [(1, 1), (3, 5), (16, 16), (64, 64), (128, 32), (200, 200)])
def test_block_sizes(blocks: Tuple[int, int]) -> None:
    q, k, v, dout, bias = make_inputs(1, 4, 1, 70, 90, 33, np.float64, np.random.default_rng(5), (1, 4, 70, 90))
    check_case(q, k, v, dout, bias, {"causal": True, "block_q": blocks[0], "block_k": blocks[1]})


@pytest.mark.task5_2
def test_orders_agree() -> None:
    """Q-major (FA2) and K-major (FA1 Algorithm 1) compute the same attention."""
    q, k, v, dout, bias = make_inputs(2, 4, 2, 100, 130, 32, np.float64, np.random.default_rng(3), (2, 1, 100, 130))
    results = [run_kernels(q, k, v, dout, bias, {"window": 40, "order": o, "block_q": 32, "block_k": 16}, False)
               for o in (TileOrder.Q_MAJOR, TileOrder.K_MAJOR)]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Edge cases: empty rows, extreme logits, empty inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fully_masked_rows(dtype, order) -> None:  # type: ignore[no-untyped-def]
    """Rows that see no key: out = 0, lse = -inf, zero gradients, never NaN (every way a row can be empty)."""
    B, H, Hkv, Nq, Nk, D = 2, 2, 1, 12, 10, 8
    q, k, v, dout, bias = make_inputs(B, H, Hkv, Nq, Nk, D, dtype, np.random.default_rng(0), (B, H, Nq, Nk))
    q_pos = np.arange(Nq) - 3  # rows 0..2: position -3.. -> clamp: -1 (empty) for the first, then early positions
    q_pos[:3] = -1  # empty query slots
    k_pos = np.arange(Nk) + 5  # keys start at position 5: causal rows at positions 0..4 see nothing
    pad = np.zeros((B, Nk), bool)
    pad[1] = True  # every key of batch row 1 is padding
    opts = {"causal": True, "q_positions": q_pos, "k_positions": k_pos, "key_padding_mask": pad, "order": order,
            "block_q": 4, "block_k": 4}
    out, lse, (dq, dk, dv, dbias) = check_case(q, k, v, dout, bias, opts)
    empty = ~reference_mask(B, Nq, Nk, True, None, q_pos, k_pos, pad).any(axis=-1)  # (B, Nq)
    assert empty[:, :3].all() and empty[1].all() and empty[0, 3:8].all() and not empty[0, 8:].any()
    e = np.broadcast_to(empty[:, None, :], (B, H, Nq))
    assert np.all(out[e] == 0) and np.all(np.isneginf(lse[e])) and np.all(dq[e] == 0)
    assert np.all(dbias[e] == 0)
    assert np.all(dk[1] == 0) and np.all(dv[1] == 0)
    for x in (out, dq, dk, dv, dbias):
        assert not np.isnan(x).any()


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extreme_logits(dtype) -> None:  # type: ignore[no-untyped-def]
    """Scores near 1e4 (softmax saturated): finite and correct.

    In float32 the forward keeps the plain rule. The backward recomputes ``P = exp(S - lse)`` from the saved float32
    ``lse``, whose ulp near 1e4 is 1e-3 (FlashAttention's backward does the same): its baseline is standard float32
    attention that also recomputes ``P`` from a float32 ``lse``, and the error must stay within 3x of that.
    """
    rng = np.random.default_rng(4)
    q, k, v, dout, bias = make_inputs(1, 2, 2, 40, 50, 16, dtype, rng, (1, 2, 40, 50))
    bias = (rng.choice([-1.0, 1.0], bias.shape) * 1e4).astype(dtype)
    opts = {"scale": 30.0, "block_q": 16, "block_k": 16}
    out, lse, grads = check_case(q, k, v, dout, bias, opts, backward=dtype == np.float64)
    assert np.abs(lse).max() > 5e3
    if dtype == np.float32:
        grads = run_kernels(q, k, v, dout, bias, opts)[2]
        ref_grads = reference_attention_backward(q, k, v, dout, attn_bias=bias, scale=30.0)
        naive = naive_float32(q, k, v, dout, bias, opts)[2]
        naive_lse = naive_float32(q, k, v, dout, bias, opts, p_from_lse=True)[2]
        for name, got, ref, n1, n2 in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, naive, naive_lse):
            baseline = n1 if _max_err(n1, ref) >= _max_err(n2, ref) else n2
            assert_matches(name, got, ref, baseline, dtype)
    for x in (out, lse) + tuple(grads):
        assert np.isfinite(x).all()


@pytest.mark.task5_2
def test_empty_inputs() -> None:
    for Nq, Nk in ((0, 5), (5, 0), (0, 0)):
        q, k, v, dout, _ = make_inputs(1, 2, 1, Nq, Nk, 4, np.float32, np.random.default_rng(0))
        out, lse, (dq, dk, dv, db) = run_kernels(q, k, v, dout, None, {"causal": True})
        assert out.shape == (1, 2, Nq, 4) and lse.shape == (1, 2, Nq)
        assert np.all(out == 0) and np.all(np.isneginf(lse)) and np.all(dq == 0)
        assert dk.shape == (1, 1, Nk, 4) and np.all(dk == 0) and np.all(dv == 0)


@pytest.mark.task5_2
def test_inputs_as_given() -> None:
    """Non-contiguous inputs are accepted; other dtypes are refused with a clear error."""
    q, k, v, dout, _ = make_inputs(1, 2, 2, 9, 9, 6, np.float64, np.random.default_rng(0))
    qt = np.ascontiguousarray(np.swapaxes(q, 2, 3)).swapaxes(2, 3)  # same values, Fortran-like strides
    spec = make_spec(q.shape, k.shape, v.shape)
    np.testing.assert_array_equal(cpu.forward(qt, k, v, None, spec)[0], cpu.forward(q, k, v, None, spec)[0])
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu.forward(q.astype(np.float16), k, v, None, spec)


@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fused_and_refined_backward_agree(dtype) -> None:  # type: ignore[no-untyped-def]
    """A bias broadcast over the query rows runs the two-pass backward (delta refined by the row sums of dS); the
    same call with ``rows_complete=False`` runs the fused one (dQ in the dK/dV pass, in per-chunk partials). Both
    match the float64 reference, and a full bias runs the fused backward too."""
    B, H, Hkv, N, D = 1, 2, 1, 150, 16
    opts = {"causal": True, "block_q": 16, "block_k": 16}
    for bias_shape in [(1, 1, 1, N), (B, H, N, N)]:
        q, k, v, dout, bias = make_inputs(B, H, Hkv, N, N, D, dtype, np.random.default_rng(4), bias_shape)
        spec = make_spec(q.shape, k.shape, v.shape, bias_shape=bias.shape, **opts)
        assert spec.refine_delta == (bias_shape[2] == 1)
        assert cpu.fused_chunks(B * Hkv, spec.Tc, q.nbytes) > 1  # several dQ partials
        out, lse = cpu.forward(q, k, v, bias, spec)
        ref = reference_attention_backward(q, k, v, dout, attn_bias=bias, causal=True)
        naive = naive_float32(q, k, v, dout, bias, opts)[2] if dtype == np.float32 else (None,) * 4
        for s in (spec, spec.replace(rows_complete=False)):
            for name, got, want, nv in zip(("dq", "dk", "dv", "dbias"), cpu.backward(q, k, v, bias, out, lse, dout,
                                                                                     s), ref, naive):
                assert_matches(name, got, want, nv, dtype, D)


# ----------------------------------------------------------------------------------------------------------------
# Determinism and dropout
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.task5_3
def test_backward_bitwise_deterministic() -> None:
    """20 backward passes (several threads, a broadcast bias, dropout) give bit-identical results."""
    q, k, v, dout, bias = make_inputs(2, 4, 2, 150, 170, 32, np.float32, np.random.default_rng(9), (1, 1, 150, 170))
    opts = {"causal": True, "dropout": 0.1, "seed": 5, "block_q": 32, "block_k": 32}
    spec = make_spec(q.shape, k.shape, v.shape, bias_shape=bias.shape, **opts)
    out, lse = cpu.forward(q, k, v, bias, spec)
    first = cpu.backward(q, k, v, bias, out, lse, dout, spec)
    for _ in range(19):
        again = cpu.backward(q, k, v, bias, out, lse, dout, spec)
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()
    # ... and the same bits with a single thread: how programs are shared out changes nothing
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = cpu.backward(q, k, v, bias, out, lse, dout, spec)
        single_fwd = cpu.forward(q, k, v, bias, spec)
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(first + (out, lse), single + single_fwd):
        assert a.tobytes() == b.tobytes()


@pytest.mark.task5_2
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p: float) -> None:
    """The kernel's keep-mask (read off with one-hot values) is the counter-based hash's, at rate 1 - p."""
    B, H, N = 2, 3, 64
    q = np.zeros((B, H, N, N), np.float64)  # equal scores: P = 1 / N everywhere
    k = np.zeros((B, H, N, N), np.float64)
    v = np.broadcast_to(np.eye(N), (B, H, N, N)).copy()  # out[i, j] = P_ij * keep_ij / (1 - p)
    spec = make_spec(q.shape, k.shape, v.shape, dropout=p, seed=2024, block_q=16, block_k=16)
    out, _ = cpu.forward(q, k, v, None, spec)
    kept = out > 0
    np.testing.assert_array_equal(kept, dropout_mask(2024, (B, H, N, N), p))
    np.testing.assert_allclose(out[kept], 1.0 / (N * (1 - p)), rtol=1e-12)
    n = kept.size
    rate = kept.mean()
    assert abs(rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n), f"keep rate {rate} vs {1 - p}"


@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropout_gradients(dtype) -> None:  # type: ignore[no-untyped-def]
    """With dropout, forward and all gradients equal the reference's with the same seed."""
    q, k, v, dout, bias = make_inputs(2, 4, 1, 45, 61, 16, dtype, np.random.default_rng(8), (2, 1, 45, 61))
    check_case(q, k, v, dout, bias, {"dropout": 0.3, "seed": 77, "causal": True, "block_q": 16, "block_k": 32})


# ----------------------------------------------------------------------------------------------------------------
# Compiled once, cached on disk
# ----------------------------------------------------------------------------------------------------------------

_CACHE_PROBE = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    from minitorch.attention.kernels.cpu import flash as cpu
    from minitorch.attention.spec import make_spec
    for dt in (np.float32, np.float64):
        q = np.ones((1, 2, 5, 3), dt); k = np.ones((1, 1, 6, 3), dt)
        for order in ("q_major", "k_major"):
            spec = make_spec(q.shape, k.shape, k.shape, causal=True, block_q=2, block_k=4, order=order)
            out, lse = cpu.forward(q, k, k, None, spec)
        cpu.backward(q, k, k, None, out, lse, out, spec)  # the fused backward
        bias = np.ones((1, 1, 1, 6), dt)  # broadcast over the query rows: the two-pass backward (refined delta)
        spec = make_spec(q.shape, k.shape, k.shape, bias_shape=bias.shape, block_q=2, block_k=4)
        out, lse = cpu.forward(q, k, k, bias, spec)
        cpu.backward(q, k, k, bias, out, lse, out, spec)
    kernels = [cpu._fwd_q_major, cpu._fwd_k_major, cpu._bwd_preprocess, cpu._bwd_dkdv, cpu._bwd_dq]
    print(json.dumps({
        "seconds": time.perf_counter() - t0,
        "hits": sum(sum(f.stats.cache_hits.values()) for f in kernels),
        "misses": sum(sum(f.stats.cache_misses.values()) for f in kernels),
    }))
    """
)


def _probe() -> Dict[str, float]:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _CACHE_PROBE], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.task5_2
@pytest.mark.task5_3
def test_kernels_cached_on_disk() -> None:
    """A second process loads every kernel (both dtypes) from the disk cache: no compilation."""
    _probe()  # compiles if this source was never compiled here, else already a cache hit
    second = _probe()
    assert second["misses"] == 0 and second["hits"] == 10, second
