"""Validation of an attention call, and the normalized description every kernel reads (:class:`AttentionSpec`).

All user input of ``flash_attention`` is checked here, once, for every backend, so that bad input raises a clear
``ValueError``/``TypeError`` naming the argument and the shapes instead of a Numba traceback deep in a kernel.

An :class:`AttentionSpec` is a *configuration of the engine's inner step* (docs/internals.md):

* the **key source**: key tile ``tk`` is the key rows ``[tk Bc, (tk + 1) Bc)`` (contiguous, the default), or, with
  a :class:`KeyList`, the rows ``kidx[b, g, c]`` of list entries ``c`` in ``[tk Bc, (tk + 1) Bc)`` (Dynamic Mask
  Attention's compacted keys; later the pages of a paged cache);
* the **score modification**: ``s = scale q.k + bias``, the visibility rule of :mod:`.masks` on the positions
  (causal, window, sinks, padding, empty slots), optionally a :class:`TopK` keep rule on the bias (DMA's ``z``),
  and dropout;
* the **tiles**: which (query tile, key tile) pairs are SKIP / DENSE / TRIANGLE (:meth:`AttentionSpec.kernel_tiles`),
  from :class:`~.tiling.TileSchedule` or from the key list's selection;
* ``num_splits``: split-K of the forward (each split of the key tiles gives a partial result, merged by lse).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from .dropout import drop_threshold
from .tiling import TileOrder, TileSchedule, default_block_sizes

Shape4 = Tuple[int, int, int, int]
MAX_POSITION = 2**62
"""Positions and windows beyond this are refused or clamped: the kernels compute in int64."""


@dataclass(frozen=True, eq=False)
class KeyList:
    """Keys read through an index list: list entry ``c`` of (batch ``b``, kv head ``g``) is key row ``kidx[b, g, c]``.

    ``kidx (B, Hkv, L)`` int64, ``counts (B, Hkv)`` int64 (entries past ``counts[b, g]`` are unused), and the tile
    types of (query tile, tile of ``block_k`` list entries), ``tile_types (B, Hkv, Tr, Tc)`` int8. A key appears at
    most once in a list. Arrays live where the backend computes (NumPy, or device arrays for CUDA).
    """

    kidx: Any
    counts: Any
    tile_types: Any


@dataclass(frozen=True, eq=False)
class TopK:
    """Dynamic Mask Attention's keep rule (:func:`.masks.kept`) on the bias: row ``i`` of (b, kv head g) keeps key
    ``j`` iff ``kept(bias[b, g, 0, j], j, thr_val[b, g, i], thr_idx[b, g, i])``. ``thr_val``, ``thr_idx (B, Hkv, Nq)``;
    the bias is then the importance ``z`` of shape ``(B, Hkv, 1, Nk)``."""

    thr_val: Any
    thr_idx: Any


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Everything about one attention call except the tensors themselves (see docs/internals.md).

    Immutable: a derived configuration is a new spec (:func:`dataclasses.replace`). ``eq=False`` makes a spec
    hashable by identity, so that a backend may memoize what it derives from one (device copies of the positions).
    """

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
    bias_shape: Optional[Shape4] = None
    keys: Optional[KeyList] = None
    topk: Optional[TopK] = None
    num_splits: int = 1
    rows_complete: bool = True
    """The call sees every key of its rows (``out``, ``lse`` given to backward are its own). False when the caller
    runs one part of a larger attention with the whole's ``out`` and ``lse`` (ring attention's blocks): backward
    then keeps ``delta`` as it is instead of refining it by this call's row sums of ``dS``."""

    @property
    def has_bias(self) -> bool:
        return self.bias_shape is not None

    @property
    def group(self) -> int:
        """Query heads per kv head (``H // Hkv``): query head ``h`` reads kv head ``h // group``."""
        return self.H // self.Hkv

    @property
    def Tr(self) -> int:
        return -(-self.Nq // self.block_q)

    @property
    def Tc(self) -> int:
        """Key tiles: of the key rows, or of the list entries with a :class:`KeyList`."""
        if self.keys is not None:
            return int(self.keys.tile_types.shape[3])
        return -(-self.Nk // self.block_k)

    def kernel_tiles(self) -> Any:
        """The tile types the kernels read, ``int8 (B, 1 or Hkv, Tr, Tc)``: per batch row from the schedule, or per
        (batch row, kv head) from a key list."""
        if self.keys is not None:
            return self.keys.tile_types
        return self.tile_types[:, None]

    def replace(self, **changes: Any) -> "AttentionSpec":
        """A copy with some fields changed (a new configuration of the same call)."""
        return dataclasses.replace(self, **changes)


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


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_))


