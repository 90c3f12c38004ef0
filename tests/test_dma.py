"""Dynamic mask attention (minitorch/attention/dma.py, selection.py, and the engines) against the float64 oracle.

The oracle (``reference.reference_dma*``) builds the dense ``(Nq, Nk)`` keep-mask the direct way: a stable argsort
of z per query over its visible keys. It shares no code with the selection (heap sweep, thresholds, compacted
list, tile flags). float64 results must match it to ~1e-10 relative; float32 results follow FlashAttention's rule
(error <= 3x a naive float32 implementation's error + a small floor), as in test_attention_simple.py.

Backends: ``simple`` (NumPy), ``fast`` (fused Numba CPU kernels), ``cuda`` (the CUDA kernels in Numba's simulator,
tiny sizes). DMA is the engine's flash attention configured with the selection (``functions.dma_config``).
"""

from __future__ import annotations

import math
import tracemalloc
from typing import Any, Dict, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minitorch.attention import dma as DMA
from minitorch.attention import reference as R
from minitorch.attention.dma import flash_dma_attention
from minitorch.attention.functions import dma_config
from minitorch.attention.importance import importance, importance_backward
from minitorch.attention.kernels.cpu.select import select as select_cpu
from minitorch.attention.selection import Selection, kept_dense, select_numpy
from minitorch.attention.spec import DMASpec, KeyList, make_dma_spec, make_spec
from minitorch.attention.tiling import TileType
from minitorch.fast_ops import FastTensorBackend as FastBackend
from minitorch.tensor import Tensor
from minitorch.tensor_functions import from_numpy
from minitorch.tensor_ops import SimpleBackend

pytestmark = [pytest.mark.task5_6, pytest.mark.filterwarnings("error::RuntimeWarning")]

BACKENDS = {"simple": SimpleBackend, "fast": FastBackend}


# ---------------------------------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------------------------------


def make_case(B=1, H=2, Hkv=1, Nq=17, Nk=17, D=4, keep=5, causal=False, pad=False, dropout=0.0, log_space=False,
              ties=None, a_scale=1.0, data_seed=0, block_q=4, block_k=4) -> Dict[str, Any]:
    """A DMA problem. ``ties``: None (random z), "all" (a_coef = 0: every z = 1), "flat" (dt_proj = 0: z equal per
    head), "discrete" (integer v, one-hot dt_proj rows: z takes three values, many exact ties)."""
    rng = np.random.default_rng(data_seed)
    v = rng.standard_normal((B, Hkv, Nk, D))
    dt = rng.standard_normal((Hkv, Hkv * D)) * 0.5
    a = rng.standard_normal(Hkv) * a_scale
    if ties == "all":
        a = np.zeros(Hkv)
    elif ties == "flat":
        dt = np.zeros((Hkv, Hkv * D))
    elif ties == "discrete":
        v = rng.integers(-1, 2, size=(B, Hkv, Nk, D)).astype(np.float64)
        dt = np.zeros((Hkv, Hkv * D))
        dt[np.arange(Hkv), rng.integers(0, Hkv * D, size=Hkv)] = 1.0
        a = np.abs(a) + 0.5
    return {
        "q": rng.standard_normal((B, H, Nq, D)), "k": rng.standard_normal((B, Hkv, Nk, D)), "v": v,
        "dt": dt, "a": a, "dout": rng.standard_normal((B, H, Nq, D)),
        "opts": {"keep_window_size": keep, "causal": causal, "dropout_p": dropout, "seed": 7 if dropout else None,
                 "key_padding_mask": (rng.random((B, Nk)) < 0.3) if pad else None, "log_space": log_space},
        "blocks": {"block_q": block_q, "block_k": block_k},
    }


def ref_kwargs(case: Dict[str, Any]) -> Dict[str, Any]:
    o = case["opts"]
    return {"keep_window_size": o["keep_window_size"], "causal": o["causal"], "key_padding_mask": o["key_padding_mask"],
            "dropout": o["dropout_p"], "seed": o["seed"] or 0, "log_space": o["log_space"]}


