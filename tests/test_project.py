"""The course scripts in project/ run end to end on tiny settings: the loss falls, accuracy does not get worse, the
PNGs are written; the transformer resumes from its checkpoint exactly where an uninterrupted run would be.

Each script's ``main(argv)`` runs in-process (Numba kernels compiled by earlier tests are reused) and returns its
numbers. With Numba's disk cache warm the whole file takes about 10 s on 2 cores; with a cold cache the float32
kernels of ``--quick`` compile on first use (about 55 s on a busy 2-core machine). No wall-time assertions: CI
machines are shared.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict

import numpy as np
import pytest

PROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "project")
if PROJECT not in sys.path:
    sys.path.insert(0, PROJECT)

pytest.importorskip("matplotlib")


def _check_classifier(res: Dict[str, Any], epochs: int) -> None:
    losses, acc = res["losses"], res["accuracies"]
    assert len(losses) == len(acc) == epochs
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}"
    assert max(acc[-3:]) >= acc[0], f"accuracy got worse: {acc[0]:.2f} -> {acc[-3:]}"
    assert max(acc) > 0.7
    assert os.path.getsize(res["out"]) > 1000


def test_run_scalar(tmp_path: Any) -> None:
    import run_scalar

    out = tmp_path / "scalar.png"
    res = run_scalar.main(["--dataset", "simple", "--points", "20", "--hidden", "4", "--epochs", "40", "--rate", "1.0",
                           "--out", str(out), "--quiet"])
    _check_classifier(res, 40)
    assert res["out"] == str(out)


def test_run_tensor(tmp_path: Any) -> None:
    import run_tensor

    out = tmp_path / "tensor.png"
    res = run_tensor.main(["--dataset", "diag", "--points", "20", "--hidden", "4", "--epochs", "25",
                           "--out", str(out), "--quiet"])
    _check_classifier(res, 25)


@pytest.mark.parametrize("dataset", ["xor", "split"])
def test_run_fast_tensor(tmp_path: Any, dataset: str) -> None:
    import run_fast_tensor

    out = tmp_path / f"fast_{dataset}.png"
    res = run_fast_tensor.main(["--dataset", dataset, "--epochs", "40", "--out", str(out), "--quiet"])
    _check_classifier(res, 40)
    assert res["accuracies"][-1] > 0.8


def test_run_fast_tensor_rejects_cuda_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import run_fast_tensor
    from numba import cuda

    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        run_fast_tensor.get_backend("cuda")


def test_run_transformer_quick(tmp_path: Any) -> None:
    """``--quick``: a tiny model trains for 40 steps and its loss falls; checkpoint, plot and generation work."""
    import run_transformer

    ckpt, plot = tmp_path / "ckpt.npz", tmp_path / "loss.png"
    res = run_transformer.main(["--quick", "--checkpoint", str(ckpt), "--plot", str(plot)])
    assert res["steps"] == 40 and len(res["train_losses"]) == 40
    assert res["final_loss"] < res["initial_loss"] - 0.3, (res["initial_loss"], res["final_loss"])
    assert res["val_losses"][-1][1] < res["val_losses"][0][1]  # held-out loss fell too
    assert ckpt.exists() and plot.exists() and plot.stat().st_size > 1000
    gen = res["generation"]
    assert len(gen["text"]) > len("Alice ") and gen["cached_tokens_per_s"] > 0 and gen["recompute_tokens_per_s"] > 0
    # within the first context, the KV-cache path and recomputing the window see the same keys
    assert gen["max_logit_diff_within_context"] < 1e-3


def test_run_transformer_resume_is_exact(tmp_path: Any) -> None:
    """Stopping after 6 of 10 steps and resuming gives the losses of an uninterrupted 10-step run: the checkpoint
    holds parameters and Adam moments, and the batch of each step depends only on (seed, step)."""
    import run_transformer

    common = ["--quick", "--steps", "10", "--gen-tokens", "0", "--eval-every", "0", "--plot", ""]
    full = run_transformer.main(common + ["--checkpoint", str(tmp_path / "a.npz")])
    ckpt = str(tmp_path / "b.npz")
    first = run_transformer.main(common + ["--checkpoint", ckpt, "--stop-after", "6"])
    assert first["steps"] == 6 and os.path.exists(ckpt)
    meta, arrays = run_transformer.read_checkpoint(ckpt)
    assert meta["step"] == 6 and any(k.startswith("adam_m/") for k in arrays)
    second = run_transformer.main(common + ["--checkpoint", ckpt, "--resume"])
    assert second["steps"] == 10
    np.testing.assert_allclose(second["train_losses"], full["train_losses"], rtol=1e-5, atol=1e-6)


def test_embedding_function_gradient() -> None:
    """The script's gather Function: backward scatter-adds into the rows read (repeated indices accumulate)."""
    import minitorch
    import run_transformer

    w = minitorch.from_numpy(np.arange(12.0).reshape(4, 3), backend=minitorch.FastTensorBackend, requires_grad=True)
    idx = np.array([[1, 3], [1, 0]])
    out = run_transformer.Embedding.apply(w, idx)
    np.testing.assert_array_equal(out.to_numpy(), np.arange(12.0).reshape(4, 3)[idx])
    (out * 2.0).sum().backward()
    np.testing.assert_array_equal(w.grad.to_numpy(), 2.0 * np.array([[1] * 3, [2] * 3, [0] * 3, [1] * 3]))


# ---------------------------------------------------------------------------------------------------------------------
# project/progress.py
# ---------------------------------------------------------------------------------------------------------------------


def _tty(monkeypatch: pytest.MonkeyPatch, columns: int) -> Any:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", str(columns))
    return Tty()


def test_progress_eta_leaves_out_the_first_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    bar = progress.Progress(100, desc="train", stream=_tty(monkeypatch, 200), eta_after=3)
    for step, seconds in enumerate([30.0, 1.0, 1.0, 1.0, 1.0], start=1):  # step 1 compiles: 30 s
        clock[0] += seconds
        bar.update()
        assert ("ETA" in bar.line()) == (step > 3), (step, bar.line())
    assert bar.eta() == pytest.approx(1.0 * 95)  # 1 s per step after the first 3, not 34 s / 5 per step
    assert "ETA 1m35s" in bar.line()


def test_progress_bar_fits_the_terminal_and_messages_go_above_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import progress

    stream = _tty(monkeypatch, 60)
    bar = progress.Progress(40, desc="train", stream=stream)
    for i in range(5):
        bar.update(loss=3.0 - i * 0.1, val=4.2706, **{"tok/s": 31000})
        if i == 2:
            bar.write("[checkpoint] step 3 (periodic) -> /some/long/path/to/checkpoints/run_transformer_quick.npz")
    bar.close()
    out = stream.getvalue()
    redraws = [seg.split("\n")[-1] for seg in out.split("\r")]
    assert all(len(r.replace("\x1b[K", "")) < 60 for r in redraws), redraws  # never wraps: \r redraws in place
    assert "\r\x1b[K[checkpoint] step 3 (periodic) -> /some/long/path/to/checkpoints/run_transformer_quick.npz\n" \
           "train [" in out  # the message on its own line, the bar redrawn below it
    assert out.endswith("\n")
