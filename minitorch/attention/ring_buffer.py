"""Ring-buffer attention as a Module, with the seed project's configuration and call forms.

```python
config = RingBufferConfig(num_heads=8, head_dim=64, buffer_size=2048, block_size=128, tile_size=32)
model = RingBufferAttention(config)                       # or build_attention({"name": "ring_buffer", ...})
model.tiling_processor.tile_order = TileOrder.K_MAJOR     # FlashAttention 1 loop order (default Q_MAJOR)

out, state = model(q, k, v, requires_grad=True)           # encoder / prefill: attention + cache fill
out = model(q_t, k_t, v_t, position=state.position, is_decoder=True, buffer_state=state)   # one decoder step
```

Every configuration field does something:

* ``buffer_size``: the cache capacity ``C``; causal attention has window ``C - num_sinks`` everywhere (prefill and
  decoding agree, so a prompt prefilled in one call or decoded token by token gives the same outputs).
* ``block_size``: the cache's tile granularity. The decode kernels walk the slots in tiles of ``block_size``
  and skip tiles with no visible slot; on CUDA it is the split of the split-K decode kernel (one block per tile).
  ``buffer_size`` must be a multiple of it.
* ``tile_size``: the flash-attention tile (``block_q = block_k``) of prefill and chunk attention; on CUDA also the
  threads per block of the decode kernel (a power of two).
* ``head_tile_size``: query heads one decode program processes together (they share each slot tile while it is hot).
* ``prefill_size``: a causal prefill longer than this runs in chunks of ``prefill_size`` queries through the cache
  (the forward cache at inference, the backward cache when ``requires_grad=True``): at most
  ``buffer_size + prefill_size`` keys are touched per chunk.
* ``dropout``: attention dropout in training mode (``model.train()``); none in ``model.eval()``.
* ``causal``: the prefill is causal (decoder-style) or bidirectional (encoder-style, then it is not chunked).
* ``num_kv_heads`` (GQA, default ``num_heads``) and ``num_sinks`` (attention sinks kept by the cache) are extras.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Tuple, Union

import numpy as np

from ..module import Module
from ..tensor import Tensor
from ..tensor_functions import from_numpy
from .api import flash_attention
from .engine import engine_of, raw4, wrap
from .kv_cache import DecoderFeedbackBuffer, RingBufferKVCache, chunked_causal_attention, concat_seq, take_seq
from .spec import make_spec
from .tiling import TileOrder, TileSchedule

# ---------------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass
class RingBufferConfig:
    """Configuration of :class:`RingBufferAttention` (see the module docstring for what each field does)."""

    num_heads: int
    head_dim: int
    dropout: float = 0.0
    buffer_size: int = 2048
    block_size: int = 128
    tile_size: int = 32
    head_tile_size: int = 4
    prefill_size: int = 512
    causal: bool = True
    num_kv_heads: Optional[int] = None
    num_sinks: int = 0

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "buffer_size", "block_size", "tile_size", "head_tile_size", "prefill_size"):
            val = getattr(self, name)
            if not _is_int(val) or val < 1:
                raise ValueError(f"RingBufferConfig.{name} must be a positive int, got {val!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if not _is_int(self.num_kv_heads) or self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"RingBufferConfig.num_kv_heads must divide num_heads={self.num_heads}, "
                             f"got {self.num_kv_heads!r}")
        if not isinstance(self.dropout, (int, float, np.floating)) or not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"RingBufferConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.buffer_size % self.block_size != 0:
            raise ValueError(f"RingBufferConfig.buffer_size ({self.buffer_size}) must be a multiple of block_size "
                             f"({self.block_size}): the cache is processed in whole blocks")
        if self.tile_size & (self.tile_size - 1):
            raise ValueError(f"RingBufferConfig.tile_size must be a power of two, got {self.tile_size}")
        if not _is_int(self.num_sinks) or not 0 <= self.num_sinks < self.buffer_size:
            raise ValueError(f"RingBufferConfig.num_sinks must be in [0, buffer_size={self.buffer_size}), "
                             f"got {self.num_sinks!r}")
        self.causal = bool(self.causal)
        self.dropout = float(self.dropout)

    @property
    def window(self) -> int:
        """The attention window of causal attention through the cache: ``buffer_size - num_sinks``."""
        return self.buffer_size - self.num_sinks


class TilingProcessor:
    """The tiling of the module's attention calls: tile sizes from the config and the loop order (settable)."""

    def __init__(self, config: RingBufferConfig) -> None:
        self.block_q = self.block_k = config.tile_size
        self.block_size = config.block_size
        self.head_tile_size = config.head_tile_size
        self._order = TileOrder.Q_MAJOR

    @property
    def tile_order(self) -> TileOrder:
        """``TileOrder.Q_MAJOR`` (FlashAttention 2) or ``TileOrder.K_MAJOR`` (FlashAttention 1)."""
        return self._order

    @tile_order.setter
    def tile_order(self, order: Any) -> None:
        try:
            self._order = TileOrder(order)
        except ValueError:
            raise ValueError(f"tile_order must be a TileOrder (q_major or k_major), got {order!r}") from None

    def schedule(self, Nq: int, Nk: int, **masks: Any) -> TileSchedule:
        """The :class:`TileSchedule` this module's attention uses for ``Nq`` queries and ``Nk`` keys."""
        return TileSchedule(Nq, Nk, self.block_q, self.block_k, order=self._order, **masks)

    def options(self) -> Dict[str, Any]:
        """Tile options of a flash-attention call."""
        return {"block_q": self.block_q, "block_k": self.block_k, "order": self._order}

    def __repr__(self) -> str:
        return f"TilingProcessor(tile={self.block_q}, block_size={self.block_size}, order={self._order.value})"


