"""The NaN contract of every engine (Simple, Fast, and CUDA in the simulator), float32 and float64.

(The CUDA engine's hidden-key cases run at simulator sizes in test_cuda_attention.py; here CUDA runs the
visible-NaN case, whose rows come out of the whole online softmax.)

* A key that a query does not see is never read for it: NaN or Inf in a padded key, a causal-future key, an empty
  slot (position -1) or a key outside the window, in k, v or the bias, changes no output and no gradient. Checked
  against the float64 reference of the *clean* inputs (the hidden values replaced by 0), with the rule of
  test_attention_cpu.py, and: nothing is NaN, and the hidden keys' gradients are exactly 0.
* NaN in a visible q, k, v or bias propagates: exactly the rows that see it are NaN (out and lse), as in PyTorch.
* The ring cache never reads a slot whose position is -1: after wraparound, after ``reset()`` (stale NaN in the
  slots) and on the multi-token path.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import pytest

import minitorch
from minitorch.attention.reference import reference_attention, reference_attention_backward, reference_mask
from test_attention_cpu import assert_matches, naive_float32

pytestmark = pytest.mark.task5_3

BACKENDS = {
    "simple": minitorch.SimpleBackend,
    "fast": minitorch.FastTensorBackend,
    "cuda": pytest.param(minitorch.CudaBackend, marks=[pytest.mark.cuda, pytest.mark.task5_4]),  # the CUDA kernels
}
DTYPES = [np.float64, np.float32]


def _backend_params(cuda: bool = False):  # type: ignore[no-untyped-def]
    return [BACKENDS["simple"], BACKENDS["fast"]] + ([BACKENDS["cuda"]] if cuda else [])


def run(backend, q, k, v, dout, bias, **opts):  # type: ignore[no-untyped-def]
    """out, lse and (dq, dk, dv, dbias) through the tensor API (the Functions and the engine)."""
    t = lambda x: minitorch.from_numpy(x, backend=backend).requires_grad_()  # noqa: E731
    Q, K, V = t(q), t(k), t(v)
    Bt = None if bias is None else t(bias)
    out, lse = Q.flash_attention(K, V, attn_bias=Bt, return_lse=True, **opts)
    (out * minitorch.from_numpy(dout, backend=backend)).sum().backward()
    grads = (Q.grad.to_numpy(), K.grad.to_numpy(), V.grad.to_numpy(), None if Bt is None else Bt.grad.to_numpy())
    return out.to_numpy(), lse.to_numpy(), grads


def inputs(dtype, B=2, H=4, Hkv=2, Nq=13, Nk=21, D=8, bias=True, seed=0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Nk, D)).astype(dtype)
    do = rng.standard_normal((B, H, Nq, D)).astype(dtype)
    b = rng.standard_normal((B, H, Nq, Nk)).astype(dtype) if bias else None
    return q, k, v, do, b


def check_hidden(backend, dtype, q, k, v, do, bias, hidden_keys: np.ndarray, opts: Dict[str, Any],
                 hidden_pairs: Optional[np.ndarray] = None) -> None:
    """Poison every hidden key (``hidden_keys (B, Nk)`` bool) in k, v and the bias, and every hidden pair of the
    bias (``hidden_pairs (B, Nq, Nk)``); results must be those of the clean inputs."""
    kn, vn = k.copy(), v.copy()
    hb, hj = np.nonzero(hidden_keys)
    kn[hb, :, hj] = np.nan
    vn[hb, :, hj] = np.inf
    bn = None
    if bias is not None:
        bn = bias.copy()
        pairs = hidden_keys[:, None, :] if hidden_pairs is None else hidden_pairs
        bn = np.where(np.broadcast_to(pairs[:, None], bn.shape), np.nan, bn).astype(dtype)
    out, lse, grads = run(backend, q, kn, vn, do, bn, **opts)
    ref_opts = {key: opts[key] for key in ("causal", "window", "key_padding_mask", "q_positions", "k_positions",
                                           "num_sinks") if key in opts}
    ref_out, ref_lse = reference_attention(q, k, v, attn_bias=bias, **ref_opts)
    ref_grads = reference_attention_backward(q, k, v, do, attn_bias=bias, **ref_opts)
    naive = naive_float32(q, k, v, do, bias, ref_opts) if dtype == np.float32 else (None, None, (None,) * 4)
    D = q.shape[-1]
    assert_matches("out", out, ref_out, naive[0], dtype, D)
    assert_matches("lse", lse, ref_lse, naive[1], dtype, D)
    for name, got, ref, nv in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, naive[2]):
        if ref is not None:
            assert_matches(name, got, ref, nv, dtype, D)
    dk, dv = grads[1], grads[2]
    assert np.all(dk[hb, :, hj] == 0) and np.all(dv[hb, :, hj] == 0), "a hidden key got a gradient"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backend_params())
def test_padded_keys_are_never_read(backend, dtype) -> None:  # type: ignore[no-untyped-def]
    q, k, v, do, bias = inputs(dtype)
    pad = np.zeros((2, 21), dtype=bool)
    pad[0, [0, 5, 6, 20]] = True
    pad[1, 8:16] = True
    check_hidden(backend, dtype, q, k, v, do, bias, pad, dict(causal=True, key_padding_mask=pad, block_q=4,
                                                              block_k=8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backend_params())
@pytest.mark.parametrize("order", ["q_major", "k_major"])
def test_future_keys_are_never_read(backend, dtype, order) -> None:  # type: ignore[no-untyped-def]
    """Queries at positions 0..12, keys at 0..20, causal: keys 13..20 are in every query's future, and they share
    key tiles with visible keys (masked element by element)."""
    q, k, v, do, bias = inputs(dtype)
    future = np.zeros((2, 21), dtype=bool)
    future[:, 13:] = True
    check_hidden(backend, dtype, q, k, v, do, bias, future,
                 dict(causal=True, q_positions=np.arange(13), block_q=4, block_k=8, order=order))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backend_params())
def test_empty_slots_and_out_of_window_keys_are_never_read(backend, dtype) -> None:  # type: ignore[no-untyped-def]
    """Rotated ring-buffer positions with empty slots (-1), a window of 6 and 2 sinks: the empty slots and the
    keys outside every query's window hold NaN/Inf."""
    q, k, v, do, bias = inputs(dtype, Nq=5, Nk=16)
    k_pos = np.array([30, 31, 32, -1, 0, 1, 20, 21, 22, 23, 24, -1, 26, 27, 28, 29])
    q_pos = np.arange(28, 33)
    opts = dict(causal=True, window=6, num_sinks=2, q_positions=q_pos, k_positions=k_pos, block_q=2, block_k=4)
    vis = reference_mask(2, 5, 16, True, 6, q_pos, k_pos, None, 2)  # (B, Nq, Nk)
    hidden = ~vis.any(axis=1)  # no query sees these keys
    assert hidden[0, 3] and hidden[0, 6] and not hidden[0, 4]  # an empty slot, an old key; a sink is seen
    check_hidden(backend, dtype, q, k, v, do, bias, hidden, opts, hidden_pairs=~vis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backend_params(cuda=True))
