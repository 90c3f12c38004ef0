"""RingBufferAttention: the seed's configuration and call forms, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from minitorch.attention.kv_cache import DecoderFeedbackBuffer, slot_of
from minitorch.attention.reference import reference_attention, reference_attention_backward
from minitorch.attention.ring_buffer import (
    ATTENTION_REGISTRY,
    BufferState,
    RingBufferAttention,
    RingBufferConfig,
    build_attention,
    register_attention,
)
from minitorch.attention.tiling import TileOrder
from minitorch.tensor_functions import from_numpy

pytestmark = pytest.mark.task5_5



def _config(**kw):
    opts = dict(num_heads=4, head_dim=8, buffer_size=8, block_size=4, tile_size=4, head_tile_size=2, prefill_size=6)
    opts.update(kw)
    return RingBufferConfig(**opts)


def _inputs(rng, B, H, Hkv, N, D):
    return (rng.standard_normal((B, H, N, D)), rng.standard_normal((B, Hkv, N, D)),
            rng.standard_normal((B, Hkv, N, D)))


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and registry
# ---------------------------------------------------------------------------------------------------------------------


def test_config_validation():
    c = RingBufferConfig(num_heads=8, head_dim=64)
    assert (c.buffer_size, c.block_size, c.tile_size, c.head_tile_size, c.prefill_size, c.causal) == (
        2048, 128, 32, 4, 512, True)
    assert c.num_kv_heads == 8 and c.window == 2048
    with pytest.raises(ValueError, match=r"buffer_size \(100\) must be a multiple of block_size \(16\)"):
        RingBufferConfig(num_heads=2, head_dim=4, buffer_size=100, block_size=16)
    for bad in (dict(num_heads=0), dict(dropout=1.0), dict(tile_size=6), dict(num_kv_heads=3), dict(num_sinks=8),
                dict(prefill_size=0), dict(head_tile_size=0)):
        with pytest.raises(ValueError):
            _config(**bad)


def test_registry_and_build():
    model = build_attention({"name": "ring_buffer", "num_heads": 2, "head_dim": 4, "buffer_size": 8,
                             "block_size": 4})
    assert isinstance(model, RingBufferAttention) and model.config.buffer_size == 8
    assert isinstance(build_attention(_config()), RingBufferAttention)
    with pytest.raises(ValueError, match="unknown attention"):
        build_attention({"name": "nope"})
    with pytest.raises(TypeError, match="bogus"):
        build_attention({"name": "ring_buffer", "num_heads": 2, "head_dim": 4, "bogus": 1})

    @register_attention("my_test_attention")
    class Mine:
        def __init__(self, width):
            self.width = width

    try:
        assert build_attention({"name": "my_test_attention", "width": 3}).width == 3
    finally:
        del ATTENTION_REGISTRY["my_test_attention"]


def test_tile_order_setting():
    model = RingBufferAttention(_config())
    assert model.tiling_processor.tile_order == TileOrder.Q_MAJOR
    model.tiling_processor.tile_order = "k_major"
    assert model.tiling_processor.tile_order == TileOrder.K_MAJOR
    sched = model.tiling_processor.schedule(8, 8, causal=True)
    assert sched.order == TileOrder.K_MAJOR and sched.block_q == 4
    with pytest.raises(ValueError, match="tile_order"):
        model.tiling_processor.tile_order = "diagonal"


# ---------------------------------------------------------------------------------------------------------------------
# The seed's usage: encoder (prefill) phase, then decoder phase with buffer_state
# ---------------------------------------------------------------------------------------------------------------------


def _backend(name):
    if name == "fast":
        from minitorch.fast_ops import FastTensorBackend

        return FastTensorBackend
    from minitorch.tensor_ops import SimpleBackend

    return SimpleBackend


@pytest.mark.parametrize("backend,order,sinks", [
    ("simple", TileOrder.Q_MAJOR, 0), ("simple", TileOrder.K_MAJOR, 2),
    ("fast", TileOrder.Q_MAJOR, 2), ("fast", TileOrder.K_MAJOR, 0),
])
def test_encoder_then_decoder_inference(backend, order, sinks):
    """Prefill 13 tokens (chunks of prefill_size=6 through an 8-slot cache), then decode 11 more, one at a time;
    everything equals full causal attention with window buffer_size - num_sinks (GQA, batch 2)."""
    rng = np.random.default_rng(0)
    B, H, Hkv, D, N0, N = 2, 4, 2, 8, 13, 24
    cfg = _config(num_kv_heads=Hkv, num_sinks=sinks)
    be = _backend(backend)
    model = RingBufferAttention(cfg).to(be)
    model.tiling_processor.tile_order = order
    q, k, v = _inputs(rng, B, H, Hkv, N, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=cfg.window, num_sinks=sinks)
    t = lambda x: from_numpy(x, backend=be)  # noqa: E731
    out, state = model(t(q[:, :, :N0]), t(k[:, :, :N0]), t(v[:, :, :N0]), requires_grad=False)
    assert isinstance(state, BufferState) and state.position == N0
    np.testing.assert_allclose(out.to_numpy(), ref[:, :, :N0], atol=1e-12)
    for pos in range(N0, N):
        sl = slice(pos, pos + 1)
        out = model(t(q[:, :, sl]), t(k[:, :, sl]), t(v[:, :, sl]), position=pos, is_decoder=True,
                    att_mask=None, key_padding_mask=None, needs_weights=False, output_attentions=False,
                    buffer_state=state)
        np.testing.assert_allclose(out.to_numpy(), ref[:, :, sl], atol=1e-12, err_msg=f"position {pos}")
    assert state.position == N and state.cache.length == cfg.buffer_size


@pytest.mark.parametrize("order", [TileOrder.Q_MAJOR, TileOrder.K_MAJOR])
def test_encoder_requires_grad(order):
    """requires_grad=True: chunked prefill through the backward cache; gradients equal full-sequence attention."""
    rng = np.random.default_rng(1)
    B, H, Hkv, D, N = 1, 4, 2, 8, 15
    cfg = _config(num_kv_heads=Hkv)
    model = RingBufferAttention(cfg)
    model.tiling_processor.tile_order = order
    qn, kn, vn = _inputs(rng, B, H, Hkv, N, D)
    q, k, v = (from_numpy(x, requires_grad=True) for x in (qn, kn, vn))
    out, state = model(q, k, v, requires_grad=True)
    dout = rng.standard_normal(out.shape)
    (out * from_numpy(dout)).sum().backward()
    ref, _ = reference_attention(qn, kn, vn, causal=True, window=cfg.window)
    dq, dk, dv, _ = reference_attention_backward(qn, kn, vn, dout, causal=True, window=cfg.window)
    np.testing.assert_allclose(out.to_numpy(), ref, atol=1e-10)
    for got, want in ((q.grad, dq), (k.grad, dk), (v.grad, dv)):
        np.testing.assert_allclose(got.to_numpy(), want, atol=1e-10)
    # the state continues decoding where the prefill stopped
    assert state.position == N
    np.testing.assert_array_equal(state.cache.unrotate()[0].to_numpy(), kn[:, :, N - cfg.buffer_size :])


def test_bidirectional_encoder_then_decode():
    rng = np.random.default_rng(2)
    B, H, D, N0 = 1, 4, 8, 10
    cfg = _config(causal=False)
    model = RingBufferAttention(cfg)
    q, k, v = _inputs(rng, B, H, H, N0 + 3, D)
    out, state = model(from_numpy(q[:, :, :N0]), from_numpy(k[:, :, :N0]), from_numpy(v[:, :, :N0]))
    ref, _ = reference_attention(q[:, :, :N0], k[:, :, :N0], v[:, :, :N0])
    np.testing.assert_allclose(out.to_numpy(), ref, atol=1e-12)
    full, _ = reference_attention(q, k, v, causal=True, window=cfg.buffer_size)
    for pos in range(N0, N0 + 3):
        sl = slice(pos, pos + 1)
        out = model(from_numpy(q[:, :, sl]), from_numpy(k[:, :, sl]), from_numpy(v[:, :, sl]), position=pos,
                    is_decoder=True, buffer_state=state)
        np.testing.assert_allclose(out.to_numpy(), full[:, :, sl], atol=1e-12)


def test_decoder_weights_masks_and_feedback():
    rng = np.random.default_rng(3)
    B, H, D, C = 2, 4, 8, 8
    cfg = _config()
    model = RingBufferAttention(cfg)
    state = model.new_state(B, from_numpy(np.zeros(1)).backend, np.float64, feedback=True)
    q, k, v = _inputs(rng, B, H, H, 11, D)
    full, _ = reference_attention(q, k, v, causal=True, window=C)
    for pos in range(11):
        sl = slice(pos, pos + 1)
        out, w = model(from_numpy(q[:, :, sl]), from_numpy(k[:, :, sl]), from_numpy(v[:, :, sl]), position=pos,
                       is_decoder=True, needs_weights=True, buffer_state=state)
        np.testing.assert_allclose(out.to_numpy(), full[:, :, sl], atol=1e-12)
        # the weights over the slots: slot of position p holds softmax weight of key p
        w = w.to_numpy()
        held = np.arange(max(0, pos + 1 - C), pos + 1)
        p, _, _ = __import__("minitorch.attention.reference", fromlist=["x"]).attention_probs(
            q[:, :, sl], k[:, :, held], causal=True, window=C, q_positions=[pos], k_positions=held)
        np.testing.assert_allclose(w[..., slot_of(held, C)], p, atol=1e-12)
        assert np.allclose(w.sum(-1), 1.0)
    # the feedback buffer holds [start, y_0, ..., y_9] (last C) as (B, L, H * D)
    fb = state.feedback.inputs().to_numpy()
    assert fb.shape == (B, C, H * D)
    np.testing.assert_allclose(fb[:, -1], full[:, :, 10].reshape(B, H * D), atol=1e-12)
    # att_mask over the slots (True: masked), and key_padding_mask of the new key
    pos = 11
    qn, kn, vn = _inputs(rng, B, H, H, 1, D)
    mask = np.zeros((B, 1, 1, C), dtype=bool)
    mask[0, 0, 0, slot_of(7, C)] = True
    out = model(from_numpy(qn), from_numpy(kn), from_numpy(vn), position=pos, is_decoder=True, att_mask=mask,
                buffer_state=state)
    keys = np.concatenate([k[:, :, 4:11], kn], axis=2)
    vals = np.concatenate([v[:, :, 4:11], vn], axis=2)
    pad = np.zeros((B, 8), dtype=bool)
    pad[0, 3] = True  # position 7
    ref, _ = reference_attention(qn, keys, vals, causal=True, key_padding_mask=pad)
    np.testing.assert_allclose(out.to_numpy(), ref, atol=1e-12)


def test_dropout_train_and_eval():
    rng = np.random.default_rng(4)
    B, H, D, N = 1, 4, 8, 6
    model = RingBufferAttention(_config(dropout=0.5))
    q, k, v = (from_numpy(x) for x in _inputs(rng, B, H, H, N, D))
    model.eval()
    out_eval, _ = model(q, k, v, requires_grad=True)
    ref, _ = reference_attention(q.to_numpy(), k.to_numpy(), v.to_numpy(), causal=True, window=8)
    np.testing.assert_allclose(out_eval.to_numpy(), ref, atol=1e-12)
    model.train()
    out_train, _ = model(q, k, v, requires_grad=True, seed=5)
    ref_drop, _ = reference_attention(q.to_numpy(), k.to_numpy(), v.to_numpy(), causal=True, window=8,
                                      dropout=0.5, seed=5)
    np.testing.assert_allclose(out_train.to_numpy(), ref_drop, atol=1e-12)
    assert not np.allclose(out_train.to_numpy(), ref)


def test_decoder_step_dropout_uses_slot_mask():
    """A training-mode decoder step draws the keep-mask of flash attention over (q, slots)."""
    rng = np.random.default_rng(5)
    B, H, D, C = 1, 4, 8, 8
    model = RingBufferAttention(_config(dropout=0.3))
    model.train()
    q, k, v = _inputs(rng, B, H, H, 10, D)
    state = None
    for pos in range(10):
        sl = slice(pos, pos + 1)
        state = state or model.new_state(B, from_numpy(q).backend, np.float64)
        out = model(from_numpy(q[:, :, sl]), from_numpy(k[:, :, sl]), from_numpy(v[:, :, sl]), position=pos,
                    is_decoder=True, buffer_state=state, seed=11)
    cache = state.cache
    ref, _ = reference_attention(q[:, :, 9:], cache.keys.to_numpy(), cache.values.to_numpy(), causal=True,
                                 window=C, q_positions=[9], k_positions=cache.positions, dropout=0.3, seed=11)
    np.testing.assert_allclose(out.to_numpy(), ref, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_calls():
    rng = np.random.default_rng(6)
    B, H, D = 1, 4, 8
    model = RingBufferAttention(_config())
    q, k, v = (from_numpy(x) for x in _inputs(rng, B, H, H, 3, D))
    _, state = model(q, k, v)
    one = [from_numpy(x) for x in _inputs(rng, B, H, H, 1, D)]
    with pytest.raises(ValueError, match="position 1 is behind the cache, which has already seen 3 tokens"):
        model(*one, position=1, is_decoder=True, buffer_state=state)
    with pytest.raises(ValueError, match="skips positions 3..4"):
        model(*one, position=5, is_decoder=True, buffer_state=state)
    with pytest.raises(ValueError, match="num_heads=4"):
        model(from_numpy(np.zeros((B, 2, 1, D))), *one[1:], is_decoder=True, buffer_state=state)
    with pytest.raises(ValueError, match="head_dim=8"):
        model(*(from_numpy(np.zeros((B, H, 1, 5))) for _ in range(3)), is_decoder=True, buffer_state=state)
    with pytest.raises(ValueError, match=r"batch 2 vs 1"):
        state.cache.append(np.zeros((2, H, 1, D)), np.zeros((2, H, 1, D)))
    with pytest.raises(ValueError, match="empty buffer state"):
        model(q, k, v, buffer_state=state)
    from minitorch.cuda_ops import CudaBackend

    model.to(CudaBackend)
    with pytest.raises(ValueError, match="backend"):
        model(q, k, v)


def test_feedback_buffer_standalone():
    buf = DecoderFeedbackBuffer(3, 1, 2)
    for t in range(5):
        buf.push(from_numpy(np.full((1, 2), t + 1.0)))
    np.testing.assert_array_equal(buf.inputs().to_numpy()[0, :, 0], [3.0, 4.0, 5.0])


def test_cuda_backend_prefill_and_decode():
    """The module on CudaBackend (simulator): chunked prefill, split-K decode steps, weights; storage on the device."""
    from minitorch.cuda_ops import CudaBackend

    rng = np.random.default_rng(7)
    B, H, D, N0, N = 1, 2, 4, 5, 7
    cfg = RingBufferConfig(num_heads=H, head_dim=D, num_kv_heads=1, buffer_size=4, block_size=2, tile_size=2,
                           head_tile_size=2, prefill_size=3)
    model = RingBufferAttention(cfg).to(CudaBackend)
    q, k, v = _inputs(rng, B, H, 1, N, D)
    ref, _ = reference_attention(q, k, v, causal=True, window=4)
    t = lambda x: from_numpy(x, backend=CudaBackend)  # noqa: E731
    out, state = model(t(q[:, :, :N0]), t(k[:, :, :N0]), t(v[:, :, :N0]))
    np.testing.assert_allclose(out.to_numpy(), ref[:, :, :N0], atol=1e-12)
    for pos in range(N0, N):
        sl = slice(pos, pos + 1)
        out, w = model(t(q[:, :, sl]), t(k[:, :, sl]), t(v[:, :, sl]), position=pos, is_decoder=True,
                       buffer_state=state, output_attentions=True)
        assert out.is_cuda and w.shape == (B, H, 1, 4)
        np.testing.assert_allclose(out.to_numpy(), ref[:, :, sl], atol=1e-12)
    assert state.cache.keys.is_cuda
