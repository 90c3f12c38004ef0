"""make_spec (minitorch/attention/spec.py): every bad input fails early with a clear message, and the normalized
fields (positions, padded key positions, per-batch tile types) are right."""

import math
from typing import Any, Dict

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitorch.attention.dropout import drop_threshold
from minitorch.attention.reference import reference_mask
from minitorch.attention.spec import cached_spec, make_spec
from minitorch.attention.tiling import TileOrder, TileType

pytestmark = pytest.mark.task5_1

Q, KV = (2, 4, 5, 8), (2, 2, 6, 8)  # B=2, H=4, Hkv=2, Nq=5, Nk=6, D=8


def spec(**options: Any):
    return make_spec(Q, KV, KV, **options)


# ---------------------------------------------------------------------------------------------------------------
# Shapes of q, k, v
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q,k,v,match",
    [
        ((4, 5, 8), KV, KV, r"q must be 4-D .*got shape \(4, 5, 8\)"),
        (Q, (2, 2, 6), KV, r"k must be 4-D .*got shape \(2, 2, 6\)"),
        (Q, KV, (1, 2, 2, 6, 8), r"v must be 4-D .*got shape \(1, 2, 2, 6, 8\)"),
        (Q, (2, 2, 6, 4), (2, 2, 6, 4), r"same head_dim.*q \(2, 4, 5, 8\) \(D=8\) and k \(2, 2, 6, 4\) \(D=4\)"),
        ((2, 3, 5, 8), KV, KV,
         r"multiple of the number of kv heads.*q \(2, 3, 5, 8\) \(H=3\).*k \(2, 2, 6, 8\) \(Hkv=2\)"),
        (Q, KV, (2, 2, 7, 8), r"k and v must have the same shape, got k \(2, 2, 6, 8\) and v \(2, 2, 7, 8\)"),
        (Q, (3, 2, 6, 8), (3, 2, 6, 8), r"same batch size, got q \(2, 4, 5, 8\) and k \(3, 2, 6, 8\)"),
        ((2, 4, 5, 0), (2, 2, 6, 0), (2, 2, 6, 0), r"head_dim must be >= 1"),
    ],
)
def test_bad_qkv_shapes(q: Any, k: Any, v: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_spec(q, k, v)


# ---------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"key_padding_mask": np.zeros(6, dtype=bool)}, ValueError,
         r"key_padding_mask must have shape \(B, Nk\)=\(2, 6\), got \(6,\)"),
        ({"key_padding_mask": np.zeros((2, 5), dtype=bool)}, ValueError, r"key_padding_mask .*\(2, 6\), got \(2, 5\)"),
        ({"key_padding_mask": np.full((2, 6), 2)}, ValueError, r"key_padding_mask must hold booleans or 0/1"),
        ({"bias_shape": (3, 4, 5, 6)}, ValueError,
         r"attn_bias shape \(3, 4, 5, 6\) does not broadcast .*B=2, H=4, Hkv=2, Nq=5, Nk=6"),
        ({"bias_shape": (2, 3, 5, 6)}, ValueError, r"attn_bias shape \(2, 3, 5, 6\)"),
        ({"bias_shape": (2, 4, 4, 6)}, ValueError, r"attn_bias shape \(2, 4, 4, 6\)"),
        ({"bias_shape": (5, 1)}, ValueError, r"attn_bias shape \(5, 1\) does not broadcast"),
        ({"bias_shape": (1, 2, 4, 5, 6)}, ValueError, r"attn_bias must have 1 to 4 dims .*got \(1, 2, 4, 5, 6\)"),
        ({"window": -1}, ValueError, r"window must be >= 0, got -1"),
        ({"window": 2.5}, TypeError, r"window must be an int or None, got 2.5"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        ({"dropout": "0.1"}, ValueError, r"dropout must be in \[0, 1\)"),
        ({"dropout": 0.1, "seed": -3}, ValueError, r"seed must be an int in \[0, 2\*\*64\), got -3"),
        ({"dropout": 0.1, "seed": 2**64}, ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
        ({"dropout": 0.1, "seed": 1.5}, ValueError, r"seed must be an int in \[0, 2\*\*64\), got 1.5"),
        ({"causal": "no"}, TypeError, r"causal must be True or False, got 'no'"),
        ({"causal": np.array([True, False])}, TypeError, r"causal must be True or False"),
        ({"scale": True}, TypeError, r"scale must be a finite number, got True"),
        ({"num_sinks": -3}, ValueError, r"num_sinks must be >= 0, got -3"),
        ({"num_sinks": 2.7}, TypeError, r"num_sinks must be an int, got 2.7"),
        ({"order": "sideways"}, ValueError, r"order must be a TileOrder \(q_major or k_major\), got 'sideways'"),
        ({"block_q": 0}, ValueError, r"block_q must be a positive int, got 0"),
        ({"block_k": -4}, ValueError, r"block_k must be a positive int, got -4"),
        ({"block_q": 16.0}, ValueError, r"block_q must be a positive int, got 16.0"),
        ({"block_k": True}, ValueError, r"block_k must be a positive int, got True"),
        ({"scale": float("nan")}, TypeError, r"scale must be a finite number, got nan"),
        ({"q_positions": np.arange(4)}, ValueError, r"q_positions must have shape \(5,\), got \(4,\)"),
        ({"k_positions": np.array([0, 1, 2, 3, 4, -2])}, ValueError, r"k_positions must be >= 0, or -1 .*got min -2"),
        ({"k_positions": np.arange(6) + 0.5}, TypeError, r"k_positions must hold integers"),
    ],
)
def test_bad_options(options: Dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        spec(**options)


# ---------------------------------------------------------------------------------------------------------------
# Normalized fields
# ---------------------------------------------------------------------------------------------------------------
def test_defaults_and_derived_fields() -> None:
    s = spec(block_q=2, block_k=4, dropout=0.25, seed=9, bias_shape=(2, 5, 6), order="k_major")
    assert (s.B, s.H, s.Hkv, s.Nq, s.Nk, s.D, s.group) == (2, 4, 2, 5, 6, 8, 2)
    assert s.scale == pytest.approx(1 / math.sqrt(8)) and s.window == -1 and not s.causal
    assert list(s.k_pos) == [0, 1, 2, 3, 4, 5] and list(s.q_pos) == [1, 2, 3, 4, 5]  # bottom-right aligned
    assert (s.Tr, s.Tc) == (3, 2) and s.tile_types.shape == (2, 3, 2) and s.tile_types.dtype == np.int8
    assert s.order == TileOrder.K_MAJOR and s.seed == 9 and s.drop_threshold == drop_threshold(0.25) == 2**30
    assert s.has_bias and s.bias_shape == (1, 2, 5, 6)  # ones prepended
    assert spec().seed == 0 and not spec().has_bias  # no dropout: the seed is irrelevant and fixed


def test_padding_demotes_dense_and_promotes_skip() -> None:
    """A padded key turns a DENSE tile into TRIANGLE in that batch row; a key tile of padding only is SKIP."""
    pad = np.zeros((2, 8), dtype=bool)
    pad[0, 1] = True  # row 0: one padded key in key tile 0
    pad[1, 4:] = True  # row 1: key tile 1 is all padding
    s = make_spec((2, 1, 6, 4), (2, 1, 8, 4), (2, 1, 8, 4), block_q=3, block_k=4, key_padding_mask=pad)
    assert (s.schedule.types == TileType.DENSE).all()  # the schedule itself knows nothing of padding
    assert (s.tile_types[0, :, 0] == TileType.TRIANGLE).all() and (s.tile_types[0, :, 1] == TileType.DENSE).all()
    assert (s.tile_types[1, :, 0] == TileType.DENSE).all() and (s.tile_types[1, :, 1] == TileType.SKIP).all()
    assert list(s.k_pos_b[0]) == [0, -1, 2, 3, 4, 5, 6, 7] and list(s.k_pos_b[1]) == [0, 1, 2, 3, -1, -1, -1, -1]
    assert list(s.k_pos) == list(range(8))  # k_pos itself is not changed
    ints = make_spec((2, 1, 6, 4), (2, 1, 8, 4), (2, 1, 8, 4), block_q=3, block_k=4, key_padding_mask=pad.astype(int))
    assert np.array_equal(ints.tile_types, s.tile_types) and np.array_equal(ints.k_pos_b, s.k_pos_b)


def test_padding_never_unskips_a_tile() -> None:
    """Causal SKIP tiles stay SKIP and TRIANGLE tiles stay TRIANGLE whatever the padding."""
    pad = np.zeros((1, 8), dtype=bool)
    pad[0, ::2] = True
    s = make_spec((1, 1, 8, 4), (1, 1, 8, 4), (1, 1, 8, 4), causal=True, block_q=4, block_k=4, key_padding_mask=pad)
    assert s.schedule.to_text() == "/.\n#/"
    assert s.tile_types[0].tolist() == [[TileType.TRIANGLE, TileType.SKIP], [TileType.TRIANGLE, TileType.TRIANGLE]]


@given(
    st.integers(1, 3), st.integers(1, 20), st.integers(1, 20), st.integers(1, 6), st.integers(1, 6), st.booleans(),
    st.one_of(st.none(), st.integers(1, 8)), st.sampled_from([0.0, 0.3, 0.8, 1.0]), st.integers(0, 2**32 - 1),
)
def test_padded_tile_types_are_sound(
    B: int, Nq: int, Nk: int, Br: int, Bc: int, causal: bool, window: Any, p_pad: float, seed: int
) -> None:
    """Per batch row, with padding: SKIP tiles hold no visible pair, DENSE tiles only visible pairs, and a key
    tile whose keys are all padding is SKIP."""
    rng = np.random.default_rng(seed)
    pad = rng.random((B, Nk)) < p_pad
    s = make_spec((B, 1, Nq, 2), (B, 1, Nk, 2), (B, 1, Nk, 2), causal=causal, window=window,
                  key_padding_mask=pad, block_q=Br, block_k=Bc)
    vis = reference_mask(B, Nq, Nk, causal, window, key_padding_mask=pad)
    assert np.array_equal(s.k_pos_b, np.where(pad, -1, s.k_pos[None, :]))
    for b in range(B):
        for tq in range(s.Tr):
            qs, qe = s.schedule.q_range(tq)
            for tk in range(s.Tc):
                ks, ke = s.schedule.k_range(tk)
                block = vis[b, qs:qe, ks:ke]
                kind = s.tile_types[b, tq, tk]
                if kind == TileType.SKIP:
                    assert not block.any()
                elif kind == TileType.DENSE:
                    assert block.all()
                if pad[b, ks:ke].all():
                    assert kind == TileType.SKIP


# ---------------------------------------------------------------------------------------------------------------
# The spec cache of repeated calls
# ---------------------------------------------------------------------------------------------------------------
def test_cached_spec_reuses_plain_calls_only() -> None:
    """Same shapes and plain options: the same (immutable) spec. Other options, arrays among the options, or dropout
    without a seed: a spec of their own. A value equal to a cached one but of another type is still refused."""
    first = cached_spec(Q, KV, KV, causal=True, window=3)
    assert cached_spec(Q, KV, KV, causal=True, window=3) is first
    assert cached_spec(Q, KV, KV, causal=True, window=4) is not first
    assert cached_spec(Q, (2, 2, 7, 8), (2, 2, 7, 8), causal=True, window=3) is not first
    with pytest.raises(TypeError, match="causal must be True or False"):
        cached_spec(Q, KV, KV, causal=1, window=3)  # 1 == True, but not a flag
    pad = np.zeros((2, 6), bool)
    assert cached_spec(Q, KV, KV, key_padding_mask=pad) is not cached_spec(Q, KV, KV, key_padding_mask=pad)
    a, b = cached_spec(Q, KV, KV, dropout=0.5), cached_spec(Q, KV, KV, dropout=0.5)
    assert a is not b and a.seed != b.seed
    assert cached_spec(Q, KV, KV, dropout=0.5, seed=3) is cached_spec(Q, KV, KV, dropout=0.5, seed=3)
