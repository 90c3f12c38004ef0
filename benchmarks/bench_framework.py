"""The framework around the kernels: per-op overhead, small attention calls, and a training step, against PyTorch.

    python benchmarks/bench_framework.py [--steps 20] [--threads 1] [--json PATH]

What a small model pays besides arithmetic. Three tables, minitorch (``FastTensorBackend``, float32) beside PyTorch
eager on the CPU (the optional peer, ``pip install -e '.[bench]'``; without it only minitorch's column is filled):

1. **tensor ops** on 8x8 float32 tensors (``a + b``, ``a.exp()``, ``a.sum(1)``), microseconds per op: constants,
   and with ``a`` needing a gradient (the op records its history);
2. **small attention calls** through the public API (``minitorch.flash_attention`` / ``F.scaled_dot_product_attention``,
   causal): a tiny call (B=1, H=1, N=8, D=16), where the time is all host work, and the attention of the tiny
   transformer (B=8, H=4, N=64, D=16), forward and forward+backward (``out.backward(dout)``). ``host us`` is
   minitorch's time per call minus the compiled kernels' own time (the engine's kernels called directly through
   their compiled entry points, measured in the same run): what validation, the spec, the Function layer and the
   launches cost;
3. **training step** of the tiny transformer of ``project/run_transformer.py`` (its default config: 2 layers,
   d_model 64, 4 heads, context 64, batch 16, Adam, gradient clipping; forward, backward, clip, step), and the
   same model written in PyTorch eager (same initial weights, same batches, same optimizer): ms per step and the
   losses of both (they agree to float32 rounding over the first steps: the same model).

Timing: one process, ``OMP_WAIT_POLICY=PASSIVE`` and ``OPENBLAS_THREAD_TIMEOUT=4`` set before anything is imported
(every library's idle threads sleep instead of spinning, so no contender steals a core from the next); ``--threads`` threads for every library
(default 1: small ops do not parallelize); contenders interleaved in rounds, medians of wall time and of process CPU
time. The machine's load average is printed and stored with the results.
"""

from __future__ import annotations

import os
import sys

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before NumPy / Numba / torch start any thread pool
os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"  # NumPy's OpenBLAS threads otherwise spin after each product


def _threads_from_argv(default: int = 1) -> int:
    for i, a in enumerate(sys.argv):
        if a == "--threads" and i + 1 < len(sys.argv):
            return int(sys.argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return default


if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_var] = str(_threads_from_argv())

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "project"))

import minitorch  # noqa: E402
from benchmarks.common import LOCAL_RESULTS_DIR, RESULTS_DIR, machine_info  # noqa: E402

FB = minitorch.FastTensorBackend


def try_torch() -> Any:
    try:
        import torch
    except Exception:  # not installed, or an install that fails to load
        return None
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return torch


def interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, inner: int) -> Dict[str, Dict[str, float]]:
    """Seconds per call of each callable: ``rounds`` rounds, each running every callable ``inner`` times in a row;
    medians over the rounds of wall time and of process CPU time."""
    for fn in fns.values():
        fn()
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(inner):
                fn()
            wall[name].append((time.perf_counter() - t0) / inner)
            cpu[name].append((time.process_time() - c0) / inner)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k])} for k in fns}


def mt(x: np.ndarray, grad: bool = False) -> minitorch.Tensor:
    t = minitorch.from_numpy(np.ascontiguousarray(x, dtype=np.float32), backend=FB)
    return t.requires_grad_(True) if grad else t


# ---------------------------------------------------------------------------------------------------------------------
# 1. tensor ops
# ---------------------------------------------------------------------------------------------------------------------


def bench_ops(torch: Any, rounds: int) -> List[Dict[str, Any]]:
    rng = np.random.default_rng(0)
    a_np, b_np = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    rows = []
    for grad in (False, True):
        a, b = mt(a_np, grad), mt(b_np)
        cases = {"add": (lambda: a + b), "exp": (lambda: a.exp()), "sum": (lambda: a.sum(1))}
        peers: Dict[str, Callable[[], Any]] = {}
        if torch is not None:
            ta, tb = torch.from_numpy(a_np.copy()).requires_grad_(grad), torch.from_numpy(b_np.copy())
            peers = {"add": (lambda: ta + tb), "exp": (lambda: ta.exp()), "sum": (lambda: ta.sum(1))}
        for name, fn in cases.items():
            fns = {"minitorch": fn}
            if name in peers:
                fns["torch"] = peers[name]
            r = interleaved(fns, rounds, 2000)
            rows.append({"op": f"{name} 8x8" + (" (a needs grad)" if grad else ""), **{
                f"{k}_us": v["wall_s"] * 1e6 for k, v in r.items()}})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# 2. small attention calls
