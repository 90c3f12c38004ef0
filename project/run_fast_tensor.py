"""Module 3 assignment: the classifier with matrix multiplies on a fast backend (Numba CPU or CUDA).

    python project/run_fast_tensor.py --dataset spiral --hidden 64 --rate 0.2 --epochs 300 --backend fast

``Linear`` is now ``x @ W + b`` (the backend's matmul kernel), training uses mini-batches, and the backend is a
flag: ``fast`` (Numba, parallel CPU), ``cuda`` (Numba CUDA; needs a GPU, or ``NUMBA_ENABLE_CUDASIM=1`` for the
slow simulator) or ``simple`` (pure Python, for comparison). Prints a progress bar (loss, accuracy, time per epoch)
and saves a PNG with the decision boundary and the loss curve.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minitorch  # noqa: E402
from progress import Progress  # noqa: E402
from run_scalar import default_out, load_dataset, make_parser, plot_run  # noqa: E402

BACKEND_NAMES = ("fast", "cuda", "simple")


def get_backend(name: str) -> minitorch.TensorBackend:
    """The TensorBackend for a name; exits with a clear message when CUDA is asked for without a GPU."""
    if name == "cuda":
        from numba import cuda

        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not cuda.is_available():
            sys.exit("--backend cuda: no CUDA GPU found (set NUMBA_ENABLE_CUDASIM=1 to run in the slow simulator)")
        return minitorch.CudaBackend
    return {"fast": minitorch.FastTensorBackend, "simple": minitorch.SimpleBackend}[name]


class Linear(minitorch.Module):
    """``x (B, in) @ W (in, out) + b (out)``, initialised uniformly in ``[-1/sqrt(in), 1/sqrt(in))``."""

    def __init__(self, in_size: int, out_size: int, backend: minitorch.TensorBackend, dtype: np.dtype):
        super().__init__()
        bound = 1.0 / np.sqrt(in_size)
        w = np.random.uniform(-bound, bound, (in_size, out_size))
        b = np.random.uniform(-bound, bound, (out_size,))
        self.weights = minitorch.Parameter(minitorch.from_numpy(w, backend=backend, dtype=dtype))
        self.bias = minitorch.Parameter(minitorch.from_numpy(b, backend=backend, dtype=dtype))

    def forward(self, x: minitorch.Tensor) -> minitorch.Tensor:
        return x @ self.weights.value + self.bias.value


class Network(minitorch.Module):
    """``2 -> hidden -> hidden -> 1``: ReLU, ReLU, sigmoid."""

    def __init__(self, hidden: int, backend: minitorch.TensorBackend, dtype: np.dtype):
        super().__init__()
        self.layer1 = Linear(2, hidden, backend, dtype)
        self.layer2 = Linear(hidden, hidden, backend, dtype)
        self.layer3 = Linear(hidden, 1, backend, dtype)

    def forward(self, x: minitorch.Tensor) -> minitorch.Tensor:
        h = self.layer1.forward(x).relu()
        h = self.layer2.forward(h).relu()
        return self.layer3.forward(h).sigmoid().view(x.shape[0])


def train(args: argparse.Namespace) -> Dict[str, object]:
    """Mini-batch gradient descent on the log loss; returns losses, accuracies, seconds per epoch and the PNG path."""
    backend = get_backend(args.backend)
    dtype = np.dtype(args.dtype)
    data = load_dataset(args.dataset, args.points, args.seed)
    X_np = np.asarray(data.X, dtype=dtype)
    y_np = np.asarray(data.y, dtype=dtype)
    X_all = minitorch.from_numpy(X_np, backend=backend)
    y_all = minitorch.from_numpy(y_np, backend=backend)
    model = Network(args.hidden, backend, dtype)
    optim = minitorch.SGD(model.parameters(), args.rate)
    rng = np.random.default_rng(args.seed)
    losses: List[float] = []
    accuracies: List[float] = []
    epoch_times: List[float] = []
    bar = None if args.quiet else Progress(args.epochs, desc=f"{args.backend} {args.dataset}")
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        order = rng.permutation(data.N)
        total = 0.0
        for start in range(0, data.N, args.batch):
            idx = order[start:start + args.batch]
            x = minitorch.from_numpy(X_np[idx], backend=backend)
            y = minitorch.from_numpy(y_np[idx], backend=backend)
            optim.zero_grad()
            out = model.forward(x)
            prob = out * y + (out - 1.0) * (y - 1.0)  # probability given to the true class
            loss = -prob.log()
            (loss / len(idx)).sum().backward()  # mean over the batch
            total += float(loss.sum().item())
            optim.step()
        epoch_times.append(time.perf_counter() - t0)
        losses.append(total / data.N)
        out = model.forward(X_all)  # accuracy after the epoch, on all points
        accuracies.append(float(((out > 0.5) == y_all).sum().item()) / data.N)
        if bar:
            bar.update(loss=losses[-1], acc=accuracies[-1], s_per_epoch=epoch_times[-1])
    if bar:
        bar.close()

    def predict(pts: np.ndarray) -> np.ndarray:
        return model.forward(minitorch.from_numpy(pts.astype(dtype), backend=backend)).to_numpy()

    out_path = args.out or default_out("run_fast_tensor", args.dataset)
    plot_run(out_path, data.X, data.y, predict, losses, accuracies,
             f"{args.backend} backend on {args.dataset} (hidden {args.hidden}, rate {args.rate}, batch {args.batch})",
             grid=25 if args.backend == "simple" else 50)
    # the first epoch includes Numba compilation (or loading its disk cache)
    steady = float(np.median(epoch_times[1:])) if len(epoch_times) > 1 else epoch_times[0]
    print(f"final loss {losses[-1]:.4f}, accuracy {accuracies[-1]:.3f}; {steady:.3f} s/epoch; plot: {out_path}")
    return {"losses": losses, "accuracies": accuracies, "epoch_times": epoch_times, "out": out_path}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = make_parser(__doc__.split("\n")[0], hidden=64, rate=0.2, epochs=150, points=100,
                         backends=BACKEND_NAMES, default_backend="fast", dataset="xor")
    parser.add_argument("--batch", type=int, default=25, help="mini-batch size (default 25)")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                        help="float64 (course default) or float32")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return train(args)


if __name__ == "__main__":
    main()