def check_flag(name: str, value: Any) -> bool:
    """A boolean option (``causal``, ``return_lse``): True/False only, not a string or an array."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_scale(value: Any, D: int, name: str = "scale") -> float:
    """``scale`` (default ``1/sqrt(D)``): a finite real number."""
    if value is None:
        return 1.0 / math.sqrt(D)
    if _is_bool(value) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_dropout(value: Any, name: str = "dropout") -> float:
    if _is_bool(value) or not isinstance(value, (int, float, np.floating, np.integer)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_seed(seed: Any, dropout: float) -> int:
    """A dropout seed: an int in ``[0, 2**64)`` (all 64 bits are hashed); None draws one when dropout is on."""
    if seed is None:
        return int(np.random.randint(0, 2**63 - 1, dtype=np.int64)) if dropout > 0 else 0
    if not _is_int(seed) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def check_int(name: str, value: Any, low: int, none_ok: bool = False) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int{' or None' if none_ok else ''}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


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
    default_blocks: Optional[Tuple[int, int]] = None,
    num_sinks: int = 0,
    num_splits: int = 1,
) -> AttentionSpec:
    """Validate every option of an attention call and build its :class:`AttentionSpec`.

    ``key_padding_mask`` is a NumPy array (the caller converts tensors); ``bias_shape`` the shape of ``attn_bias``;
    ``default_blocks`` the backend's ``(Br, Bc)`` for this head dim (its engine's ``default_blocks(D)``; the CPU's
    when None). Block sizes larger than the sequence are clamped to it.
    """
    B, H, Hkv, Nq, Nk, D = check_qkv(q_shape, k_shape, v_shape)
    causal = check_flag("causal", causal)
    scale = check_scale(scale, D)
    if window is not None:
        window = check_int("window", window, 0, none_ok=True)
        if window >= MAX_POSITION:  # wider than any distance between positions: no window at all
            window = None
    dropout = check_dropout(dropout)
    seed = check_seed(seed, dropout)
    num_sinks = check_int("num_sinks", num_sinks, 0)
    num_splits = check_int("num_splits", num_splits, 1)
    try:
        order = TileOrder(order)
    except ValueError:
        raise ValueError(f"order must be a TileOrder (q_major or k_major), got {order!r}") from None

    dq, dk = default_blocks if default_blocks is not None else default_block_sizes(D)
    block_q = dq if block_q is None else block_q
    block_k = dk if block_k is None else block_k
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    block_q, block_k = min(int(block_q), max(Nq, 1)), min(int(block_k), max(Nk, 1))

    pad = None
    if key_padding_mask is not None:
        pad = np.asarray(key_padding_mask)
        if pad.shape != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk)=({B}, {Nk}), got {pad.shape}")
    schedule = TileSchedule(
        Nq, Nk, block_q, block_k, causal=causal, window=window, q_positions=q_positions, k_positions=k_positions,
        order=order, num_sinks=num_sinks, key_padding_mask=pad,
    )
    for name, pos in (("q_positions", schedule.q_pos), ("k_positions", schedule.k_pos)):
        if pos.size and pos.max() >= MAX_POSITION:
            raise ValueError(f"{name} must be < 2**62, got max {pos.max()}")

    bshape = None
    if bias_shape is not None:
        bshape = check_bias_shape(bias_shape, B, H, Hkv, Nq, Nk)

    return AttentionSpec(
        B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, scale=scale, causal=causal,
        window=-1 if window is None else int(window), q_pos=schedule.q_pos, k_pos=schedule.k_pos,
        k_pos_b=np.ascontiguousarray(np.broadcast_to(schedule.k_pos_b, (B, Nk))),
        block_q=block_q, block_k=block_k, order=order, schedule=schedule,
        tile_types=np.ascontiguousarray(np.broadcast_to(schedule.batch_types, (B, schedule.Tr, schedule.Tc))),
        dropout=dropout, seed=seed, drop_threshold=drop_threshold(dropout), num_sinks=num_sinks,
        bias_shape=bshape, num_splits=num_splits,
    )


@dataclass(frozen=True, eq=False)
class DMASpec:
    """A validated Dynamic Mask Attention call: the flash :class:`AttentionSpec` (shapes, scale, causal, padding,
    dropout, blocks) plus ``keep`` (keep_window_size), ``log_space``, ``compact`` and ``return_probs``."""

    attn: AttentionSpec
    keep: int
    log_space: bool = False
    compact: bool = True
    return_probs: bool = False

    def __getattr__(self, name: str) -> Any:  # B, H, Hkv, Nq, Nk, D, group, scale, causal, dropout, seed, ...
        if name == "attn":
            raise AttributeError(name)
        return getattr(self.attn, name)

    @property
    def off(self) -> int:
        """With causal, row i sees the keys ``j <= off + i`` (``off = Nk - Nq``: bottom-right alignment)."""
        return self.attn.Nk - self.attn.Nq


def make_dma_spec(
    q_shape: Tuple[int, ...], k_shape: Tuple[int, ...], v_shape: Tuple[int, ...],
    dt_shape: Tuple[int, ...], a_shape: Tuple[int, ...], *,
    keep_window_size: int = 1024, causal: bool = False, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[np.ndarray] = None, seed: Optional[int] = None, log_space: bool = False,
    return_attn_probs: bool = False, block_q: Optional[int] = None, block_k: Optional[int] = None,
    default_blocks: Optional[Tuple[int, int]] = None, compact: bool = True,
) -> DMASpec:
    """Validate a DMA call (raising ``ValueError``/``TypeError`` naming the argument and the shapes)."""
    B, H, Hkv, Nq, Nk, D = check_qkv(q_shape, k_shape, v_shape)
    keep = check_int("keep_window_size", keep_window_size, 1)
    if tuple(dt_shape) != (Hkv, Hkv * D):
        raise ValueError(
            f"dt_proj must have shape (Hkv, Hkv*D)=({Hkv}, {Hkv * D}) for k/v of shape {tuple(k_shape)}, "
            f"got {tuple(dt_shape)}"
        )
    if tuple(a_shape) != (Hkv,):
        raise ValueError(f"a_coef must have shape (Hkv,)=({Hkv},) for k/v of shape {tuple(k_shape)}, got {tuple(a_shape)}")
    dropout = check_dropout(dropout_p, "dropout_p")
    scale = check_scale(softmax_scale, D, "softmax_scale")
    attn = make_spec(
        q_shape, k_shape, v_shape, causal=check_flag("causal", causal), scale=scale, key_padding_mask=key_padding_mask,
        dropout=dropout, seed=seed, block_q=block_q, block_k=block_k, default_blocks=default_blocks,
    )
    return DMASpec(attn, keep, check_flag("log_space", log_space), check_flag("compact", compact),
                   check_flag("return_attn_probs", return_attn_probs))
