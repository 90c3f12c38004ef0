"""Ring attention over MPI: exact attention on a sequence split across ranks, forward and backward.

Each of the ``P`` ranks holds ``N/P`` queries, keys and values (:func:`~minitorch.distributed.shard_sequence`).
The K/V blocks travel around a ring; the queries never move:

* **Forward** (``P`` steps). At step ``s`` rank ``r`` holds the K/V block of rank ``(r - s) mod P``. Before
  computing it posts a non-blocking send of that block to rank ``r + 1`` and a receive of the next one from
  ``r - 1`` (``Isend`` / ``Irecv``), so the transfer runs while it computes (:func:`_overlapped`). It attends its
  queries to the block with the backend's flash attention kernel (global positions give the causal and window
  masks; a block that is entirely masked launches nothing) and merges the block's ``(out, lse)`` into its running
  result by log-sum-exp (:func:`~minitorch.attention.ring_schedule.lse_merge`).
* **Backward** (``P`` steps, then one more hop). dQ stays home and is summed over the blocks. dK and dV of a
  block are summed by every rank it visits: they travel with the block and, after the last step, arrive back at
  the block's owner. Each step calls the kernel's raw backward with the *global* ``out`` and ``lse`` of the query
  rows (``delta = rowsum(dO * O)`` comes from the global output), which makes every partial gradient exact.

Memory per rank is ``O(N / P)``: its own shard, two K/V blocks (the one in use and the one arriving) and one
travelling dK/dV block besides its own result. Nothing of size ``N`` or ``N x N`` is ever allocated.

The kernels are reached through :func:`_engine`, their call description through :func:`_spec` and tensors become
arrays (and back) through :func:`_array` / :func:`_tensor`: the places that know how minitorch's attention internals
are organised.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np

from ..attention.engine import AttentionEngine, engine_of, raw4, wrap
from ..attention.ring_schedule import (
    RingStep,
    check_layout,
    check_sequence_length,
    local_length,
    local_positions,
    lse_merge,
    ring_plan,
)
from ..attention.spec import AttentionSpec, make_spec
from ..tensor import Tensor
from ..tensor_functions import Function
from .comm import MPI, agree, get_comm

Array = np.ndarray
T = TypeVar("T")
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 0x52A0, 0x52A1, 0x52A2, 0x52A3  # one message stream per kind of block


def _engine(backend: Any) -> AttentionEngine:
    """The backend's attention engine: ``forward(q, k, v, bias, spec) -> (out, lse)`` and
    ``backward(q, k, v, bias, out, lse, dout, spec) -> (dq, dk, dv, dbias)`` on raw arrays."""
    return engine_of(backend)


def _spec(q_shape: Sequence[int], k_shape: Sequence[int], backend: Any, *, causal: bool, window: Optional[int],
          scale: Optional[float], q_positions: Optional[Array] = None, k_positions: Optional[Array] = None
          ) -> AttentionSpec:
    """The validated description of one kernel call (masks given by absolute positions)."""
    return make_spec(q_shape, k_shape, k_shape, causal=causal, window=window, scale=scale, q_positions=q_positions,
                     k_positions=k_positions, default_blocks=engine_of(backend).default_blocks(int(q_shape[-1])))


def _array(t: Tensor) -> Array:
    """The tensor's data as a contiguous NumPy array of its shape (a view, no copy, when it is contiguous)."""
    return raw4(t)


def _tensor(a: Array, like: Tensor) -> Tensor:
    """A constant tensor of ``like``'s backend around the contiguous array ``a`` (no copy)."""
    return wrap(np.ascontiguousarray(a, dtype=like.dtype), like.backend)


