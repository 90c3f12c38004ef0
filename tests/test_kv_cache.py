"""Ring-buffer KV cache: slot arithmetic, decoding (the engines' flash attention over the rotated slots: NumPy, Numba
CPU, CUDA split-K in the simulator), chunked prefill, the backward cache and the decoder feedback buffer, all against
the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch import FastTensorBackend, SimpleBackend
from minitorch.attention.kv_cache import (
    DecoderFeedbackBuffer,
    RingBufferKVCache,
    chunked_causal_attention,
    held_positions,
    seq_cat,
    seq_take,
    slot_of,
)
from minitorch.attention.reference import reference_attention, reference_attention_backward
from minitorch.attention.spec import make_spec
from minitorch.attention.tiling import TileSchedule

pytestmark = pytest.mark.task5_5

CPU_KINDS = ["simple", "fast"]


def _qkv(rng, B, H, Hkv, N, D):
    return (rng.standard_normal((B, H, N, D)), rng.standard_normal((B, Hkv, N, D)),
            rng.standard_normal((B, Hkv, N, D)))


def _host(x):
    return x.copy_to_host() if hasattr(x, "copy_to_host") else np.asarray(x)


# ---------------------------------------------------------------------------------------------------------------------
# Slot arithmetic and pointers
# ---------------------------------------------------------------------------------------------------------------------


@given(st.integers(1, 12), st.integers(0, 11), st.integers(0, 60))
def test_slot_of_formula(capacity, sinks, p):
    if sinks >= capacity:
        sinks = capacity - 1
    expected = p if p < sinks else sinks + (p - sinks) % (capacity - sinks)
    assert slot_of(p, capacity, sinks) == expected
    if sinks == 0:
        assert slot_of(p, capacity) == p % capacity
    # the positions held after p + 1 tokens occupy distinct slots
    held = held_positions(p + 1, capacity, sinks)
    assert len(held) == min(p + 1, capacity)
    assert len(set(slot_of(held, capacity, sinks).tolist())) == len(held)


@pytest.mark.parametrize("sinks", [0, 2])
def test_pointers_and_positions(sinks):
    C = 6
    cache = RingBufferKVCache(1, 1, 2, C, num_sinks=sinks, backend="simple", dtype=np.float64)
    assert (cache.seen, cache.length, cache.write_ptr, cache.read_ptr) == (0, 0, 0, 0)
    assert np.all(cache.positions == -1)
    storage = cache.key_storage
    for t in range(3 * C + 1):
        cache.append(np.full((1, 1, 1, 2), t), np.full((1, 1, 1, 2), -t))
        seen = t + 1
        assert cache.seen == seen and cache.length == min(seen, C)
        assert cache.write_ptr == slot_of(seen, C, sinks)
        held = held_positions(seen, C, sinks)
        assert sorted(cache.positions[cache.positions >= 0].tolist()) == held.tolist()
        ring = held[held >= sinks]
        if ring.size:
            assert cache.read_ptr == slot_of(ring[0], C, sinks)
        if seen >= C:
            assert cache.read_ptr == cache.write_ptr  # a full ring: read and write pointers meet
        # the slot storage holds each held token in its slot
        keys = cache.key_storage[0, 0, :, 0]
        for p in held:
            assert keys[slot_of(p, C, sinks)] == p
        assert cache.key_storage is storage and storage.shape == (1, 1, C, 2)  # fixed memory, written in place


@pytest.mark.parametrize("sinks", [0, 2])
def test_unrotate_chronological(sinks):
    rng = np.random.default_rng(0)
    C, N = 5, 13
    k = rng.standard_normal((2, 3, N, 4))
    v = rng.standard_normal((2, 3, N, 4))
    cache = RingBufferKVCache(2, 3, 4, C, num_sinks=sinks)
    for t in range(N):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        uk, uv = cache.unrotate()
        held = held_positions(t + 1, C, sinks)
        assert uk.shape == (2, 3, min(t + 1, C), 4)
        np.testing.assert_array_equal(uk.to_numpy(), k[:, :, held])
        np.testing.assert_array_equal(uv.to_numpy(), v[:, :, held])
    if sinks == 0:
        np.testing.assert_array_equal(cache.unrotate()[0].to_numpy(), k[:, :, N - C :])  # the last C tokens


def test_append_longer_than_capacity_keeps_newest():
    rng = np.random.default_rng(1)
    k, v = rng.standard_normal((1, 2, 11, 3)), rng.standard_normal((1, 2, 11, 3))
    for sinks in (0, 2):
        cache = RingBufferKVCache(1, 2, 3, 4, num_sinks=sinks)
        cache.append(k[:, :, :2], v[:, :, :2])
        cache.append(k[:, :, 2:], v[:, :, 2:])
        held = held_positions(11, 4, sinks)
        np.testing.assert_array_equal(cache.unrotate()[0].to_numpy(), k[:, :, held])


# ---------------------------------------------------------------------------------------------------------------------
# Decode kernels on raw arrays
# ---------------------------------------------------------------------------------------------------------------------


def test_padding_in_the_schedule_is_padding_per_row():
    """A decode step's tiles come from TileSchedule: with a key padding mask, row b's tile types are those of the
    positions with row b's padded slots emptied (-1)."""
    rng = np.random.default_rng(2)
    for _ in range(30):
        C = int(rng.integers(1, 20))
        block = int(rng.integers(1, 8))
        T = int(rng.integers(1, 4))
        pos = rng.permutation(40)[:C].astype(np.int64)
        pos[rng.random(C) < 0.2] = -1
        pad = rng.random((2, C)) < 0.3
        q_pos = np.sort(rng.integers(0, 45, T))
        causal = bool(rng.integers(2))
        window = None if rng.random() < 0.3 else int(rng.integers(0, 12))
        sinks = int(rng.integers(0, 4))
        opts = dict(causal=causal, window=window, q_positions=q_pos, num_sinks=sinks)
        sched = TileSchedule(T, C, T, block, k_positions=pos, key_padding_mask=pad, **opts)
        for b in range(2):
            row = TileSchedule(T, C, T, block, k_positions=np.where(pad[b], -1, pos), **opts)
            np.testing.assert_array_equal(sched.batch_types[b], row.types)


