"""Module 2 assignment: the same classifier as ``run_scalar.py`` with `minitorch.Tensor`s.

    python project/run_tensor.py --dataset xor --hidden 10 --rate 0.5 --epochs 200

A layer is one tensor expression over the whole batch instead of a Python loop over Scalars. Module 2 has no matrix
multiply yet, so ``Linear`` broadcasts: ``(B, in, 1) * (1, in, out)`` summed over ``in``. Runs on the readable
`SimpleBackend` (pure Python loops over tensor elements) in float64; ``--backend fast`` uses the Numba kernels of
module 3. Prints a progress bar (loss, accuracy) and saves a PNG with the decision boundary and the loss curve.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minitorch  # noqa: E402
from progress import Progress  # noqa: E402
from run_scalar import default_out, load_dataset, make_parser, plot_run  # noqa: E402

BACKENDS = {"simple": minitorch.SimpleBackend, "fast": minitorch.FastTensorBackend}


def RParam(*shape: int, backend: minitorch.TensorBackend) -> minitorch.Parameter:
    """A parameter with values uniform in [-1, 1)."""
    r = 2 * (minitorch.rand(shape, backend=backend) - 0.5)
    return minitorch.Parameter(r)


class Linear(minitorch.Module):
    """``x (B, in) -> x @ W + b (B, out)``, written with broadcasting and a sum (no matmul in module 2)."""

    def __init__(self, in_size: int, out_size: int, backend: minitorch.TensorBackend):
        super().__init__()
        self.weights = RParam(in_size, out_size, backend=backend)
        self.bias = RParam(out_size, backend=backend)
        self.out_size = out_size

    def forward(self, x: minitorch.Tensor) -> minitorch.Tensor:
        batch, in_size = x.shape
        w = self.weights.value.view(1, in_size, self.out_size)
        prod = x.view(batch, in_size, 1) * w  # (B, in, out)
        return prod.sum(1).view(batch, self.out_size) + self.bias.value.view(1, self.out_size)


class Network(minitorch.Module):
    """``2 -> hidden -> hidden -> 1``: ReLU, ReLU, sigmoid."""

    def __init__(self, hidden: int, backend: minitorch.TensorBackend):
        super().__init__()
        self.layer1 = Linear(2, hidden, backend)
        self.layer2 = Linear(hidden, hidden, backend)
        self.layer3 = Linear(hidden, 1, backend)

    def forward(self, x: minitorch.Tensor) -> minitorch.Tensor:
        h = self.layer1.forward(x).relu()
        h = self.layer2.forward(h).relu()
        return self.layer3.forward(h).sigmoid().view(x.shape[0])


def train(args: argparse.Namespace, script: str = "run_tensor") -> Dict[str, object]:
    """Full-batch gradient descent on the log loss; returns losses, accuracies and the PNG path."""
    backend = BACKENDS[args.backend]
    data = load_dataset(args.dataset, args.points, args.seed)
    X = minitorch.tensor(data.X, backend=backend)
    y = minitorch.tensor(data.y, backend=backend)
    model = Network(args.hidden, backend)
    optim = minitorch.SGD(model.parameters(), args.rate)
    losses: List[float] = []
    accuracies: List[float] = []
    bar = None if args.quiet else Progress(args.epochs, desc=f"tensor {args.dataset} ({args.backend})")
    for _ in range(args.epochs):
        optim.zero_grad()
        out = model.forward(X)
        prob = out * y + (out - 1.0) * (y - 1.0)  # probability given to the true class
        loss = -prob.log()
        (loss / data.N).sum().backward()
        optim.step()
        losses.append(float(loss.sum().item()) / data.N)
        accuracies.append(float(((out > 0.5) == y).sum().item()) / data.N)
        if bar:
            bar.update(loss=losses[-1], acc=accuracies[-1])
    if bar:
        bar.close()

    def predict(pts: np.ndarray) -> np.ndarray:
        return model.forward(minitorch.tensor(pts.tolist(), backend=backend)).to_numpy()

    out_path = args.out or default_out(script, args.dataset)
    plot_run(out_path, data.X, data.y, predict, losses, accuracies,
             f"Tensor network ({args.backend}) on {args.dataset} (hidden {args.hidden}, rate {args.rate})",
             grid=25 if args.backend == "simple" else 40)  # the pure-Python backend: fewer grid points
    print(f"final loss {losses[-1]:.4f}, accuracy {accuracies[-1]:.3f}; plot: {out_path}")
    return {"losses": losses, "accuracies": accuracies, "out": out_path}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = make_parser(__doc__.split("\n")[0], hidden=10, rate=0.5, epochs=150, points=50,
                         backends=list(BACKENDS), default_backend="simple", dataset="xor")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)  # minitorch.rand draws from NumPy's global generator
    return train(args)


if __name__ == "__main__":
    main()
