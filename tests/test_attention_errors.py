"""Bad or edge input to the attention API gets a clear error naming the argument (or a correct answer), never a
Numba or NumPy traceback, a hang or a silent wrong answer. The cases come from a probe of the public API."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import minitorch
from minitorch import from_numpy
from minitorch.attention.reference import reference_attention

pytestmark = pytest.mark.task5_3


def Q() -> Any:  # noqa: N802 (built when a test runs: in a course starter tree, building tensors is a task's stub)
    return from_numpy(np.ones((1, 2, 4, 3)))


def K() -> Any:  # noqa: N802
    return from_numpy(np.ones((1, 1, 5, 3)))


@pytest.mark.parametrize("call, error, match", [
    (lambda: Q().flash_attention(K(), K(), causal="no"), TypeError, r"causal must be True or False, got 'no'"),
    (lambda: Q().flash_attention(K(), K(), causal=np.array([True])), TypeError, r"causal must be True or False"),
    (lambda: Q().flash_attention(K(), K(), return_lse="no"), TypeError, r"return_lse must be True or False"),
    (lambda: Q().flash_attention(K(), K(), scale=True), TypeError, r"scale must be a finite number, got True"),
    (lambda: Q().flash_attention(K(), K(), num_sinks=-3), ValueError, r"num_sinks must be >= 0, got -3"),
    (lambda: Q().flash_attention(K(), K(), num_sinks=2.7), TypeError, r"num_sinks must be an int, got 2.7"),
    (lambda: Q().flash_attention(K(), K(), dropout=0.1, seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    (lambda: Q().flash_attention(K(), K(), dropout=0.1, seed=2**64), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    (lambda: Q().flash_attention(K(), K(), attn_bias="x"), TypeError, r"attn_bias must be a Tensor or an array of numbers"),
    (lambda: minitorch.attention_reference(Q(), K(), K(), causal="yes"), TypeError, r"causal must be True or False"),
    (lambda: minitorch.TileSchedule(8, 8, 2.5, 2), ValueError, r"block_q must be an int >= 1, got 2.5"),
    (lambda: minitorch.TileSchedule(8, 8, 2, 2, window=-5), ValueError, r"window must be None or an int >= 0"),
    (lambda: minitorch.TileSchedule(8.5, 8, 2, 2), ValueError, r"Nq must be an int >= 0, got 8.5"),
    (lambda: minitorch.DecoderFeedbackBuffer(4, 1, 3, dtype=np.int32), TypeError, r"dtype must be float32 or float64"),
    (lambda: minitorch.RingBufferKVCache(1, 1, 3, 4, tile_size=0), ValueError, r"tile_size must be an int >= 1"),
])
def test_clear_errors(call: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


@pytest.mark.task5_5  # the ring-buffer cache
def test_cache_input_errors_leave_it_as_it_was() -> None:
    cache = minitorch.RingBufferKVCache(1, 1, 3, 4)
    with pytest.raises(TypeError, match=r"append: k must be a Tensor or an array"):
        cache.append([[1.0]], [[1.0]])
    ones = np.ones((1, 1, 2, 3))
    with pytest.raises(ValueError, match=r"key_padding_mask must hold booleans or 0/1"):
        cache.append(ones, ones, key_padding_mask=np.array([[2, 0]]))
    assert cache.seen == 0
    cache.append(ones, ones)
    for kwargs, error, match in (({"scale": float("nan")}, TypeError, "scale must be a finite number"),
                                 ({"dropout": -0.5}, ValueError, r"dropout must be in \[0, 1\)"),
                                 ({"return_lse": "yes"}, TypeError, "return_lse must be True or False")):
        with pytest.raises(error, match=match):  # the same checks on the one-token and the multi-token path
            cache.attend(np.ones((1, 1, 1, 3)), **kwargs)
        with pytest.raises(error, match=match):
            cache.attend(np.ones((1, 1, 2, 3)), **kwargs)
    assert cache.seen == 2 and list(cache.positions) == [0, 1, -1, -1]


def test_edge_values_give_correct_answers() -> None:
    """A window wider than any distance is no window; a block larger than the sequence is clamped to it; a 64-bit
    seed is accepted (all its bits count); no keys at all gives zeros and lse = -inf."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 2, 4, 3)), rng.standard_normal((1, 1, 5, 3)), rng.standard_normal((1, 1, 5, 3))
    t = [from_numpy(x) for x in (q, k, v)]
    ref, _ = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(t[0].flash_attention(t[1], t[2], causal=True, window=2**70).to_numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(t[0].flash_attention(t[1], t[2], causal=True, block_q=10**9, block_k=10**9).to_numpy(),
                               ref, atol=1e-12)
    high = t[0].flash_attention(t[1], t[2], dropout=0.5, seed=2**64 - 1).to_numpy()
    low = t[0].flash_attention(t[1], t[2], dropout=0.5, seed=2**64 - 1 - 2**32).to_numpy()  # same low 32 bits
    assert not np.allclose(high, low)
    empty = from_numpy(np.ones((1, 1, 0, 3)))
    for fn in (minitorch.flash_attention, minitorch.attention_reference):
        out, lse = fn(t[0], empty, empty, return_lse=True)
        assert np.all(out.to_numpy() == 0) and np.all(np.isneginf(lse.to_numpy()))


@pytest.mark.task5_5  # the ring-buffer cache
def test_cache_takes_backend_and_dtype_from_what_is_appended() -> None:
    cache = minitorch.RingBufferKVCache(1, 1, 3, 4)
    with pytest.raises(ValueError, match="no storage yet"):
        cache.keys
    x = from_numpy(np.ones((1, 1, 1, 3), np.float32), backend=minitorch.FastTensorBackend)
    cache.append(x, x)
    assert cache.backend is minitorch.FastTensorBackend and cache.dtype == np.float32
    assert cache.keys.dtype == np.float32 and cache.keys.backend is minitorch.FastTensorBackend


@pytest.mark.task5_5  # the ring-buffer cache
def test_ring_buffer_attention_clear_calls() -> None:
    """A decoder step needs a state; a prefill cannot return weights; a decoder step whose every slot is masked
    outputs zeros (as everywhere else), not the mean of the values."""
    cfg = minitorch.RingBufferConfig(num_heads=2, head_dim=4, buffer_size=4, block_size=2, tile_size=2)
    model = minitorch.RingBufferAttention(cfg)
    rng = np.random.default_rng(1)
    x = lambda n: from_numpy(rng.standard_normal((1, 2, n, 4)))  # noqa: E731
    with pytest.raises(ValueError, match="needs buffer_state"):
        model(x(1), x(1), x(1), is_decoder=True)
    with pytest.raises(ValueError, match="needs_weights / output_attentions apply to decoder steps"):
        model(x(3), x(3), x(3), needs_weights=True)
    out, state = model(x(3), x(3), x(3))
    every_slot = np.ones((1, 1, 1, 4), dtype=bool)
    step, w = model(x(1), x(1), x(1), position=3, is_decoder=True, att_mask=every_slot, buffer_state=state,
                    needs_weights=True)
    assert np.all(step.to_numpy() == 0) and np.all(w.to_numpy() == 0)
