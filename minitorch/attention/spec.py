"""Validation of an attention call, and the normalized description every kernel reads (:class:`AttentionSpec`).

All user input of ``flash_attention`` is checked here, once, for every backend, so that bad input raises a clear
``ValueError``/``TypeError`` naming the argument and the shapes instead of a Numba traceback deep in a kernel.

An :class:`AttentionSpec` is a *configuration of the engine's inner step* (docs/internals.md):

* the **key source**: key tile ``tk`` is the key rows ``[tk Bc, (tk + 1) Bc)`` (contiguous, the default), or, with
  a :class:`KeyList`, the rows ``kidx[b, g, c]`` of list entries ``c`` in ``[tk Bc, (tk + 1) Bc)`` (Dynamic Mask
  Attention's compacted keys); a key row is stored at ``k[b, g, j]``, or, with :class:`Pages`, in a page pool
  shared by the batch, read through a block table (a paged KV cache, vLLM's PagedAttention);
* the **score modification**: ``s = scale q.k + bias``, then a user's ``score_mod``, ``softcap * tanh(s /
  softcap)`` and ALiBi's ``- slope[h] |q_pos - k_pos|``; the visibility rule of :mod:`.masks` on the positions
  (causal, window, sinks, padding, empty slots) and on the segment ids (packed sequences), a ``mask_mod``'s
  :class:`~.block_mask.BlockMask`, optionally a :class:`TopK` keep rule on the bias (DMA's ``z``); dropout; and
  learnable ``sinks``, one more term of each row's softmax (the online softmax starts from it);
* the **tiles**: which (query tile, key tile) pairs are SKIP / DENSE / TRIANGLE (:meth:`AttentionSpec.kernel_tiles`),
  from :class:`~.tiling.TileSchedule` or from the key list's selection;
* ``num_splits``: split-K of the forward (each split of the key tiles gives a partial result, merged by lse).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .block_mask import BlockMask, block_mask_from
from .dropout import drop_threshold
from .mods import score_mod_of
from .tiling import TileOrder, TileSchedule, classify_tiles, default_block_sizes, default_positions

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
    per_tile: Optional["KeyList"] = None
    """Optionally, the same keys as one list per query tile: ``kidx (B, Hkv, Tr, L)``, ``counts (B, Hkv, Tr)``,
    ``tile_types (B, Hkv, Tr, Tc')``, the keys some row of the tile keeps, those every row keeps first (so that
    most of its tiles are DENSE). Kernels that run one query tile at a time (a CPU Q-major forward, dQ) may read it
    instead of the list above; the kept keys, hence the results, are the same. Causal DMA on the CPU: the top-k of
    a growing prefix keeps different keys at different rows, and one list for all rows makes every query tile
    visit keys it does not keep."""


@dataclass(frozen=True, eq=False)
class Pages:
    """Keys stored in pages of a pool shared by the batch (vLLM's PagedAttention layout): the ``k, v`` given to the
    engine are the pools ``(num_pages, Hkv, page_size, D)``, and batch row ``b`` (a sequence) has ``lengths[b]`` key
    rows: row ``j`` is the sequence's token ``j``, stored in page ``block_table[b, j // page_size]`` at offset
    ``j % page_size``. Rows past ``lengths[b]`` do not exist (never read, whatever their table entry holds).

    ``block_table (B, max_pages)`` int64 (-1: unused), ``lengths (B,)`` int64; NumPy arrays (an engine copies them to
    where it computes). Forward only (decoding).
    """

    block_table: np.ndarray
    page_size: int
    lengths: np.ndarray


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
    q_pos_b: np.ndarray
    block_q: int
    block_k: int
    order: TileOrder
    schedule: Optional[TileSchedule]
    tile_types: np.ndarray
    dropout: float = 0.0
    seed: int = 0
    drop_threshold: int = 0
    num_sinks: int = 0
    bias_shape: Optional[Shape4] = None
    keys: Optional[KeyList] = None
    pages: Optional[Pages] = None
    topk: Optional[TopK] = None
    num_splits: int = 1
    rows_complete: bool = True
    """The call sees every key of its rows (``out``, ``lse`` given to backward are its own). False when the caller
    runs one part of a larger attention with the whole's ``out`` and ``lse`` (ring attention's blocks): backward
    then keeps ``delta`` as it is instead of refining it by this call's row sums of ``dS``."""
    q_seg: Optional[np.ndarray] = None
    """Packed sequences: segment ids ``(B, Nq)`` and ``k_seg (B, Nk)`` int64 (``-1``: padding); a pair is visible
    only if :func:`~.masks.same_segment`. ``None``: one sequence."""
    k_seg: Optional[np.ndarray] = None
    block_mask: Any = None
    """A ``mask_mod``'s :class:`~.block_mask.BlockMask` (tiles and the bits of its partial tiles), or None."""
    score_mod: Any = None
    """A user's :class:`~.mods.ScoreMod` (``s = score_mod(s, b, h, q_pos, k_pos)`` after scale and bias), or None."""
    softcap: float = 0.0
    """``s = softcap tanh(s / softcap)`` after ``score_mod`` (Gemma 2); 0: off."""
    alibi: Optional[np.ndarray] = None
    """ALiBi slopes ``(H,)`` float64: ``s -= alibi[h] |q_pos - k_pos|`` after the softcap; None: off."""
    sinks: Any = None
    """Learnable sink logits ``(H,)`` (an array of the backend, q's dtype): every row's softmax has one more term
    ``exp(sinks[h])`` with no value (its running max and sum start at ``(sinks[h], 1)``). None: off."""

    @property
    def has_mods(self) -> bool:
        """Is the score modified after ``scale q.k + bias`` (score_mod, softcap or ALiBi)?"""
        return self.score_mod is not None or self.softcap > 0 or self.alibi is not None

    @property
    def has_bias(self) -> bool:
        return self.bias_shape is not None

    @property
    def refine_delta(self) -> bool:
        """Does backward refine ``delta`` by the row sums of ``dS`` (docs/internals.md)? Where ``dS`` is summed over
        whole columns, a bias broadcast over the query rows (DMA's ``z``), the rounding of ``delta`` would cancel
        catastrophically; elsewhere ``delta = rowsum(dO * O) - dlse`` is as exact as any one entry of ``dS`` needs,
        and the engines may run dQ in the same pass as dK/dV. Never for a call that sees part of its rows' keys
        (``rows_complete=False``)."""
        return self.rows_complete and self.bias_shape is not None and self.bias_shape[2] == 1 and self.Nq > 1

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
        """The tile types the kernels read, ``int8 (B, Ht, Tr, Tc)``: per batch row from the schedule (``Ht = 1``),
        per (batch row, query head) when a ``mask_mod`` depends on the head (``Ht = H``), or per (batch row, kv head)
        from a key list (``Ht = Hkv``). Query head ``h`` reads ``[b, h // (H // Ht)]``."""
        if self.keys is not None:
            return self.keys.tile_types
        if self.block_mask is not None:
            head_types = self.schedule.head_types
            return np.ascontiguousarray(np.broadcast_to(head_types, (self.B,) + head_types.shape[1:]))
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