def decode(backend, q, k, v, kpb, q_pos, block, splits=1, causal=True, window=-1, num_sinks=0, dropout=0.0, seed=0):
    """One decode step on raw arrays: the engine's flash attention over the slots (positions ``kpb``, -1 empty)."""
    pos = kpb.max(axis=0)  # a slot's position where some row holds it; -1 where no row does
    spec = make_spec(q.shape, k.shape, v.shape, causal=causal, window=None if window < 0 else window,
                     num_sinks=num_sinks, dropout=dropout, seed=seed, q_positions=q_pos, k_positions=pos,
                     key_padding_mask=(kpb < 0) & (pos >= 0), block_q=q.shape[2], block_k=block, num_splits=splits)
    return backend.attention.forward(q, k, v, None, spec)


@pytest.mark.parametrize("backend", [SimpleBackend, FastTensorBackend], ids=["simple", "fast"])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("opts", [
    dict(causal=True, window=10, num_sinks=2),
    dict(causal=True, window=-1),
    dict(causal=False, window=5),
    dict(causal=True, window=10, num_sinks=2, dropout=0.3, seed=7),
])
def test_decode_matches_reference(backend, splits, opts):
    """Rotated, partly empty (NaN-filled) and padded (NaN-filled) slots; GQA; several query rows; tiles of 4 slots;
    split-K or not."""
    rng = np.random.default_rng(3)
    B, H, Hkv, T, D, C = 2, 4, 2, 3, 8, 16
    q = rng.standard_normal((B, H, T, D))
    k, v = rng.standard_normal((B, Hkv, C, D)), rng.standard_normal((B, Hkv, C, D))
    pos = rng.permutation(40)[:C].astype(np.int64)
    pos[[3, 7]] = -1
    kpb = np.broadcast_to(pos, (B, C)).copy()
    kpb[1, 2] = -1  # a padded key in batch row 1
    kn, vn = k.copy(), v.copy()
    kn[:, :, 3] = np.nan
    vn[:, :, 7] = np.nan
    kn[1, :, 2] = np.nan
    vn[1, :, 2] = np.inf
    q_pos = np.array([30, 31, 35])
    window = opts.get("window", -1)
    ref, ref_lse = reference_attention(
        q, k, v, causal=opts["causal"], window=None if window < 0 else window, q_positions=q_pos, k_positions=pos,
        key_padding_mask=kpb < 0, num_sinks=opts.get("num_sinks", 0), dropout=opts.get("dropout", 0.0),
        seed=opts.get("seed", 0))
    out, lse = decode(backend, q, kn, vn, kpb, q_pos, block=4, splits=splits, **opts)
    np.testing.assert_allclose(out, ref, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse, atol=1e-12)