# ---------------------------------------------------------------------------------------------------------------------


def kernel_only(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray) -> Dict[str, Callable[[], Any]]:
    """The CPU engine's compiled kernels of one causal call, called through their entry points with everything
    prepared in advance: the time no host code can remove."""
    from minitorch.attention.kernels.cpu import flash as cpu
    from minitorch.attention.kernels.cpu.launch import _entry_point
    from minitorch.attention.spec import make_spec

    dtype = np.dtype(np.float32)
    spec = make_spec(q.shape, k.shape, v.shape, causal=True, default_blocks=FB.attention.default_blocks(q.shape[3]))
    out, lse = cpu.forward(q, k, v, None, spec)
    cpu.backward(q, k, v, None, out, lse, do, spec)
    cfg, tiles = cpu._config(None, spec, dtype)
    B, H, N, D = q.shape
    Tr, Tc = tiles.shape[2], tiles.shape[3]
    scale = dtype.type(spec.scale)
    o5, l4 = np.empty((B, H, 1, N, D), dtype), np.empty((B, H, 1, N), dtype)
    fwd_args = (q, k, v, o5, l4, spec.block_q, spec.block_k, 1, tiles, scale, cfg)
    dlse, delta = np.zeros((B, H, N), dtype), np.empty((B, H, N), dtype)
    n_chunks = cpu.fused_chunks(B * H, Tc, q.nbytes)
    parts = np.zeros((n_chunks, B, H, N, D), dtype)
    dk, dv, dbias = np.empty_like(k), np.empty_like(v), np.zeros((1, 1, 1, 1), dtype)
    bwd_args = (q, k, v, do, lse, delta, dk, dv, dbias, parts, True, n_chunks, spec.block_q, spec.block_k, B, H,
                tiles, scale, cfg)
    pre_args = (out, do, dlse, delta)
    fwd, pre, bwd = (_entry_point(kern, args) for kern, args in (
        (cpu._fwd_q_major, fwd_args), (cpu._bwd_preprocess, pre_args), (cpu._bwd_dkdv, bwd_args)))
    return {"fwd": lambda: fwd(0, 1, *fwd_args),
            "bwd": lambda: (pre(0, 1, *pre_args), bwd(0, 1, *bwd_args))}


def bench_attention_calls(torch: Any, rounds: int) -> List[Dict[str, Any]]:
    rows = []
    for (B, H, N, D), inner in (((1, 1, 8, 16), 500), ((8, 4, 64, 16), 20)):
        rng = np.random.default_rng(1)
        q, k, v, do = (rng.standard_normal((B, H, N, D)).astype(np.float32) for _ in range(4))
        mq, mk, mv = (mt(x, True) for x in (q, k, v))
        mdo = mt(do)

        def m_fwd() -> Any:
            return minitorch.flash_attention(mq, mk, mv, causal=True)

        def m_fwd_bwd() -> Any:
            for t in (mq, mk, mv):
                t.grad = None
            minitorch.flash_attention(mq, mk, mv, causal=True).backward(mdo)

        fns = {"minitorch fwd": m_fwd, "minitorch fwd+bwd": m_fwd_bwd}
        try:
            kern = kernel_only(q, k, v, do)
            fns.update({"kernels fwd": kern["fwd"], "kernels fwd+bwd": lambda: (kern["fwd"](), kern["bwd"]())})
        except (ImportError, AttributeError, TypeError):  # an older engine without these entry points
            pass
        if torch is not None:
            F = torch.nn.functional
            tq, tk, tv = (torch.from_numpy(x.copy()).requires_grad_(True) for x in (q, k, v))
            tdo = torch.from_numpy(do.copy())

            def t_fwd() -> Any:
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

            def t_fwd_bwd() -> Any:
                for t in (tq, tk, tv):
                    t.grad = None
                F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).backward(tdo)

            fns.update({"torch fwd": t_fwd, "torch fwd+bwd": t_fwd_bwd})
        r = interleaved(fns, rounds, inner)
        for what in ("fwd", "fwd+bwd"):
            row = {"shape": f"B={B} H={H} N={N} D={D} causal", "pass": what,
                   "minitorch_us": r[f"minitorch {what}"]["wall_s"] * 1e6,
                   "minitorch_cpu_us": r[f"minitorch {what}"]["cpu_s"] * 1e6}
            if f"kernels {what}" in r:
                row["kernels_us"] = r[f"kernels {what}"]["wall_s"] * 1e6
                row["host_us"] = row["minitorch_us"] - row["kernels_us"]
            if torch is not None:
                row["torch_us"] = r[f"torch {what}"]["wall_s"] * 1e6
                row["torch_cpu_us"] = r[f"torch {what}"]["cpu_s"] * 1e6
                row["ratio"] = row["torch_us"] / row["minitorch_us"]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# 3. a training step of the tiny transformer
