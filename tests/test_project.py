"""The course scripts in project/ run end to end on tiny settings: the loss falls, accuracy does not get worse, the
PNGs are written; the transformer resumes from its checkpoint exactly where an uninterrupted run would be, never
replaces another run's checkpoint, saves atomically, and times generation warm; the progress bar's ETA and width.

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


def test_run_transformer_paged_generation_matches_alone() -> None:
    """``--paged``: prompts of different lengths generated together with the paged KV cache (one decode step for
    all of them) get the tokens each prompt gets alone with its ring-buffer cache, past the context window too."""
    import run_transformer

    res = run_transformer.main(["--quick", "--steps", "6", "--eval-every", "0", "--no-save", "--plot", "", "--paged",
                                "--gen-tokens", "40", "--gen-tokens-recompute", "2"])
    paged = res["generation"]["paged"]
    assert paged["same_tokens"] and len(paged["texts"]) == 3 and paged["tokens_per_s"] > 0
    assert paged["max_logit_diff"] < 1e-4  # the same logits up to float32 rounding, not just the same samples
    # "Alice " (6), "The Queen said, " (16) and "W" (1) plus 40 tokens each: 3 + 4 + 3 pages of 16 tokens
    assert paged["pages_in_use"] == paged["num_pages"] == 10


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
# run_transformer.py: checkpoints are never lost, the command line says what it does
# ---------------------------------------------------------------------------------------------------------------------

TINY = ["--quick", "--steps", "4", "--save-every", "2", "--eval-every", "0", "--gen-tokens", "0", "--plot", ""]


def test_quick_has_its_own_checkpoint_and_explicit_options_win() -> None:
    import run_transformer as rt

    assert rt.parse_args([]).checkpoint == rt.DEFAULT_CHECKPOINT
    assert rt.parse_args(["--quick"]).checkpoint == rt.QUICK_CHECKPOINT != rt.DEFAULT_CHECKPOINT
    quick = rt.parse_args(["--quick", "--save-every", "7", "--steps", "100"])
    assert (quick.save_every, quick.steps, quick.d_model) == (7, 100, rt.QUICK_DEFAULTS["d_model"])


def test_fresh_run_never_replaces_another_run(tmp_path: Any) -> None:
    import run_transformer as rt

    ckpt = str(tmp_path / "a.npz")
    rt.main(TINY + ["--checkpoint", ckpt])
    before = open(ckpt, "rb").read()
    for other in (["--d-model", "16"], ["--seed", "7"], ["--steps", "6"], ["--no-tie"]):
        with pytest.raises(SystemExit, match="holds a different run"):
            rt.main(TINY + ["--checkpoint", ckpt] + other)
        assert open(ckpt, "rb").read() == before
    with pytest.raises(SystemExit, match="further than this run goes"):  # the same run, stopped before its step
        rt.main(TINY + ["--checkpoint", ckpt, "--stop-after", "2"])
    assert open(ckpt, "rb").read() == before
    res = rt.main(TINY + ["--checkpoint", ckpt, "--d-model", "16", "--overwrite"])  # told to: replaced
    meta, _ = rt.read_checkpoint(ckpt)
    assert res["steps"] == 4 and meta["model"]["d_model"] == 16 and meta["train"]["steps"] == 4


def test_fresh_run_of_the_same_run_replaces_it_only_once_it_gets_as_far(tmp_path: Any, capsys: Any) -> None:
    import run_transformer as rt

    ckpt = str(tmp_path / "a.npz")
    rt.main(TINY + ["--checkpoint", ckpt, "--stop-after", "3", "--steps", "4"])
    assert rt.read_checkpoint(ckpt)[0]["step"] == 3
    capsys.readouterr()
    res = rt.main(TINY + ["--checkpoint", ckpt])  # from scratch: the save at step 2 would replace step 3
    out = capsys.readouterr().out
    assert "step 2 (periodic) not saved" in out and "holds this same run at step 3" in out
    assert res["steps"] == 4 and rt.read_checkpoint(ckpt)[0]["step"] == 4


def test_resume_of_a_finished_run_only_samples(tmp_path: Any, capsys: Any) -> None:
    import run_transformer as rt

    ckpt = str(tmp_path / "a.npz")
    first = rt.main(TINY + ["--checkpoint", ckpt])
    mtime = os.stat(ckpt).st_mtime_ns
    capsys.readouterr()
    res = rt.main(TINY + ["--checkpoint", ckpt, "--resume", "--gen-tokens", "3", "--gen-tokens-recompute", "2"])
    assert "is a finished run (step 4 of 4): nothing to train, sampling only" in capsys.readouterr().out
    assert res["train_losses"] == first["train_losses"] and len(res["generation"]["text"]) > len("Alice ")
    assert os.stat(ckpt).st_mtime_ns == mtime  # nothing trained, nothing rewritten


@pytest.mark.parametrize("damage", ["empty", "truncated", "not a checkpoint"])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Any, damage: str) -> None:
    import run_transformer as rt

    ckpt = tmp_path / "a.npz"
    rt.main(TINY + ["--checkpoint", str(ckpt)])
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not a checkpoint": b"x" * 100}[damage])
    with pytest.raises(rt.CheckpointError, match="cannot read the checkpoint"):
        rt.read_checkpoint(str(ckpt))
    with pytest.raises(SystemExit, match="truncated, empty or not written by this script"):
        rt.main(TINY + ["--checkpoint", str(ckpt), "--resume"])
    with pytest.raises(SystemExit, match="Not replacing it: --overwrite does"):  # a fresh run does not replace it
        rt.main(TINY + ["--checkpoint", str(ckpt)])
    assert rt.main(TINY + ["--checkpoint", str(ckpt), "--overwrite"])["steps"] == 4
    assert rt.read_checkpoint(str(ckpt))[0]["step"] == 4


def _tiny_model() -> Any:
    import minitorch
    import run_transformer as rt

    tok = rt.CharTokenizer("abcde")
    cfg = rt.Config(tok.vocab_size, 1, 8, 2, 4, True, minitorch.FastTensorBackend, np.float32)
    model = rt.GPT(cfg)
    return model, minitorch.Adam(model.parameters(), lr=1e-3), tok, {"step": 1, "history": {"train": [], "val": []}}


def test_checkpoint_save_is_fsynced_before_the_rename_and_leaves_no_temp_file(tmp_path: Any,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import run_transformer as rt

    model, opt, tok, state = _tiny_model()
    path = str(tmp_path / "c.npz")
    rt.save_checkpoint(path, model, opt, tok, state, {})
    before = open(path, "rb").read()
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b)))
    state["step"] = 2
    rt.save_checkpoint(path, model, opt, tok, state, {})
    replace = next(i for i, e in enumerate(events) if e[0] == "replace")
    tmp = events[replace][1]
    assert events[replace][2] == path and ("fsync", tmp) in events[:replace]  # the data is on disk first
    assert os.listdir(tmp_path) == ["c.npz"] and rt.read_checkpoint(path)[0]["step"] == 2

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    after = open(path, "rb").read()
    with pytest.raises(OSError, match="No space"):
        rt.save_checkpoint(path, model, opt, tok, dict(state, step=3), {})
    assert open(path, "rb").read() == after != before and os.listdir(tmp_path) == ["c.npz"]


def test_stale_temp_files_of_interrupted_saves_are_removed(tmp_path: Any, capsys: Any) -> None:
    import run_transformer as rt

    ckpt = tmp_path / "a.npz"
    stale = tmp_path / "a.npz.k3j9x.tmp"
    other = tmp_path / "b.npz.k3j9x.tmp"  # another checkpoint's: left alone
    stale.write_bytes(b"half a checkpoint")
    other.write_bytes(b"x")
    rt.main(TINY + ["--checkpoint", str(ckpt)])
    assert f"removed {stale}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz.k3j9x.tmp"]


def test_generation_speed_is_timed_warm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timed generation follows an untimed one of the same kind long enough to wrap the cache and fill the
    window, so no first-call compile is timed; the printed speed says so."""
    import run_transformer as rt

    calls = []
    real = rt.generate

    def spy(model: Any, prompt: Any, n_new: int, *args: Any, use_cache: bool) -> Any:
        calls.append((use_cache, n_new))
        return real(model, prompt, n_new, *args, use_cache=use_cache)

    monkeypatch.setattr(rt, "generate", spy)
    res = rt.main(["--quick", "--steps", "2", "--eval-every", "0", "--plot", "", "--no-save", "--gen-tokens", "40"])
    context = rt.QUICK_DEFAULTS["context"]
    assert calls[-2:] == [(True, 40), (False, 20)]  # the timed ones
    for use_cache, n in calls[-2:]:
        assert any(c == use_cache and m >= min(n, context + 1) for c, m in calls[:-2]), calls
    assert res["generation"]["timing"].startswith("warm")