def check_window(window: Any) -> Optional[int]:
    """``window``: None or an int >= 0; one wider than any distance between positions is no window at all."""
    if window is None:
        return None
    window = check_int("window", window, 0, none_ok=True)
    return None if window >= MAX_POSITION else window


def check_blocks(block_q: Any, block_k: Any, default_blocks: Optional[Tuple[int, int]], D: int, Nq: int,
                 Nk: int) -> Tuple[int, int]:
    """``(block_q, block_k)``: positive ints (None: the backend's ``default_blocks``, the CPU's when that is None too),
    clamped to the sequences (``Nq``, ``Nk``)."""
    dq, dk = default_blocks if default_blocks is not None else default_block_sizes(D)
    block_q = dq if block_q is None else block_q
    block_k = dk if block_k is None else block_k
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not _is_int(val) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    return min(int(block_q), max(Nq, 1)), min(int(block_k), max(Nk, 1))


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
    mask_mod: Any = None,
    score_mod: Any = None,
    score_mod_grad: Any = None,
    q_segment_ids: Any = None,
    k_segment_ids: Any = None,
    sinks: Any = None,
    softcap: Optional[float] = None,
    alibi_slopes: Any = None,
) -> AttentionSpec:
    """Validate every option of an attention call and build its :class:`AttentionSpec`.

    ``key_padding_mask``, the segment ids and ``alibi_slopes`` are NumPy arrays (the caller converts tensors);
    ``bias_shape`` the shape of ``attn_bias``; ``sinks`` the backend's array ``(H,)`` (data: the kernels read it);
    ``mask_mod`` a function or a :class:`~.block_mask.BlockMask`; ``default_blocks`` the backend's ``(Br, Bc)`` for
    this head dim (its engine's ``default_blocks(D)``; the CPU's when None). Block sizes larger than the sequence
    are clamped to it.
    """
    B, H, Hkv, Nq, Nk, D = check_qkv(q_shape, k_shape, v_shape)
    causal = check_flag("causal", causal)
    scale = check_scale(scale, D)
    window = check_window(window)
    dropout = check_dropout(dropout)
    seed = check_seed(seed, dropout)
    num_sinks = check_int("num_sinks", num_sinks, 0)
    num_splits = check_int("num_splits", num_splits, 1)
    try:
        order = TileOrder(order)
    except ValueError:
        raise ValueError(f"order must be a TileOrder (q_major or k_major), got {order!r}") from None

    if isinstance(mask_mod, BlockMask):  # a block mask built for this call brings its tiles
        block_q = mask_mod.block_q if block_q is None else block_q
        block_k = mask_mod.block_k if block_k is None else block_k
    block_q, block_k = check_blocks(block_q, block_k, default_blocks, D, Nq, Nk)

    pad = None
    if key_padding_mask is not None:
        pad = np.asarray(key_padding_mask)
        if pad.shape != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk)=({B}, {Nk}), got {pad.shape}")
    q_pos, k_pos = default_positions(Nq, Nk, q_positions, k_positions)
    block_mask = None
    if isinstance(mask_mod, BlockMask):
        mask_mod.check_fits(Nq, Nk, block_q, block_k, q_pos, k_pos, B, H)
        block_mask = mask_mod
    elif mask_mod is not None:
        block_mask = block_mask_from(mask_mod, B, H, Nq, Nk, block_q, block_k, q_pos, k_pos)
    segs = {}
    for name, ids, n in (("q_segment_ids", q_segment_ids, Nq), ("k_segment_ids", k_segment_ids, Nk)):
        if ids is not None and np.shape(ids) != (B, n):
            raise ValueError(f"{name} must have shape (B, {'Nq' if n == Nq else 'Nk'})=({B}, {n}), got {np.shape(ids)}")
        segs[name] = ids
    schedule = TileSchedule(
        Nq, Nk, block_q, block_k, causal=causal, window=window, q_positions=q_pos, k_positions=k_pos,
        order=order, num_sinks=num_sinks, key_padding_mask=pad, block_mask=block_mask, **segs,
    )
    for name, pos in (("q_positions", schedule.q_pos), ("k_positions", schedule.k_pos)):
        if pos.size and pos.max() >= MAX_POSITION:
            raise ValueError(f"{name} must be < 2**62, got max {pos.max()}")

    bshape = None
    if bias_shape is not None:
        bshape = check_bias_shape(bias_shape, B, H, Hkv, Nq, Nk)
    if score_mod is None and score_mod_grad is not None:
        raise ValueError("score_mod_grad was given without a score_mod")
    mods = score_mod_of(score_mod, score_mod_grad) if score_mod is not None else None

    return AttentionSpec(
        B=B, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, scale=scale, causal=causal,
        window=-1 if window is None else int(window), q_pos=schedule.q_pos, k_pos=schedule.k_pos,
        k_pos_b=np.ascontiguousarray(np.broadcast_to(schedule.k_pos_b, (B, Nk))),
        q_pos_b=np.ascontiguousarray(np.broadcast_to(schedule.q_pos, (B, Nq))),
        block_q=block_q, block_k=block_k, order=order, schedule=schedule,
        tile_types=np.ascontiguousarray(np.broadcast_to(schedule.batch_types, (B, schedule.Tr, schedule.Tc))),
        dropout=dropout, seed=seed, drop_threshold=drop_threshold(dropout), num_sinks=num_sinks,
        bias_shape=bshape, num_splits=num_splits, q_seg=schedule.q_seg, k_seg=schedule.k_seg,
        block_mask=block_mask, score_mod=mods, softcap=check_softcap(softcap), alibi=check_per_head(
            "alibi_slopes", alibi_slopes, H), sinks=check_sinks(sinks, H),
    )