# ---------------------------------------------------------------------------------------------------------------------

MODEL = dict(n_layer=2, d_model=64, n_head=4, context=64)
TRAIN = dict(batch=16, lr=1e-2, clip=1.0, seed=1337)


def torch_gpt(torch: Any, model: Any) -> Any:
    """The same GPT in PyTorch eager, initialized with the minitorch model's values (same names and layouts)."""
    nn, F = torch.nn, torch.nn.functional
    cfg = model.cfg
    values = {name: torch.from_numpy(p.value.to_numpy().copy()) for name, p in model.named_parameters()}

    def param(name: str) -> Any:
        return nn.Parameter(values[name].clone())

    class Lin(nn.Module):
        def __init__(self, prefix: str):
            super().__init__()
            self.weight = param(prefix + ".weight")
            self.bias = param(prefix + ".bias") if prefix + ".bias" in values else None

        def forward(self, x: Any) -> Any:
            y = x @ self.weight
            return y + self.bias if self.bias is not None else y

    class LN(nn.Module):
        def __init__(self, prefix: str):
            super().__init__()
            self.gamma, self.beta = param(prefix + ".gamma"), param(prefix + ".beta")

        def forward(self, x: Any) -> Any:
            xc = x - x.mean(1, keepdim=True)
            var = (xc * xc).mean(1, keepdim=True)
            return xc * torch.rsqrt(var + 1e-5) * self.gamma + self.beta

    class Blk(nn.Module):
        def __init__(self, i: int):
            super().__init__()
            p = f"block{i}."
            self.ln1, self.ln2 = LN(p + "ln1"), LN(p + "ln2")
            self.q, self.k, self.v, self.proj = (Lin(p + "attn." + n) for n in ("q", "k", "v", "proj"))
            self.fc, self.out = Lin(p + "mlp.fc"), Lin(p + "mlp.proj")

        def forward(self, x: Any, B: int, T: int) -> Any:
            H = cfg.n_head
            Dh = cfg.d_model // H
            h = self.ln1(x)
            q, k, v = (lin(h).view(B, T, H, Dh).permute(0, 2, 1, 3) for lin in (self.q, self.k, self.v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.permute(0, 2, 1, 3).reshape(B * T, cfg.d_model))
            return x + self.out(torch.relu(self.fc(self.ln2(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = param("wte"), param("wpe")
            self.blocks = nn.ModuleList(Blk(i) for i in range(cfg.n_layer))
            self.ln_f = LN("ln_f")

        def forward(self, idx: Any, pos: Any) -> Any:
            B, T = idx.shape
            x = self.wte[idx.reshape(-1)] + self.wpe[pos.reshape(-1)]
            for blk in self.blocks:
                x = blk(x, B, T)
            return self.ln_f(x) @ self.wte.t()

    return Net()


def bench_training(torch: Any, steps: int) -> Dict[str, Any]:
    import run_transformer as rt

    texts = rt.load_texts(sorted(p for p in (os.path.join(rt.DATA_DIR, f) for f in os.listdir(rt.DATA_DIR))
                                 if p.endswith(".txt")))
    tok = rt.CharTokenizer.from_text("".join(texts))
    train_data, _ = rt.split_data(texts, tok, MODEL["context"])
    np.random.seed(TRAIN["seed"])
    cfg = rt.Config(tok.vocab_size, tie=True, backend=FB, dtype=np.float32, **MODEL)
    model = rt.GPT(cfg)
    params = model.parameters()
    opt = minitorch.Adam(params, lr=TRAIN["lr"])
    batches = [rt.get_batch(train_data, TRAIN["batch"], MODEL["context"], np.random.default_rng([TRAIN["seed"], s]))
               for s in range(steps + 1)]

    def m_step(s: int) -> float:
        x, y, pos = batches[s]
        opt.zero_grad()
        loss = rt.cross_entropy(model(x, pos), y)
        loss.backward()
        rt.clip_gradients(params, TRAIN["clip"])
        opt.step()
        return loss.item()

    contenders: Dict[str, Callable[[int], float]] = {"minitorch": m_step}
    if torch is not None:
        net = torch_gpt(torch, model)
        topt = torch.optim.Adam(net.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.999), eps=1e-8)
        tb = [tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in b) for b in batches]

        def t_step(s: int) -> float:
            x, y, pos = tb[s]
            topt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x, pos), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), TRAIN["clip"])
            topt.step()
            return float(loss.detach())

        contenders["torch"] = t_step
    losses: Dict[str, List[float]] = {k: [] for k in contenders}
    wall: Dict[str, List[float]] = {k: [] for k in contenders}
    cpu: Dict[str, List[float]] = {k: [] for k in contenders}
    for s in range(steps + 1):  # step 0 warms up (compiles, or loads the disk cache): not timed
        for name, step in contenders.items():  # interleaved: the same step of each model in turn
            c0, t0 = time.process_time(), time.perf_counter()
            losses[name].append(step(s))
            if s > 0:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    out: Dict[str, Any] = {"model": MODEL, "train": TRAIN, "steps_timed": steps, "losses": losses}
    for name in contenders:
        out[f"{name}_ms_per_step"] = statistics.median(wall[name]) * 1e3
        out[f"{name}_cpu_ms_per_step"] = statistics.median(cpu[name]) * 1e3
    if torch is not None:
        out["ratio"] = out["torch_ms_per_step"] / out["minitorch_ms_per_step"]
        out["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["minitorch"], losses["torch"]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def fmt(x: Optional[float], spec: str = "8.1f") -> str:
    return format(x, spec) if x is not None and not (isinstance(x, float) and math.isnan(x)) else "-".rjust(8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed training steps (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the op and call tables")
    p.add_argument("--threads", type=int, default=1, help="threads of every library (set before they load)")
    p.add_argument("--json", default=os.path.join(LOCAL_RESULTS_DIR, "bench_framework.json"))
    p.add_argument("--update-results", action="store_true", help="write benchmarks/results/bench_framework.json")
    args = p.parse_args()
    torch = try_torch()
    load0 = os.getloadavg()
    print(f"timing: one process, OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 for every library, "
          f"{args.threads} thread(s), interleaved rounds, medians; load average {load0[0]:.2f}; "
          f"torch: {torch.__version__ if torch else 'not installed'}")

    ops = bench_ops(torch, args.rounds)
    print("\n1. tensor ops, us per op (float32)")
    print(f"{'op':28s} {'minitorch':>10s} {'torch':>10s}")
    for r in ops:
        print(f"{r['op']:28s} {fmt(r['minitorch_us']):>10s} {fmt(r.get('torch_us')):>10s}")

    calls = bench_attention_calls(torch, args.rounds)
    print("\n2. attention calls through the API, us per call (causal; host = minitorch - its kernels alone)")
    print(f"{'shape':28s} {'pass':8s} {'minitorch':>10s} {'kernels':>10s} {'host':>10s} {'torch':>10s} {'torch/mt':>9s}")
    for r in calls:
        print(f"{r['shape']:28s} {r['pass']:8s} {fmt(r['minitorch_us']):>10s} {fmt(r.get('kernels_us')):>10s} "
              f"{fmt(r.get('host_us')):>10s} {fmt(r.get('torch_us')):>10s} {fmt(r.get('ratio'), '8.2f'):>9s}")

    train = bench_training(torch, args.steps)
    print(f"\n3. training step of the tiny transformer ({MODEL}, batch {TRAIN['batch']}), ms per step "
          f"(median of {args.steps})")
    print(f"   minitorch {train['minitorch_ms_per_step']:.1f} ms (cpu {train['minitorch_cpu_ms_per_step']:.1f})", end="")
    if torch is not None:
        print(f"   torch {train['torch_ms_per_step']:.1f} ms (cpu {train['torch_cpu_ms_per_step']:.1f})   "
              f"torch/minitorch {train['ratio']:.2f}x   max loss difference {train['max_loss_difference']:.2e}")
    else:
        print("   (torch not installed)")

    info = machine_info()
    info["load_average_start"], info["load_average_end"] = load0, os.getloadavg()
    report = {"benchmark": "bench_framework", "machine": info, "threads": args.threads,
              "timing": "one process, OMP_WAIT_POLICY=PASSIVE and OPENBLAS_THREAD_TIMEOUT=4 for every library, "
                        "interleaved rounds, medians of wall and process CPU time",
              "torch": torch.__version__ if torch else None, "ops": ops, "attention_calls": calls, "training": train}
    path = os.path.join(RESULTS_DIR, "bench_framework.json") if args.update_results else args.json
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