def _option_helps(parser: Any) -> Dict[str, str]:
    """``{option: its help text}`` from ``--help`` (whitespace normalized)."""
    helps: Dict[str, str] = {}
    current = None
    for line in parser.format_help().split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            helps[current] = stripped
        elif current and stripped and line.startswith(" "):
            helps[current] += " " + stripped
        elif not stripped or not line.startswith(" "):
            current = None
    return {k: " ".join(v.split()) for k, v in helps.items()}


def test_run_transformer_help_has_help_and_one_correct_default_per_option() -> None:
    import argparse

    import run_transformer as rt

    parser = rt.build_parser()
    helps = _option_helps(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        opt = action.option_strings[0]
        assert action.help, f"{opt} has no help"
        text = helps[opt]
        flag = action.nargs == 0
        assert text.count("(default") == (0 if flag else 1), (opt, text)
        if not flag and action.default not in (None, []):
            shown = {"--plot": os.path.relpath(rt.DEFAULT_PLOT, os.path.dirname(PROJECT)),
                     "--prompt": repr(action.default)}.get(opt, str(action.default))
            assert f"(default: {shown})" in text, (opt, text)
    assert "default: True" not in helps["--no-tie"] and "default, the output matrix is the token" in helps["--no-tie"]
    assert helps["--data"].endswith("(default: every project/data/*.txt)")


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
