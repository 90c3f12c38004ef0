"""A paged KV cache and paged attention (vLLM's PagedAttention), on the engine of every backend.

A contiguous KV cache reserves room for the longest sequence a batch may reach, for every sequence of the batch;
serving systems built that way wasted most of their KV memory. A *paged* cache cuts memory into fixed-size pages
of ``page_size`` tokens in one pool shared by all sequences:

* **The pool.** Keys and values live in ``k_pages, v_pages (num_pages, Hkv, page_size, D)`` (vLLM's layout). A
  sequence owns a list of pages, its **block table**: token ``j`` of the sequence is row ``j % page_size`` of page
  ``block_table[j // page_size]``. A sequence grows one page at a time, taking pages from a **free list**, so at
  most one page per sequence is partly empty.
* **Sharing.** ``fork`` makes a new sequence whose block table is its parent's: the pages are shared (a reference
  count per page), nothing is copied. The last page is usually only partly filled; the first of the two
  sequences to append to it gets its own copy first (**copy-on-write**), so the other one's tokens never change.
  ``free`` drops a sequence's references; a page whose count reaches zero goes back to the free list.
* **Attention.** ``paged_attention`` reads the keys in place through the block tables: it is the backend's flash
  attention with the pages as the key source (:class:`~.spec.Pages`), so GQA, sliding windows, sinks, split-K
  over the pages and the lse merge work as in every other configuration of the engine. Forward only (decoding).

Positions are the tokens' indices in their sequence: the ``T`` queries of sequence ``s`` are its ``T`` newest
tokens, at positions ``seq_lens[s] - T .. seq_lens[s] - 1``, and the masks (causal, window, sinks) are the rule of
:mod:`.masks` on those positions.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..tensor import Tensor
from ..tensor_ops import TensorBackend
from .engine import AttentionEngine, engine_of, raw4, wrap
from .kv_cache import adopt_backend, float_dtype, resolve_backend
from .spec import check_flag, check_int, make_paged_spec

Array = Any


class OutOfPagesError(RuntimeError):
    """An append needs more free pages than the pool has (the cache is left as it was)."""


# ---------------------------------------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------------------------------------


def _raw(x: Any, name: str, backend: TensorBackend, dtype: Optional[np.dtype]) -> Array:
    """A contiguous raw array (NumPy or device) of ``x``, a Tensor on ``backend``'s device or an array, of ``dtype``
    (None: its own, which must be float32 or float64)."""
    if isinstance(x, Tensor):
        if bool(x.backend.cuda) != bool(backend.cuda):
            raise ValueError(f"{name} is on backend {x.backend.name}, but the attention runs on {backend.name}")
        arr = raw4(x)
    elif isinstance(x, (list, tuple)) or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be a Tensor or an array, got {type(x).__name__}")
    else:
        arr = engine_of(backend).asarray(x, x.dtype)
    have = np.dtype(arr.dtype)
    if dtype is None:
        float_dtype(have)  # float32 or float64, else a TypeError
    elif have != dtype:
        raise TypeError(f"{name} has dtype {have.name}, expected {np.dtype(dtype).name}")
    return arr


def attend_pages(engine: AttentionEngine, q: Array, k_pages: Array, v_pages: Array, block_table: Any, seq_lens: Any,
                 *, scale: Optional[float] = None, causal: bool = True, window: Optional[int] = None,
                 num_sinks: int = 0, num_splits: Optional[int] = None) -> Tuple[Array, Array]:
    """Paged attention on raw arrays: ``(out (S, H, T, D), lse (S, H, T))`` from the engine's forward with the pages
    as the key source. A decode step (``T = 1``) runs ``engine.decode_splits`` split-K parts over each sequence's
    pages unless ``num_splits`` says how many."""
    spec = make_paged_spec(tuple(q.shape), tuple(k_pages.shape), tuple(v_pages.shape), block_table, seq_lens,
                           causal=causal, scale=scale, window=window, num_sinks=num_sinks,
                           default_blocks=engine.default_blocks(int(q.shape[3])))
    if num_splits is None:
        num_splits = engine.decode_splits(spec.Tc) if spec.Nq == 1 else 1
    spec = spec.replace(num_splits=check_int("num_splits", num_splits, 1))
    return engine.forward(q, k_pages, v_pages, None, spec)


def paged_attention(q: Any, k_pages: Any, v_pages: Any, block_table: Any, seq_lens: Any, *,
                    scale: Optional[float] = None, causal: bool = True, window: Optional[int] = None,
                    num_sinks: int = 0, return_lse: bool = False, backend: Any = None) -> Any:
    """Attention of the ``T`` newest tokens of ``S`` sequences over their keys, read in place from a page pool.

    Args:
        q: ``(S, H, T, D)``, the queries of sequence ``s`` at positions ``seq_lens[s] - T .. seq_lens[s] - 1``.
        k_pages, v_pages: ``(num_pages, Hkv, page_size, D)`` with ``H % Hkv == 0`` (MHA, GQA, MQA): token ``j`` of
            sequence ``s`` is row ``j % page_size`` of page ``block_table[s, j // page_size]``.
        block_table: ``(S, max_pages)`` ints, ``-1`` where unused. seq_lens: ``(S,)`` ints, each ``>= T``.
        scale, causal, window, num_sinks: as :func:`~.api.flash_attention`, on those positions.
        return_lse: also return ``lse (S, H, T)``.
        backend: the engine for raw arrays (a TensorBackend or ``"simple"``, ``"fast"``, ``"cuda"``; default: the
            Tensors' backend, ``CudaBackend`` for device arrays, ``SimpleBackend`` for NumPy arrays).

    Returns ``out (S, H, T, D)`` (and ``lse``): Tensors for a Tensor ``q``, without autodiff history (forward only),
    else raw arrays. Keys a query does not see (other sequences' pages, unused pages and page tails, keys outside
    the window) are never read for it.
    """
    return_lse = check_flag("return_lse", return_lse)
    be = resolve_backend(backend) if backend is not None else adopt_backend(q)
    qr = _raw(q, "q", be, None)
    dtype = np.dtype(qr.dtype)
    kr, vr = _raw(k_pages, "k_pages", be, dtype), _raw(v_pages, "v_pages", be, dtype)
    out, lse = attend_pages(engine_of(be), qr, kr, vr, block_table, seq_lens, scale=scale, causal=causal,
                            window=window, num_sinks=num_sinks)
    if isinstance(q, Tensor):
        out, lse = wrap(out, q.backend), wrap(lse, q.backend)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------------------------------
# The paged KV cache
# ---------------------------------------------------------------------------------------------------------------------


class PagedKVCache:
    """Keys and values of many sequences in one pool of pages (see the module docstring).

    Args:
        num_kv_heads, head_dim: the ``Hkv, D`` of the keys and values appended.
        page_size: tokens per page (vLLM's default, 16).
        num_pages: pages in the pool; the cache holds at most ``num_pages * page_size`` tokens in all.
        backend: a TensorBackend (or ``"simple"``, ``"fast"``, ``"cuda"``): where the pool lives and which engine
            ``attend`` runs. Default: that of the first keys appended.
        dtype: ``float32`` or ``float64``. Default: that of the first keys appended.

    Sequences are named by the int ids ``add_sequence`` and ``fork`` return. Every operation checks everything
    before it changes anything: a failed one leaves the cache as it was.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, *, page_size: int = 16, num_pages: int,
                 backend: Any = None, dtype: Any = None) -> None:
        for name, val in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("page_size", page_size),
                          ("num_pages", num_pages)):
            check_int(name, val, 1)
        self.Hkv, self.D = int(num_kv_heads), int(head_dim)
        self.page_size, self.num_pages = int(page_size), int(num_pages)
        self.backend: Optional[TensorBackend] = None if backend is None else resolve_backend(backend)
        self.dtype: Optional[np.dtype] = None if dtype is None else float_dtype(dtype)
        self._k: Optional[Array] = None
        self._v: Optional[Array] = None
        self._refs = np.zeros(self.num_pages, dtype=np.int64)  # sequences holding each page
        self._free: List[int] = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() gives page 0 first
        self._pages: Dict[int, List[int]] = {}  # sequence id -> its block table
        self._lens: Dict[int, int] = {}  # sequence id -> its number of tokens
        self._freed: set = set()
        self._next_id = 0
        if self.backend is not None and self.dtype is not None:
            self._allocate()

    def _allocate(self) -> None:
        shape = (self.num_pages, self.Hkv, self.page_size, self.D)
        self._k, self._v = self.engine.zeros(shape, self.dtype), self.engine.zeros(shape, self.dtype)

    @property
    def engine(self) -> AttentionEngine:
        if self.backend is None:
            raise ValueError("the cache has no backend yet: give backend= (and dtype=) or append keys first")
        return engine_of(self.backend)

    # -- state ------------------------------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages on the free list."""
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        """Pages held by at least one sequence (a shared page counts once)."""
        return self.num_pages - len(self._free)

    @property
    def sequences(self) -> List[int]:
        """The ids of the live sequences, in the order they were made."""
        return list(self._pages)

    @property
    def free_pages(self) -> List[int]:
        """The free list, the page the next allocation takes first."""
        return self._free[::-1]

    @property
    def page_refcounts(self) -> np.ndarray:
        """``(num_pages,)``: how many sequences hold each page (0: free)."""
        return self._refs.copy()

    def pages(self, sid: int) -> List[int]:
        """The block table of sequence ``sid``: its pages, in token order."""
        return list(self._pages[self._check_id(sid)])

    def block_table(self, ids: Sequence[int]) -> np.ndarray:
        """``(S, max_pages)`` int64 block tables of the sequences ``ids``, ``-1`` where unused."""
        ids = self._check_ids(ids)
        table = np.full((len(ids), max([len(self._pages[s]) for s in ids] + [1])), -1, dtype=np.int64)
        for row, s in enumerate(ids):
            table[row, : len(self._pages[s])] = self._pages[s]
        return table

    def seq_lens(self, ids: Sequence[int]) -> np.ndarray:
        """``(S,)`` int64: the number of tokens of each of the sequences ``ids``."""
        return np.array([self._lens[s] for s in self._check_ids(ids)], dtype=np.int64)

    @property
    def k_pages(self) -> Array:
        """The key pool ``(num_pages, Hkv, page_size, D)`` (NumPy or device array; shared, not a copy)."""
        self._storage_ready()
        return self._k

    @property
    def v_pages(self) -> Array:
        """The value pool ``(num_pages, Hkv, page_size, D)``."""
        self._storage_ready()
        return self._v

    def _storage_ready(self) -> None:
        if self._k is None:
            raise ValueError("the cache has no storage yet: give backend= and dtype=, or append keys first")

    def __repr__(self) -> str:
        return (f"PagedKVCache(Hkv={self.Hkv}, D={self.D}, page_size={self.page_size}, num_pages={self.num_pages}, "
                f"sequences={len(self._pages)}, pages_in_use={self.pages_in_use}, "
                f"backend={getattr(self.backend, 'name', None)}, dtype={getattr(self.dtype, 'name', None)})")

    # -- sequences --------------------------------------------------------------------------------------------------
    def _check_id(self, sid: Any) -> int:
        if isinstance(sid, (bool, np.bool_)) or not isinstance(sid, (int, np.integer)):
            raise TypeError(f"a sequence id is an int from add_sequence() or fork(), got {sid!r}")
        sid = int(sid)
        if sid in self._freed:
            raise ValueError(f"sequence {sid} was freed")
        if sid not in self._pages:
            raise ValueError(f"no sequence {sid} in this cache (live ids: {self.sequences})")
        return sid

    def _check_ids(self, ids: Sequence[int]) -> List[int]:
        if isinstance(ids, (int, np.integer)) or not hasattr(ids, "__iter__"):
            raise TypeError(f"ids must be a sequence of sequence ids, got {ids!r}")
        return [self._check_id(s) for s in ids]

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._pages[sid], self._lens[sid] = [], 0
        return sid

    def fork(self, sid: int) -> int:
        """A new sequence sharing all of ``sid``'s pages (and tokens); returns its id. Nothing is copied: the first
        of the two to append to their shared last page copies it (copy-on-write)."""
        sid = self._check_id(sid)
        child = self.add_sequence()
        self._pages[child], self._lens[child] = list(self._pages[sid]), self._lens[sid]
        for p in self._pages[sid]:
            self._refs[p] += 1
        return child

    def free(self, sid: int) -> None:
        """Drop sequence ``sid``; the pages no other sequence holds go back to the free list."""
        sid = self._check_id(sid)
        for p in reversed(self._pages.pop(sid)):  # reversed: the sequence's first page is the next one taken
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
        del self._lens[sid]
        self._freed.add(sid)

    # -- appending ---------------------------------------------------------------------------------------------------
    def _check_kv(self, k: Any, v: Any) -> int:
        for name, x in (("k", k), ("v", v)):
            if not hasattr(x, "shape") or not hasattr(x, "dtype") or isinstance(x, (list, tuple)):
                raise TypeError(f"append: {name} must be a Tensor or an array of shape (Hkv, T, D), "
                                f"got {type(x).__name__}")
        ks, vs = tuple(int(s) for s in k.shape), tuple(int(s) for s in v.shape)
        if ks != vs:
            raise ValueError(f"append: k and v must have the same shape, got k {ks} and v {vs}")
        if len(ks) != 3 or ks[0] != self.Hkv or ks[2] != self.D:
            raise ValueError(f"append: the cache holds (Hkv, T, D) = ({self.Hkv}, T, {self.D}), got k {ks}")
        for name, x in (("k", k), ("v", v)):
            have = np.dtype(x.dtype)
            if self.dtype is not None and have != self.dtype:
                raise TypeError(f"append: {name} has dtype {have.name}, the cache holds {self.dtype.name}")
            float_dtype(have)
            if isinstance(x, Tensor) and self.backend is not None and bool(x.backend.cuda) != bool(self.backend.cuda):
                raise ValueError(f"append: {name} is on backend {x.backend.name}, the cache on {self.backend.name}")
        return ks[1]

    def append(self, sid: int, k: Any, v: Any) -> None:
        """Append ``T`` tokens ``k, v (Hkv, T, D)`` (Tensors or arrays) to sequence ``sid``.

        New pages come from the free list as the sequence grows; a last page shared with a fork is copied first.
        Raises :class:`OutOfPagesError` (saying how many pages are needed and free) when the pool is short, and
        leaves the cache unchanged: nothing is half-appended.
        """
        sid = self._check_id(sid)
        T = self._check_kv(k, v)
        if T == 0:
            return
        ps, L, pages = self.page_size, self._lens[sid], self._pages[sid]
        grow = -(-(L + T) // ps) - len(pages)  # pages the new tokens need beyond the sequence's own
        cow = L % ps != 0 and self._refs[pages[-1]] > 1  # its partly filled last page is shared: copy it first
        need = grow + int(cow)
        if need > len(self._free):
            raise OutOfPagesError(
                f"append: {T} tokens to sequence {sid} (length {L}) need {need} free pages of {ps} tokens "
                f"({grow} new{' + 1 copy-on-write' if cow else ''}), but only {len(self._free)} of {self.num_pages} "
                f"are free; free sequences or make a larger cache")
        backend = self.backend if self.backend is not None else adopt_backend(k)
        dtype = self.dtype if self.dtype is not None else np.dtype(k.dtype)
        kr, vr = (_raw(x, n, backend, dtype) for x, n in ((k, "k"), (v, "v")))
        if self._k is None:  # the first append: the pool, of the backend and dtype not given before
            self.backend, self.dtype = backend, dtype
            self._allocate()
        taken = [self._free.pop() for _ in range(need)]
        try:
            new_pages = list(pages)
            if cow:  # the shared page's first L % ps rows, into a page of this sequence's own
                self._copy_rows(taken[0], pages[-1], L % ps)
                new_pages[-1] = taken[0]
            new_pages += taken[int(cow):]
            self._write(new_pages, L, kr.reshape(1, self.Hkv, T, self.D), vr.reshape(1, self.Hkv, T, self.D))
        except BaseException:
            self._free += taken[::-1]
            raise
        if cow:
            self._refs[pages[-1]] -= 1
        self._refs[taken] = 1
        self._pages[sid], self._lens[sid] = new_pages, L + T

    def _copy_rows(self, dst: int, src: int, n: int) -> None:
        """Rows ``[0, n)`` of page ``src`` into page ``dst``, keys and values (copy-on-write)."""
        rows = np.arange(n, dtype=np.int64)
        for pool in (self._k, self._v):
            self.engine.write_rows(pool[dst : dst + 1], pool[src : src + 1], rows, rows)

    def _write(self, pages: List[int], start: int, k4: Array, v4: Array) -> None:
        """Tokens ``start ..`` of a sequence with block table ``pages`` from ``k4, v4 (1, Hkv, T, D)``, page by page."""
        ps, T = self.page_size, int(k4.shape[2])
        t = 0
        while t < T:
            page, off = pages[(start + t) // ps], (start + t) % ps
            n = min(ps - off, T - t)
            dst_rows, src_rows = np.arange(off, off + n, dtype=np.int64), np.arange(t, t + n, dtype=np.int64)
            self.engine.write_rows(self._k[page : page + 1], k4, dst_rows, src_rows)
            self.engine.write_rows(self._v[page : page + 1], v4, dst_rows, src_rows)
            t += n

    # -- attention --------------------------------------------------------------------------------------------------
    def attend(self, q: Any, ids: Sequence[int], *, scale: Optional[float] = None, window: Optional[int] = None,
               num_sinks: int = 0, return_lse: bool = False) -> Any:
        """Attention of ``q (S, H, T, D)``, the ``T`` newest tokens of each of the sequences ``ids``, over their
        own tokens (causal; ``window`` and ``num_sinks`` as in :func:`paged_attention`). Returns what ``q`` is: a
        Tensor for a Tensor, else a raw array; ``(out, lse)`` with ``return_lse``."""
        ids = self._check_ids(ids)
        self._storage_ready()
        if not hasattr(q, "shape") or len(q.shape) != 4 or int(q.shape[0]) != len(ids):
            raise ValueError(f"attend: q must be (S, H, T, D) with S = {len(ids)} sequences, got "
                             f"{getattr(q, 'shape', type(q).__name__)}")
        T = int(q.shape[2])
        for s in ids:
            if self._lens[s] < T:
                raise ValueError(f"attend: {T} queries for the newest tokens of sequence {s}, which holds only "
                                 f"{self._lens[s]}")
        return_lse = check_flag("return_lse", return_lse)
        out, lse = attend_pages(self.engine, _raw(q, "q", self.backend, self.dtype), self._k, self._v,
                                self.block_table(ids), self.seq_lens(ids), scale=scale, window=window,
                                num_sinks=num_sinks)
        if isinstance(q, Tensor):
            out, lse = wrap(out, q.backend), wrap(lse, q.backend)
        return (out, lse) if return_lse else out