def test_visible_nan_propagates_to_exactly_the_rows_that_see_it(backend, dtype) -> None:  # type: ignore[no-untyped-def]
    q, k, v, _, _ = inputs(dtype, B=1, Nq=12, Nk=12, D=4, bias=False)
    vis = reference_mask(1, 12, 12, True)[0]  # (Nq, Nk)

    def forward(q, k, v, bias=None):  # type: ignore[no-untyped-def]
        t = [minitorch.from_numpy(x, backend=backend) for x in (q, k, v)]
        out, lse = t[0].flash_attention(t[1], t[2], causal=True, block_q=4, block_k=4, return_lse=True,
                                        attn_bias=None if bias is None else minitorch.from_numpy(bias, backend=backend))
        return out.to_numpy(), lse.to_numpy()

    for name in ("q", "k", "v"):
        arrays = {"q": q.copy(), "k": k.copy(), "v": v.copy()}
        arrays[name][0, 1, 6] = np.nan  # head 1 (a kv head for k, v), row / key 6
        out, lse = forward(arrays["q"], arrays["k"], arrays["v"])
        expected = np.zeros((1, 4, 12), dtype=bool)
        if name == "q":
            expected[0, 1, 6] = True
        else:  # kv head 1 is read by query heads 2, 3; the rows that see key 6 are rows 6..11
            expected[0, 2:4] = vis[:, 6]
        assert np.array_equal(np.isnan(out).any(axis=-1), expected), name
        assert np.array_equal(np.isnan(lse), expected) or name == "v", name  # (V does not enter the lse)
        assert not np.isnan(out[~expected]).any()
    # a NaN bias entry poisons its own row only
    bias = np.zeros((1, 4, 12, 12), dtype)
    bias[0, 3, 9, 2] = np.nan
    out, lse = forward(q, k, v, bias)
    rows = np.isnan(out).any(axis=-1)
    assert rows[0, 3, 9] and rows.sum() == 1 and np.isnan(lse[0, 3, 9]) and np.isnan(lse).sum() == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backend_params())