SPEC_CACHE_SIZE = 128
"""How many validated specs :func:`cached_spec` keeps (the oldest goes first)."""
_SPEC_CACHE: Dict[Tuple[Any, ...], AttentionSpec] = {}
_SPEC_LOCK = threading.Lock()
_PLAIN_TYPES = (type(None), bool, int, float, str, np.bool_, np.integer, np.floating, TileOrder)
_PLAIN_EXACT = frozenset({type(None), bool, int, float, str, TileOrder})


def _plain(value: Any) -> bool:
    """A value that a cache key may hold: a number, a flag, a string, None, or a tuple of those (a shape)."""
    if type(value) is tuple:
        return all(isinstance(x, _PLAIN_TYPES) for x in value)
    return isinstance(value, _PLAIN_TYPES)


def cached_spec(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], **options: Any
                ) -> AttentionSpec:
    """:func:`make_spec`, memoized for calls whose options are all plain values (shapes, flags, numbers, None).

    A training loop calls attention with the same shapes and options at every step: validating them again, and
    classifying the tiles again, would cost more than the attention of a small model. A call with an array or a
    function among its options (positions, a padding mask, a mask_mod, sinks) is validated every time, and so is
    dropout without a seed (each call draws a new one). The key holds each value's type too, so that ``causal=1``
    is refused as it would be the first time. Specs are immutable: sharing one between calls is safe.
    """
    values = tuple(options.values())
    types = tuple(map(type, values))
    for t, value in zip(types, values):
        if t not in _PLAIN_EXACT and not _plain(value):
            return make_spec(q_shape, k_shape, v_shape, **options)
    if options.get("dropout") and options.get("seed") is None:
        return make_spec(q_shape, k_shape, v_shape, **options)
    key = (tuple(q_shape), tuple(k_shape), tuple(v_shape), tuple(options), values, types)
    spec = _SPEC_CACHE.get(key)
    if spec is not None:
        return spec
    spec = make_spec(q_shape, k_shape, v_shape, **options)  # (raises for bad input: nothing is cached then)
    with _SPEC_LOCK:
        if len(_SPEC_CACHE) >= SPEC_CACHE_SIZE:
            del _SPEC_CACHE[next(iter(_SPEC_CACHE))]
        _SPEC_CACHE[key] = spec
    return spec


