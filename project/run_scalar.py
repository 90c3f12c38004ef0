"""Module 1 assignment: train a small network of `minitorch.Scalar`s on a 2-D toy dataset.

    python project/run_scalar.py --dataset xor --hidden 4 --rate 0.5 --epochs 200 --out scalar_xor.png

Every weight is one `Scalar` and every multiply-add records a node in the graph that `backward` walks: slow (pure
Python), but every derivative can be followed by hand. The network is ``2 -> hidden -> hidden -> 1`` with ReLU
and a sigmoid output, trained with full-batch gradient descent on the log loss. The script prints a progress bar
(loss and accuracy) and saves a PNG with the decision boundary and the loss curve.

The argument parser and the plot are shared with ``run_tensor.py`` and ``run_fast_tensor.py``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minitorch  # noqa: E402
from progress import Progress  # noqa: E402

DATASETS = ("simple", "diag", "split", "xor", "circle", "spiral")
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "outputs")


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers (also used by run_tensor.py and run_fast_tensor.py)
# ---------------------------------------------------------------------------------------------------------------------


def make_parser(description: str, *, hidden: int, rate: float, epochs: int, points: int,
                backends: Optional[Sequence[str]] = None, default_backend: str = "fast",
                dataset: str = "xor") -> argparse.ArgumentParser:
    """The common command line: dataset, size, learning rate, epochs, output PNG (and backend where it applies)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", choices=DATASETS, default=dataset, help=f"which 2-D toy dataset (default: {dataset})")
    p.add_argument("--points", type=int, default=points, help=f"number of training points (default {points})")
    p.add_argument("--hidden", type=int, default=hidden, help=f"hidden layer width (default {hidden})")
    p.add_argument("--rate", type=float, default=rate, help=f"learning rate (default {rate})")
    p.add_argument("--epochs", type=int, default=epochs, help=f"full passes over the data (default {epochs})")
    p.add_argument("--seed", type=int, default=1, help="seed of the data and the initial weights")
    p.add_argument("--out", default=None, help="PNG to write (default: project/outputs/<script>_<dataset>.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    if backends:
        p.add_argument("--backend", choices=list(backends), default=default_backend,
                       help=f"tensor backend (default {default_backend})")
    return p


def load_dataset(name: str, points: int, seed: int) -> Any:
    """The named dataset (``xor`` -> ``minitorch.datasets["Xor"]``), reproducible for a seed."""
    random.seed(seed)
    return minitorch.datasets[name.capitalize()](points)


def default_out(script: str, dataset: str) -> str:
    return os.path.join(OUT_DIR, f"{script}_{dataset}.png")


def plot_run(path: str, X: Sequence[Sequence[float]], y: Sequence[int],
             predict_grid: Callable[[np.ndarray], np.ndarray], losses: List[float], accuracies: List[float],
             title: str, grid: int = 40) -> str:
    """Save a two-panel PNG: the decision boundary over the unit square with the points, and the loss curve.

    ``predict_grid(points (M, 2)) -> probabilities (M,)`` evaluates the trained model on a ``grid x grid`` mesh.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(0.0, 1.0, grid)
    gx, gy = np.meshgrid(xs, xs)
    probs = np.asarray(predict_grid(np.stack([gx.ravel(), gy.ravel()], axis=1)), dtype=float).reshape(grid, grid)
    X = np.asarray(X, dtype=float)
    y = np.asarray(y)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4.2))
    cs = ax0.contourf(gx, gy, probs, levels=np.linspace(0, 1, 11), cmap="RdBu_r", alpha=0.75)
    ax0.contour(gx, gy, probs, levels=[0.5], colors="k", linewidths=1.5)
    ax0.scatter(X[y == 1, 0], X[y == 1, 1], c="tab:red", edgecolors="k", s=25, label="class 1")
    ax0.scatter(X[y == 0, 0], X[y == 0, 1], c="tab:blue", edgecolors="k", s=25, label="class 0")
    fig.colorbar(cs, ax=ax0, label="P(class 1)")
    ax0.set_xlim(0, 1)
    ax0.set_ylim(0, 1)
    ax0.set_title("decision boundary")
    ax0.legend(loc="upper right", fontsize=8)
    epochs = np.arange(1, len(losses) + 1)
    ax1.plot(epochs, losses, color="tab:purple", label="loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss (mean log loss)")
    ax1.set_title("training")
    ax2 = ax1.twinx()
    ax2.plot(epochs, accuracies, color="tab:green", alpha=0.6, label="accuracy")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.05)
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="center right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# The Scalar network
# ---------------------------------------------------------------------------------------------------------------------


class Linear(minitorch.Module):
    """``out_j = sum_i x_i w_ij + b_j``, one Scalar parameter per weight."""

    def __init__(self, in_size: int, out_size: int):
        super().__init__()
        self.weights: List[List[minitorch.Parameter]] = []
        self.bias: List[minitorch.Parameter] = []
        for i in range(in_size):
            self.weights.append([self.add_parameter(f"weight_{i}_{j}", minitorch.Scalar(2 * (random.random() - 0.5)))
                                 for j in range(out_size)])
        for j in range(out_size):
            self.bias.append(self.add_parameter(f"bias_{j}", minitorch.Scalar(2 * (random.random() - 0.5))))

    def forward(self, inputs: Sequence[minitorch.Scalar]) -> List[minitorch.Scalar]:
        outs = []
        for j in range(len(self.bias)):
            acc = self.bias[j].value
            for i, x in enumerate(inputs):
                acc = acc + x * self.weights[i][j].value
            outs.append(acc)
        return outs


class Network(minitorch.Module):
    """``2 -> hidden -> hidden -> 1``: ReLU, ReLU, sigmoid."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layer1 = Linear(2, hidden)
        self.layer2 = Linear(hidden, hidden)
        self.layer3 = Linear(hidden, 1)

    def forward(self, x: Sequence[minitorch.Scalar]) -> minitorch.Scalar:
        h = [v.relu() for v in self.layer1.forward(x)]
        h = [v.relu() for v in self.layer2.forward(h)]
        return self.layer3.forward(h)[0].sigmoid()


def predict(model: Network, pts: np.ndarray) -> np.ndarray:
    """Probability of class 1 for each point (constant inputs: no derivatives for them)."""
    return np.array([model.forward([minitorch.Scalar(a, None), minitorch.Scalar(b, None)]).data for a, b in pts])


def train(args: argparse.Namespace) -> Dict[str, object]:
    """Train and plot; returns the loss and accuracy per epoch and the PNG path."""
    data = load_dataset(args.dataset, args.points, args.seed)
    model = Network(args.hidden)
    optim = minitorch.SGD(model.parameters(), args.rate)
    losses: List[float] = []
    accuracies: List[float] = []
    bar = None if args.quiet else Progress(args.epochs, desc=f"scalar {args.dataset}")
    for _ in range(args.epochs):
        optim.zero_grad()
        total, correct = 0.0, 0
        for (x1, x2), label in zip(data.X, data.y):
            prob = model.forward([minitorch.Scalar(x1, None), minitorch.Scalar(x2, None)])
            correct += int((prob.data > 0.5) == (label == 1))
            # log loss of the true class; dividing by N makes the accumulated derivative the mean's.
            loss = -(prob if label == 1 else 1.0 - prob).log()
            (loss / data.N).backward()
            total += loss.data
        optim.step()
        losses.append(total / data.N)
        accuracies.append(correct / data.N)
        if bar:
            bar.update(loss=losses[-1], acc=accuracies[-1])
    if bar:
        bar.close()
    out = args.out or default_out("run_scalar", args.dataset)
    plot_run(out, data.X, data.y, lambda pts: predict(model, pts), losses, accuracies,
             f"Scalar network on {args.dataset} (hidden {args.hidden}, rate {args.rate})", grid=25)
    print(f"final loss {losses[-1]:.4f}, accuracy {accuracies[-1]:.3f}; plot: {out}")
    return {"losses": losses, "accuracies": accuracies, "out": out}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = make_parser(__doc__.split("\n")[0], hidden=3, rate=0.5, epochs=100, points=50,
                       dataset="simple").parse_args(argv)
    random.seed(args.seed)
    return train(args)


if __name__ == "__main__":
    main()