def test_a_nan_row_reaches_only_the_gradients_of_the_keys_it_sees(backend, dtype) -> None:  # type: ignore[no-untyped-def]
    """A NaN key makes the rows that see it NaN, and through them the gradients of the keys *those rows see*;
    the keys they do not see (outside their window, in the same tiles) keep clean gradients: the backward gives a
    masked pair probability 0, whatever the row's lse. (The CUDA engine's case runs in test_cuda_attention.py's
    NaN tests at simulator sizes.)"""
    q, k, v, do, _ = inputs(dtype, B=1, H=1, Hkv=1, Nq=16, Nk=16, D=4, bias=False)
    k[0, 0, 10] = np.nan  # seen by rows 10..12 (window 3), which see keys 8..12
    out, lse, (dq, dk, dv, _) = run(backend, q, k, v, do, None, causal=True, window=3, block_q=8, block_k=8)
    rows, keys = np.isnan(out[0, 0]).any(axis=-1), np.isnan(dv[0, 0]).any(axis=-1)
    np.testing.assert_array_equal(np.nonzero(rows)[0], [10, 11, 12])
    np.testing.assert_array_equal(np.nonzero(keys)[0], [8, 9, 10, 11, 12])
    np.testing.assert_array_equal(np.nonzero(np.isnan(dk[0, 0]).any(axis=-1))[0], [8, 9, 10, 11, 12])
    clean = k.copy()
    clean[0, 0, 10] = 0.0
    ref_dv = reference_attention_backward(q, clean, v, do, causal=True, window=3)[2]
    ok = ~keys
    np.testing.assert_allclose(dv[0, 0, ok], ref_dv[0, 0, ok], rtol=1e-4, atol=1e-5)  # the clean keys: untouched


@pytest.mark.task5_5  # the ring-buffer cache
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", _backend_params())
def test_ring_cache_never_reads_empty_slots(backend, dtype) -> None:  # type: ignore[no-untyped-def]
    """Wraparound, reset() with NaN left in every slot, single-token and multi-token appends."""
    rng = np.random.default_rng(5)
    B, H, Hkv, D, C, sinks = 1, 4, 2, 8, 8, 2
    ks = rng.standard_normal((B, Hkv, 30, D)).astype(dtype)
    vs = rng.standard_normal((B, Hkv, 30, D)).astype(dtype)
    qs = rng.standard_normal((B, H, 30, D)).astype(dtype)
    cache = minitorch.RingBufferKVCache(B, Hkv, D, C, num_sinks=sinks, backend=backend, dtype=dtype, block_size=4,
                                        tile_size=4)
    tol = 1e-10 if dtype == np.float64 else 2e-5
    nan_kv = np.full((B, Hkv, C, D), np.nan, dtype)
    for round_ in range(2):
        cache.append(nan_kv, nan_kv)  # fill every slot with NaN ...
        cache.reset()  # ... then forget them: the slots still hold NaN, their positions are -1
        t = 0
        for n in (1, 1, 3, 1, 5, 1, 1, 4, 1):  # single- and multi-token steps, past the capacity (wraparound)
            kt, vt = ks[:, :, t : t + n], vs[:, :, t : t + n]
            cache.append(minitorch.from_numpy(kt, backend=backend), minitorch.from_numpy(vt, backend=backend))
            out = cache.attend(minitorch.from_numpy(qs[:, :, t : t + n], backend=backend)).to_numpy()
            ref, _ = reference_attention(qs[:, :, t : t + n], ks[:, :, : t + n], vs[:, :, : t + n], causal=True,
                                         window=C - sinks, num_sinks=sinks, q_positions=np.arange(t, t + n))
            assert not np.isnan(out).any(), (round_, t, n)
            np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
            t += n


def test_lse_has_a_gradient() -> None:
    """``lse`` from ``return_lse=True`` is differentiable (``d lse / d s = P``), against the reference's lse."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal(s) for s in ((1, 2, 9, 4), (1, 1, 11, 4), (1, 1, 11, 4)))
    w = rng.standard_normal((1, 2, 9))
    grads = []
    for fn in (minitorch.flash_attention, minitorch.attention_reference):
        Q, K, V = (minitorch.from_numpy(x).requires_grad_() for x in (q, k, v))
        _, lse = fn(Q, K, V, causal=True, return_lse=True)
        (lse * minitorch.from_numpy(w)).sum().backward()
        grads.append((Q.grad.to_numpy(), K.grad.to_numpy()))
        assert V.grad is None or np.all(V.grad.to_numpy() == 0)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert np.abs(grads[0][0]).max() > 1e-3  # the gradient is not trivially zero


def test_reference_masks_before_the_max() -> None:
    """A masked score far above every visible one changes nothing (no overflow, no NaN) in attention_reference."""
    q = np.ones((1, 1, 2, 2))
    k = np.array([[[[1.0, 1.0], [1e3, 1e3]]]])  # key 1 scores ~1400 but is in the future of query 0
    v = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    for backend, dtype in ((minitorch.SimpleBackend, np.float64), (minitorch.FastTensorBackend, np.float32)):
        t = [minitorch.from_numpy(x.astype(dtype), backend=backend) for x in (q, k, v)]
        out, lse = minitorch.attention_reference(*t, causal=True, return_lse=True)
        o = out.to_numpy()
        assert np.isfinite(o).all() and np.isfinite(lse.to_numpy()).all()
        np.testing.assert_allclose(o[0, 0, 0], [1.0, 2.0], rtol=1e-6)