def test_decode_row_without_keys():
    q = np.ones((1, 2, 1, 4))
    k = np.full((1, 1, 6, 4), np.nan)
    kpb = np.full((1, 6), -1, dtype=np.int64)
    for backend in (SimpleBackend, FastTensorBackend):
        out, lse = decode(backend, q, k, k, kpb, np.array([3]), block=2, splits=2)
        assert np.all(out == 0) and np.all(np.isneginf(lse))


# ---------------------------------------------------------------------------------------------------------------------
# The cache: decoding and chunked prefill equal full windowed causal attention
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CPU_KINDS)
@pytest.mark.parametrize("sinks", [0, 2])
def test_decode_equals_windowed_causal_attention(kind, sinks):
    """3 x capacity tokens decoded one at a time (every wrap boundary: C-1, C, C+1, 2C, ...), GQA, batch 2,
    unused slots full of NaN: each step equals full causal attention with window C - sinks plus the sinks."""
    rng = np.random.default_rng(5)
    B, H, Hkv, D, C = 2, 4, 2, 8, 8
    N = 3 * C
    q, k, v = _qkv(rng, B, H, Hkv, N, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=C - sinks, num_sinks=sinks)
    cache = RingBufferKVCache(B, Hkv, D, C, num_sinks=sinks, dtype=np.float64, backend=kind, block_size=4, head_tile_size=3)
    cache.key_storage[...] = np.nan
    cache.value_storage[...] = np.nan
    for t in range(N):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        out = cache.attend(q[:, :, t : t + 1])
        np.testing.assert_allclose(out, ref[:, :, t : t + 1], atol=1e-12, err_msg=f"step {t}")


def test_decode_equals_windowed_causal_attention_cuda():
    rng = np.random.default_rng(6)
    B, H, Hkv, D, C, sinks = 1, 2, 1, 3, 4, 1
    N = 2 * C + 1
    q, k, v = _qkv(rng, B, H, Hkv, N, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=C - sinks, num_sinks=sinks)
    cache = RingBufferKVCache(B, Hkv, D, C, num_sinks=sinks, dtype=np.float64, backend="cuda", block_size=2,
                              tile_size=2, head_tile_size=2)
    for t in range(N):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        out = cache.attend(q[:, :, t : t + 1])
        np.testing.assert_allclose(out.copy_to_host(), ref[:, :, t : t + 1], atol=1e-12, err_msg=f"step {t}")
    np.testing.assert_array_equal(cache.unrotate()[0].to_numpy(), k[:, :, held_positions(N, C, sinks)])


@pytest.mark.parametrize("kind", CPU_KINDS)
@pytest.mark.parametrize("sinks", [0, 2])
def test_chunked_prefill_equals_one_shot(kind, sinks):
    rng = np.random.default_rng(7)
    B, H, Hkv, D, C = 2, 4, 1, 4, 8
    N = 3 * C + 1
    q, k, v = _qkv(rng, B, H, Hkv, N, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=C - sinks, num_sinks=sinks)
    for chunk in (1, 3, C - 1, C, C + 3, N):
        cache = RingBufferKVCache(B, Hkv, D, C, num_sinks=sinks, dtype=np.float64, backend=kind, block_size=4)
        outs = []
        for a in range(0, N, chunk):
            cache.append(k[:, :, a : a + chunk], v[:, :, a : a + chunk])
            if cache._ws is not None:  # bounded workspace: at most capacity + chunk keys
                assert cache._ws[0].shape[2] <= C + chunk
            outs.append(cache.attend(q[:, :, a : a + chunk]))
        np.testing.assert_allclose(np.concatenate(outs, axis=2), ref, atol=1e-12, err_msg=f"chunk {chunk}")
        np.testing.assert_array_equal(cache.unrotate()[0].to_numpy(), k[:, :, held_positions(N, C, sinks)])


def test_chunked_prefill_cuda():
    rng = np.random.default_rng(8)
    B, H, Hkv, D, C, sinks = 1, 2, 1, 3, 4, 1
    N = 2 * C + 1
    q, k, v = _qkv(rng, B, H, Hkv, N, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=C - sinks, num_sinks=sinks)
    cache = RingBufferKVCache(B, Hkv, D, C, num_sinks=sinks, dtype=np.float64, backend="cuda", block_size=2, tile_size=2)
    outs = []
    for a in range(0, N, 5):
        cache.append(k[:, :, a : a + 5], v[:, :, a : a + 5])
        outs.append(cache.attend(q[:, :, a : a + 5]).copy_to_host())
    np.testing.assert_allclose(np.concatenate(outs, axis=2), ref, atol=1e-12)