# ---------------------------------------------------------------------------------------------------------------------
# The ring of one call: who holds what, and the blocks travelling around it
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Ring:
    """Everything about one ``ring_attention`` call except the tensors (the same on every rank but ``rank``)."""

    comm: Any
    rank: int
    P: int
    N: int
    lengths: List[int]  # local sequence length of every rank
    layout: str
    causal: bool
    window: Optional[int]
    scale: Optional[float]
    backend: Any
    plan: List[RingStep]
    stats: Optional[Dict[str, Any]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.P

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.P

    def owner(self, step: int) -> int:
        """Whose block this rank holds at ``step`` (``step == P``: its own, back home)."""
        return (self.rank - step) % self.P

    def positions(self, rank: int) -> Array:
        return local_positions(self.N, self.P, rank, self.layout)

    def spec(self, step: RingStep, q_shape: Sequence[int], k_shape: Sequence[int]) -> AttentionSpec:
        """The kernel call of ``step``: its query rows against its key rows, at their global positions."""
        q_pos = self.positions(self.rank)[step.q_rows]
        k_pos = self.positions(step.kv_rank)[step.k_rows]
        spec = _spec(q_shape, k_shape, self.backend, causal=self.causal, window=self.window, scale=self.scale,
                     q_positions=q_pos, k_positions=k_pos)
        # with several ranks a block holds a part of each row's keys: backward keeps the global delta as it is
        return spec if self.P == 1 else spec.replace(rows_complete=False)


class _Buffers:
    """Flat arrays viewed as ``(B, Hkv, n, D)`` blocks of any length up to the longest shard (shards differ by at
    most a row or two), so a block can be received into them whatever its owner."""

    def __init__(self, count: int, B: int, Hkv: int, n_max: int, D: int, dtype: Any):
        self.B, self.Hkv, self.D = B, Hkv, D
        self.flat = [np.empty(B * Hkv * n_max * D, dtype) for _ in range(count)]

    def view(self, i: int, n: int) -> Array:
        return self.flat[i][: self.B * self.Hkv * n * self.D].reshape(self.B, self.Hkv, n, self.D)


_compute_thread: Optional[ThreadPoolExecutor] = None
POLL_S = 0.0005  # how often the waiting thread drives MPI's progress engine while a kernel runs


def _overlapped(work: Callable[[], T], requests: List[Any], timer: "_Timer") -> T:
    """Run ``work`` (kernel calls, which release the GIL) on a helper thread while this thread calls
    ``MPI_Testall`` on the step's messages every ``POLL_S`` seconds until they are done.

    An MPI library moves a large message only inside MPI calls (unless it runs a progress thread of its own): a
    receive posted before a long computation would otherwise start only at the ``Wait`` after it. Polling lets the
    transfer happen during the computation; ``timer`` counts the steps whose messages were all done by its end.
    """
    global _compute_thread
    pending = [r for r in requests if r]
    if not pending:
        return work()
    if _compute_thread is None:
        _compute_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minitorch-ring")
    future = _compute_thread.submit(work)
    done = False
    while not wait_for([future], timeout=POLL_S).done:
        if not done:
            done = MPI.Request.Testall(pending)
    timer.steps_with_messages += 1
    timer.arrived_during_compute += int(done or MPI.Request.Testall(pending))
    return future.result()


class _Timer:
    """Seconds spent computing and waiting for messages, bytes sent, and how often the messages of a step had
    arrived by the end of its computation (fully hidden), for ``stats``."""

    def __init__(self) -> None:
        self.compute_s = self.wait_s = 0.0
        self.bytes_sent = 0
        self.computed = self.skipped = 0
        self.steps_with_messages = self.arrived_during_compute = 0

    def wait(self, requests: List[Any]) -> None:
        if requests:
            t0 = time.perf_counter()
            MPI.Request.Waitall(requests)
            self.wait_s += time.perf_counter() - t0

    def send(self, comm: Any, array: Array, dest: int, tag: int) -> Any:
        self.bytes_sent += array.nbytes
        return comm.Isend(array, dest=dest, tag=tag)

    def as_dict(self) -> Dict[str, Any]:
        return {"compute_s": self.compute_s, "wait_s": self.wait_s, "bytes_sent": self.bytes_sent,
                "blocks_computed": self.computed, "blocks_skipped": self.skipped,
                "steps_with_messages": self.steps_with_messages, "arrived_during_compute": self.arrived_during_compute}


class _KVRing:
    """The K/V block a rank holds at each step. ``post(step)`` sends the held block to the next rank and starts
    receiving the following one into the free buffer of two; ``finish()`` waits for both and moves on."""

    def __init__(self, ring: _Ring, k: Array, v: Array, timer: _Timer):
        self.ring, self.timer = ring, timer
        self.k, self.v = k, v  # step 0: this rank's own block, no copy
        B, Hkv, _, D = k.shape
        self.bufs = _Buffers(4, B, Hkv, max(ring.lengths), D, k.dtype) if ring.P > 1 else None
        self.requests: List[Any] = []
        self.incoming: Optional[Tuple[Array, Array]] = None

    def post(self, step: int) -> None:
        ring = self.ring
        if step == ring.P - 1:  # the last block: nobody needs it after this rank
            self.requests, self.incoming = [], None
            return
        n = ring.lengths[ring.owner(step + 1)]
        nk, nv = self.bufs.view(2 * (step % 2), n), self.bufs.view(2 * (step % 2) + 1, n)
        comm, t = ring.comm, self.timer
        self.requests = [comm.Irecv(nk, source=ring.prev, tag=_TAG_K), comm.Irecv(nv, source=ring.prev, tag=_TAG_V),
                         t.send(comm, self.k, ring.next, _TAG_K), t.send(comm, self.v, ring.next, _TAG_V)]
        self.incoming = (nk, nv)

    def finish(self) -> None:
        self.timer.wait(self.requests)
        if self.incoming is not None:
            self.k, self.v = self.incoming


# ---------------------------------------------------------------------------------------------------------------------
# Forward and backward on NumPy arrays
# ---------------------------------------------------------------------------------------------------------------------


def _rows(x: Array, rows: slice) -> Array:
    """Rows of the sequence axis (axis 2) of a ``(B, H, n, ...)`` array, as a contiguous array."""
    return np.ascontiguousarray(x[:, :, rows])


def ring_forward(ring: _Ring, q: Array, k: Array, v: Array) -> Tuple[Array, Array, Dict[str, Any]]:
    """``out (B, H, n, D)`` and ``lse (B, H, n)`` of this rank's queries over the whole sequence, and timings."""
    engine = _engine(ring.backend)
    timer = _Timer()
    B, H, n, D = q.shape
    out = np.zeros((B, H, n, D), q.dtype)  # the running result, in the kernels' precision
    lse = np.full((B, H, n), -np.inf, q.dtype)
    blocks = _KVRing(ring, k, v, timer)
    for step in ring.plan:
        blocks.post(step.step)  # communication first: it runs while we compute
        t0 = time.perf_counter()
        if step.skipped:
            timer.skipped += 1
        else:
            def attend(step: RingStep = step, kb: Array = blocks.k, vb: Array = blocks.v) -> None:
                kb, vb = _rows(kb, step.k_rows), _rows(vb, step.k_rows)
                qs, r = _rows(q, step.q_rows), step.q_rows
                o, o_lse = engine.forward(qs, kb, vb, None, ring.spec(step, qs.shape, kb.shape))
                out[:, :, r], lse[:, :, r] = lse_merge(out[:, :, r], lse[:, :, r], o, o_lse)

            _overlapped(attend, blocks.requests, timer)
            timer.computed += 1
        timer.compute_s += time.perf_counter() - t0
        blocks.finish()
    return out, lse, timer.as_dict()


def ring_backward(ring: _Ring, q: Array, k: Array, v: Array, out: Array, lse: Array, dout: Array
                  ) -> Tuple[Array, Array, Array, Dict[str, Any]]:
    """``dq``, ``dk``, ``dv`` of this rank's shard (gradients of ``sum(out * dout)`` over all ranks), and timings."""
    engine = _engine(ring.backend)
    timer = _Timer()
    P, comm = ring.P, ring.comm
    B, H, n, D = q.shape
    Hkv = k.shape[1]
    dq = np.zeros((B, H, n, D), q.dtype)
    blocks = _KVRing(ring, k, v, timer)
    # The dK/dV of the block held at step t live in acc slot (P - t) % 2. Slot 0 is this rank's own result, where
    # its block's gradients arrive after the last hop (t = P); slot 1 is the one extra travelling buffer.
    acc = _Buffers(4 if P > 1 else 2, B, Hkv, max(ring.lengths), D, k.dtype)

    def slot(t: int) -> Tuple[Array, Array]:
        s, n_t = (P - t) % 2 if P > 1 else 0, ring.lengths[ring.owner(t)]
        return acc.view(2 * s, n_t), acc.view(2 * s + 1, n_t)

    recv_reqs: List[Any] = []
    send_reqs: List[Any] = []
    for step in ring.plan:
        t = step.step
        blocks.post(t)
        t0 = time.perf_counter()
        partial = None
        if step.skipped:
            timer.skipped += 1
        else:
            def grads(step: RingStep = step, kb: Array = blocks.k, vb: Array = blocks.v) -> Tuple[Array, Array]:
                kb, vb, r = _rows(kb, step.k_rows), _rows(vb, step.k_rows), step.q_rows
                qs, os_, ls, dos = _rows(q, r), _rows(out, r), _rows(lse, r), _rows(dout, r)
                dq_p, dk_p, dv_p, _ = engine.backward(qs, kb, vb, None, os_, ls, dos,
                                                      ring.spec(step, qs.shape, kb.shape))
                dq[:, :, r] += dq_p
                return dk_p, dv_p

            partial = _overlapped(grads, blocks.requests + recv_reqs + send_reqs, timer)
            timer.computed += 1
        timer.compute_s += time.perf_counter() - t0
        dk_acc, dv_acc = slot(t)
        if t == 0:
            dk_acc[...] = 0
            dv_acc[...] = 0
        else:
            timer.wait(recv_reqs)  # the block's dK/dV so far, from the ranks it visited before
        if partial is not None:
            dk_acc[:, :, step.k_rows] += partial[0]
            dv_acc[:, :, step.k_rows] += partial[1]
        if P > 1:  # pass dK/dV on with the block; its next buffer is the one sent a step ago
            timer.wait(send_reqs)
            nk, nv = slot(t + 1)
            recv_reqs = [comm.Irecv(nk, source=ring.prev, tag=_TAG_DK), comm.Irecv(nv, source=ring.prev, tag=_TAG_DV)]
            send_reqs = [timer.send(comm, dk_acc, ring.next, _TAG_DK), timer.send(comm, dv_acc, ring.next, _TAG_DV)]
        blocks.finish()
    timer.wait(recv_reqs + send_reqs)  # this rank's own dK/dV arrive home, in slot 0
    dk, dv = slot(P)
    return dq, dk, dv, timer.as_dict()


# ---------------------------------------------------------------------------------------------------------------------
# The differentiable Function and the public call
# ---------------------------------------------------------------------------------------------------------------------


class RingAttention(Function):
    """``apply(q_loc, k_loc, v_loc, ring)``: ring attention as a differentiable Function (backward is a ring too).

    Forward saves the shards, ``out`` and ``lse`` of this rank (``O(N/P)``) and leaves the lse in
    ``ring.extra["lse"]`` for ``return_lse``.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> Tensor:
        qa, ka, va = _array(q), _array(k), _array(v)
        out, lse, timing = ring_forward(ring, qa, ka, va)
        if ring.stats is not None:
            ring.stats["forward"] = timing
        ring.extra["lse"] = _tensor(lse, q)
        ctx.save_for_backward(qa, ka, va, out, lse, ring)
        return _tensor(out, q)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Any, ...]:
        qa, ka, va, out, lse, ring = ctx.saved_values
        dout = np.ascontiguousarray(_array(grad_out), dtype=qa.dtype)
        dq, dk, dv, timing = ring_backward(ring, qa, ka, va, out, lse, dout)
        if ring.stats is not None:
            ring.stats["backward"] = timing
        return _tensor(dq, grad_out), _tensor(dk, grad_out), _tensor(dv, grad_out), None


def _local_check(q: Any, k: Any, v: Any, causal: bool, layout: str, window: Optional[int], scale: Optional[float]
                 ) -> Tuple[Any, ...]:
    """This rank's own arguments: types, shapes, options. Returns what the other ranks must agree with."""
    for name, t in (("q_loc", q), ("k_loc", k), ("v_loc", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a minitorch Tensor, got {type(t).__name__}")
        if t.backend.cuda:
            raise TypeError(f"ring_attention runs on NumPy-backed tensors (SimpleBackend, FastTensorBackend); {name} "
                            f"is on the CUDA backend (see docs/distributed.md for CUDA-aware MPI)")
    check_layout(layout)
    spec = _spec(q.shape, k.shape, q.backend, causal=causal, window=window, scale=scale)  # shapes and options
    if v.shape != k.shape:
        raise ValueError(f"k_loc and v_loc must have the same shape, got k_loc {k.shape} and v_loc {v.shape}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"q_loc and k_loc must hold the same positions of one sequence, got q_loc {q.shape} and "
                         f"k_loc {k.shape}")
    if len({q.dtype, k.dtype, v.dtype}) != 1 or len({q.backend.name, k.backend.name, v.backend.name}) != 1:
        raise TypeError(f"q_loc, k_loc and v_loc must share dtype and backend, got {q.dtype}/{q.backend.name}, "
                        f"{k.dtype}/{k.backend.name}, {v.dtype}/{v.backend.name}")
    needs_grad = any(t.requires_grad() for t in (q, k, v))
    return (spec.B, spec.H, spec.Hkv, spec.D, np.dtype(q.dtype).name, q.backend.name, needs_grad, bool(causal),
            window, float(spec.scale), layout, q.shape[2])


_FIELDS = ("B", "H", "Hkv", "D", "dtype", "backend", "requires_grad", "causal", "window", "scale", "layout")


def _make_ring(q: Any, k: Any, v: Any, comm: Any, causal: bool, layout: str, window: Optional[int],
               scale: Optional[float], stats: Optional[Dict[str, Any]]) -> _Ring:
    """Check the call on every rank at once (so a bad argument on one rank fails on all, never hangs) and plan it."""
    comm = get_comm(comm)
    error, info = None, None
    try:
        info = _local_check(q, k, v, causal, layout, window, scale)
    except (TypeError, ValueError) as e:
        error = e
    infos = agree(comm, error, info)
    P, rank = comm.Get_size(), comm.Get_rank()
    for i, name in enumerate(_FIELDS):
        values = [inf[i] for inf in infos]
        if len(set(values)) != 1:
            raise ValueError(f"every rank must call ring_attention with the same {name}, got {values} on ranks "
                             f"0..{P - 1}")
    lengths = [inf[-1] for inf in infos]
    N = sum(lengths)
    check_sequence_length(N, P, layout)
    expected = [local_length(N, P, r, layout) for r in range(P)]
    if lengths != expected:
        raise ValueError(f"the local sequence lengths {lengths} (ranks 0..{P-1}) are not the {layout!r} layout of a "
                         f"sequence of N={N}, which has {expected}: cut the sequence with shard_sequence(x, comm, "
                         f"layout={layout!r})")
    return _Ring(comm=comm, rank=rank, P=P, N=N, lengths=lengths, layout=layout, causal=bool(causal), window=window,
                 scale=scale, backend=q.backend, plan=ring_plan(N, P, rank, layout, bool(causal), window), stats=stats)


def ring_attention(
    q_loc: Tensor,
    k_loc: Tensor,
    v_loc: Tensor,
    comm: Any = None,
    causal: bool = False,
    layout: str = "zigzag",
    window: Optional[int] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    stats: Optional[Dict[str, Any]] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Exact attention over a sequence whose positions are split across the ranks of ``comm``.

    Args:
        q_loc: ``(B, H, n_r, D)``, this rank's queries; k_loc, v_loc: ``(B, Hkv, n_r, D)`` (``H % Hkv == 0``).
            The shards of ``shard_sequence(x, comm, layout)``: ``n_r`` rows at the positions the layout gives rank
            ``r`` of a sequence of ``N = sum(n_r)``.
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``). Every rank must call with the same options; a
            bad argument on any rank raises the same error on every rank.
        causal, window, scale: as in ``flash_attention``, by global position (``window``: ``q - k < window`` if
            causal, ``|q - k| < window`` otherwise).
        layout: ``"zigzag"`` (chunks ``r`` and ``2P-1-r``, balanced causal work) or ``"contiguous"``.
        return_lse: also return ``lse (B, H, n_r)`` (natural log; ``-inf`` for a row that sees no key).
        stats: a dict to fill with timings of this call: ``stats["forward"]`` (and ``stats["backward"]`` once the
            backward has run) hold ``compute_s``, ``wait_s`` (time blocked on messages), ``bytes_sent``,
            ``blocks_computed`` and ``blocks_skipped``.

    Returns:
        ``out_loc (B, H, n_r, D)`` (differentiable: its backward is a ring too and must run on every rank), or
        ``(out_loc, lse_loc)``. With one rank this is ``flash_attention`` on the whole sequence.
    """
    ring = _make_ring(q_loc, k_loc, v_loc, comm, causal, layout, window, scale, stats)
    out = RingAttention.apply(q_loc, k_loc, v_loc, ring)
    if return_lse:
        return out, ring.extra["lse"]
    return out