@dataclass
class BufferState:
    """What a decoder carries between steps: its KV cache (whose ``seen`` is the next position) and, optionally,
    a :class:`DecoderFeedbackBuffer` that every decoder step pushes its output ``(B, H * D)`` into."""

    cache: RingBufferKVCache
    feedback: Optional[DecoderFeedbackBuffer] = None

    @property
    def position(self) -> int:
        """The position of the next token."""
        return self.cache.seen


# ---------------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------------


class RingBufferAttention(Module):
    """Attention through a ring-buffer KV cache (see the module docstring for the call forms)."""

    def __init__(self, config: RingBufferConfig) -> None:
        super().__init__()
        if not isinstance(config, RingBufferConfig):
            raise TypeError(f"RingBufferAttention needs a RingBufferConfig, got {type(config).__name__}")
        self.config = config
        self.tiling_processor = TilingProcessor(config)
        self.backend: Any = None

    def to(self, backend: Any) -> "RingBufferAttention":
        """Run on ``backend`` (a TensorBackend): inputs and buffer states must live there. Returns self."""
        super().to(backend)
        self.backend = backend
        return self

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _check_inputs(self, q: Any, k: Any, v: Any) -> Tuple[int, int, int, int, int]:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor):
                raise TypeError(f"RingBufferAttention: {name} must be a Tensor, got {type(t).__name__}")
        if self.backend is not None and q.backend.ops is not self.backend.ops:
            raise ValueError(f"RingBufferAttention is on backend {self.backend.name}, q on {q.backend.name}; "
                             "use model.to(backend) or move the inputs")
        c = self.config
        qs, ks = tuple(q.shape), tuple(k.shape)
        if len(qs) != 4 or qs[1] != c.num_heads or qs[3] != c.head_dim:
            raise ValueError(f"q must be (B, num_heads={c.num_heads}, N, head_dim={c.head_dim}), got {qs}")
        if len(ks) != 4 or ks[0] != qs[0] or ks[1] != c.num_kv_heads or ks[3] != c.head_dim or tuple(v.shape) != ks:
            raise ValueError(f"k and v must be (B={qs[0]}, num_kv_heads={c.num_kv_heads}, N, head_dim={c.head_dim}), "
                             f"got k {ks} and v {tuple(v.shape)}")
        return qs[0], qs[1], ks[1], qs[2], ks[2]

    def new_state(self, batch: int, backend: Any, dtype: Any, feedback: bool = False) -> BufferState:
        """An empty :class:`BufferState` for this config."""
        c = self.config
        cache = RingBufferKVCache(batch, c.num_kv_heads, c.head_dim, c.buffer_size, c.num_sinks, backend=backend,
                                  dtype=dtype, block_size=c.block_size, tile_size=c.tile_size,
                                  head_tile_size=c.head_tile_size, order=self.tiling_processor.tile_order)
        fb = None
        if feedback:
            fb = DecoderFeedbackBuffer(c.buffer_size, batch, c.num_heads * c.head_dim, backend=backend, dtype=dtype)
        return BufferState(cache, fb)

    def _dropout(self) -> float:
        return self.config.dropout if self.training else 0.0

    # -- call forms ----------------------------------------------------------------------------------------------------
    def forward(
        self,
        q: "Any",
        k: "Any",
        v: "Any",
        requires_grad: bool = False,
        position: Optional[int] = None,
        is_decoder: bool = False,
        att_mask: Any = None,
        key_padding_mask: Any = None,
        needs_weights: bool = False,
        output_attentions: bool = False,
        buffer_state: Optional[BufferState] = None,
        seed: Optional[int] = None,
    ) -> Any:
        """Encoder/prefill form: ``out, state = model(q, k, v, requires_grad=...)``.
        Decoder form: ``out = model(q, k, v, position=pos, is_decoder=True, buffer_state=state, ...)``
        (``(out, weights)`` with ``needs_weights`` or ``output_attentions``)."""
        if is_decoder:
            if buffer_state is None:
                raise ValueError("a decoder step (is_decoder=True) needs buffer_state: the state the prefill returned, "
                                 "or model.new_state(batch, backend, dtype) to start from an empty cache")
            return self._decode_step(q, k, v, position, att_mask, key_padding_mask,
                                     needs_weights or output_attentions, buffer_state, seed)
        if att_mask is not None:
            raise ValueError("att_mask applies to decoder steps (is_decoder=True); for a prefill use key_padding_mask")
        if needs_weights or output_attentions:
            raise ValueError("needs_weights / output_attentions apply to decoder steps (is_decoder=True); for the "
                             "weights of a prefill use minitorch.attention.attention_probs on the same inputs")
        return self._prefill(q, k, v, requires_grad, key_padding_mask, buffer_state, seed)

    def _prefill(self, q: Any, k: Any, v: Any, requires_grad: bool, key_padding_mask: Any,
                 buffer_state: Optional[BufferState], seed: Optional[int]) -> Tuple[Any, BufferState]:
        """Attention over the whole input (causal with window ``buffer_size - num_sinks``, or bidirectional) and a
        state whose cache holds the input's last tokens."""
        B, H, Hkv, N, Nk = self._check_inputs(q, k, v)
        c = self.config
        if c.causal and Nk != N:
            raise ValueError(f"a causal prefill needs as many keys as queries, got q length {N} and k length {Nk}")
        state = buffer_state if buffer_state is not None else self.new_state(B, q.backend, q.dtype)
        if state.cache.seen != 0:
            raise ValueError(f"prefill needs an empty buffer state, this one has seen {state.cache.seen} tokens; "
                             "continue it with decoder steps (is_decoder=True)")
        pad = None
        if key_padding_mask is not None:
            pad = key_padding_mask.to_numpy() if isinstance(key_padding_mask, Tensor) else np.asarray(key_padding_mask)
            pad = pad.astype(bool)
        dropout = self._dropout()
        if dropout > 0 and seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        tiles = self.tiling_processor.options()
        masks: Dict[str, Any] = {"causal": True, "window": c.window, "num_sinks": c.num_sinks} if c.causal else {}
        P = c.prefill_size
        if requires_grad:
            # the backward cache: chunks see the graph-carrying cached keys (or one flash call when short)
            if c.causal and N > P:
                out = chunked_causal_attention(
                    q, k, v, P, c.window, c.num_sinks, key_padding_mask=pad, dropout=dropout, seed=seed,
                    block_size=c.block_size, tile_size=c.tile_size, order=tiles["order"])
            else:
                out = flash_attention(q, k, v, key_padding_mask=pad, dropout=dropout, seed=seed, **masks, **tiles)
            state.cache.append(k.detach(), v.detach(), pad)
            return out, state
        # the forward cache: no graph
        cache = state.cache
        engine = engine_of(q.backend)
        if c.causal:
            outs = []
            qr = raw4(q.detach())
            kr, vr = raw4(k.detach()), raw4(v.detach())
            for a in range(0, N, P):
                b = min(a + P, N)
                rows = np.arange(a, b, dtype=np.int64)
                cache.append(take_seq(engine, kr, rows), take_seq(engine, vr, rows), None if pad is None else pad[:, a:b])
                outs.append(cache.attend(take_seq(engine, qr, rows), dropout=dropout,
                                         seed=None if seed is None else seed + a))
            out = wrap(concat_seq(engine, outs), q.backend)
        else:
            spec = make_spec(q.shape, k.shape, v.shape, key_padding_mask=pad, dropout=dropout, seed=seed,
                             default_blocks=engine.default_blocks(int(q.shape[3])), **tiles)
            out_raw, _ = engine.forward(raw4(q.detach()), raw4(k.detach()), raw4(v.detach()), None, spec)
            out = wrap(out_raw, q.backend)
            cache.append(k.detach(), v.detach(), pad)
        return out, state

    def _decode_step(self, q: Any, k: Any, v: Any, position: Optional[int], att_mask: Any, key_padding_mask: Any,
                     weights: bool, buffer_state: Optional[BufferState], seed: Optional[int]) -> Any:
        """Append the step's keys and values to the cache and attend over it."""
        B, H, Hkv, T, Tk = self._check_inputs(q, k, v)
        if Tk != T:
            raise ValueError(f"a decoder step appends one key per query, got q length {T} and k length {Tk}")
        state = buffer_state
        cache = state.cache
        if bool(q.backend.cuda) != bool(cache.backend.cuda):
            raise ValueError(f"buffer_state is on {cache.backend.name}, q on backend {q.backend.name}")
        if position is not None:
            if position < cache.seen:
                raise ValueError(f"position {position} is behind the cache, which has already seen {cache.seen} "
                                 f"tokens (positions 0..{cache.seen - 1}); the next position is {cache.seen}")
            if position > cache.seen:
                raise ValueError(f"position {position} skips positions {cache.seen}..{position - 1}: the cache "
                                 f"has seen {cache.seen} tokens and the next position is {cache.seen}")
        dropout = self._dropout()
        cache.append(k, v, key_padding_mask)
        bias = None
        if att_mask is not None:
            bias = self._att_bias(att_mask, B, H, T, cache.capacity, cache.dtype)
            if T > 1 and cache._ws is not None:
                raise ValueError("att_mask is given over the cache slots; this step evicted keys its own earlier "
                                 "queries need, so it must be split into steps of one token")
        out = cache.attend(q, dropout=dropout, seed=seed, attn_bias=bias)
        if state.feedback is not None:
            last = out.to_numpy()[:, :, -1, :].reshape(B, H * self.config.head_dim)
            state.feedback.push(last)
        if weights:
            w = cache.attention_weights(q, attn_bias=bias)
            return out, from_numpy(w.astype(cache.dtype), backend=q.backend)
        return out

    @staticmethod
    def _att_bias(att_mask: Any, B: int, H: int, T: int, C: int, dtype: np.dtype) -> np.ndarray:
        """``att_mask`` over the cache slots, ``(B|1, H|1, T|1, capacity)``: booleans (True: masked) or additive
        floats, as a 4-D additive bias (a masked slot gets ``-inf``: it is never read, and a row whose every slot
        is masked outputs zeros, as everywhere else)."""
        m = att_mask.to_numpy() if isinstance(att_mask, Tensor) else np.asarray(att_mask)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)
        if m.ndim != 4 or m.shape[0] not in (1, B) or m.shape[1] not in (1, H) or m.shape[2] not in (1, T) \
                or m.shape[3] != C:
            raise ValueError(f"att_mask must broadcast as (B|1, H|1, T|1, capacity) = ({B}|1, {H}|1, {T}|1, {C}) "
                             f"over the cache slots, got {tuple(np.shape(att_mask))}")
        if m.dtype == np.bool_:
            m = np.where(m, -np.inf, 0.0)
        return np.ascontiguousarray(m, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Registry (the xFormers factory pattern, without xFormers)
# ---------------------------------------------------------------------------------------------------------------------

ATTENTION_REGISTRY: Dict[str, Tuple[type, type]] = {}


def register_attention(name: str, config_cls: Optional[type] = None) -> Callable[[type], type]:
    """Class decorator: make an attention class buildable by ``build_attention({"name": name, ...})``.

    ``config_cls`` is the dataclass its keyword arguments build (default: the class takes them directly).
    """

    def register(cls: type) -> type:
        if name in ATTENTION_REGISTRY and ATTENTION_REGISTRY[name][0] is not cls:
            raise ValueError(f"attention {name!r} is already registered to {ATTENTION_REGISTRY[name][0].__name__}")
        ATTENTION_REGISTRY[name] = (cls, config_cls)  # type: ignore[assignment]
        return cls

    return register


def build_attention(config: Union[Dict[str, Any], Any]) -> Any:
    """Build a registered attention from ``{"name": ..., **config fields}`` or from a config instance."""
    if isinstance(config, dict):
        opts = dict(config)
        name = opts.pop("name", None)
        if name not in ATTENTION_REGISTRY:
            raise ValueError(f"unknown attention {name!r}; registered: {sorted(ATTENTION_REGISTRY)}")
        cls, config_cls = ATTENTION_REGISTRY[name]
        if config_cls is None:
            return cls(**opts)
        known = {f.name for f in fields(config_cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise TypeError(f"unknown {config_cls.__name__} fields for attention {name!r}: {unknown}; "
                            f"known: {sorted(known)}")
        return cls(config_cls(**opts))
    for cls, config_cls in ATTENTION_REGISTRY.values():
        if config_cls is not None and isinstance(config, config_cls):
            return cls(config)
    raise TypeError(f"build_attention needs a dict with a 'name' or a registered config, got {type(config).__name__}")


register_attention("ring_buffer", RingBufferConfig)(RingBufferAttention)
