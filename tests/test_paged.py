"""Paged attention and the paged KV cache (minitorch/attention/paged.py) against the float64 reference.

The reference (``reference_paged_attention``) gathers each sequence's keys out of its pages into contiguous arrays
and runs standard attention on them; the engines read the keys in place through the block tables. Every pool here
is NaN wherever no token was written (unused pages, the unused tail of a sequence's last page), so a key read that
should not be read shows up as NaN. float64 must match to 1e-10; float32 follows FlashAttention's rule (at most 3x
the error of standard attention in float32, plus one dot product's rounding).

Engines: NumPy and Numba CPU on every case; CUDA in the simulator on tiny cases (tests/conftest.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minitorch
from minitorch import FastTensorBackend, SimpleBackend
from minitorch.attention import OutOfPagesError, PagedKVCache, paged_attention
from minitorch.attention.kernels.cpu import flash as cpu_flash
from minitorch.attention.kernels.simple import flash as simple_flash
from minitorch.attention.kv_cache import RingBufferKVCache
from minitorch.attention.paged import attend_pages
from minitorch.attention.reference import naive_attention_float32, reference_paged_attention
from minitorch.attention.spec import make_paged_spec
from minitorch.cuda_ops import CudaBackend

pytestmark = pytest.mark.task5_5

ENGINES = {"simple": SimpleBackend.attention, "fast": FastTensorBackend.attention}


def make_pool(rng: np.random.Generator, lens: List[int], page_size: int, Hkv: int, D: int, dtype: Any,
              extra_pages: int = 3) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(k_pages, v_pages, block_table)``: each sequence's pages scattered over a permuted pool with unused pages,
    everything no token was written to (unused pages, page tails) NaN; unused table entries -1."""
    needed = [-(-n // page_size) for n in lens]
    num_pages = sum(needed) + extra_pages
    k = np.full((num_pages, Hkv, page_size, D), np.nan, dtype=dtype)
    v = np.full((num_pages, Hkv, page_size, D), np.nan, dtype=dtype)
    table = np.full((len(lens), max(needed) + 1), -1, dtype=np.int64)
    order = iter(rng.permutation(num_pages))
    for s, n in enumerate(lens):
        table[s, : needed[s]] = [next(order) for _ in range(needed[s])]
        j = np.arange(n)
        k[table[s, j // page_size], :, j % page_size] = rng.standard_normal((n, Hkv, D))
        v[table[s, j // page_size], :, j % page_size] = rng.standard_normal((n, Hkv, D))
    return k, v, table


def naive_paged_float32(q, k_pages, v_pages, table, lens, **opts):  # type: ignore[no-untyped-def]
    """Standard attention in float32 on each sequence's gathered keys: FlashAttention's error baseline."""
    out = np.zeros(q.shape, np.float32)
    ps, T = k_pages.shape[2], q.shape[2]
    for s, n in enumerate(lens):
        j = np.arange(n)
        k = k_pages[table[s, j // ps], :, j % ps].transpose(1, 0, 2)[None]
        v = v_pages[table[s, j // ps], :, j % ps].transpose(1, 0, 2)[None]
        out[s] = naive_attention_float32(q[s : s + 1], k, v, causal=opts.get("causal", True),
                                         window=opts.get("window"), num_sinks=opts.get("num_sinks", 0),
                                         q_positions=np.arange(n - T, n), k_positions=j)[0]
    return out


def assert_close(got: np.ndarray, ref: np.ndarray, naive_err: float, D: int, name: str) -> None:
    """float64: 1e-10 of the largest value; float32: 3x the float32 baseline's error plus one dot product's
    rounding. No NaN may leak from the pool's unwritten rows."""
    got = np.asarray(got)
    assert not np.isnan(got).any(), f"{name}: NaN leaked"
    assert np.array_equal(np.isneginf(got), np.isneginf(ref)), f"{name}: -inf entries differ"
    fin = ~np.isneginf(ref)
    err = float(np.abs(got[fin].astype(np.float64) - ref[fin]).max()) if fin.any() else 0.0
    scale = max(1.0, float(np.abs(ref[fin]).max())) if fin.any() else 1.0
    tol = 1e-10 * scale if got.dtype == np.float64 else 3 * naive_err + 1e-5 * math.sqrt(D) * scale
    assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g}"


def check_paged(engine: Any, dtype: Any, lens: List[int], page_size: int, T: int, H: int, Hkv: int, D: int,
                seed: int = 0, num_splits: Optional[int] = None, **opts: Any) -> None:
    rng = np.random.default_rng(seed)
    k, v, table = make_pool(rng, lens, page_size, Hkv, D, dtype)
    q = rng.standard_normal((len(lens), H, T, D)).astype(dtype)
    out, lse = attend_pages(engine, q, k, v, table, np.array(lens), num_splits=num_splits, **opts)
    out, lse = (engine.to_host(x) for x in (out, lse))
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.dtype(dtype)
    ref_out, ref_lse = reference_paged_attention(q, k, v, table, np.array(lens), **opts)
    naive_err = 0.0
    if dtype == np.float32:
        naive_err = float(np.abs(naive_paged_float32(q, k, v, table, lens, **opts) - ref_out).max())
    assert_close(out, ref_out, naive_err, D, "out")
    assert_close(lse, ref_lse, 0.0, D, "lse")  # (float32: within one dot product's rounding of the lse)


# ---------------------------------------------------------------------------------------------------------------------
# paged_attention against the reference
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def paged_cases(draw):  # type: ignore[no-untyped-def]
    page_size = draw(st.sampled_from([1, 3, 16]))
    lens = draw(st.lists(st.integers(1, 200), min_size=1, max_size=4))
    T = draw(st.sampled_from([1, 1, 3]))
    lens = [max(n, T) for n in lens]
    Hkv, group = draw(st.sampled_from([(1, 1), (2, 1), (1, 4), (2, 2)]))  # MHA, MQA, GQA
    opts: Dict[str, Any] = {"causal": draw(st.booleans())}
    if draw(st.booleans()):
        opts["window"] = draw(st.integers(1, 60))
        opts["num_sinks"] = draw(st.sampled_from([0, 1, 4]))
    return dict(lens=lens, page_size=page_size, T=T, H=Hkv * group, Hkv=Hkv, D=draw(st.sampled_from([4, 8])),
                seed=draw(st.integers(0, 2**16)), num_splits=draw(st.sampled_from([None, 1, 3])), **opts)


@pytest.mark.parametrize("kind", ["simple", "fast"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(case=paged_cases())
def test_paged_attention_matches_reference(kind: str, dtype: Any, case: Dict[str, Any]) -> None:
    """Random block tables (pages scattered and permuted), NaN in unused pages and page tails, page sizes 1, 3,
    16, lengths up to 200 in one batch, T = 1 and T > 1, MHA/MQA/GQA, window and sinks, split-K."""
    check_paged(ENGINES[kind], dtype, **case)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lengths_1_to_200_in_one_batch(dtype: Any) -> None:
    """One batch with sequences from 1 to 200 tokens (one page to thirteen), decode and a 2-token chunk."""
    lens = [1, 2, 15, 16, 17, 31, 64, 100, 150, 199, 200]
    for T in (1, 2):
        check_paged(FastTensorBackend.attention, dtype, [max(n, T) for n in lens], 16, T, 4, 2, 16, seed=T)
        check_paged(FastTensorBackend.attention, dtype, [max(n, T) for n in lens], 16, T, 4, 2, 16, seed=T,
                    window=40, num_sinks=2)


@pytest.mark.cuda
@pytest.mark.parametrize("opts", [dict(T=1, num_splits=None), dict(T=2, num_splits=2, window=5, num_sinks=2)])
def test_paged_attention_cuda(opts: Dict[str, Any]) -> None:
    """The CUDA engine (simulator: tiny): GQA, NaN pools, split-K (decode: one part per key tile), window, sinks."""
    check_paged(CudaBackend.attention, np.float32, [3, 20, 9], 3, H=4, Hkv=2, D=8, seed=5, **opts)


def test_split_k_merges_to_the_same_result() -> None:
    """Split-K over a long sequence's pages and the lse merge agree with one pass on every engine (CPU here)."""
    rng = np.random.default_rng(3)
    k, v, table = make_pool(rng, [300, 7], 16, 1, 8, np.float64)
    q = rng.standard_normal((2, 2, 1, 8))
    one = attend_pages(FastTensorBackend.attention, q, k, v, table, [300, 7], num_splits=1)
    for splits in (2, 5, 40):
        many = attend_pages(FastTensorBackend.attention, q, k, v, table, [300, 7], num_splits=splits)
        np.testing.assert_allclose(many[0], one[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(many[1], one[1], rtol=0, atol=1e-12)


def test_tensor_interface() -> None:
    """Tensors in, Tensors out (no history); lse on request; NumPy arrays run on the backend asked for."""
    rng = np.random.default_rng(0)
    k, v, table = make_pool(rng, [5, 12], 4, 2, 8, np.float32, extra_pages=0)
    q = rng.standard_normal((2, 4, 1, 8)).astype(np.float32)
    be = FastTensorBackend
    t = lambda x: minitorch.from_numpy(x, backend=be)  # noqa: E731
    out, lse = paged_attention(t(q), t(k), t(v), table, [5, 12], return_lse=True)
    assert isinstance(out, minitorch.Tensor) and out.shape == (2, 4, 1, 8) and lse.shape == (2, 4, 1)
    ref = reference_paged_attention(q, k, v, table, [5, 12])[0]
    np.testing.assert_allclose(out.to_numpy(), ref, atol=1e-5)
    raw = paged_attention(q, k, v, table, np.array([5, 12]), backend="fast")
    assert isinstance(raw, np.ndarray)
    np.testing.assert_array_equal(raw, out.to_numpy())


@pytest.mark.parametrize("bad, match", [
    (dict(block_table=[[0, 1], [2, 9]]), r"block_table\[1, 1\] = 9"),
    (dict(block_table=[[0, -1], [2, 3]]), r"block_table\[0, 1\] = -1"),
    (dict(block_table=[[0, 1]]), "S=2 rows"),
    (dict(block_table=[[0.5, 1], [2, 3]]), "must hold ints"),
    (dict(seq_lens=[5, 0]), r"seq_lens\[1\]=0 < 1"),
    (dict(seq_lens=[5, 9]), "needs 3 pages"),
    (dict(seq_lens="ab"), "must hold ints"),
    (dict(k_pages=np.zeros((6, 3, 4, 8)), v_pages=np.zeros((6, 3, 4, 8))), "multiple of the number of kv heads"),
    (dict(v_pages=np.zeros((6, 2, 4, 4))), "same shape"),
    (dict(k_pages=np.zeros((6, 2, 4, 8), np.float32)), "dtype float32"),
    (dict(window=-1), "window must be >= 0"),
    (dict(return_lse="yes"), "return_lse must be True or False"),
])
def test_paged_attention_bad_input(bad: Dict[str, Any], match: str) -> None:
    args = dict(q=np.zeros((2, 4, 1, 8)), k_pages=np.zeros((6, 2, 4, 8)), v_pages=np.zeros((6, 2, 4, 8)),
                block_table=[[0, 1], [2, 3]], seq_lens=[5, 8])
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        paged_attention(**args)


def test_paged_attention_is_forward_only() -> None:
    """Every engine's backward refuses a paged spec with a clear message (no kernel runs)."""
    q = np.zeros((1, 1, 1, 4))
    spec = make_paged_spec(q.shape, (2, 1, 4, 4), (2, 1, 4, 4), [[0, 1]], [6])
    for backward in (simple_flash.backward, cpu_flash.backward):
        with pytest.raises(ValueError, match="forward only"):
            backward(q, np.zeros((2, 1, 4, 4)), np.zeros((2, 1, 4, 4)), None, q, np.zeros((1, 1, 1)), q, spec)


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------


def _tokens(rng: np.random.Generator, Hkv: int, T: int, D: int, dtype: Any = np.float64) -> Tuple[np.ndarray, ...]:
    return tuple(rng.standard_normal((Hkv, T, D)).astype(dtype) for _ in range(2))


def _gathered(cache: PagedKVCache, sid: int) -> Tuple[np.ndarray, np.ndarray]:
    """A sequence's keys and values read out of its pages, ``(Hkv, n, D)`` each."""
    j = np.arange(cache.seq_lens([sid])[0])
    pages = np.array(cache.pages(sid), dtype=np.int64)
    host = cache.engine.to_host
    return tuple(host(pool)[pages[j // cache.page_size], :, j % cache.page_size].transpose(1, 0, 2)
                 for pool in (cache.k_pages, cache.v_pages))


def _snapshot(cache: PagedKVCache) -> Dict[str, Any]:
    return dict(seqs={s: (cache.pages(s), int(cache.seq_lens([s])[0])) for s in cache.sequences},
                free=cache.free_pages, refs=cache.page_refcounts,
                k=None if cache._k is None else cache.engine.to_host(cache.k_pages).copy())


@pytest.mark.parametrize("kind", ["simple", "fast"])
def test_cache_grows_page_by_page_and_attends(kind: str) -> None:
    """Appends take pages from the free list only when a page fills; attend equals the reference on the tokens
    appended (and the NaN in the never-written pool never leaks)."""
    rng = np.random.default_rng(1)
    cache = PagedKVCache(2, 8, page_size=4, num_pages=12, backend=kind, dtype=np.float64)
    cache.engine.to_host(cache.k_pages)[:] = np.nan  # NumPy pools: the host array is the pool
    cache.engine.to_host(cache.v_pages)[:] = np.nan
    a, b = cache.add_sequence(), cache.add_sequence()
    kv: Dict[int, List[Tuple[np.ndarray, np.ndarray]]] = {a: [], b: []}
    for sid, T, free_after in ((a, 3, 11), (b, 9, 8), (a, 1, 8), (a, 1, 7), (b, 3, 7), (b, 1, 6)):
        kv[sid].append(_tokens(rng, 2, T, 8))
        cache.append(sid, *kv[sid][-1])
        assert cache.num_free_pages == free_after and cache.pages_in_use == 12 - free_after
    assert list(cache.seq_lens([a, b])) == [5, 13] and cache.block_table([a, b]).shape == (2, 4)
    for sid in (a, b):
        k, v = (np.concatenate([x[i] for x in kv[sid]], axis=1) for i in (0, 1))
        np.testing.assert_array_equal(_gathered(cache, sid)[0], k)
        np.testing.assert_array_equal(_gathered(cache, sid)[1], v)
    q = rng.standard_normal((2, 4, 2, 8))
    out = cache.attend(q, [a, b])
    ref = reference_paged_attention(q, cache.k_pages, cache.v_pages, cache.block_table([a, b]),
                                    cache.seq_lens([a, b]))[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_fork_shares_pages_and_copies_on_write() -> None:
    """fork shares every page; the first append to a shared, partly filled last page copies it; the parent's
    tokens (and its attention) never change; a full shared last page is not copied."""
    rng = np.random.default_rng(2)
    cache = PagedKVCache(1, 4, page_size=4, num_pages=10, backend="fast", dtype=np.float64)
    parent = cache.add_sequence()
    cache.append(parent, *_tokens(rng, 1, 6, 4))  # pages [0, 1], the second half full
    before = _gathered(cache, parent)
    q = rng.standard_normal((1, 2, 1, 4))
    attn_before = cache.attend(q, [parent])
    child = cache.fork(parent)
    assert cache.pages(child) == cache.pages(parent) == [0, 1] and cache.num_free_pages == 8
    assert list(cache.page_refcounts[:2]) == [2, 2]
    cache.append(child, *_tokens(rng, 1, 2, 4))  # copy-on-write of page 1 into page 2, filled there
    assert cache.pages(child) == [0, 2] and cache.num_free_pages == 7 and list(cache.page_refcounts[:3]) == [2, 1, 1]
    np.testing.assert_array_equal(_gathered(cache, child)[0][:, :6], before[0])  # the copy kept the shared rows
    for x, y in zip(_gathered(cache, parent), before):  # the parent's tokens did not change ...
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(cache.attend(q, [parent]), attn_before)  # ... nor what it attends to
    cache.append(parent, *_tokens(rng, 1, 2, 4))  # page 1 is the parent's own again: written in place
    assert cache.pages(parent) == [0, 1] and cache.num_free_pages == 7
    for x, y in zip(_gathered(cache, parent), before):
        np.testing.assert_array_equal(x[:, :6], y)
    # a fork whose last page is full shares it for good: new tokens go to a new page, nothing is copied
    full = cache.fork(child)
    cache.append(full, *_tokens(rng, 1, 1, 4))
    assert cache.pages(full) == [0, 2, 3] and cache.num_free_pages == 6
    np.testing.assert_array_equal(_gathered(cache, child)[0], _gathered(cache, full)[0][:, :8])


def test_fork_then_divergent_appends_attend_independently() -> None:
    """After a fork, parent and child each see their own tokens: attention equals flash attention on each one's
    contiguous keys."""
    rng = np.random.default_rng(3)
    cache = PagedKVCache(2, 8, page_size=3, num_pages=20, backend="fast", dtype=np.float64)
    p = cache.add_sequence()
    k0, v0 = _tokens(rng, 2, 7, 8)
    cache.append(p, k0, v0)
    c = cache.fork(p)
    (kp, vp), (kc, vc) = _tokens(rng, 2, 4, 8), _tokens(rng, 2, 2, 8)
    cache.append(p, kp, vp)
    cache.append(c, kc, vc)
    q = rng.standard_normal((2, 4, 1, 8))
    out = cache.attend(q, [p, c])
    for row, (k1, v1) in enumerate(((kp, vp), (kc, vc))):
        k = np.concatenate([k0, k1], axis=1)[None]
        v = np.concatenate([v0, v1], axis=1)[None]
        be = FastTensorBackend
        t = lambda x: minitorch.from_numpy(np.ascontiguousarray(x), backend=be)  # noqa: E731
        ref = minitorch.flash_attention(t(q[row : row + 1]), t(k), t(v), causal=True).to_numpy()
        np.testing.assert_allclose(out[row : row + 1], ref, rtol=0, atol=1e-12)


def test_free_returns_pages_and_they_are_reused() -> None:
    """free returns a sequence's own pages; shared pages only when their last holder goes; a new sequence reuses
    them."""
    rng = np.random.default_rng(4)
    cache = PagedKVCache(1, 4, page_size=2, num_pages=6, backend="simple", dtype=np.float64)
    a = cache.add_sequence()
    cache.append(a, *_tokens(rng, 1, 4, 4))  # pages 0, 1
    b = cache.fork(a)
    cache.append(b, *_tokens(rng, 1, 1, 4))  # page 2
    cache.free(a)
    assert cache.num_free_pages == 3 and cache.pages(b) == [0, 1, 2]  # 0, 1 still held by b
    cache.free(b)
    assert cache.num_free_pages == 6 and cache.pages_in_use == 0 and not cache.page_refcounts.any()
    c = cache.add_sequence()
    cache.append(c, *_tokens(rng, 1, 6, 4))
    assert sorted(cache.pages(c)) == [0, 1, 2]
    with pytest.raises(ValueError, match="sequence 0 was freed"):
        cache.append(a, *_tokens(rng, 1, 1, 4))
    with pytest.raises(ValueError, match="was freed"):
        cache.fork(b)


@pytest.mark.parametrize("shared", [False, True])
def test_out_of_pages_leaves_the_cache_unchanged(shared: bool) -> None:
    """An append that needs more pages than are free raises OutOfPagesError saying how many are needed and free,
    and changes nothing (no page taken, no token written, lengths and tables as they were)."""
    rng = np.random.default_rng(5)
    cache = PagedKVCache(1, 4, page_size=4, num_pages=4, backend="fast", dtype=np.float64)
    a = cache.add_sequence()
    cache.append(a, *_tokens(rng, 1, 5, 4))  # 2 pages, the last partly filled; 2 free
    sid = cache.fork(a) if shared else a
    before = _snapshot(cache)
    # 12 more tokens need 3 new pages; to the fork 8 more need 2 new + a copy of the shared last page
    what = "2 new + 1 copy-on-write" if shared else "3 new"
    message = "need 3 free pages of 4 tokens " + re.escape(f"({what})") + ", but only 2 of 4"
    with pytest.raises(OutOfPagesError, match=message):
        cache.append(sid, *_tokens(rng, 1, 8 if shared else 12, 4))
    after = _snapshot(cache)
    assert after["seqs"] == before["seqs"] and after["free"] == before["free"]
    np.testing.assert_array_equal(after["refs"], before["refs"])
    np.testing.assert_array_equal(after["k"], before["k"])
    cache.append(sid, *_tokens(rng, 1, 2, 4))  # what fits still works afterwards
    assert cache.seq_lens([sid])[0] == 7


def test_bad_input() -> None:
    cache = PagedKVCache(2, 8, page_size=4, num_pages=4, backend="fast", dtype=np.float32)
    a = cache.add_sequence()
    good = np.zeros((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match=r"\(Hkv, T, D\) = \(2, T, 8\), got k \(3, 3, 8\)"):
        cache.append(a, np.zeros((3, 3, 8), np.float32), np.zeros((3, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"got k \(2, 3, 4\)"):
        cache.append(a, np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="k has dtype float64, the cache holds float32"):
        cache.append(a, good.astype(np.float64), good)
    with pytest.raises(ValueError, match="same shape"):
        cache.append(a, good, good[:, :2])
    with pytest.raises(ValueError, match="no sequence 7"):
        cache.append(7, good, good)
    with pytest.raises(TypeError, match="sequence id is an int"):
        cache.append("a", good, good)
    cache.append(a, good, good)
    with pytest.raises(ValueError, match="holds only 3"):
        cache.attend(np.zeros((1, 4, 4, 8), np.float32), [a])
    with pytest.raises(ValueError, match="S = 1 sequences"):
        cache.attend(np.zeros((2, 4, 1, 8), np.float32), [a])
    with pytest.raises(TypeError, match="dtype float64"):
        cache.attend(np.zeros((1, 4, 1, 8)), [a])
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        PagedKVCache(2, 8, num_pages=0)
    assert cache.seq_lens([a])[0] == 3  # none of the failures changed anything


def test_paged_decode_equals_ring_cache_and_flash_attention() -> None:
    """Token by token, a paged cache and a ring cache that holds every token give the same attention, and both
    equal contiguous flash attention over the same keys; with a window the paged cache (window=W) equals a ring
    cache of capacity W, and with sinks too (window=W, 2 sinks: a ring of capacity W + 2 with 2 sinks)."""
    rng = np.random.default_rng(6)
    N, Hkv, H, D, W = 40, 2, 4, 8, 11
    k, v = rng.standard_normal((2, Hkv, N, D))
    q = rng.standard_normal((N, H, 1, D))
    paged = PagedKVCache(Hkv, D, page_size=5, num_pages=8, backend="fast", dtype=np.float64)
    sid = paged.add_sequence()
    full = RingBufferKVCache(1, Hkv, D, N, backend="fast", dtype=np.float64)
    windowed = RingBufferKVCache(1, Hkv, D, W, backend="fast", dtype=np.float64)
    sinks = RingBufferKVCache(1, Hkv, D, W + 2, num_sinks=2, backend="fast", dtype=np.float64)
    for t in range(N):
        paged.append(sid, k[:, t : t + 1], v[:, t : t + 1])
        for ring in (full, windowed, sinks):
            ring.append(k[None, :, t : t + 1], v[None, :, t : t + 1])
        qt = q[t : t + 1]
        np.testing.assert_allclose(paged.attend(qt, [sid]), full.attend(qt), rtol=0, atol=1e-12)
        np.testing.assert_allclose(paged.attend(qt, [sid], window=W), windowed.attend(qt), rtol=0, atol=1e-12)
        np.testing.assert_allclose(paged.attend(qt, [sid], window=W, num_sinks=2), sinks.attend(qt), rtol=0,
                                   atol=1e-12)
    be = FastTensorBackend
    t4 = lambda x: minitorch.from_numpy(np.ascontiguousarray(x), backend=be)  # noqa: E731
    qs = q.transpose(2, 1, 0, 3)  # all N queries of the one sequence: (1, H, N, D)
    flash = minitorch.flash_attention(t4(qs), t4(k[None]), t4(v[None]), causal=True).to_numpy()
    paged_all = paged.attend(qs, [sid])
    np.testing.assert_allclose(paged_all, flash, rtol=0, atol=1e-12)


def test_tensor_appends_and_backend_adoption() -> None:
    """Backend and dtype default to the first keys appended (a Tensor's); attend returns a Tensor for one."""
    rng = np.random.default_rng(7)
    be = FastTensorBackend
    t = lambda x: minitorch.from_numpy(x.astype(np.float32), backend=be)  # noqa: E731
    cache = minitorch.PagedKVCache(1, 4, page_size=2, num_pages=4)
    with pytest.raises(ValueError, match="no storage yet"):
        cache.k_pages
    a = cache.add_sequence()
    cache.append(a, t(rng.standard_normal((1, 3, 4))), t(rng.standard_normal((1, 3, 4))))
    assert cache.backend is be and cache.dtype == np.float32
    out = cache.attend(t(rng.standard_normal((1, 2, 1, 4))), [a])
    assert isinstance(out, minitorch.Tensor) and out.shape == (1, 2, 1, 4)
    assert "pages_in_use=2" in repr(cache)