def check_backward(spec: AttentionSpec) -> None:
    """Engines run backward for every spec but a paged one (paged attention is for decoding: forward only)."""
    if spec.pages is not None:
        raise ValueError("paged attention is forward only (decoding): keys read through a block table have no "
                         "backward; train with flash_attention on contiguous keys")


def _int_array(name: str, x: Any, ndim: int) -> np.ndarray:
    """``x`` (a list, an array, a Tensor) as an int64 array of ``ndim`` dims, or a TypeError/ValueError naming it."""
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    elif hasattr(x, "copy_to_host") and not isinstance(x, np.ndarray):
        x = x.copy_to_host()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an array of ints, got {type(x).__name__}") from None
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0)):
        raise TypeError(f"{name} must hold ints, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def make_paged_spec(
    q_shape: Sequence[int],
    k_pages_shape: Sequence[int],
    v_pages_shape: Sequence[int],
    block_table: Any,
    seq_lens: Any,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    window: Optional[int] = None,
    num_sinks: int = 0,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
    default_blocks: Optional[Tuple[int, int]] = None,
    num_splits: int = 1,
) -> AttentionSpec:
    """Validate a paged attention call and build its spec: keys read in place through the block table (:class:`Pages`).

    ``q (S, H, T, D)``: the ``T`` newest tokens of each of ``S`` sequences, at positions ``seq_lens[s] - T ..
    seq_lens[s] - 1``; ``k_pages, v_pages (num_pages, Hkv, page_size, D)``; ``block_table (S, max_pages)`` ints, -1
    where unused; ``seq_lens (S,)``. The spec is that of ``S`` batch rows of ``Nk = max(seq_lens)`` keys, row ``j`` of
    sequence ``s`` at position ``j`` (``-1`` past ``seq_lens[s]``), with per-row query positions (``q_pos_b``).
    """
    qs = _shape4("q", q_shape)
    kp, vp = _shape4("k_pages", k_pages_shape), _shape4("v_pages", v_pages_shape)
    if kp != vp:
        raise ValueError(f"k_pages and v_pages must have the same shape, got k_pages {kp} and v_pages {vp}")
    S, H, T, D = qs
    num_pages, Hkv, page_size, Dk = kp
    if Dk != D or D < 1:
        raise ValueError(f"q and k_pages must have the same head_dim >= 1, got q {qs} and k_pages {kp}")
    if Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"the number of query heads must be a multiple of the number of kv heads, got q {qs} "
                         f"(H={H}) and k_pages {kp} (Hkv={Hkv})")
    if page_size < 1:
        raise ValueError(f"k_pages must have page_size >= 1 (num_pages, Hkv, page_size, D), got {kp}")
    table = _int_array("block_table", block_table, 2)
    lens = _int_array("seq_lens", seq_lens, 1)
    if lens.shape != (S,) or table.shape[0] != S:
        raise ValueError(f"block_table (S, max_pages) and seq_lens (S,) must have S={S} rows for q {qs}, got "
                         f"block_table {table.shape} and seq_lens {lens.shape}")
    if S and lens.min() < T:
        s = int(np.argmin(lens))
        raise ValueError(f"seq_lens: q holds the T={T} newest tokens of each sequence, but sequence {s} has "
                         f"seq_lens[{s}]={lens[s]} < {T}")
    needed = -(-lens // page_size)  # pages holding each sequence's tokens
    if S and needed.max() > table.shape[1]:
        s = int(np.argmax(needed))
        raise ValueError(f"block_table {table.shape} has {table.shape[1]} pages per sequence, but sequence {s} of "
                         f"length {lens[s]} needs {needed[s]} pages of {page_size}")
    used = np.arange(table.shape[1])[None, :] < needed[:, None]
    bad = (table < -1) | (table >= num_pages) | (used & (table < 0))
    if bad.any():
        s, c = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"block_table[{s}, {c}] = {table[s, c]}: entries must be pages in [0, {num_pages}) "
                         f"(k_pages {kp}), or -1 past the sequence's {needed[s]} pages")
    causal = check_flag("causal", causal)
    scale = check_scale(scale, D)
    window = check_window(window)
    num_sinks = check_int("num_sinks", num_sinks, 0)
    num_splits = check_int("num_splits", num_splits, 1)
    Nk = int(lens.max()) if S else 0
    block_q, block_k = check_blocks(block_q, block_k, default_blocks, D, T, Nk)
    # row j of sequence s is its token j; the queries are each sequence's T newest tokens
    k_pos = np.arange(Nk, dtype=np.int64)
    k_pos_b = np.where(k_pos[None, :] < lens[:, None], k_pos[None, :], -1)
    q_pos_b = lens[:, None] - T + np.arange(T, dtype=np.int64)[None, :]
    return AttentionSpec(
        B=S, H=H, Hkv=Hkv, Nq=T, Nk=Nk, D=D, scale=scale, causal=causal, window=-1 if window is None else window,
        q_pos=max(Nk - T, 0) + np.arange(T, dtype=np.int64), k_pos=k_pos, k_pos_b=k_pos_b, q_pos_b=q_pos_b,
        block_q=block_q, block_k=block_k, order=TileOrder.Q_MAJOR, schedule=None,
        tile_types=classify_tiles(q_pos_b, k_pos_b, block_q, block_k, causal, -1 if window is None else window,
                                  num_sinks),
        num_sinks=num_sinks, num_splits=num_splits, pages=Pages(table, int(page_size), lens),
    )


