"""Attention variants as configurations of the engine: ``mask_mod`` / ``score_mod`` from Python, packed sequences
(segment ids), learnable sinks, softcap and ALiBi, on the three engines, forward and backward, float32 and float64.

Everything is measured against the float64 reference (``minitorch/attention/reference.py``), which evaluates the same
user functions and options densely, sharing no code with the kernels. float32 follows FlashAttention's rule: the
error against float64 is at most 3x the error of the same textbook formulas computed in float32
(``reference_attention_grads(..., dtype=np.float32)``), plus a floor of one dot product's rounding
(:func:`test_attention_cpu.assert_matches`). CUDA runs in Numba's simulator at tiny sizes (few cases: each is
seconds there).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_attention_cpu import assert_matches

import minitorch
from minitorch.attention import block_mask_from
from minitorch.attention.reference import reference_attention_grads, reference_mask
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import TileOrder, TileSchedule, TileType

ENGINES = {"simple": minitorch.SimpleBackend.attention, "cpu": minitorch.FastTensorBackend.attention}
GRADS = ("out", "lse", "dq", "dk", "dv", "dbias", "dsinks")
SPEC_ONLY = ("block_q", "block_k", "order", "num_splits")  # tiling: the reference ignores them


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(B: int, H: int, Hkv: int, Nq: int, Nk: int, D: int, dtype: Any, seed: int = 0,
                bias_shape: Optional[tuple] = None, q_scale: float = 1.0) -> Dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = {"q": rng.standard_normal((B, H, Nq, D)) * q_scale, "k": rng.standard_normal((B, Hkv, Nk, D)),
         "v": rng.standard_normal((B, Hkv, Nk, D)), "dout": rng.standard_normal((B, H, Nq, D)),
         "dlse": rng.standard_normal((B, H, Nq)),
         "bias": None if bias_shape is None else rng.standard_normal(bias_shape)}
    return {n: None if a is None else a.astype(dtype) for n, a in x.items()}


def run_engine(engine: Any, x: Dict[str, Any], opts: Dict[str, Any], to_device: Callable = np.asarray,
               backward: bool = True) -> Dict[str, Any]:
    """Forward and backward (with an incoming gradient on out and on lse) through ``engine`` on raw arrays."""
    q, k, v, bias = x["q"], x["k"], x["v"], x["bias"]
    dtype = q.dtype
    opts = dict(opts)
    sinks = opts.pop("sinks", None)
    sinks_a = None if sinks is None else to_device(np.asarray(sinks, dtype=dtype))
    spec = make_spec(q.shape, k.shape, v.shape, bias_shape=None if bias is None else bias.shape, sinks=sinks_a,
                     default_blocks=engine.default_blocks(q.shape[3]), **opts)
    dev = [None if a is None else to_device(a) for a in (q, k, v, bias, x["dout"], x["dlse"])]
    out, lse = engine.forward(*dev[:4], spec)
    got = {"out": out, "lse": lse}
    if backward:
        got.update(zip(("dq", "dk", "dv", "dbias"), engine.backward(*dev[:4], out, lse, dev[4], spec, dev[5])))
        got["dsinks"] = None if sinks is None else engine.sinks_backward(out, lse, dev[4], dev[5], spec)
    host = lambda a: None if a is None else (a.copy_to_host() if hasattr(a, "copy_to_host") else a)  # noqa: E731
    return {n: host(a) for n, a in got.items()}


def check(engine: Any, x: Dict[str, Any], opts: Dict[str, Any], to_device: Callable = np.asarray,
          backward: bool = True) -> Dict[str, Any]:
    """Run ``engine`` and compare every output and gradient with the float64 reference (FlashAttention's rule)."""
    got = run_engine(engine, x, opts, to_device, backward)
    ref_opts = {n: o for n, o in opts.items() if n not in SPEC_ONLY}
    args = (x["q"], x["k"], x["v"], x["dout"] if backward else None, x["dlse"] if backward else None)
    ref = reference_attention_grads(*args, attn_bias=x["bias"], **ref_opts)
    dtype = x["q"].dtype
    naive = reference_attention_grads(*args, attn_bias=x["bias"], dtype=np.float32, **ref_opts) \
        if dtype == np.float32 else {}
    for name in GRADS:
        if name not in got:
            continue
        if ref[name] is None:
            assert got[name] is None, name
            continue
        assert_matches(name, np.asarray(got[name]), ref[name], naive.get(name), dtype, x["q"].shape[3])
    return got


def documents(B: int, lengths: list, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Segment ids ``(B, sum(lengths) + pad)``: packed documents of these lengths (shuffled per batch row), then
    ``pad`` padding positions (-1)."""
    rows = []
    for _ in range(B):
        order = rng.permutation(len(lengths))
        ids = np.concatenate([np.full(lengths[i], n) for n, i in enumerate(order)] + [np.full(pad, -1)])
        rows.append(ids)
    return np.stack(rows).astype(np.int64)


def prefix_lm(prefix: int) -> Callable:
    def mask(b, h, q, k):  # type: ignore[no-untyped-def]
        return (k <= q) | (k < prefix)  # bidirectional over the prefix, causal after it
    return mask


def dilated(b, h, q, k):  # type: ignore[no-untyped-def]
    """Each head h sees every (h + 1)-th key behind it (a head-dependent mask)."""
    return (k <= q) & ((q - k) % (h + 1) == 0)


def score_mod_half(s, b, h, q, k):  # type: ignore[no-untyped-def]
    return s * 0.5 - 0.05 * (h + 1) * abs(q - k)  # halve the score, plus an ALiBi-like distance penalty


def score_mod_half_grad(s, b, h, q, k):  # type: ignore[no-untyped-def]
    return 0.5


# ---------------------------------------------------------------------------------------------------------------------
# Every variant on the NumPy and CPU engines, both dtypes
# ---------------------------------------------------------------------------------------------------------------------

B0, H0, HKV0, NQ0, NK0, D0 = 2, 4, 2, 37, 45, 16
_RNG = np.random.default_rng(5)
_QSEG, _KSEG = documents(B0, [5, 9, 11, 3], 9, _RNG), documents(B0, [7, 13, 11, 5], 9, _RNG)
_SINKS = np.array([0.5, -1.0, 2.0, 0.0])
_SLOPES = np.array([0.5, 0.25, 0.125, 0.0625])
_EMPTY_Q = np.where(np.arange(NQ0) % 7 == 3, -1, np.arange(NK0 - NQ0, NK0))  # some empty query rows
CASES: Dict[str, Dict[str, Any]] = {
    "documents": {"q_segment_ids": _QSEG[:, :NQ0], "k_segment_ids": _KSEG, "causal": True},
    "prefix_lm": {"mask_mod": prefix_lm(20)},
    "dilated_per_head": {"mask_mod": dilated, "window": 30},
    "mask_without_partial_tiles": {"mask_mod": lambda b, h, q, k: q * 0 == k * 0, "causal": True},  # no bits at all
    "softcap_30": {"softcap": 30.0},
    "softcap_50": {"softcap": 50.0, "causal": True},
    "alibi": {"alibi_slopes": _SLOPES, "causal": True},
    "score_mod": {"score_mod": score_mod_half, "score_mod_grad": score_mod_half_grad},
    "sinks_empty_rows": {"sinks": _SINKS, "q_positions": _EMPTY_Q, "causal": True},
    "everything": {"sinks": _SINKS, "softcap": 20.0, "alibi_slopes": _SLOPES, "score_mod": score_mod_half,
                   "score_mod_grad": score_mod_half_grad, "mask_mod": prefix_lm(12), "causal": True,
                   "q_segment_ids": _QSEG[:, :NQ0], "k_segment_ids": _KSEG, "dropout": 0.2, "seed": 3,
                   "num_splits": 2},
}
BIG_SCORES = ("softcap_30", "softcap_50")  # q scaled so that the raw scores reach 100


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case", [  # "everything" has split-K, whose merge is task 5.5's
    pytest.param(c, marks=[pytest.mark.task5_5] if "num_splits" in CASES[c] else []) for c in sorted(CASES)])
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_variant_matches_reference(engine: str, case: str, dtype: Any) -> None:
    x = make_inputs(B0, H0, HKV0, NQ0, NK0, D0, dtype, seed=sorted(CASES).index(case), bias_shape=(1, H0, NQ0, NK0),
                    q_scale=40.0 if case in BIG_SCORES else 1.0)
    order = TileOrder.K_MAJOR if case in ("documents", "alibi", "softcap_50") else TileOrder.Q_MAJOR
    got = check(ENGINES[engine], x, dict(CASES[case], block_q=16, block_k=8, order=order))
    if case in BIG_SCORES:
        raw = np.abs(np.einsum("bhid,bhjd->bhij", x["q"].astype(np.float64),
                               np.repeat(x["k"], H0 // HKV0, axis=1)) / np.sqrt(D0))
        assert raw.max() > 100, raw.max()  # the cap really bites
        assert np.all(np.isfinite(got["out"]))


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_sinks_fully_masked_row(engine: str) -> None:
    """A row that sees no key attends only to its sink: output 0, lse = the sink's logit (finite), no gradient but
    the sink's (which is exactly -P_sink delta = dlse for such a row)."""
    B, H, Nq, Nk = 1, 2, 6, 8
    x = make_inputs(B, H, 1, Nq, Nk, 4, np.float64, seed=1)
    seg_q = np.array([[0, 0, 1, 1, 2, -1]])  # rows 4 (segment 2: no key) and 5 (padding) see nothing
    seg_k = np.array([[0, 0, 0, 1, 1, 1, -1, -1]])
    sinks = np.array([0.7, -0.4])
    opts = {"q_segment_ids": seg_q, "k_segment_ids": seg_k, "sinks": sinks, "block_q": 2, "block_k": 4}
    got = check(ENGINES[engine], x, opts)
    for h in range(H):
        np.testing.assert_array_equal(got["out"][0, h, 4:], 0.0)
        np.testing.assert_allclose(got["lse"][0, h, 4:], sinks[h], rtol=0, atol=1e-15)
        np.testing.assert_array_equal(got["dq"][0, h, 4:], 0.0)
    # the empty rows' share of d sinks: P_sink = 1 and delta = -dlse there
    rows = np.where(np.arange(Nq) >= 4, 1.0, 0.0)
    only = run_engine(ENGINES[engine], dict(x, dout=np.zeros_like(x["dout"]), dlse=x["dlse"] * rows), opts)
    np.testing.assert_allclose(only["dsinks"], x["dlse"][0, :, 4:].sum(axis=1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Packed documents (hypothesis): 1-5 segments of odd lengths, padding; tiles sound, results exact
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def packed_documents(draw):  # type: ignore[no-untyped-def]
    n_docs = draw(st.integers(1, 5))
    q_lengths = [2 * draw(st.integers(0, 9)) + 1 for _ in range(n_docs)]  # odd lengths
    same = draw(st.booleans())  # self-attention over the packed sequence, or queries of a different packing
    k_lengths = q_lengths if same else [2 * draw(st.integers(0, 9)) + 1 for _ in range(n_docs)]
    q_pad, k_pad = draw(st.integers(0, 6)), draw(st.integers(0, 6))
    B = draw(st.sampled_from([1, 2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    q_seg = documents(B, q_lengths, q_pad, rng) if not same else None
    k_seg = documents(B, k_lengths, k_pad, rng)
    if same:
        q_seg = k_seg.copy()
    opts = {"q_segment_ids": q_seg, "k_segment_ids": k_seg, "causal": draw(st.booleans()),
            "block_q": draw(st.sampled_from([1, 3, 8, 16])), "block_k": draw(st.sampled_from([2, 5, 8, 16])),
            "order": draw(st.sampled_from([TileOrder.Q_MAJOR, TileOrder.K_MAJOR]))}
    if draw(st.booleans()):
        opts["sinks"] = rng.standard_normal(2)
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    return B, q_seg.shape[1], k_seg.shape[1], dtype, draw(st.integers(0, 2**16)), opts


GRID = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.task5_3
@GRID
@given(packed_documents())
def test_packed_documents_cpu(case) -> None:  # type: ignore[no-untyped-def]
    B, Nq, Nk, dtype, seed, opts = case
    sched = TileSchedule(Nq, Nk, opts["block_q"], opts["block_k"], causal=opts["causal"],
                         q_segment_ids=opts["q_segment_ids"], k_segment_ids=opts["k_segment_ids"])
    mask = reference_mask(B, Nq, Nk, opts["causal"]) & (opts["q_segment_ids"][:, :, None] ==
                                                         opts["k_segment_ids"][:, None, :]) & (
        opts["q_segment_ids"] >= 0)[:, :, None]
    assert_sound(sched.batch_types, mask, opts["block_q"], opts["block_k"])
    check(ENGINES["cpu"], make_inputs(B, 2, 1, Nq, Nk, 8, dtype, seed), opts)


def assert_sound(types: np.ndarray, mask: np.ndarray, bq: int, bk: int) -> None:
    """No visible pair in a SKIP tile, no masked pair in a DENSE tile (``types (B, Tr, Tc)``, ``mask (B, Nq, Nk)``)."""
    B, Nq, Nk = mask.shape
    for b in range(B):
        for tq in range(types.shape[1]):
            for tk in range(types.shape[2]):
                tile = mask[b, tq * bq:(tq + 1) * bq, tk * bk:(tk + 1) * bk]
                t = types[b % types.shape[0], tq, tk]
                if t == TileType.SKIP:
                    assert not tile.any(), (b, tq, tk)
                elif t == TileType.DENSE:
                    assert tile.all(), (b, tq, tk)


def test_sorted_documents_tiles_are_exact() -> None:
    """Packed documents (sorted ids): tiles inside one document are DENSE, tiles across documents that share none
    are SKIP, and only the tiles on a boundary are TRIANGLE."""
    seg = np.repeat(np.arange(4), 16)[None]  # 4 documents of 16, tiles of 8: boundaries fall between tiles
    sched = TileSchedule(64, 64, 8, 8, q_segment_ids=seg, k_segment_ids=seg)
    expected = np.kron(np.eye(4, dtype=np.int8), np.ones((2, 2), np.int8)) * TileType.DENSE
    np.testing.assert_array_equal(sched.batch_types[0], expected)
    sched = TileSchedule(64, 64, 8, 8, causal=True, q_segment_ids=seg, k_segment_ids=seg)
    assert sched.skip_fraction() == pytest.approx(1 - 4 * 3 / 64)  # each document: 3 of its 4 tiles (causal)


# ---------------------------------------------------------------------------------------------------------------------
# block_mask_from: sound and exact (exhaustive on small sizes)
# ---------------------------------------------------------------------------------------------------------------------

MASKS = {
    "causal": lambda w: (lambda b, h, q, k: k <= q),
    "window": lambda w: (lambda b, h, q, k: abs(q - k) < w),
    "prefix": lambda w: prefix_lm(w),
    "dilated": lambda w: dilated,
    "documents": lambda w: (lambda b, h, q, k: (q // (w + 1)) == (k // (w + 1))),
    "per_batch": lambda w: (lambda b, h, q, k: (k + b) % (w + 1) != 0),
    "everything": lambda w: (lambda b, h, q, k: q * 0 == k * 0),
}


@GRID
@given(name=st.sampled_from(sorted(MASKS)), w=st.integers(1, 6), B=st.integers(1, 2), H=st.integers(1, 3),
       Nq=st.integers(0, 19), Nk=st.integers(0, 19), bq=st.integers(1, 8), bk=st.integers(1, 8),
       empty=st.booleans(), seed=st.integers(0, 1000))
def test_block_mask_sound_and_exact(name: str, w: int, B: int, H: int, Nq: int, Nk: int, bq: int, bk: int,
                                    empty: bool, seed: int) -> None:
    """Every tile of ``block_mask_from`` is what the mask says, pair by pair: SKIP has no visible pair, DENSE no
    masked one, TRIANGLE both; its bits are the mask; combined with the positions' rule by ``TileSchedule`` the
    result is still sound."""
    fn = MASKS[name](w)
    rng = np.random.default_rng(seed)
    qp = kp = None
    if empty:
        qp = np.where(rng.random(Nq) < 0.2, -1, rng.integers(0, 25, Nq))
        kp = np.where(rng.random(Nk) < 0.2, -1, rng.permutation(25)[:Nk] if Nk <= 25 else np.arange(Nk))
    bm = block_mask_from(fn, B, H, Nq, Nk, bq, bk, q_positions=qp, k_positions=kp)
    bq, bk = bm.block_q, bm.block_k
    for b in range(B):
        for h in range(H):
            dense = np.broadcast_to(fn(b, h, bm.q_pos[:, None], bm.k_pos[None, :]), (Nq, Nk))
            np.testing.assert_array_equal(bm.visible(b, h), dense)
            types = bm.types[b % bm.types.shape[0], h % bm.types.shape[1]]
            for tq in range(bm.Tr):
                for tk in range(bm.Tc):
                    tile = dense[tq * bq:(tq + 1) * bq, tk * bk:(tk + 1) * bk]
                    want = TileType.SKIP if not tile.any() else (TileType.DENSE if tile.all() else TileType.TRIANGLE)
                    assert types[tq, tk] == want, (b, h, tq, tk)
    sched = TileSchedule(Nq, Nk, bq, bk, causal=True, q_positions=bm.q_pos, k_positions=bm.k_pos, block_mask=bm)
    for b in range(B):
        for h in range(H):
            full = reference_mask(1, Nq, Nk, True, None, bm.q_pos, bm.k_pos)[0] & bm.visible(b, h)
            ht = sched.head_types[b % sched.head_types.shape[0], h % sched.head_types.shape[1]]
            assert_sound(ht[None], full[None], bq, bk)


def test_block_mask_stores_only_what_the_mask_depends_on() -> None:
    assert block_mask_from(lambda b, h, q, k: k <= q, 4, 8, 32, 32, 8, 8).types.shape == (1, 1, 4, 4)
    assert block_mask_from(dilated, 4, 8, 32, 32, 8, 8).types.shape == (1, 8, 4, 4)
    bm = block_mask_from(lambda b, h, q, k: (k <= q) | (k < b), 4, 8, 32, 32, 8, 8)
    assert bm.types.shape == (4, 1, 4, 4)
    assert bm.bits.shape[1:] == (8, 8) and bm.bits.shape[0] == int((bm.types == TileType.TRIANGLE).sum())


# ---------------------------------------------------------------------------------------------------------------------
# The tensor API: autodiff reaches the sinks and the bias; a block mask can be reused
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.task5_3
@pytest.mark.parametrize("backend", ["simple", "fast"])
def test_flash_attention_matches_attention_reference(backend: str) -> None:
    """``q.flash_attention`` with every variant against ``attention_reference`` (tensor ops + autodiff), values
    and the gradients of q, k, v, the bias and the sinks, in float64."""
    be = minitorch.SimpleBackend if backend == "simple" else minitorch.FastTensorBackend
    x = make_inputs(B0, H0, HKV0, NQ0, NK0, 8, np.float64, seed=4, bias_shape=(1, 1, NQ0, NK0))
    opts = dict(CASES["everything"], dropout=0.0, block_q=8, block_k=8)
    opts.pop("num_splits")
    outs = []
    for fn in (minitorch.flash_attention, minitorch.attention_reference):
        t = {n: minitorch.from_numpy(x[n], backend=be).requires_grad_() for n in ("q", "k", "v", "bias")}
        sinks = minitorch.from_numpy(np.asarray(_SINKS), backend=be).requires_grad_()
        out, lse = fn(t["q"], t["k"], t["v"], attn_bias=t["bias"], return_lse=True, **dict(opts, sinks=sinks))
        (out * minitorch.from_numpy(x["dout"], backend=be)).sum().backward()
        (lse * minitorch.from_numpy(x["dlse"], backend=be)).sum().backward()
        outs.append([out.to_numpy(), lse.to_numpy()] + [t[n].grad.to_numpy() for n in ("q", "k", "v", "bias")]
                    + [sinks.grad.to_numpy()])
    ref = reference_attention_grads(x["q"], x["k"], x["v"], x["dout"], x["dlse"], attn_bias=x["bias"],
                                    **{n: o for n, o in opts.items() if n not in SPEC_ONLY})
    for name, a, b, r in zip(("out", "lse", "dq", "dk", "dv", "dbias", "dsinks"), *outs,
                             (ref[n] for n in GRADS)):
        np.testing.assert_allclose(a, r, rtol=1e-9, atol=1e-10, err_msg=f"flash_attention {name}")
        np.testing.assert_allclose(b, r, rtol=1e-9, atol=1e-10, err_msg=f"attention_reference {name}")


def test_block_mask_reused_across_calls() -> None:
    """A BlockMask from block_mask_from passed as mask_mod: evaluated once, its tiles taken by the call; a block
    mask of another call is refused."""
    x = make_inputs(1, 2, 2, 40, 40, 8, np.float64, seed=2)
    q, k, v = (minitorch.from_numpy(x[n], backend=minitorch.FastTensorBackend) for n in ("q", "k", "v"))
    bm = block_mask_from(prefix_lm(9), 1, 2, 40, 40, 16, 8)
    a = q.flash_attention(k, v, mask_mod=bm).to_numpy()
    b = q.flash_attention(k, v, mask_mod=prefix_lm(9), block_q=16, block_k=8).to_numpy()
    np.testing.assert_array_equal(a, b)
    one_head = block_mask_from(prefix_lm(9), 1, 1, 40, 40, 16, 8)  # H = 1: serves every head
    np.testing.assert_array_equal(q.flash_attention(k, v, mask_mod=one_head).to_numpy(), a)
    with pytest.raises(ValueError, match="block mask was built for"):
        q.flash_attention(k, v, mask_mod=bm, block_q=8)
    with pytest.raises(ValueError, match="block mask was built for"):
        q.flash_attention(k, v, mask_mod=block_mask_from(prefix_lm(9), 1, 2, 40, 41, 16, 8))


# ---------------------------------------------------------------------------------------------------------------------
# A key that a query does not see is never read for it (other documents, SKIP and masked tiles of a mask_mod)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_nan_in_unseen_keys_changes_nothing(engine: str) -> None:
    x = make_inputs(1, 2, 1, 32, 32, 8, np.float32, seed=6)
    seg = np.repeat([0, 1, 2], [10, 12, 10])[None]
    mask = prefix_lm(4)
    clean = run_engine(ENGINES[engine], x, {"q_segment_ids": seg, "k_segment_ids": seg, "mask_mod": mask,
                                             "causal": True, "block_q": 8, "block_k": 8})
    poisoned = dict(x, k=x["k"].copy(), v=x["v"].copy())
    poisoned["k"][0, 0, 22:] = np.nan  # the third document: unseen by the others
    poisoned["v"][0, 0, 22:] = np.inf
    got = run_engine(ENGINES[engine], poisoned, {"q_segment_ids": seg, "k_segment_ids": seg, "mask_mod": mask,
                                                 "causal": True, "block_q": 8, "block_k": 8})
    # (the same values up to rounding: a tile with NaN next to visible keys takes the product that skips masked pairs)
    for name in ("out", "lse", "dq", "dk", "dv"):
        np.testing.assert_allclose(got[name][:, :, :22], clean[name][:, :, :22], rtol=1e-5, atol=1e-6, err_msg=name)
    assert np.isnan(got["out"][:, :, 22:]).any()  # ... while the document that sees them goes NaN


# ---------------------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------------------


def _call(backend: Any = None, **opts: Any) -> Any:
    be = backend or minitorch.FastTensorBackend
    x = make_inputs(1, 2, 2, 8, 8, 4, np.float32, seed=0)
    q, k, v = (minitorch.from_numpy(x[n], backend=be).requires_grad_() for n in ("q", "k", "v"))
    return q.flash_attention(k, v, **opts)


def uses_and(b, h, q, k):  # type: ignore[no-untyped-def]
    return (k <= q) and (q - k < 4)


def not_compilable(s, b, h, q, k):  # type: ignore[no-untyped-def]
    return float(str(s))


@pytest.mark.parametrize("opts, error, match", [
    ({"mask_mod": uses_and}, TypeError, r"mask_mod 'uses_and' .*could not be evaluated.*not `and`"),
    ({"mask_mod": lambda b, h, q: q > 0}, TypeError, r"mask_mod .* must take 4 arguments"),
    ({"mask_mod": lambda b, h, q, k: (q - k) * 1.5}, TypeError, r"mask_mod .* must return booleans"),
    ({"mask_mod": 3}, TypeError, r"mask_mod must be a function"),
    ({"score_mod": lambda s, b, h: s}, TypeError, r"score_mod .* must take 5 arguments"),
    ({"score_mod": not_compilable}, TypeError, r"score_mod 'not_compilable' .*cannot be compiled by Numba"),
    ({"score_mod": lambda s, b, h, q, k: s > 0}, TypeError, r"score_mod .* must return a number"),
    ({"score_mod_grad": lambda s, b, h, q, k: 1.0}, ValueError, r"score_mod_grad was given without a score_mod"),
    ({"q_segment_ids": np.zeros((1, 8), int)}, ValueError, r"q_segment_ids and k_segment_ids go together"),
    ({"q_segment_ids": np.zeros((1, 7), int), "k_segment_ids": np.zeros((1, 8), int)}, ValueError,
     r"q_segment_ids must have shape \(B, Nq\)=\(1, 8\)"),
    ({"q_segment_ids": np.full((1, 8), -2), "k_segment_ids": np.zeros((1, 8), int)}, ValueError, r">= 0, or -1"),
    ({"sinks": np.zeros(3, np.float32)}, ValueError, r"sinks must have shape \(H,\)=\(2,\)"),
    ({"softcap": 0.0}, ValueError, r"softcap must be a finite number > 0"),
    ({"softcap": "big"}, ValueError, r"softcap must be"),
    ({"alibi_slopes": [1.0]}, ValueError, r"alibi_slopes must have shape \(H,\)=\(2,\)"),
    ({"alibi_slopes": [1.0, np.nan]}, ValueError, r"alibi_slopes must be finite"),
])
def test_bad_variants_raise_clear_errors(opts: Dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(**opts)


@pytest.mark.parametrize("backend", ["simple", "fast"])
def test_backward_through_score_mod_needs_its_grad(backend: str) -> None:
    be = minitorch.SimpleBackend if backend == "simple" else minitorch.FastTensorBackend
    out = _call(be, score_mod=score_mod_half)  # forward alone needs no derivative
    with pytest.raises(ValueError, match=r"pass score_mod_grad="):
        out.sum().backward()


def test_simple_engine_score_mod_errors_name_the_function() -> None:
    with pytest.raises(TypeError, match=r"score_mod 'not_compilable' .*could not be evaluated"):
        _call(minitorch.SimpleBackend, score_mod=not_compilable)


# ---------------------------------------------------------------------------------------------------------------------
# Dynamic Mask Attention: importance="exp" | "log"
# ---------------------------------------------------------------------------------------------------------------------


def test_dma_importance_log_is_log_space() -> None:
    from minitorch.attention.reference import reference_dma, reference_dma_backward

    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal(s) for s in ((1, 2, 20, 4), (1, 1, 20, 4), (1, 1, 20, 4), (1, 2, 20, 4)))
    dt, a = rng.standard_normal((1, 4)), rng.standard_normal(1)
    results = []
    for kw in ({"importance": "log"}, {"log_space": True}):
        t = {n: minitorch.from_numpy(x).requires_grad_() for n, x in (("q", q), ("k", k), ("v", v), ("dt", dt),
                                                                       ("a", a))}
        out = minitorch.flash_dma_attention(t["q"], t["k"], t["v"], t["dt"], t["a"], keep_window_size=6,
                                            causal=True, block_q=8, block_k=4, **kw)
        (out * minitorch.from_numpy(do)).sum().backward()
        results.append([out.to_numpy()] + [t[n].grad.to_numpy() for n in ("q", "k", "v", "dt", "a")])
    ref_out = reference_dma(q, k, v, dt, a, keep_window_size=6, causal=True, log_space=True)[0]
    ref_grads = reference_dma_backward(q, k, v, dt, a, do, keep_window_size=6, causal=True, log_space=True)
    for got, ref in zip(results[0], (ref_out,) + tuple(ref_grads)):
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-11)
    for x, y in zip(*results):
        np.testing.assert_array_equal(x, y)
    t = minitorch.from_numpy(q)
    with pytest.raises(ValueError, match='importance must be "exp" or "log"'):
        minitorch.flash_dma_attention(t, minitorch.from_numpy(k), minitorch.from_numpy(v), dt, a, importance="ln")
    with pytest.raises(ValueError, match='log_space=True means importance="log"'):
        minitorch.flash_dma_attention(t, minitorch.from_numpy(k), minitorch.from_numpy(v), dt, a, log_space=True,
                                      importance="exp")


# ---------------------------------------------------------------------------------------------------------------------
# CUDA (simulator): a few tiny cases that together configure every variant
# ---------------------------------------------------------------------------------------------------------------------

CUDA_CASES = {
    "documents_sinks_alibi_f32": (np.float32, 2, 2, 1, {
        "q_segment_ids": np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, -1], [0, 1, 1, 1, 1, 1, 3, 3, 3, -1, -1]]),
        "k_segment_ids": np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, -1, -1, -1], [0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, -1,
                                                                                -1]]),
        "sinks": np.array([0.3, -0.8]), "alibi_slopes": np.array([0.5, 0.25]), "causal": True, "num_splits": 2}),
    "mask_mod_per_head_f64": (np.float64, 1, 2, 1, {"mask_mod": dilated, "order": TileOrder.K_MAJOR}),
    "score_mod_softcap_f32": (np.float32, 1, 2, 2, {"score_mod": score_mod_half, "score_mod_grad": score_mod_half_grad,
                                                     "softcap": 2.0, "mask_mod": prefix_lm(5)}),
    # one query row: the split layout (a key's head dim over lanes, groups merged per block), split-K over it
    "decode_sinks_mods_f32": (np.float32, 1, 4, 2, {
        "sinks": np.array([0.3, -0.8, 1.0, 0.0]), "alibi_slopes": np.array([0.5, 0.25, 0.1, 0.0]), "softcap": 5.0,
        "score_mod": score_mod_half, "score_mod_grad": score_mod_half_grad, "causal": True, "window": 9,
        "dropout": 0.3, "seed": 4, "num_splits": 2}),
}


@pytest.mark.cuda
@pytest.mark.task5_4
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_cuda_variants(case: str) -> None:
    from numba import cuda

    dtype, B, H, Hkv, opts = CUDA_CASES[case]
    Nq, Nk = (11, 13) if "q_segment_ids" in opts else (1, 13) if case.startswith("decode") else (12, 12)
    x = make_inputs(B, H, Hkv, Nq, Nk, 4, dtype, seed=9, bias_shape=(1, H, Nq, Nk))
    check(minitorch.CudaBackend.attention, x, dict(opts, block_q=8, block_k=4), to_device=cuda.to_device)


@pytest.mark.cuda
def test_cuda_score_mod_errors_name_the_function() -> None:
    def broken(s, b, h, q, k):  # type: ignore[no-untyped-def]
        return s + undefined_name  # noqa: F821

    with pytest.raises(TypeError, match=r"score_mod '.*broken' .*failed in the CUDA kernels: NameError"):
        _call(minitorch.CudaBackend, score_mod=broken)
