"""The tiled NumPy flash attention (minitorch/attention/kernels/simple/flash.py) against the float64 NumPy reference.

float64 inputs must match the reference to ~1e-10 relative. float32 inputs follow FlashAttention's rule: the
kernel's error against the float64 truth is at most 3x the error of standard attention computed in float32
(plus a tiny floor), so the test is exactly as strict as float32 arithmetic allows.

Every test here runs with RuntimeWarnings turned into errors: masked rows must never produce NaN or inf warnings.
"""

import math
import tracemalloc
from typing import Any, Dict, Tuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch.attention import reference as R
from minitorch.attention.kernels.simple import flash as simple
from minitorch.attention.dropout import dropout_mask
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import TileOrder, TileType

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

SIZES = [1, 2, 5, 17, 37, 97]
BLOCKS = [1, 2, 3, 8, 16, 64, 128]
MAX_TILES = 8  # blocks are enlarged so that Tr, Tc <= MAX_TILES: keeps the Python tile loops fast


# ---------------------------------------------------------------------------------------------------------------
# Problem generation
# ---------------------------------------------------------------------------------------------------------------
@st.composite
def attention_cases(draw: Any) -> Dict[str, Any]:
    """One attention call: shapes, every mask option, bias, dropout, order, block sizes and a data seed."""
    B = draw(st.integers(1, 2))
    H, Hkv = draw(st.sampled_from([(1, 1), (4, 1), (4, 2), (2, 2)]))
    Nq, Nk = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    D = draw(st.sampled_from([1, 3, 8, 16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    opts: Dict[str, Any] = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        opts["window"] = draw(st.integers(0, Nk + 2))
        opts["num_sinks"] = draw(st.integers(0, 3))
    if draw(st.booleans()):  # ring-buffer-like keys: rotated positions, some empty slots
        k_pos = np.roll(np.arange(Nk) + draw(st.integers(0, 5)), draw(st.integers(0, Nk)))
        k_pos[rng.random(Nk) < 0.2] = -1
        q_pos = rng.integers(-1, Nk + 6, size=Nq)
        opts["k_positions"], opts["q_positions"] = k_pos, q_pos
    if draw(st.booleans()):
        opts["key_padding_mask"] = rng.random((B, Nk)) < 0.3
    bias_shape = None
    if draw(st.booleans()):
        Bb, Hb, Nqb = draw(st.sampled_from([1, B])), draw(st.sampled_from([1, Hkv, H])), draw(st.sampled_from([1, Nq]))
        bias_shape = (Bb, Hb, Nqb, Nk)
    if draw(st.booleans()):
        opts["dropout"] = draw(st.sampled_from([0.1, 0.5]))
        opts["seed"] = draw(st.integers(0, 2**31 - 1))
    block_q = max(draw(st.sampled_from(BLOCKS)), -(-Nq // MAX_TILES))
    block_k = max(draw(st.sampled_from(BLOCKS)), -(-Nk // MAX_TILES))
    order = draw(st.sampled_from(list(TileOrder)))
    data = {
        "q": rng.standard_normal((B, H, Nq, D)),
        "k": rng.standard_normal((B, Hkv, Nk, D)),
        "v": rng.standard_normal((B, Hkv, Nk, D)),
        "dout": rng.standard_normal((B, H, Nq, D)),
        "bias": None if bias_shape is None else rng.standard_normal(bias_shape),
    }
    return {"opts": opts, "block_q": block_q, "block_k": block_k, "order": order, **data}


def spec_for(case: Dict[str, Any]):
    q, k, v = case["q"], case["k"], case["v"]
    bias = case["bias"]
    return make_spec(
        q.shape, k.shape, v.shape, bias_shape=None if bias is None else bias.shape,
        block_q=case["block_q"], block_k=case["block_k"], order=case["order"],
        **case["opts"],
    )


def cast(case: Dict[str, Any], dtype: Any) -> Dict[str, Any]:
    out = dict(case)
    for name in ("q", "k", "v", "dout", "bias"):
        if case[name] is not None:
            out[name] = np.ascontiguousarray(case[name], dtype=dtype)
    return out


def run_simple(case: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    """simple.forward then simple.backward: ``(out, lse, dq, dk, dv, dbias)``."""
    spec = spec_for(case)
    q, k, v, bias = case["q"], case["k"], case["v"], case["bias"]
    out, lse = simple.forward(q, k, v, bias, spec)
    return (out, lse) + simple.backward(q, k, v, bias, out, lse, case["dout"], spec)


def run_reference(case: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    """The float64 oracle on the (possibly float32) inputs: ``(out, lse, dq, dk, dv, dbias)``."""
    q, k, v, bias = case["q"], case["k"], case["v"], case["bias"]
    out, lse = R.reference_attention(q, k, v, attn_bias=bias, **case["opts"])
    return (out, lse) + R.reference_attention_backward(q, k, v, case["dout"], attn_bias=bias, **case["opts"])


def naive_float32(case: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    """Standard attention *and its backward* with every operation in float32: the error baseline.

    The forward output is reference.py's ``naive_attention_float32``; ``lse`` and the gradients follow the
    same textbook formulas as ``reference_attention_backward``, in float32.
    """
    f32 = np.float32
    q, k, v, do = (np.asarray(case[n], dtype=f32) for n in ("q", "k", "v", "dout"))
    bias, opts = case["bias"], case["opts"]
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    out = R.naive_attention_float32(q, k, v, attn_bias=bias, **opts)
    mask = R.reference_mask(
        B, Nq, Nk, opts.get("causal", False), opts.get("window"), opts.get("q_positions"),
        opts.get("k_positions"), opts.get("key_padding_mask"), opts.get("num_sinks", 0),
    )[:, None]
    k_h, v_h = R._expand_kv(k, H), R._expand_kv(v, H)
    scale = f32(1 / math.sqrt(D) if opts.get("scale") is None else opts["scale"])
    s = scale * (q @ np.swapaxes(k_h, -1, -2))
    if bias is not None:
        s = s + R._full_bias(bias, B, H, Nq, Nk).astype(f32)
    s = np.where(mask, s, f32(-np.inf))
    m = s.max(axis=-1)
    m = np.where(np.isfinite(m), m, f32(0))
    e = np.where(mask, np.exp(s - m[..., None]), f32(0))
    l = e.sum(axis=-1)
    lse = np.where(l > 0, m + np.log(np.where(l > 0, l, f32(1))), f32(-np.inf))
    p = e / np.where(l > 0, l, f32(1))[..., None]
    p_drop = opts.get("dropout", 0.0)
    keep = (dropout_mask(opts.get("seed", 0), p.shape, p_drop) / f32(1 - p_drop)).astype(f32) if p_drop else f32(1)
    dv = np.swapaxes(p * keep, -1, -2) @ do
    dp = (do @ np.swapaxes(v_h, -1, -2)) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * (ds @ k_h)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q)
    dk = dk.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dv = dv.reshape(B, Hkv, H // Hkv, Nk, D).sum(axis=2)
    dbias = None if bias is None else R._sum_to(ds, bias.shape, H)
    return out, lse, dq, dk, dv, dbias


# ---------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------
NAMES = ("out", "lse", "dq", "dk", "dv", "dbias")


def max_err(x: np.ndarray, ref: np.ndarray) -> float:
    """max |x - ref|, with matching -inf entries (masked rows' lse) counting as exact."""
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape
    inf = np.isinf(ref)
    assert np.array_equal(np.isinf(x), inf) and np.array_equal(x[inf], ref[inf]), "infinite entries differ"
    assert not np.isnan(x).any(), "NaN in the result"
    return float(np.abs(x[~inf] - ref[~inf]).max(initial=0.0))


def magnitude(ref: np.ndarray) -> float:
    finite = np.asarray(ref)[np.isfinite(ref)]
    return max(1.0, float(np.abs(finite).max(initial=0.0)))


def check_float64(got: Tuple, ref: Tuple, names=NAMES) -> None:
    for name, x, r in zip(names, got, ref):
        if r is None:
            assert x is None, name
            continue
        assert x.dtype == np.float64, name
        assert max_err(x, r) <= 1e-10 * magnitude(r), f"{name}: error {max_err(x, r):.3g}"


# The floor of FlashAttention's rule, relative to the largest |value| (at least 1). Gradients get a larger one:
# where a row sees a single key, standard attention's dS = P * (dP - rowsum(dP * P)) cancels to exactly 0, while
# flash attention's dS = P * (dP - rowsum(dO * O)) (the delta trick that avoids storing P) leaves a float32
# rounding residue; summed over the rows of dK that is a few 1e-6. Float32 epsilon is 1.2e-7.
FLOOR = {"out": 1e-6, "lse": 1e-6, "dq": 1e-5, "dk": 1e-5, "dv": 1e-5, "dbias": 1e-5}


def check_float32(got: Tuple, ref: Tuple, naive: Tuple, names=NAMES) -> None:
    """FlashAttention's rule: error(kernel) <= 3 * error(standard float32 attention) + a small floor."""
    for name, x, r, n in zip(names, got, ref, naive):
        if r is None:
            assert x is None, name
            continue
        assert x.dtype == np.float32, name
        bound = 3 * max_err(n, r) + FLOOR[name] * magnitude(r)
        assert max_err(x, r) <= bound, f"{name}: error {max_err(x, r):.3g} > bound {bound:.3g}"


def assert_shapes(case: Dict[str, Any], got: Tuple) -> None:
    out, lse, dq, dk, dv, dbias = got
    assert out.shape == case["q"].shape and dq.shape == case["q"].shape
    assert lse.shape == case["q"].shape[:3]
    assert dk.shape == case["k"].shape and dv.shape == case["v"].shape
    if case["bias"] is not None:
        assert dbias.shape == case["bias"].shape


# ---------------------------------------------------------------------------------------------------------------
# Forward (task5_2) and backward (task5_3) over the hypothesis grid
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.task5_2
@given(attention_cases())
def test_forward_float64(case: Dict[str, Any]) -> None:
    spec = spec_for(case)
    out, lse = simple.forward(case["q"], case["k"], case["v"], case["bias"], spec)
    assert out.shape == case["q"].shape and lse.shape == case["q"].shape[:3]
    check_float64((out, lse), run_reference(case)[:2])


@pytest.mark.task5_2
@given(attention_cases())
def test_forward_float32(case: Dict[str, Any]) -> None:
    case = cast(case, np.float32)
    out, lse = simple.forward(case["q"], case["k"], case["v"], case["bias"], spec_for(case))
    check_float32((out, lse), run_reference(case)[:2], naive_float32(case)[:2])


@pytest.mark.task5_3
@given(attention_cases())
def test_backward_float64(case: Dict[str, Any]) -> None:
    got = run_simple(case)
    assert_shapes(case, got)
    check_float64(got, run_reference(case))


@pytest.mark.task5_3
@given(attention_cases())
def test_backward_float32(case: Dict[str, Any]) -> None:
    case = cast(case, np.float32)
    got = run_simple(case)
    assert_shapes(case, got)
    check_float32(got, run_reference(case), naive_float32(case))


# ---------------------------------------------------------------------------------------------------------------
# Targeted cases
# ---------------------------------------------------------------------------------------------------------------
def make_case(B=1, H=2, Hkv=1, Nq=17, Nk=17, D=8, data_seed=0, bias_shape=None, block_q=4, block_k=4,
              order=TileOrder.Q_MAJOR, **opts) -> Dict[str, Any]:
    """A fixed problem; ``opts`` are the attention options (causal, window, dropout, seed, ...)."""
    rng = np.random.default_rng(data_seed)
    return {
        "q": rng.standard_normal((B, H, Nq, D)), "k": rng.standard_normal((B, Hkv, Nk, D)),
        "v": rng.standard_normal((B, Hkv, Nk, D)), "dout": rng.standard_normal((B, H, Nq, D)),
        "bias": None if bias_shape is None else rng.standard_normal(bias_shape),
        "opts": opts, "block_q": block_q, "block_k": block_k, "order": order,
    }


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", list(TileOrder))
def test_fully_masked_rows(dtype: Any, order: TileOrder) -> None:
    """Rows that see no key: out 0, lse -inf, zero gradients, no NaN (and no warning)."""
    Nq, Nk = 9, 12
    q_pos = np.arange(Nq)
    q_pos[2] = -1  # an empty query row
    pad = np.zeros((2, Nk), dtype=bool)
    pad[1] = True  # batch row 1: every key is padding
    case = cast(make_case(B=2, H=4, Hkv=2, Nq=Nq, Nk=Nk, causal=True, window=2, q_positions=q_pos,
                          k_positions=np.arange(Nk) + 3, key_padding_mask=pad, bias_shape=(2, 2, Nq, Nk),
                          dropout=0.3, seed=5, order=order), dtype)
    out, lse, dq, dk, dv, dbias = got = run_simple(case)
    ref = run_reference(case)
    dead = np.isinf(ref[1])  # rows 0..2 (positions before every key), row 2 (empty) and all of batch row 1
    assert dead[0, :, :3].all() and dead[1].all() and not dead[0, :, 3:].any()
    assert np.all(out[dead] == 0) and np.all(lse[dead] == -np.inf) and np.all(dq[dead] == 0)
    assert np.all(dk[1] == 0) and np.all(dv[1] == 0) and np.all(dbias[1] == 0)
    assert all(np.isfinite(g).all() for g in (out, dq, dk, dv, dbias))
    if dtype == np.float64:
        check_float64(got, ref)
    else:
        check_float32(got, ref, naive_float32(case))


@pytest.mark.task5_2
@pytest.mark.task5_3
def test_everything_masked_window_zero() -> None:
    """window=0 hides every key (no sinks): the whole output is zeros and every gradient is zero."""
    case = make_case(window=0, bias_shape=(1, 1, 1, 17))
    out, lse, dq, dk, dv, dbias = run_simple(case)
    assert np.all(lse == -np.inf)
    for g in (out, dq, dk, dv, dbias):
        assert np.all(g == 0)


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("order", list(TileOrder))
def test_extreme_logits(dtype: Any, order: TileOrder) -> None:
    """Scores near 1e4 (where a plain exp overflows): the online softmax stays finite and correct."""
    rng = np.random.default_rng(1)
    case = make_case(B=1, H=2, Hkv=2, Nq=33, Nk=40, D=8, causal=True, order=order, block_q=8, block_k=8)
    case["q"] = 35.0 + 0.1 * rng.standard_normal(case["q"].shape)
    case["k"] = 35.0 + 0.1 * rng.standard_normal(case["k"].shape)
    case["opts"]["scale"] = 1.0
    case = cast(case, dtype)
    got = run_simple(case)
    ref = run_reference(case)
    assert ref[1].min() > 9000  # the scores really are ~1e4
    assert all(np.isfinite(g).all() for g in got[:5])  # out, lse, dq, dk, dv (no bias here)
    if dtype == np.float64:
        check_float64(got, ref)
    else:
        check_float32(got, ref, naive_float32(case))


@pytest.mark.task5_2
@pytest.mark.task5_3
def test_bias_broadcast_shapes_and_kv_head_bias() -> None:
    """Every bias shape of (B|1, H|Hkv|1, Nq|1, Nk); dbias comes back in the bias's own shape."""
    B, H, Hkv, Nq, Nk = 2, 4, 2, 6, 7
    for bias_shape in [(b, h, n, Nk) for b in (1, B) for h in (1, Hkv, H) for n in (1, Nq)]:
        case = make_case(B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, causal=True, bias_shape=bias_shape, block_q=4, block_k=3)
        got = run_simple(case)
        assert got[5].shape == bias_shape
        check_float64(got, run_reference(case))


@pytest.mark.task5_2
@pytest.mark.task5_3
@pytest.mark.parametrize("order", list(TileOrder))
def test_dropout_matches_reference_mask(order: TileOrder) -> None:
    """Dropout uses the counter-based keep-mask of (seed, b, h, i, j): same as the reference, not a fresh draw."""
    case = make_case(B=2, H=4, Hkv=2, Nq=20, Nk=23, dropout=0.4, seed=123, order=order, block_q=8, block_k=5)
    got = run_simple(case)
    check_float64(got, run_reference(case))
    other = dict(case, opts=dict(case["opts"], seed=124))  # another seed gives another output
    assert np.abs(run_simple(other)[0] - got[0]).max() > 1e-3
    plain = dict(case, opts=dict(case["opts"], dropout=0.0))  # lse is of the undropped scores
    assert np.array_equal(run_simple(plain)[1], got[1])


@pytest.mark.task5_2
@pytest.mark.parametrize("order", list(TileOrder))
def test_tiles_visited_follow_schedule(order: TileOrder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward touches exactly the non-SKIP tiles of ``tile_types[b]`` (padding-aware), in the spec's order."""
    Nq, Nk = 21, 26
    pad = np.zeros((2, Nk), dtype=bool)
    pad[1, :8] = True  # batch row 1: the first key tiles are all padding -> SKIP in that row only
    case = make_case(B=2, H=1, Hkv=1, Nq=Nq, Nk=Nk, causal=True, window=9, key_padding_mask=pad,
                     block_q=4, block_k=4, order=order)
    spec = spec_for(case)
    seen = []
    original = simple._Head.scores

    def recording(self, tq, tk):  # type: ignore[no-untyped-def]
        seen.append((self.b, tq, tk))
        return original(self, tq, tk)

    monkeypatch.setattr(simple._Head, "scores", recording)
    simple.forward(case["q"], case["k"], case["v"], None, spec)
    for b in range(2):
        visited = [(tq, tk) for bb, tq, tk in seen if bb == b]
        work = [(tq, tk) for tq, tk in zip(*np.nonzero(spec.tile_types[b] != TileType.SKIP))]
        key = (lambda t: t) if order == TileOrder.Q_MAJOR else (lambda t: (t[1], t[0]))
        assert visited == sorted(work, key=key)
    assert (spec.tile_types[1] == TileType.SKIP).sum() > (spec.tile_types[0] == TileType.SKIP).sum()


@pytest.mark.task5_3
def test_no_score_sized_allocation() -> None:
    """Forward and backward never allocate an (Nq, Nk) array: peak memory stays far below one score matrix."""
    Nq = Nk = 1024
    case = make_case(B=1, H=1, Hkv=1, Nq=Nq, Nk=Nk, D=4, block_q=128, block_k=128)
    spec = spec_for(case)
    q, k, v, do = case["q"], case["k"], case["v"], case["dout"]
    tracemalloc.start()
    try:
        out, lse = simple.forward(q, k, v, None, spec)
        simple.backward(q, k, v, None, out, lse, do, spec)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < Nq * Nk * 8 / 4, f"peak {peak} bytes"