def check_per_head(name: str, value: Any, H: int) -> Optional[np.ndarray]:
    """One finite number per query head, ``(H,)`` float64 (``alibi_slopes``), or None."""
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {H} numbers, one per query head, got {type(value).__name__}") from None
    if arr.shape != (H,):
        raise ValueError(f"{name} must have shape (H,)=({H},), one per query head, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr}")
    return arr


def check_softcap(value: Any) -> float:
    """``softcap``: None (off) or a finite number > 0."""
    if value is None:
        return 0.0
    if _is_bool(value) or not isinstance(value, (int, float, np.floating, np.integer)) or not (
            math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"softcap must be a finite number > 0 (or None), got {value!r}")
    return float(value)


def check_sinks(sinks: Any, H: int) -> Any:
    """``sinks``: an array of the backend with shape ``(H,)``, or None."""
    if sinks is not None and tuple(getattr(sinks, "shape", np.shape(sinks))) != (H,):
        raise ValueError(f"sinks must have shape (H,)=({H},), one logit per query head, got "
                         f"{tuple(getattr(sinks, 'shape', np.shape(sinks)))}")
    return sinks


@dataclass(frozen=True, eq=False)
class DMASpec:
    """A validated Dynamic Mask Attention call: the flash :class:`AttentionSpec` (shapes, scale, causal, padding,
    dropout, blocks) plus ``keep`` (keep_window_size), ``log_space`` (the importance is ``"log"``: ``z = a
    softplus(u)``, not ``exp`` of it), ``compact`` and ``return_probs``."""

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
    def importance(self) -> str:
        """``"exp"`` (``z = exp(a softplus(u))``) or ``"log"`` (``z = a softplus(u)``)."""
        return "log" if self.log_space else "exp"

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
    default_blocks: Optional[Tuple[int, int]] = None, compact: bool = True, importance: Optional[str] = None,
) -> DMASpec:
    """Validate a DMA call (raising ``ValueError``/``TypeError`` naming the argument and the shapes).

    ``importance`` is ``"exp"`` or ``"log"``; ``log_space=True`` is the older name of ``"log"`` (None: from it).
    """
    B, H, Hkv, Nq, Nk, D = check_qkv(q_shape, k_shape, v_shape)
    log_space = check_flag("log_space", log_space)
    if importance is not None:
        if importance not in ("exp", "log"):
            raise ValueError(f'importance must be "exp" or "log", got {importance!r}')
        if log_space and importance == "exp":
            raise ValueError('log_space=True means importance="log", but importance="exp" was given')
        log_space = importance == "log"
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
    return DMASpec(attn, keep, log_space, check_flag("compact", compact),
                   check_flag("return_attn_probs", return_attn_probs))
