"""Validation of an attention call, and the normalized description every kernel reads (:class:`AttentionSpec`).

All user input of ``flash_attention`` is checked here, once, for every backend, so that bad input raises a clear
``ValueError``/``TypeError`` naming the argument and the shapes instead of a Numba traceback deep in a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .dropout import drop_threshold
from .tiling import TileOrder, TileSchedule, TileType, default_block_sizes

Shape4 = Tuple[int, int, int, int]


@dataclass
class AttentionSpec:
    """Everything about one attention call except the tensors themselves (see docs/internals.md)."""

    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    scale: float
    causal: bool
    window: int
    q_pos: np.ndarray
    k_pos: np.ndarray
    k_pos_b: np.ndarray
    block_q: int
    block_k: int
    order: TileOrder
    schedule: TileSchedule
    tile_types: np.ndarray
    dropout: float = 0.0
    seed: int = 0
    drop_threshold: int = 0
    num_sinks: int = 0
    has_bias: bool = False
    bias_shape: Optional[Shape4] = None
    extra: dict = field(default_factory=dict)

    @property
    def group(self) -> int:
        """Query heads per kv head (``H // Hkv``): query head ``h`` reads kv head ``h // group``."""
        return self.H // self.Hkv

    @property
    def Tr(self) -> int:
        return self.schedule.Tr

    @property
    def Tc(self) -> int:
        return self.schedule.Tc


def _shape4(name: str, shape: Sequence[int]) -> Shape4:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {shape}")
    return shape  # type: ignore[return-value]


def check_qkv(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> Tuple[int, int, int, int, int, int]:
    """Validate the q/k/v shapes; return ``(B, H, Hkv, Nq, Nk, D)``."""
    qs, ks, vs = _shape4("q", q_shape), _shape4("k", k_shape), _shape4("v", v_shape)
    B, H, Nq, D = qs
    if ks != vs:
        raise ValueError(f"k and v must have the same shape, got k {ks} and v {vs}")
    Bk, Hkv, Nk, Dk = ks
    if Bk != B:
        raise ValueError(f"q and k must have the same batch size, got q {qs} and k {ks}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head_dim, got q {qs} (D={D}) and k {ks} (D={Dk})")
    if D < 1:
        raise ValueError(f"head_dim must be >= 1, got q {qs}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(
            f"the number of query heads must be a multiple of the number of kv heads, got q {qs} (H={H}) and k {ks} (Hkv={Hkv})"
        )
    return B, H, Hkv, Nq, Nk, D


def check_bias_shape(bias_shape: Sequence[int], B: int, H: int, Hkv: int, Nq: int, Nk: int) -> Shape4:
    """``attn_bias`` broadcasts as ``(B|1, H|Hkv|1, Nq|1, Nk)``; return its 4-D shape (ones prepended)."""
    given = tuple(int(s) for s in bias_shape)
    if len(given) > 4 or len(given) < 1:
        raise ValueError(f"attn_bias must have 1 to 4 dims broadcastable to (B, H, Nq, Nk)=({B}, {H}, {Nq}, {Nk}), got {given}")
    shape = (1,) * (4 - len(given)) + given
    ok = shape[0] in (1, B) and shape[1] in (1, Hkv, H) and shape[2] in (1, Nq) and shape[3] == Nk
    if not ok:
        raise ValueError(
            f"attn_bias shape {given} does not broadcast as (B|1, H|Hkv|1, Nq|1, Nk) with "
            f"B={B}, H={H}, Hkv={Hkv}, Nq={Nq}, Nk={Nk}"
        )
    return shape  # type: ignore[return-value]


def make_spec(
    q_shape: Sequence[int],
    k_shape: Sequence[int],
    v_shape: Sequence[int],
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    key_padding_mask: Optional[np.ndarray] = None,
    bias_shape: Optional[Sequence[int]] = None,
    dropout: float = 0.0,
    seed: Optional[int] = None,
    q_positions: Any = None,
    k_positions: Any = None,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    order: Any = TileOrder.Q_MAJOR,
    backend_kind: str = "fast",
    num_sinks: int = 0,
) -> AttentionSpec:
    """Validate every option of an attention call and build its :class:`AttentionSpec`.

    ``key_padding_mask`` is a NumPy array (the caller converts tensors); ``bias_shape`` the shape of ``attn_bias``.
    """
    B, H, Hkv, Nq, Nk, D = check_qkv(q_shape, k_shape, v_shape)

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if not isinstance(scale, (int, float, np.floating, np.integer)) or not math.isfinite(float(scale)):
        raise TypeError(f"scale must be a finite number, got {scale!r}")

    if window is not None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise TypeError(f"window must be an int or None, got {window!r}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
    if not isinstance(dropout, (int, float, np.floating)) or not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    dropout = float(dropout)
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1)) if dropout > 0 else 0
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")

    try:
        order = TileOrder(order)
    except ValueError:
        raise ValueError(f"order must be a TileOrder (q_major or k_major), got {order!r}") from None

    dq, dk = default_block_sizes(D, backend_kind)
    block_q = dq if block_q is None else block_q
    block_k = dk if block_k is None else block_k
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")

    schedule = TileSchedule(
        Nq, Nk, int(block_q), int(block_k), causal=causal, window=window,
        q_positions=q_positions, k_positions=k_positions, order=order, num_sinks=num_sinks,
    )

    k_pos_b = np.broadcast_to(schedule.k_pos, (B, Nk)).copy()
    tile_types = np.broadcast_to(schedule.types, (B, schedule.Tr, schedule.Tc)).copy()
    if key_padding_mask is not None:
        pad = np.asarray(key_padding_mask)
        if pad.shape != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk)=({B}, {Nk}), got {pad.shape}")
        if pad.dtype != np.bool_:
            if not np.all((pad == 0) | (pad == 1)):
                raise ValueError("key_padding_mask must hold booleans or 0/1 (True/1 means padding)")
            pad = pad.astype(bool)
        k_pos_b[pad] = -1
        # A padded key turns a DENSE tile into one that needs per-element masking; all-padded tiles are skipped.
        for tk in range(schedule.Tc):
            ks, ke = schedule.k_range(tk)
            tile_pad = pad[:, ks:ke]
            some, every = tile_pad.any(axis=1), tile_pad.all(axis=1)
            col = tile_types[:, :, tk]
            col[some[:, None] & (col == TileType.DENSE)] = TileType.TRIANGLE
            col[np.broadcast_to(every[:, None], col.shape)] = TileType.SKIP

    bshape = None
    if bias_shape is not None:
        bshape = check_bias_shape(bias_shape, B, H, Hkv, Nq, Nk)

    return AttentionSpec(
        B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, scale=float(scale), causal=bool(causal),
        window=-1 if window is None else int(window), q_pos=schedule.q_pos, k_pos=schedule.k_pos, k_pos_b=k_pos_b,
        block_q=int(block_q), block_k=int(block_k), order=order, schedule=schedule, tile_types=tile_types,
        dropout=dropout, seed=int(seed), drop_threshold=drop_threshold(dropout), num_sinks=int(num_sinks),
        has_bias=bshape is not None, bias_shape=bshape,
    )
