"""A tiny dependency-free progress bar for the training scripts.

    bar = Progress(total=500, desc="train")
    for step in range(500):
        ...
        bar.update(loss=1.23, acc=0.9)     # one step done; metrics shown after the bar
    bar.close()

On a terminal the bar redraws one line (``\\r``), cut to the terminal's width (a line that wrapped could not be
redrawn in place); messages (``bar.write``) go above it. When the output is a file or a pipe (a background run, CI)
it prints a plain line every ``log_every`` updates instead, so logs stay readable. The ETA appears after the first
``eta_after`` updates and leaves them out: first steps are slow (Numba compiles the kernels), so the mean time of the
later updates, times the updates left, is the estimate.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any, Optional, TextIO


def format_seconds(s: float) -> str:
    """``75.3 -> '1m15s'``, ``3700 -> '1h01m'``, ``4.2 -> '4.2s'``."""
    if s != s or s < 0:  # nan
        return "?"
    if s < 10:
        return f"{s:.1f}s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


class Progress:
    """A progress bar over ``total`` updates, starting at ``initial`` (e.g. when a run resumes)."""

    def __init__(self, total: int, desc: str = "", width: int = 24, initial: int = 0,
                 stream: Optional[TextIO] = None, log_every: Optional[int] = None, eta_after: int = 3):
        self.total = max(int(total), 1)
        self.desc = desc
        self.width = width
        self.n = self.start_n = int(initial)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_every = log_every if log_every is not None else max(1, (self.total - self.n) // 20)
        self.eta_after = max(int(eta_after), 0)
        self.t0 = time.perf_counter()
        self.t_eta: Optional[float] = self.t0 if self.eta_after == 0 else None  # when update `eta_after` was done
        self.metrics: dict = {}
        self.closed = False

    @property
    def elapsed(self) -> float:
        """Seconds since the bar was created."""
        return time.perf_counter() - self.t0

    def eta(self) -> float:
        """Estimated seconds left: the mean time of the updates after the first ``eta_after`` (NaN before)."""
        timed = self.n - self.start_n - self.eta_after
        if self.t_eta is None or timed <= 0:
            return float("nan")
        return (time.perf_counter() - self.t_eta) / timed * (self.total - self.n)

    def line(self) -> str:
        """The current bar as a string."""
        frac = min(self.n / self.total, 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"{self.desc} [{bar}] {self.n}/{self.total}"]
        parts += [f"{k} {_fmt(v)}" for k, v in self.metrics.items()]
        eta = self.eta()
        timing = f"{format_seconds(self.elapsed)} elapsed"
        parts.append(timing if math.isnan(eta) else f"{timing}, ETA {format_seconds(eta)}")
        return " | ".join(parts)

    def _fit(self, line: str) -> str:
        """``line`` cut to the terminal's width: a line that wraps cannot be redrawn in place by ``\\r``."""
        cols = shutil.get_terminal_size().columns
        return line if len(line) < cols else line[: max(cols - 2, 1)] + "~"

    def update(self, n: int = 1, **metrics: Any) -> None:
        """Advance by ``n`` and remember the metrics to show."""
        self.n += n
        if self.t_eta is None and self.n - self.start_n >= self.eta_after:
            self.t_eta = time.perf_counter()
        self.metrics.update(metrics)
        if self.tty:
            self.stream.write("\r" + self._fit(self.line()) + "\x1b[K")
            self.stream.flush()
        elif (self.n - self.start_n) % self.log_every == 0 or self.n >= self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def write(self, message: str) -> None:
        """Print a message above the bar."""
        if self.tty and not self.closed:
            self.stream.write("\r\x1b[K" + message + "\n" + self._fit(self.line()) + "\x1b[K")
        else:
            self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Finish the line (once)."""
        if self.tty and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True