def test_key_padding_is_remembered():
    rng = np.random.default_rng(9)
    B, H, D, C, N = 2, 2, 4, 4, 9
    q, k, v = _qkv(rng, B, H, H, N, D)
    pad = rng.random((B, N)) < 0.3
    pad[:, -1] = False
    ref, _ = reference_attention(q, k, v, causal=True, window=C, key_padding_mask=pad)
    for kind in CPU_KINDS:
        cache = RingBufferKVCache(B, H, D, C, dtype=np.float64, backend=kind, block_size=2)
        outs = []
        for t in range(N):
            cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1], key_padding_mask=pad[:, t : t + 1])
            outs.append(cache.attend(q[:, :, t : t + 1]))
        np.testing.assert_allclose(np.concatenate(outs, axis=2), ref, atol=1e-12)


def test_tensor_interface_and_attention_weights():
    from minitorch.tensor import Tensor
    from minitorch.tensor_functions import from_numpy

    rng = np.random.default_rng(10)
    B, H, D, C = 1, 2, 4, 4
    q, k, v = _qkv(rng, B, H, H, 7, D)
    cache = RingBufferKVCache(B, H, D, C)
    for t in range(7):
        cache.append(from_numpy(k[:, :, t : t + 1]), from_numpy(v[:, :, t : t + 1]))
    out = cache.attend(from_numpy(q[:, :, 6:]))
    assert isinstance(out, Tensor) and out.shape == (B, H, 1, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=C)
    np.testing.assert_allclose(out.to_numpy(), ref[:, :, 6:], atol=1e-12)
    keys = cache.keys  # a Tensor over the slot storage, in slot order
    assert keys.shape == (B, H, C, D)
    np.testing.assert_array_equal(keys.to_numpy()[:, :, slot_of(np.arange(3, 7), C)], k[:, :, 3:7])
    w = cache.attention_weights(q[:, :, 6:])
    assert w.shape == (B, H, 1, C)
    np.testing.assert_allclose(w.sum(-1), 1.0)
    np.testing.assert_allclose(np.einsum("bhts,bhsd->bhtd", w, cache.values.to_numpy()), ref[:, :, 6:], atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_input():
    cache = RingBufferKVCache(2, 3, 4, 8)
    good = np.zeros((2, 3, 1, 4))
    for bad, word in (((1, 3, 1, 4), "batch 1 vs 2"), ((2, 2, 1, 4), "kv heads 2 vs 3"), ((2, 3, 1, 5), "head_dim 5 vs 4")):
        with pytest.raises(ValueError, match=word):
            cache.append(np.zeros(bad), np.zeros(bad))
    with pytest.raises(ValueError, match="same shape"):
        cache.append(good, np.zeros((2, 3, 2, 4)))
    with pytest.raises(ValueError, match="4-D"):
        cache.append(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="num_sinks"):
        RingBufferKVCache(1, 1, 4, 4, num_sinks=4)
    cache.append(good, good)
    with pytest.raises(ValueError, match="seen only 1"):
        cache.attend(np.zeros((2, 3, 2, 4)))
    with pytest.raises(ValueError, match="multiple"):
        cache.attend(np.zeros((2, 4, 1, 4)))
    # queries older than the last append whose keys were evicted
    small = RingBufferKVCache(1, 1, 2, 3)
    for t in range(6):
        small.append(np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 1, 2)))
    with pytest.raises(ValueError, match="no longer holds"):
        small.attend(np.zeros((1, 1, 3, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# The backward cache: training in chunks
# ---------------------------------------------------------------------------------------------------------------------


def test_seq_take_and_cat_gradients():
    from minitorch.tensor_functions import from_numpy

    rng = np.random.default_rng(11)
    a = from_numpy(rng.standard_normal((1, 2, 5, 3)), requires_grad=True)
    b = from_numpy(rng.standard_normal((1, 2, 2, 3)), requires_grad=True)
    out = seq_take(seq_cat(a, b), np.array([6, 0, 3]))
    w = rng.standard_normal(out.shape)
    (out * from_numpy(w)).sum().backward()
    ga = np.zeros((1, 2, 5, 3))
    ga[:, :, [0, 3]] = w[:, :, [1, 2]]
    gb = np.zeros((1, 2, 2, 3))
    gb[:, :, 1] = w[:, :, 0]
    np.testing.assert_allclose(a.grad.to_numpy(), ga)
    np.testing.assert_allclose(b.grad.to_numpy(), gb)



def _backend(name):
    if name == "fast":
        from minitorch.fast_ops import FastTensorBackend

        return FastTensorBackend
    if name == "cuda":
        from minitorch.cuda_ops import CudaBackend

        return CudaBackend
    from minitorch.tensor_ops import SimpleBackend

    return SimpleBackend


@pytest.mark.parametrize("backend,sizes,sinks,window,chunk", [
    ("simple", (2, 4, 2, 13, 4), 0, 5, 3),
    ("simple", (2, 4, 2, 13, 4), 2, 4, 4),
    ("simple", (2, 4, 2, 13, 4), 0, None, 5),
    ("fast", (2, 4, 2, 13, 4), 1, 5, 3),
    ("cuda", (1, 2, 1, 5, 2), 1, 2, 2),
])
def test_backward_cache_gradients_equal_full_attention(backend, sizes, sinks, window, chunk):
    """Training in chunks through the backward cache: output and gradients to q, k, v equal full-sequence
    causal attention with the same window and sinks (GQA, batch 2)."""
    from minitorch.tensor_functions import from_numpy

    be = _backend(backend)
    rng = np.random.default_rng(12)
    B, H, Hkv, N, D = sizes
    qn, kn, vn = _qkv(rng, B, H, Hkv, N, D)
    dout = rng.standard_normal((B, H, N, D))
    q, k, v = (from_numpy(x, backend=be, requires_grad=True) for x in (qn, kn, vn))
    out = chunked_causal_attention(q, k, v, chunk, window, sinks, tile_size=2 if backend == "cuda" else None)
    (out * from_numpy(dout, backend=be)).sum().backward()
    ref, _ = reference_attention(qn, kn, vn, causal=True, window=window, num_sinks=sinks)
    dq, dk, dv, _ = reference_attention_backward(qn, kn, vn, dout, causal=True, window=window, num_sinks=sinks)
    np.testing.assert_allclose(out.to_numpy(), ref, atol=1e-10)
    np.testing.assert_allclose(q.grad.to_numpy(), dq, atol=1e-10)
    np.testing.assert_allclose(k.grad.to_numpy(), dk, atol=1e-10)
    np.testing.assert_allclose(v.grad.to_numpy(), dv, atol=1e-10)


def test_backward_cache_upstream_gradient():
    """Gradients flow through the cache to what produced q, k, v (a shared projection)."""
    from minitorch.tensor_functions import from_numpy

    rng = np.random.default_rng(13)
    B, H, N, D = 1, 2, 9, 3
    x_np = rng.standard_normal((B, H, N, D))
    x = from_numpy(x_np, requires_grad=True)
    out = chunked_causal_attention(x * 0.5, x, x * 2.0, chunk=4, window=4)
    out.sum().backward()
    eps = 1e-6
    num = np.zeros_like(x_np)
    for idx in [(0, 0, 0, 0), (0, 1, 4, 2), (0, 0, 8, 1)]:
        for sgn in (1, -1):
            xp = x_np.copy()
            xp[idx] += sgn * eps
            o, _ = reference_attention(xp * 0.5, xp, xp * 2.0, causal=True, window=4)
            num[idx] += sgn * o.sum() / (2 * eps)
        np.testing.assert_allclose(x.grad.to_numpy()[idx], num[idx], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# The decoder feedback buffer
# ---------------------------------------------------------------------------------------------------------------------


def test_decoder_feedback_buffer():
    buf = DecoderFeedbackBuffer(capacity=4, batch=2, dim=3, start_value=-1.0)
    assert buf.inputs().shape == (2, 1, 3)
    np.testing.assert_array_equal(buf.inputs().to_numpy(), -np.ones((2, 1, 3)))
    ys = []
    for t in range(10):
        y = np.full((2, 3), float(t)) + np.arange(2)[:, None] * 100
        ys.append(y)
        buf.push(y)
        seq = [np.full((2, 3), -1.0)] + ys  # [start, y_0, ..., y_t]
        expected = np.stack(seq[-4:], axis=1)
        np.testing.assert_array_equal(buf.inputs().to_numpy(), expected)
        assert buf.write_ptr == (t + 2) % 4
        assert buf.read_ptr == (t + 2 - min(t + 2, 4)) % 4
    with pytest.raises(ValueError, match=r"\(batch, dim\) = \(2, 3\)"):
        buf.push(np.zeros((3, 3)))
