"""The MPI side of tests/test_distributed.py: run under ``mpiexec``, it writes what each rank computed; the test
process checks the numbers. One ``mpiexec`` run covers many cases because starting MPI processes is the slow part.

    mpiexec -n 4 python tests/distributed_worker.py ring OUT_DIR     # every CASE on P = 1, 2, 3 and 4 ranks,
                                                                     # then bad arguments on one rank fail on all,
                                                                     # and the data-parallel helpers
    mpiexec -n 2 python tests/distributed_worker.py fail OUT_DIR     # a kernel raising on rank 1 mid-ring

``ring``: the 4 ranks split into groups that run at the same time: P=1 beside P=3, then two groups of P=2, then
P=4. Each group's rank 0 writes ``P{P}_g{group}.npz`` with, per case, the gathered ``out``, ``lse`` and the
gradients of ``sum(out * g)`` with respect to q, k and v. Then every rank writes ``errors_rank{r}.json`` and
``dp_rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List

import numpy as np

# name -> (B, H, Hkv, N, D, dtype, causal, layout, window, scale). N = 37 and 45 are not divisible by 2P.
CASES: Dict[str, Dict[str, Any]] = {
    "f64_causal_zigzag_gqa": dict(B=2, H=4, Hkv=2, N=37, D=8, dtype="float64", causal=True, layout="zigzag"),
    "f64_causal_contiguous_gqa": dict(B=2, H=4, Hkv=2, N=37, D=8, dtype="float64", causal=True, layout="contiguous"),
    "f64_full_zigzag": dict(B=1, H=2, Hkv=2, N=48, D=16, dtype="float64", causal=False, layout="zigzag"),
    "f64_full_contiguous_mqa": dict(B=1, H=3, Hkv=1, N=45, D=8, dtype="float64", causal=False, layout="contiguous"),
    "f64_causal_window_zigzag": dict(B=1, H=2, Hkv=1, N=64, D=8, dtype="float64", causal=True, layout="zigzag",
                                     window=7),
    "f64_causal_window_contiguous": dict(B=1, H=2, Hkv=2, N=64, D=8, dtype="float64", causal=True,
                                         layout="contiguous", window=5, scale=0.3),
    "f64_window_zigzag": dict(B=1, H=2, Hkv=2, N=40, D=8, dtype="float64", causal=False, layout="zigzag", window=6),
    "f32_causal_zigzag_gqa": dict(B=1, H=4, Hkv=2, N=96, D=16, dtype="float32", causal=True, layout="zigzag"),
    "f32_full_contiguous": dict(B=2, H=2, Hkv=2, N=50, D=8, dtype="float32", causal=False, layout="contiguous"),
}


def case_inputs(name: str) -> Dict[str, np.ndarray]:
    """The whole-sequence q, k, v and output cotangent g of a case (the same on every rank and in the test)."""
    c = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    B, H, Hkv, N, D = c["B"], c["H"], c["Hkv"], c["N"], c["D"]
    shapes = {"q": (B, H, N, D), "k": (B, Hkv, N, D), "v": (B, Hkv, N, D), "g": (B, H, N, D)}
    return {key: rng.standard_normal(shape).astype(c["dtype"]) for key, shape in shapes.items()}


def case_options(name: str) -> Dict[str, Any]:
    c = CASES[name]
    return {"causal": c["causal"], "window": c.get("window"), "scale": c.get("scale")}


def run_case(name: str, comm: Any) -> Dict[str, np.ndarray]:
    """Shard the case's tensors, run ring attention, gather; the loss ``sum(out * g)`` is computed on the gathered
    output, so its gradients flow back through gather, the ring and shard to the whole q, k, v on every rank."""
    import minitorch
    from minitorch.distributed import gather_sequence, ring_attention, shard_sequence

    layout = CASES[name]["layout"]
    x = {key: minitorch.from_numpy(a, backend=minitorch.FastTensorBackend) for key, a in case_inputs(name).items()}
    for key in "qkv":
        x[key].requires_grad_()
    q, k, v = (shard_sequence(x[key], comm, layout) for key in "qkv")
    stats: Dict[str, Any] = {}
    out, lse = ring_attention(q, k, v, comm, layout=layout, return_lse=True, stats=stats, **case_options(name))
    (gather_sequence(out, comm, layout) * x["g"]).sum().backward()
    got = {"out": gather_sequence(out, comm, layout).to_numpy(), "lse": gather_sequence(lse, comm, layout).to_numpy()}
    got.update({f"d{key}": x[key].grad.to_numpy() for key in "qkv"})
    # blocks each rank computed / skipped, forward and backward
    counts = [stats[p][f"blocks_{w}"] for p in ("forward", "backward") for w in ("computed", "skipped")]
    got["blocks"] = np.array(comm.allgather(counts))
    return got


def mode_ring(comm: Any, out_dir: str) -> None:
    rank = comm.Get_rank()
    if comm.Get_size() != 4:
        raise SystemExit("ring mode runs on 4 ranks")
    phases = [[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]  # group of each rank: P=1 + P=3, 2 x P=2, P=4
    for colors in phases:
        sub = comm.Split(colors[rank], rank)
        results = {f"{name}/{key}": val for name in sorted(CASES) for key, val in run_case(name, sub).items()}
        if sub.Get_rank() == 0:
            np.savez(os.path.join(out_dir, f"P{sub.Get_size()}_g{colors[rank]}.npz"), **results)
        sub.Free()
        # Ranks that finish early wait here without spinning on a core that the others need.
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.002)
    mode_errors(comm, out_dir)
    check_data_parallel_helpers(comm, out_dir)


def mode_errors(comm: Any, out_dir: str) -> None:
    """Bad arguments on one rank: every rank must raise (the same error), none may hang."""
    import minitorch
    from minitorch.distributed import gather_sequence, ring_attention, shard_sequence

    rank = comm.Get_rank()
    be = minitorch.FastTensorBackend
    rng = np.random.default_rng(0)
    full = minitorch.from_numpy(rng.standard_normal((1, 2, 24, 4)), backend=be)
    good = shard_sequence(full, comm, "zigzag")
    short = minitorch.from_numpy(good.to_numpy()[:, :, 1:], backend=be)
    wrong_d = minitorch.from_numpy(rng.standard_normal((1, 2, good.shape[2], 3)), backend=be)
    tiny = minitorch.from_numpy(rng.standard_normal((1, 1, 1, 4)), backend=be)
    calls = {
        "short_q_on_rank_2": lambda: ring_attention(short if rank == 2 else good, good, good, comm),
        "short_shards_on_rank_2": lambda: ring_attention(*(3 * [short if rank == 2 else good]), comm),
        "not_a_tensor_on_rank_1": lambda: ring_attention(good.to_numpy() if rank == 1 else good, good, good, comm),
        "causal_differs_on_rank_3": lambda: ring_attention(good, good, good, comm, causal=(rank == 3)),
        "head_dim_differs_on_rank_0": lambda: ring_attention(wrong_d if rank == 0 else good, good, good, comm),
        "bad_layout": lambda: ring_attention(good, good, good, comm, layout="spiral"),
        "sequence_too_short": lambda: ring_attention(tiny, tiny, tiny, comm),
        "gather_short_shard_on_rank_1": lambda: gather_sequence(short if rank == 1 else good, comm),
        "shard_too_short": lambda: shard_sequence(minitorch.from_numpy(np.zeros((1, 1, 7, 2)), backend=be), comm),
    }
    report: Dict[str, List[str]] = {}
    for name, call in calls.items():
        try:
            call()
            report[name] = ["no error", ""]
        except Exception as e:  # noqa: BLE001 - the report says which
            report[name] = [type(e).__name__, str(e)]
    # after all that, a good call still works
    out = gather_sequence(ring_attention(good, good, good, comm, causal=True), comm)
    ref = minitorch.flash_attention(full, full, full, causal=True)
    report["good_call_after_errors"] = ["max_abs_diff", repr(float(np.max(np.abs(out.to_numpy() - ref.to_numpy()))))]
    with open(os.path.join(out_dir, f"errors_rank{rank}.json"), "w") as f:
        json.dump(report, f)


def check_data_parallel_helpers(comm: Any, out_dir: str) -> None:
    """broadcast_parameters and allreduce_gradients on a small module whose values differ by rank."""
    import minitorch
    from minitorch.distributed import allreduce_gradients, broadcast_parameters

    rank = comm.Get_rank()
    be = minitorch.FastTensorBackend

    class Net(minitorch.Module):
        def __init__(self, extra: bool = False) -> None:
            super().__init__()
            self.a = minitorch.Parameter(minitorch.from_numpy(np.full((2, 3), float(rank)), backend=be))
            self.b = minitorch.Parameter(minitorch.from_numpy(np.arange(4.0) * (rank + 1), backend=be,
                                                              dtype=np.float32))
            self.c = minitorch.Parameter(minitorch.from_numpy(np.ones(2), backend=be))
            if extra:
                self.d = minitorch.Parameter(minitorch.from_numpy(np.ones(1), backend=be))

    net = Net()
    broadcast_parameters(net, comm)
    report: Dict[str, Any] = {"a_after_broadcast": net.a.value.to_numpy().tolist(),
                              "b_after_broadcast": net.b.value.to_numpy().tolist()}
    net.a.value.grad = minitorch.from_numpy(np.full((2, 3), float(rank + 1)), backend=be)  # every rank
    if rank == 0:  # only rank 0 has a gradient for b; nobody has one for c
        net.b.value.grad = minitorch.from_numpy(np.full(4, 8.0), backend=be, dtype=np.float32)
    allreduce_gradients(net, comm)
    report["a_grad"] = net.a.value.grad.to_numpy().tolist()
    report["b_grad"] = net.b.value.grad.to_numpy().tolist()
    report["b_grad_dtype"] = str(net.b.value.grad.dtype)
    report["c_grad_is_none"] = net.c.value.grad is None
    try:
        allreduce_gradients(Net(extra=(rank == 1)), comm)
        report["mismatch"] = ["no error", ""]
    except Exception as e:  # noqa: BLE001
        report["mismatch"] = [type(e).__name__, str(e)]
    with open(os.path.join(out_dir, f"dp_rank{rank}.json"), "w") as f:
        json.dump(report, f)


def mode_fail(comm: Any, out_dir: str) -> None:
    """Rank 1's kernel raises in the middle of the ring while rank 0 waits for its block."""
    import minitorch
    import minitorch.distributed.ring as ring_module
    from minitorch.distributed import abort_on_exception, ring_attention, shard_sequence

    abort_on_exception(comm)
    be = minitorch.FastTensorBackend
    x = minitorch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 16, 4)), backend=be)
    xl = shard_sequence(x, comm)
    if comm.Get_rank() == 1:
        class Broken:
            @staticmethod
            def forward(*args: Any) -> Any:
                raise RuntimeError("simulated kernel failure on rank 1")

        ring_module._engine = lambda backend: Broken  # type: ignore[assignment]
    ring_attention(xl, xl, xl, comm)
    comm.Barrier()
    with open(os.path.join(out_dir, "fail_not_reached.txt"), "w") as f:
        f.write("every rank returned: the failure did not happen")


def main() -> None:
    from mpi4py import MPI

    mode, out_dir = sys.argv[1], sys.argv[2]
    {"ring": mode_ring, "fail": mode_fail}[mode](MPI.COMM_WORLD, out_dir)


if __name__ == "__main__":
    main()