def reference(case: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    """``(out, dq, dk, dv, d_dt, d_a)`` of the float64 oracle on the case's (possibly float32) inputs."""
    args = [case[n] for n in ("q", "k", "v", "dt", "a")]
    out = R.reference_dma(*args, **ref_kwargs(case))[0]
    return (out,) + R.reference_dma_backward(*args, case["dout"], **ref_kwargs(case))


def run_tensors(case: Dict[str, Any], backend: Any, dtype: Any = np.float64) -> Tuple[np.ndarray, ...]:
    """flash_dma_attention forward and backward through the tensor API: ``(out, dq, dk, dv, d_dt, d_a)``."""
    ts = [from_numpy(np.asarray(case[n], dtype=dtype), backend=backend, requires_grad=True)
          for n in ("q", "k", "v", "dt", "a")]
    out = flash_dma_attention(*ts, **case["opts"], **case["blocks"])
    (out * from_numpy(np.asarray(case["dout"], dtype=dtype), backend=backend)).sum().backward()
    return (out.to_numpy(),) + tuple(t.grad.to_numpy() for t in ts)


NAMES = ("out", "dq", "dk", "dv", "d_dt", "d_a")


def max_err(x: np.ndarray, ref: np.ndarray) -> float:
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape and not np.isnan(x).any()
    return float(np.abs(x - ref).max(initial=0.0))


def magnitude(ref: np.ndarray) -> float:
    return max(1.0, float(np.abs(ref).max(initial=0.0)))


def check_float64(got: Tuple, ref: Tuple) -> None:
    for name, x, r in zip(NAMES, got, ref):
        assert x.dtype == np.float64, name
        assert max_err(x, r) <= 1e-10 * magnitude(r), f"{name}: error {max_err(x, r):.3g}"


def naive_float32(case: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    """DMA and its textbook backward with every operation in float32 (the oracle's keep-mask): the error baseline."""
    f32 = np.float32
    q, k, v, dt, a, do = (np.asarray(case[n], dtype=f32) for n in ("q", "k", "v", "dt", "a", "dout"))
    o = case["opts"]
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = H // Hkv
    x = v.transpose(0, 2, 1, 3).reshape(B, Nk, Hkv * D)
    u = np.einsum("bjc,gc->bgj", x, dt)
    sp = np.logaddexp(f32(0), u)
    z = a[None, :, None] * sp if o["log_space"] else np.exp(a[None, :, None] * sp)
    z64 = R.reference_dma_importance(case["v"], case["dt"], case["a"], o["log_space"])[0]
    mask = R.reference_dma_mask(z64, Nq, o["keep_window_size"], o["causal"], o["key_padding_mask"])
    mask = np.repeat(mask, G, axis=1)
    kh, vh, zh = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1), np.repeat(z, G, axis=1)
    scale = f32(1 / math.sqrt(D))
    s = np.where(mask, scale * (q @ np.swapaxes(kh, -1, -2)) + zh[:, :, None, :], f32(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, f32(0))
    e = np.where(mask, np.exp(s - m), f32(0))
    l = e.sum(axis=-1, keepdims=True)
    p = e / np.where(l > 0, l, f32(1))
    keep = 1.0
    if o["dropout_p"]:
        keep = (R.dropout_mask(o["seed"], p.shape, o["dropout_p"]) / f32(1 - o["dropout_p"])).astype(f32)
    out = (p * keep) @ vh
    dp = (do @ np.swapaxes(vh, -1, -2)) * keep
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * (ds @ kh)
    dk = (scale * (np.swapaxes(ds, -1, -2) @ q)).reshape(B, Hkv, G, Nk, D).sum(axis=2)
    dv = (np.swapaxes(p * keep, -1, -2) @ do).reshape(B, Hkv, G, Nk, D).sum(axis=2)
    dz = ds.sum(axis=2).reshape(B, Hkv, G, Nk).sum(axis=2)
    sig = f32(0.5) + f32(0.5) * np.tanh(f32(0.5) * u)
    ar = a[None, :, None]
    du, dza = (dz * ar * sig, dz * sp) if o["log_space"] else (dz * z * ar * sig, dz * z * sp)
    d_dt = np.einsum("bgj,bjc->gc", du, x)
    dv = dv + np.einsum("bgj,gc->bjc", du, dt).reshape(B, Nk, Hkv, D).transpose(0, 2, 1, 3)
    return out, dq, dk, dv, d_dt, dza.sum(axis=(0, 2))


FLOOR = {"out": 1e-6, "dq": 1e-5, "dk": 1e-5, "dv": 1e-5, "d_dt": 1e-5, "d_a": 1e-5}


def check_float32(got: Tuple, ref: Tuple, naive: Tuple) -> None:
    """FlashAttention's rule: error(kernel) <= 3 * error(standard float32 attention) + a small floor."""
    for name, x, r, n in zip(NAMES, got, ref, naive):
        assert x.dtype == np.float32, name
        bound = 3 * max_err(n, r) + FLOOR[name] * magnitude(r)
        assert max_err(x, r) <= bound, f"{name}: error {max_err(x, r):.3g} > bound {bound:.3g}"


# ---------------------------------------------------------------------------------------------------------------------
# Selection: thresholds, lifetimes, compacted list and tile flags against the direct top-k
# ---------------------------------------------------------------------------------------------------------------------

SELECT_CASES = [
    dict(Nq=1, Nk=1, keep=1),
    dict(Nq=1, Nk=1, keep=3, causal=True),
    dict(Nq=17, Nk=17, keep=1, causal=True),
    dict(Nq=17, Nk=17, keep=5, causal=True, pad=True),
    dict(Nq=17, Nk=17, keep=5, ties="all", causal=True),
    dict(Nq=17, Nk=17, keep=20),
    dict(Nq=9, Nk=17, keep=4, causal=True, ties="discrete"),
    dict(Nq=30, Nk=17, keep=6, causal=True, pad=True),
    dict(Nq=30, Nk=17, keep=6, ties="flat"),
    dict(Nq=97, Nk=97, keep=13, causal=True, ties="discrete"),
    dict(Nq=97, Nk=97, keep=48, pad=True),
    dict(Nq=130, Nk=130, keep=25, causal=True),
    dict(Nq=130, Nk=130, keep=130, causal=True, ties="discrete"),
    dict(Nq=64, Nk=130, keep=200, causal=True),
    dict(Nq=130, Nk=130, keep=7, ties="all"),
]


def check_selection(sel: Selection, z: np.ndarray, spec: DMASpec, ref_mask: np.ndarray) -> None:
    """The thresholds, the lifetimes, the compacted list and the flags all describe exactly ``ref_mask``."""
    sel = sel.host()
    B, Hkv, Nq, Nk = ref_mask.shape
    # 1. thresholds
    np.testing.assert_array_equal(kept_dense(sel, z, spec), ref_mask)
    # 2. lifetimes: key j is kept by the rows at positions [j, evict[j]) (causal) / by all rows iff evict == Nk
    pos = spec.off + np.arange(Nq)
    j = np.arange(Nk)
    ev = sel.evict[:, :, None, :]
    if spec.causal:
        alive = (j <= pos[:, None]) & (pos[:, None] < ev)
    else:
        alive = np.broadcast_to(ev == Nk, ref_mask.shape)
    np.testing.assert_array_equal(alive, ref_mask)
    # 3. the compacted list holds every key some row keeps, once (and, compacted, nothing else)
    for b in range(B):
        for g in range(Hkv):
            c = int(sel.counts[b, g])
            listed = sel.kidx[b, g, :c]
            assert len(set(listed.tolist())) == c
            used = set(np.nonzero(ref_mask[b, g].any(axis=0))[0].tolist())
            if spec.compact:
                assert set(listed.tolist()) == used
            else:
                assert used <= set(listed.tolist())
            # 4. flags, exactly: SKIP iff no kept pair in the tile, DENSE iff every pair kept
            Br, Bc = sel.block_q, sel.block_k
            for tq in range(sel.types.shape[2]):
                rows = slice(tq * Br, min(Nq, (tq + 1) * Br))
                for tc in range(sel.types.shape[3]):
                    cols = listed[tc * Bc : min(c, (tc + 1) * Bc)]
                    block = ref_mask[b, g, rows][:, cols]
                    want = TileType.SKIP if not block.any() else (TileType.DENSE if block.all() else TileType.TRIANGLE)
                    assert sel.types[b, g, tq, tc] == want, (b, g, tq, tc)


@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("case_kw", SELECT_CASES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
def test_selection_matches_reference(case_kw: Dict[str, Any], compact: bool) -> None:
    case = make_case(B=2, H=4, Hkv=2, **case_kw)
    o = case["opts"]
    spec = make_dma_spec(case["q"].shape, case["k"].shape, case["v"].shape, case["dt"].shape, case["a"].shape,
                         keep_window_size=o["keep_window_size"], causal=o["causal"],
                         key_padding_mask=o["key_padding_mask"], block_q=8, block_k=8, compact=compact)
    z, _ = importance(case["v"], case["dt"], case["a"], False)
    z_ref = R.reference_dma_importance(case["v"], case["dt"], case["a"])[0]
    ref_mask = R.reference_dma_mask(z_ref, spec.Nq, spec.keep, spec.causal, o["key_padding_mask"])
    np.testing.assert_array_equal(R.reference_dma_mask(z, spec.Nq, spec.keep, spec.causal, o["key_padding_mask"]),
                                  ref_mask)  # same ranking from both importance computations
    for select in (select_numpy, select_cpu):
        check_selection(select(z, spec), z, spec, ref_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Forward and backward against the oracle
# ---------------------------------------------------------------------------------------------------------------------

CASES = [
    dict(Nq=1, Nk=1, keep=1),
    dict(Nq=1, Nk=1, keep=4, causal=True),
    dict(Nq=17, Nk=17, keep=5),
    dict(Nq=17, Nk=17, keep=5, causal=True, H=4, Hkv=2),
    dict(Nq=17, Nk=17, keep=1, causal=True, H=4, Hkv=1, pad=True),
    dict(Nq=17, Nk=17, keep=40, causal=True, log_space=True),
    dict(Nq=17, Nk=17, keep=6, causal=True, dropout=0.3, H=4, Hkv=2),
    dict(Nq=9, Nk=30, keep=7, causal=True, ties="discrete"),
    dict(Nq=30, Nk=9, keep=3, causal=True, pad=True),
    dict(Nq=97, Nk=97, keep=20, causal=True, H=2, Hkv=2, block_q=16, block_k=16),
    dict(Nq=130, Nk=130, keep=33, H=4, Hkv=2, block_q=32, block_k=16, pad=True),
    dict(Nq=130, Nk=130, keep=64, causal=True, block_q=16, block_k=32, D=8, dropout=0.2),
    dict(Nq=130, Nk=130, keep=200, causal=True, block_q=64, block_k=64, log_space=True),
]
CASE_IDS = ["-".join(f"{k}{v}" for k, v in kw.items()) for kw in CASES]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case_kw", CASES, ids=CASE_IDS)
def test_float64_matches_reference(case_kw: Dict[str, Any], backend: str) -> None:
    case = make_case(**case_kw)
    check_float64(run_tensors(case, BACKENDS[backend]), reference(case))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case_kw", [CASES[i] for i in (2, 3, 6, 7, 10, 11)], ids=[CASE_IDS[i] for i in (2, 3, 6, 7, 10, 11)])
def test_float32_error_rule(case_kw: Dict[str, Any], backend: str) -> None:
    case = make_case(**case_kw)
    for n in ("q", "k", "v", "dt", "a", "dout"):
        case[n] = case[n].astype(np.float32)
    check_float32(run_tensors(case, BACKENDS[backend], np.float32), reference(case), naive_float32(case))


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("log_space", [False, True])
def test_param_gradients_central_differences(backend: str, log_space: bool) -> None:
    """d/d dt_proj and d/d a_coef of sum(out * dout) by central differences in float64 (every element)."""
    case = make_case(Nq=17, Nk=17, H=4, Hkv=2, D=3, keep=6, causal=True, log_space=log_space, data_seed=3)
    bk = BACKENDS[backend]
    grads = run_tensors(case, bk)

    def loss(dt: np.ndarray, a: np.ndarray) -> float:
        ts = [from_numpy(case[n], backend=bk) for n in ("q", "k", "v")]
        out = flash_dma_attention(*ts, from_numpy(dt, backend=bk), from_numpy(a, backend=bk), **case["opts"],
                                  **case["blocks"])
        return float((out.to_numpy() * case["dout"]).sum())

    eps = 1e-6
    for name, idx in (("dt", 4), ("a", 5)):
        x = case[name]
        num = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[pos] += eps
            down[pos] -= eps
            args_up = (up, case["a"]) if name == "dt" else (case["dt"], up)
            args_down = (down, case["a"]) if name == "dt" else (case["dt"], down)
            num[pos] = (loss(*args_up) - loss(*args_down)) / (2 * eps)
        np.testing.assert_allclose(grads[idx], num, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_zero_full_window_is_plain_flash_attention(backend: str, causal: bool) -> None:
    """a_coef = 0 makes z = 1 for every key (a constant shift that cancels in the softmax); with
    keep_window_size >= N every visible key is kept: plain flash attention of the same backend's engine, values and
    gradients."""
    case = make_case(Nq=23, Nk=37, H=4, Hkv=2, D=5, keep=37, causal=causal, ties="all", pad=True)
    got = run_tensors(case, BACKENDS[backend])
    q, k, v, do = case["q"], case["k"], case["v"], case["dout"]
    kpm = case["opts"]["key_padding_mask"]
    out, _ = R.reference_attention(q, k, v, causal=causal, key_padding_mask=kpm, attn_bias=np.ones(37))
    np.testing.assert_allclose(got[0], out, rtol=1e-10, atol=1e-12)
    spec = make_spec(q.shape, k.shape, v.shape, causal=causal, key_padding_mask=kpm, block_q=8, block_k=8)
    flash = BACKENDS[backend].attention  # the backend's flash attention, no bias
    fo, fl = flash.forward(q, k, v, None, spec)
    dq, dk, dv, _ = flash.backward(q, k, v, None, fo, fl, do, spec)
    for name, x, r in (("out", got[0], fo), ("dq", got[1], dq), ("dk", got[2], dk), ("dv", got[3], dv)):
        np.testing.assert_allclose(x, r, rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_array_equal(got[4], 0.0)  # dz/du = z a sigmoid(u) = 0
    ts = [from_numpy(x, backend=BACKENDS[backend]) for x in (q, k, v)]
    plain = ts[0].flash_attention(ts[1], ts[2], causal=causal, key_padding_mask=kpm)
    np.testing.assert_allclose(got[0], plain.to_numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Sparsity: skipped tiles are never loaded, and skipping changes nothing
# ---------------------------------------------------------------------------------------------------------------------


def test_skipped_tiles_are_never_visited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Simple engine, configured for DMA, computes scores exactly for the tiles the selection marks as work."""
    from minitorch.attention.kernels.simple import flash as simple

    case = make_case(Nq=97, Nk=97, keep=9, causal=True, block_q=8, block_k=8)
    o = case["opts"]
    dspec = make_dma_spec(case["q"].shape, case["k"].shape, case["v"].shape, case["dt"].shape, case["a"].shape,
                          keep_window_size=9, causal=True, block_q=8, block_k=8)
    z, _ = importance(case["v"], case["dt"], case["a"], o["log_space"])
    spec, sel = dma_config(SimpleBackend.attention, z, dspec)
    seen = []
    orig = simple._Head.scores

    def spy(self, tq, tk):  # type: ignore[no-untyped-def]
        seen.append((self.b, self.g, tq, [int(c) for c in self.key_rows(tk)]))
        return orig(self, tq, tk)

    monkeypatch.setattr(simple._Head, "scores", spy)
    simple.forward(case["q"], case["k"], case["v"], z.reshape(spec.bias_shape), spec)
    visited = {(tq, tuple(cols)) for _, _, tq, cols in seen}
    work = set()
    for tq, tc in zip(*np.nonzero(sel.types[0, 0] != TileType.SKIP)):
        work.add((int(tq), tuple(int(c) for c in sel.kidx[0, 0, tc * 8 : min(sel.counts[0, 0], tc * 8 + 8)])))
    assert visited == work
    n_tiles = int(np.sum(-(-sel.counts[0, 0] // 8)) * sel.types.shape[2])
    assert len(work) < 0.7 * n_tiles  # causal top-9 of 97 keys: most (query tile, key tile) pairs are skipped
    assert sel.counts[0, 0] < 97


@pytest.mark.parametrize("causal", [False, True])
def test_fused_kernels_skip_only_empty_tiles(causal: bool) -> None:
    """The fused CPU kernels with the flags give exactly what they give when every tile is visited and masked."""
    case = make_case(Nq=70, Nk=90, H=4, Hkv=2, D=6, keep=11, causal=causal, pad=True, block_q=8, block_k=8)
    o = case["opts"]
    dspec = make_dma_spec(case["q"].shape, case["k"].shape, case["v"].shape, case["dt"].shape, case["a"].shape,
                          keep_window_size=11, causal=causal, key_padding_mask=o["key_padding_mask"],
                          block_q=8, block_k=8)
    q, k, v, do = case["q"], case["k"], case["v"], case["dout"]
    engine = FastBackend.attention
    z, _ = importance(v, case["dt"], case["a"], False)
    spec, sel = dma_config(engine, z, dspec)
    z4 = z.reshape(spec.bias_shape)
    assert (sel.types == TileType.SKIP).any() and (sel.types != TileType.SKIP).any()
    out, lse = engine.forward(q, k, v, z4, spec)
    grads = engine.backward(q, k, v, z4, out, lse, do, spec)
    everything = spec.replace(keys=KeyList(sel.kidx, sel.counts, np.full_like(sel.types, TileType.TRIANGLE)))
    out2, lse2 = engine.forward(q, k, v, z4, everything)
    grads2 = engine.backward(q, k, v, z4, out2, lse2, do, everything)
    for x, y in zip((out, lse) + grads, (out2, lse2) + grads2):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_tile_lists_are_exact(seed: int) -> None:
    """Causal selection on the CPU also gives each query tile its own list: exactly the keys some row of the tile
    keeps (from the dense keep-mask, an independent computation), those all its rows keep first; its DENSE tiles
    hold only keys every row keeps, and SKIP tiles lie past the end. The forward and backward that read these lists
    give what they give with the one list for all rows."""
    rng = np.random.default_rng(seed)
    Nq, Nk, Br, Bc = 70, 90, 8, 8
    case = make_case(Nq=Nq, Nk=Nk, H=4, Hkv=2, D=6, keep=int(rng.integers(3, 30)), causal=True, pad=True,
                     block_q=Br, block_k=Bc, data_seed=seed, ties="discrete" if seed == 2 else None)
    o = case["opts"]
    keep = o["keep_window_size"]
    dspec = make_dma_spec(case["q"].shape, case["k"].shape, case["v"].shape, case["dt"].shape, case["a"].shape,
                          keep_window_size=keep, causal=True, key_padding_mask=o["key_padding_mask"], block_q=Br,
                          block_k=Bc)
    engine = FastBackend.attention
    z, _ = importance(case["v"], case["dt"], case["a"], False)
    spec, sel = dma_config(engine, z, dspec)
    kidx, counts, types = sel.per_tile
    mask = kept_dense(sel, z, dspec)  # (B, Hkv, Nq, Nk)
    for b in range(mask.shape[0]):
        for g in range(mask.shape[1]):
            for tq in range(types.shape[2]):
                rows = mask[b, g, tq * Br:(tq + 1) * Br]
                listed = kidx[b, g, tq, :counts[b, g, tq]]
                assert sorted(listed) == list(np.nonzero(rows.any(axis=0))[0])
                every = rows.all(axis=0)[listed]
                n_full = int(every.sum())
                assert every[:n_full].all() and not every[n_full:].any()  # those every row keeps come first
                for tc in range(types.shape[3]):
                    entries = listed[tc * Bc:(tc + 1) * Bc]
                    t = types[b, g, tq, tc]
                    assert (t == TileType.SKIP) == (len(entries) == 0)
                    if t == TileType.DENSE:
                        assert rows[:, entries].all()
    z4 = z.reshape(spec.bias_shape)
    q, k, v, do = case["q"], case["k"], case["v"], case["dout"]
    one_list = spec.replace(keys=KeyList(sel.kidx, sel.counts, sel.types))
    out, lse = engine.forward(q, k, v, z4, spec)
    out1, lse1 = engine.forward(q, k, v, z4, one_list)
    grads = engine.backward(q, k, v, z4, out, lse, do, spec)
    grads1 = engine.backward(q, k, v, z4, out1, lse1, do, one_list)
    for x, y in zip((out, lse) + grads, (out1, lse1) + grads1):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), Nk=st.integers(0, 600), D=st.integers(1, 9),
       log_space=st.booleans(), seed=st.integers(0, 2**16))
def test_cpu_importance_kernels_match_float64(B: int, Hkv: int, Nk: int, D: int, log_space: bool, seed: int) -> None:
    """The CPU engine's importance (its two products as kernels, :mod:`...kernels.cpu.importance`) against the NumPy
    formulas in float64: float32 error at most 3x NumPy's own float32 error, plus a floor; float64 close."""
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((B, Hkv, Nk, D))
    dt, a = 0.3 * rng.standard_normal((Hkv, Hkv * D)), rng.random(Hkv) + 0.1
    dz, dv = rng.standard_normal((B, Hkv, Nk)), rng.standard_normal((B, Hkv, Nk, D))
    z64, u64 = importance(v, dt, a, log_space)
    want = (z64,) + importance_backward(dz, v, dt, a, z64, u64, log_space, dv)
    engine = FastBackend.attention
    for dtype, rule in ((np.float32, True), (np.float64, False)):
        args = [x.astype(dtype) for x in (v, dt, a)]
        z, u = engine.importance(*args, log_space)
        got = (z,) + engine.importance_backward(dz.astype(dtype), *args, z, u, log_space, dv.astype(dtype))
        z_np, u_np = importance(*args, log_space)
        naive = (z_np,) + importance_backward(dz.astype(dtype), *args, z_np, u_np, log_space, dv.astype(dtype))
        for name, g, w, n in zip(("z", "dv", "d_dt", "d_a"), got, want, naive):
            assert g.dtype == dtype and g.shape == w.shape, name
            err = float(np.abs(g - w).max(initial=0.0))
            bound = 3 * float(np.abs(n - w).max(initial=0.0)) + 1e-5 * (1 + float(np.abs(w).max(initial=0.0)))
            assert err <= (bound if rule else 1e-9 * (1 + float(np.abs(w).max(initial=0.0)))), (name, dtype, err, bound)


def test_fast_kernels_are_deterministic() -> None:
    case = make_case(Nq=130, Nk=130, H=4, Hkv=2, D=8, keep=30, causal=True, dropout=0.1, block_q=16, block_k=16)
    first = run_tensors(case, FastBackend, np.float32)
    for x, y in zip(first, run_tensors(case, FastBackend, np.float32)):
        np.testing.assert_array_equal(x, y)


def test_no_score_sized_allocation() -> None:
    """Selection, forward and backward (NumPy implementation) never allocate an (Nq, Nk) array."""
    N = 1024
    case = make_case(Nq=N, Nk=N, H=1, Hkv=1, D=4, keep=100, causal=True)
    dspec = make_dma_spec(case["q"].shape, case["k"].shape, case["v"].shape, case["dt"].shape, case["a"].shape,
                          keep_window_size=100, causal=True, block_q=128, block_k=128)
    q, k, v, do = case["q"], case["k"], case["v"], case["dout"]
    engine = SimpleBackend.attention
    tracemalloc.start()
    try:
        z, u = engine.importance(v, case["dt"], case["a"], False)
        spec, _ = dma_config(engine, z, dspec)
        z4 = z.reshape(spec.bias_shape)
        out, lse = engine.forward(q, k, v, z4, spec)
        dq, dk, dv, dz = engine.backward(q, k, v, z4, out, lse, do, spec)
        engine.importance_backward(dz.reshape(z.shape), v, case["dt"], case["a"], z, u, False, dv)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < N * N * 8 / 4, f"peak {peak} bytes"


# ---------------------------------------------------------------------------------------------------------------------
# API: return_attn_probs, errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_return_attn_probs(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = make_case(Nq=19, Nk=23, H=4, Hkv=2, keep=6, causal=True, pad=True, dropout=0.2)
    ts = [from_numpy(case[n], backend=BACKENDS[backend]) for n in ("q", "k", "v", "dt", "a")]
    out, probs = flash_dma_attention(*ts, **case["opts"], return_attn_probs=True)
    ref_out, _, ref_p, ref_mask, _ = R.reference_dma(*(case[n] for n in ("q", "k", "v", "dt", "a")), **ref_kwargs(case))
    assert isinstance(probs, Tensor) and probs.shape == (1, 4, 19, 23)
    np.testing.assert_allclose(probs.to_numpy(), ref_p, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(out.to_numpy(), ref_out, rtol=1e-10, atol=1e-12)
    assert np.array_equal(probs.to_numpy() > 0, np.repeat(ref_mask, 2, axis=1))
    monkeypatch.setattr(DMA, "PROBS_WARN_ELEMENTS", 100)
    with pytest.warns(UserWarning, match="return_attn_probs"):
        flash_dma_attention(*ts, **case["opts"], return_attn_probs=True)


def test_bad_inputs_raise_clear_errors() -> None:
    rng = np.random.default_rng(0)
    t = lambda *s: from_numpy(rng.standard_normal(s))  # noqa: E731
    q, k, v, dt, a = t(1, 4, 8, 4), t(1, 2, 8, 4), t(1, 2, 8, 4), t(2, 8), t(2)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="keep_window_size"):
            flash_dma_attention(q, k, v, dt, a, keep_window_size=bad)
    for bad in (2.5, True, "8"):
        with pytest.raises(TypeError, match="keep_window_size"):
            flash_dma_attention(q, k, v, dt, a, keep_window_size=bad)
    with pytest.raises(ValueError, match=r"dt_proj must have shape \(Hkv, Hkv\*D\)=\(2, 8\).*got \(2, 4\)"):
        flash_dma_attention(q, k, v, t(2, 4), a)
    with pytest.raises(ValueError, match=r"a_coef must have shape \(Hkv,\)=\(2,\).*got \(1,\)"):
        flash_dma_attention(q, k, v, dt, t(1))
    with pytest.raises(ValueError, match="multiple of the number of kv heads"):
        flash_dma_attention(t(1, 3, 8, 4), k, v, dt, a)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_dma_attention(q, k, t(1, 2, 9, 4), dt, a)
    with pytest.raises(ValueError, match="same head_dim"):
        flash_dma_attention(t(1, 4, 8, 3), k, v, dt, a)
    with pytest.raises(TypeError, match="q must be a minitorch Tensor"):
        flash_dma_attention(np.zeros((1, 4, 8, 4)), k, v, dt, a)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_dma_attention(q, k, v, dt, a, dropout_p=1.0)
    with pytest.raises(TypeError, match="softmax_scale"):
        flash_dma_attention(q, k, v, dt, a, softmax_scale="big")
    with pytest.raises(ValueError, match="key_padding_mask"):
        flash_dma_attention(q, k, v, dt, a, key_padding_mask=np.zeros((1, 7), bool))
    with pytest.raises(TypeError, match="dtypes"):
        flash_dma_attention(q, k, v, from_numpy(np.zeros((2, 8), np.float32)), a)


def test_parameters_as_arrays_are_constants() -> None:
    case = make_case(Nq=9, Nk=9, keep=3, causal=True)
    ts = [from_numpy(case[n], backend=SimpleBackend, requires_grad=True) for n in ("q", "k", "v")]
    out = flash_dma_attention(*ts, case["dt"], case["a"], keep_window_size=3, causal=True)
    np.testing.assert_allclose(out.to_numpy(), reference(case)[0], rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert ts[2].grad is not None


# ---------------------------------------------------------------------------------------------------------------------
# CUDA: the whole call in Numba's simulator (tiny); the kernel-level tests are in test_cuda_attention.py
# ---------------------------------------------------------------------------------------------------------------------

CUDA_CASES = [
    dict(Nq=9, Nk=13, H=2, Hkv=1, D=4, keep=4, causal=True, pad=True, block_q=4, block_k=4),
    dict(Nq=13, Nk=13, H=4, Hkv=2, D=3, keep=5, dropout=0.3, block_q=8, block_k=4),
    dict(Nq=5, Nk=9, H=2, Hkv=2, D=4, keep=20, causal=True, log_space=True, ties="discrete", block_q=4, block_k=8),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case_kw", CUDA_CASES, ids=[f"cuda{i}" for i in range(len(CUDA_CASES))])
def test_cuda_matches_reference(case_kw: Dict[str, Any], dtype: Any) -> None:
    from minitorch.cuda_ops import CudaBackend

    case = make_case(**case_kw)
    if dtype == np.float64:
        check_float64(run_tensors(case, CudaBackend), reference(case))
    else:
        for n in ("q", "k", "v", "dt", "a", "dout"):
            case[n] = case[n].astype(np.float32)
        check_float32(run_tensors(case, CudaBackend, np.float32), reference(case), naive_float32(case))
