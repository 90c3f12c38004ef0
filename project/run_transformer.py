"""A tiny GPT, from scratch in minitorch: a character-level language model trained with flash attention.

    python project/run_transformer.py                       # train on project/data/*.txt, then generate
    python project/run_transformer.py --quick               # a few steps on a tiny model (its own checkpoint)
    python project/run_transformer.py --resume              # continue an interrupted run from its checkpoint
    python project/run_transformer.py --overwrite           # start over, replacing the checkpoint of another run
    python project/run_transformer.py --backend cuda        # the Numba CUDA kernels (needs a GPU)
    mpiexec -n 2 python project/run_transformer.py --data-parallel   # the batch split over 2 MPI ranks

nanoGPT in one file. The model is a decoder-only transformer:

    tokens -> token embedding + positional embedding
           -> n_layer x [ x + Attention(LayerNorm(x)),  x + MLP(LayerNorm(x)) ]      (pre-norm blocks)
           -> LayerNorm -> logits (the output matrix is the token embedding, transposed: weight tying)

* **Attention** is multi-head causal ``minitorch.flash_attention``: the fused kernel of the backend (Numba CPU,
  Numba CUDA, or the readable NumPy version), whose backward recomputes the probabilities tile by tile.
* **Layer norm** is written with tensor ops (``mean``, ``exp(-0.5 * log(var + eps))`` for ``1/sqrt``).
* **Embedding lookup**: minitorch has no gather op, so `Embedding` below is a small `Function` of this script:
  forward takes rows with NumPy, backward scatter-adds the gradient rows (``np.add.at``).
* **Positions are cyclic**: the token at absolute position ``p`` gets positional embedding ``p % context``, and
  training windows start at random phases. That is exactly the slot arithmetic of the ring-buffer KV cache, so
  after training the model generates with a sliding window of ``context`` tokens for as long as we like, and the
  cached keys never need re-embedding.

Training: Adam with warm-up and cosine decay, gradient clipping; a progress bar with loss, tokens/s and ETA; a
held-out validation loss; a loss-curve PNG; a ``.npz`` checkpoint every ``--save-every`` steps (parameters, Adam
moments, step, loss history, the run's settings; also on Ctrl-C / SIGTERM) that ``--resume`` continues from, batch
for batch. Saves are atomic (temporary file, ``fsync``, rename). A fresh run never replaces a checkpoint of another
run, or of this run further along, unless told to (``--overwrite``).

Data parallel (``--data-parallel`` under ``mpiexec -n P``, needs ``pip install 'minitorch[dist]'``): every rank builds
the same model (same seed), takes its ``1/P`` of each step's global batch, and after ``backward`` the gradients are
averaged over the ranks (``minitorch.distributed.allreduce_gradients``), so every rank takes the step the single
process would take on the whole batch: the loss curve is the single-process one to float32 rounding. Only rank 0
writes checkpoints and plots and generates; every rank reads the checkpoint on ``--resume``.

Generation: one token at a time with one ``RingBufferKVCache`` per layer (window = context), reporting tokens/s
against recomputing the whole window for every new token (what a model without a cache does). With ``--paged``
it also generates for a batch of prompts of different lengths at once, with one ``PagedKVCache`` per layer (every
sequence's keys in pages of one shared pool, a decode step attends for all of them in one call), and checks that
every prompt gets the tokens it gets when generated alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import zipfile
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import minitorch  # noqa: E402
from minitorch import Parameter, Tensor  # noqa: E402
from progress import Progress, format_seconds  # noqa: E402

RingBufferKVCache = getattr(minitorch, "RingBufferKVCache", None)  # None: generate without a cache
PagedKVCache = getattr(minitorch, "PagedKVCache", None)  # None: no --paged

DATA_DIR = os.path.join(HERE, "data")
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(HERE), "checkpoints", "run_transformer.npz")
QUICK_CHECKPOINT = os.path.join(os.path.dirname(HERE), "checkpoints", "run_transformer_quick.npz")  # --quick's own
TMP_SUFFIX = ".tmp"
DEFAULT_PLOT = os.path.join(HERE, "outputs", "run_transformer_loss.png")
MODEL_KEYS = ("n_layer", "d_model", "n_head", "context", "tie")
TRAIN_KEYS = ("dtype", "steps", "batch", "lr", "warmup", "clip", "seed")  # with MODEL_KEYS: what defines a run


# =====================================================================================================================
# Data: characters -> integer ids
# =====================================================================================================================


class CharTokenizer:
    """One id per distinct character of the training text."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> np.ndarray:
        return np.array([self.stoi[c] for c in s if c in self.stoi], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def load_texts(paths: Sequence[str]) -> List[str]:
    """The text files (default: every ``project/data/*.txt``)."""
    files = list(paths) or sorted(glob.glob(os.path.join(DATA_DIR, "*.txt")))
    if not files:
        sys.exit(f"no training text: put .txt files in {DATA_DIR} or pass --data")
    return [open(f, encoding="utf-8").read() for f in files]


def split_data(texts: Sequence[str], tok: "CharTokenizer", context: int) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids for training (the first 90% of every text) and validation (the last 10% of every text)."""
    cuts = [int(len(t) * 0.9) for t in texts]
    train = tok.encode("\n\n".join(t[:c] for t, c in zip(texts, cuts)))
    val = tok.encode("\n\n".join(t[c:] for t, c in zip(texts, cuts)))
    if len(val) < 2 * context + 2:  # tiny texts: hold out the end of everything instead
        data = np.concatenate([train, val])
        n_val = min(len(data) // 2, max(len(data) // 10, 4 * context))
        train, val = data[:-n_val], data[-n_val:]
    if len(train) < context + 2 or len(val) < context + 2:
        sys.exit(f"the text is too short for --context {context}")
    return train, val


def get_batch(data: np.ndarray, batch: int, context: int, rng: np.random.Generator
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``batch`` random windows: inputs ``x (B, T)``, next-character targets ``y (B, T)`` and the positional
    indices ``pos (B, T)``, cyclic from a random phase (the token at position p of a stream gets ``p % context``)."""
    starts = rng.integers(0, len(data) - context - 1, size=batch)
    offsets = starts[:, None] + np.arange(context)[None, :]
    phase = rng.integers(0, context, size=batch)
    pos = (phase[:, None] + np.arange(context)[None, :]) % context
    return data[offsets], data[offsets + 1], pos


# =====================================================================================================================
# The one missing op: an embedding lookup (gather) with a scatter-add backward
# =====================================================================================================================


class Embedding(minitorch.Function):
    """``out[..., :] = weight[idx[...], :]``: rows of a table (``idx`` an integer NumPy array, no gradient).

    minitorch has no gather op, so forward and backward run in NumPy on copies (``to_numpy``) and come back as
    tensors of the weight's backend and dtype. Backward adds each gradient row into the row it was read from.
    """

    @staticmethod
    def forward(ctx: minitorch.Context, weight: Tensor, idx: np.ndarray) -> Tensor:
        ctx.save_for_backward(weight.shape, idx)
        return minitorch.from_numpy(weight.to_numpy()[idx], backend=weight.backend)

    @staticmethod
    def backward(ctx: minitorch.Context, grad_output: Tensor) -> Tuple[Tensor, None]:
        shape, idx = ctx.saved_values
        grad = np.zeros(shape, dtype=grad_output.dtype)
        np.add.at(grad, idx.reshape(-1), grad_output.to_numpy().reshape(-1, shape[1]))
        return minitorch.from_numpy(grad, backend=grad_output.backend), None


# =====================================================================================================================
# The model
# =====================================================================================================================


class Config:
    """Model hyperparameters plus where parameters live (backend, dtype)."""

    def __init__(self, vocab_size: int, n_layer: int, d_model: int, n_head: int, context: int, tie: bool,
                 backend: minitorch.TensorBackend, dtype: Any):
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head})")
        self.vocab_size, self.n_layer, self.d_model, self.n_head = vocab_size, n_layer, d_model, n_head
        self.context, self.tie, self.backend, self.dtype = context, tie, backend, np.dtype(dtype)

    def param(self, values: np.ndarray) -> Parameter:
        return Parameter(minitorch.from_numpy(values, backend=self.backend, dtype=self.dtype))

    def as_dict(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in ("vocab_size",) + MODEL_KEYS}


class Linear(minitorch.Module):
    """``x (N, in) @ W (in, out) + b``; weights ~ N(0, std^2), bias zero."""

    def __init__(self, n_in: int, n_out: int, cfg: Config, std: float = 0.02, bias: bool = True):
        super().__init__()
        self.weight = cfg.param(np.random.normal(0.0, std, (n_in, n_out)))
        self.bias = cfg.param(np.zeros(n_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight.value
        return y + self.bias.value if self.bias is not None else y


class LayerNorm(minitorch.Module):
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` over the last dim of ``x (N, d)``."""

    def __init__(self, d: int, cfg: Config, eps: float = 1e-5):
        super().__init__()
        self.gamma = cfg.param(np.ones(d))
        self.beta = cfg.param(np.zeros(d))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xc = x - x.mean(1)
        var = (xc * xc).mean(1)
        inv_std = ((var + self.eps).log() * -0.5).exp()  # 1 / sqrt(var + eps): minitorch has exp and log
        return xc * inv_std * self.gamma.value + self.beta.value


class CausalSelfAttention(minitorch.Module):
    """Multi-head causal self-attention with ``minitorch.flash_attention``."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.head_dim = cfg.n_head, d // cfg.n_head
        self.q, self.k, self.v = Linear(d, d, cfg), Linear(d, d, cfg), Linear(d, d, cfg)
        self.proj = Linear(d, d, cfg, std=0.02 / math.sqrt(2 * cfg.n_layer))  # GPT-2: scaled residual projections

    def heads(self, x: Tensor, B: int, T: int) -> Tensor:
        """``(B*T, d) -> (B, H, T, Dh)``"""
        return x.view(B, T, self.n_head, self.head_dim).permute(0, 2, 1, 3)

    def merge(self, y: Tensor, B: int, T: int) -> Tensor:
        """``(B, H, T, Dh) -> (B*T, d)``"""
        return y.permute(0, 2, 1, 3).contiguous().view(B * T, self.n_head * self.head_dim)

    def forward(self, x: Tensor, B: int, T: int) -> Tensor:
        q, k, v = (self.heads(lin(x), B, T) for lin in (self.q, self.k, self.v))
        y = minitorch.flash_attention(q, k, v, causal=True)  # fused: no (T, T) matrix is ever stored
        return self.proj(self.merge(y, B, T))

    def forward_cached(self, x: Tensor, cache: Any) -> Tensor:
        """The ``T`` newest tokens of one sequence, ``x (T, d)``: append their keys and values to the layer's ring
        buffer, then attend over it (the newest ``context`` tokens)."""
        T = x.shape[0]
        q, k, v = (self.heads(lin(x), 1, T) for lin in (self.q, self.k, self.v))
        cache.append(k, v)
        return self.proj(self.merge(cache.attend(q), 1, T))

    def forward_paged(self, x: Tensor, S: int, T: int, cache: Any, ids: Sequence[int], window: int) -> Tensor:
        """The ``T`` newest tokens of ``S`` sequences, ``x (S*T, d)``: append each sequence's keys and values to
        its pages of the layer's paged cache, then attend for all of them in one call (window = context)."""
        q, k, v = (self.heads(lin(x), S, T) for lin in (self.q, self.k, self.v))
        k_np, v_np = k.contiguous().to_numpy(), v.contiguous().to_numpy()  # (S, H, T, Dh): one (H, T, Dh) each
        for s, sid in enumerate(ids):
            cache.append(sid, k_np[s], v_np[s])
        return self.proj(self.merge(cache.attend(q.contiguous(), ids, window=window), S, T))


class MLP(minitorch.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = Linear(cfg.d_model, 4 * cfg.d_model, cfg)
        self.proj = Linear(4 * cfg.d_model, cfg.d_model, cfg, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.fc(x).relu())


class Block(minitorch.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.ln1, self.attn = LayerNorm(cfg.d_model, cfg), CausalSelfAttention(cfg)
        self.ln2, self.mlp = LayerNorm(cfg.d_model, cfg), MLP(cfg)

    def forward(self, x: Tensor, B: int, T: int) -> Tensor:
        x = x + self.attn(self.ln1(x), B, T)
        return x + self.mlp(self.ln2(x))

    def forward_cached(self, x: Tensor, cache: Any) -> Tensor:
        x = x + self.attn.forward_cached(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))

    def forward_paged(self, x: Tensor, S: int, T: int, cache: Any, ids: Sequence[int], window: int) -> Tensor:
        x = x + self.attn.forward_paged(self.ln1(x), S, T, cache, ids, window)
        return x + self.mlp(self.ln2(x))


class GPT(minitorch.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.wte = cfg.param(np.random.normal(0.0, 0.02, (cfg.vocab_size, cfg.d_model)))  # token embedding
        self.wpe = cfg.param(np.random.normal(0.0, 0.02, (cfg.context, cfg.d_model)))  # positional embedding
        for i in range(cfg.n_layer):  # Module registers attributes, not lists: block0, block1, ...
            setattr(self, f"block{i}", Block(cfg))
        self.ln_f = LayerNorm(cfg.d_model, cfg)
        self.head = None if cfg.tie else Linear(cfg.d_model, cfg.vocab_size, cfg, bias=False)

    def blocks(self) -> List[Block]:
        return [getattr(self, f"block{i}") for i in range(self.cfg.n_layer)]

    def embed(self, idx: np.ndarray, pos: np.ndarray) -> Tensor:
        """``(B, T)`` token ids and positional indices -> ``(B*T, d)``."""
        return Embedding.apply(self.wte.value, idx.reshape(-1)) + Embedding.apply(self.wpe.value, pos.reshape(-1))

    def logits(self, x: Tensor) -> Tensor:
        """``(N, d) -> (N, vocab)``"""
        x = self.ln_f(x)
        if self.head is None:
            return x @ self.wte.value.permute(1, 0)  # weight tying: the output matrix is the embedding
        return self.head(x)

    def forward(self, idx: np.ndarray, pos: np.ndarray) -> Tensor:
        """Logits ``(B*T, vocab)`` for every position of ``idx (B, T)``."""
        B, T = idx.shape
        x = self.embed(idx, pos)
        for block in self.blocks():
            x = block(x, B, T)
        return self.logits(x)

    def forward_cached(self, idx: np.ndarray, start: int, caches: Sequence[Any]) -> Tensor:
        """Logits ``(T, vocab)`` for ``T`` new tokens ``idx (T,)`` at positions ``start..start+T-1`` of one
        sequence whose earlier keys and values are in ``caches`` (one ring buffer per layer)."""
        pos = (start + np.arange(len(idx))) % self.cfg.context
        x = self.embed(np.asarray(idx)[None, :], pos[None, :])
        for block, cache in zip(self.blocks(), caches):
            x = block.forward_cached(x, cache)
        return self.logits(x)

    def forward_paged(self, idx: np.ndarray, starts: np.ndarray, caches: Sequence[Any], ids: Sequence[int]) -> Tensor:
        """Logits ``(S*T, vocab)`` for ``T`` new tokens of each of ``S`` sequences, ``idx (S, T)``, sequence ``s`` at
        positions ``starts[s] .. starts[s]+T-1``, its earlier keys and values in pages of ``caches`` (one paged
        cache per layer, the sequences named by ``ids``)."""
        S, T = idx.shape
        pos = (np.asarray(starts)[:, None] + np.arange(T)[None, :]) % self.cfg.context
        x = self.embed(idx, pos)
        for block, cache in zip(self.blocks(), caches):
            x = block.forward_paged(x, S, T, cache, ids, self.cfg.context)
        return self.logits(x)

    def new_paged_caches(self, num_pages: int, page_size: int = 16) -> List[Any]:
        """One paged KV cache per layer, ``num_pages`` pages of ``page_size`` tokens shared by all sequences."""
        c = self.cfg
        return [PagedKVCache(c.n_head, c.d_model // c.n_head, page_size=page_size, num_pages=num_pages,
                             backend=c.backend, dtype=c.dtype) for _ in range(c.n_layer)]

    def new_caches(self) -> List[Any]:
        """One ring-buffer KV cache per layer; the window is the training context."""
        c = self.cfg
        return [RingBufferKVCache(1, c.n_head, c.d_model // c.n_head, c.context, backend=c.backend, dtype=c.dtype)
                for _ in range(c.n_layer)]


def cross_entropy(logits: Tensor, targets: np.ndarray) -> Tensor:
    """Mean of ``-log softmax(logits)[target]`` over the ``N`` rows of ``logits (N, V)``; shape ``(1,)``."""
    N, V = logits.shape
    onehot = np.zeros((N, V), dtype=logits.dtype)
    onehot[np.arange(N), targets.reshape(-1)] = 1.0
    picked = minitorch.logsoftmax(logits, 1) * minitorch.from_numpy(onehot, backend=logits.backend)
    return -picked.sum() / float(N)


@contextmanager
def no_grad(model: minitorch.Module) -> Iterator[None]:
    """Evaluate without recording a graph: the parameters are constants inside the block."""
    values = [p.value for p in model.parameters()]
    for v in values:
        v.requires_grad_(False)
    try:
        yield
    finally:
        for v in values:
            v.requires_grad_(True)


# =====================================================================================================================
# Checkpoints: parameters, Adam moments and the training history in one .npz
# =====================================================================================================================


class CheckpointError(Exception):
    """A checkpoint file that cannot be read (empty, truncated, or not written by this script)."""


def save_checkpoint(path: str, model: GPT, opt: minitorch.Adam, tok: CharTokenizer, state: Dict[str, Any],
                    train_config: Dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, flushed to disk (``fsync``), then renamed over
    ``path`` (``os.replace`` is atomic), so a crash or a full disk mid-save never corrupts the checkpoint."""
    arrays: Dict[str, np.ndarray] = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        arrays[f"param/{name}"] = p.value.to_numpy()
        st = opt.state.get(i)
        if st is not None:
            arrays[f"adam_m/{name}"], arrays[f"adam_v/{name}"] = st["m"], st["v"]
            arrays[f"adam_step/{name}"] = np.array(st["step"])
    meta = dict(state, model=model.cfg.as_dict(), chars=tok.chars, train=train_config)
    arrays["meta"] = np.array(json.dumps(meta))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable (POSIX: sync the folder's entry); not possible everywhere
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(path: str) -> List[str]:
    """Delete the temporary files that interrupted saves of ``path`` left behind (``<name>.<random>.tmp``)."""
    pattern = os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                           glob.escape(os.path.basename(path)) + ".*" + TMP_SUFFIX)
    stale = sorted(glob.glob(pattern))
    for f in stale:
        os.remove(f)
    return stale


def read_checkpoint(path: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a checkpoint; `CheckpointError` if the file is empty, truncated or foreign."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, AttributeError) as err:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        what = "it is empty" if size == 0 else f"{size:,} bytes that are not a complete checkpoint"
        raise CheckpointError(f"{path}: cannot read the checkpoint ({what}: {type(err).__name__}: {err}); it is "
                              "truncated, empty or not written by this script") from None
    return meta, arrays


def train_config(args: argparse.Namespace) -> Dict[str, Any]:
    """The training settings that, with the model's, define a run (saved in the checkpoint's meta)."""
    return {k: getattr(args, k) for k in TRAIN_KEYS}


def run_differences(meta: Dict[str, Any], args: argparse.Namespace, tok: CharTokenizer) -> List[str]:
    """How the run saved in a checkpoint's ``meta`` differs from this one (empty: the same run)."""
    saved = dict(meta.get("train", {}), **meta.get("model", {}))
    diffs = [f"{k} {saved.get(k)} there, {getattr(args, k)} here" for k in MODEL_KEYS + TRAIN_KEYS
             if saved.get(k) != getattr(args, k)]
    if meta.get("chars") != tok.chars:
        diffs.append("another training text")
    return diffs


def last_step(args: argparse.Namespace, start: int) -> int:
    """The step this invocation stops at when it starts at ``start`` (``--steps``, or earlier with --stop-after)."""
    return args.steps if not args.stop_after else min(args.steps, start + args.stop_after)


def guard_checkpoint(args: argparse.Namespace, tok: CharTokenizer) -> int:
    """Before a fresh run (no ``--resume``) saves to ``--checkpoint``: never replace, without ``--overwrite``, a
    checkpoint that cannot be read, that holds a different run, or that is further along than this run will get.

    Returns the step below which this run must not save: the step of a checkpoint of this same run (0 if none),
    which it reproduces exactly (the batch of a step depends only on (seed, step)) before replacing it.
    """
    path = args.checkpoint
    if args.overwrite or not os.path.exists(path):
        return 0
    how = "--resume continues it, --overwrite replaces it, --checkpoint PATH writes elsewhere"
    try:
        meta, _ = read_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}. Not replacing it: --overwrite does, --checkpoint PATH writes elsewhere"
                              ) from None
    diffs = run_differences(meta, args, tok)
    if diffs:
        raise CheckpointError(f"{path} holds a different run ({'; '.join(diffs)}): not replacing it. {how}")
    step, stop = int(meta.get("step", 0)), last_step(args, 0)
    if step > stop:
        raise CheckpointError(f"{path} holds this run at step {step}, further than this run goes (step {stop}): "
                              f"not replacing it. {how}")
    if step:
        print(f"note: {path} holds this same run at step {step}: starting from scratch all the same (--resume "
              f"would continue it); it is replaced once this run reaches step {step}")
    return step


def restore(model: GPT, opt: minitorch.Adam, arrays: Dict[str, np.ndarray]) -> None:
    """Load parameter values and Adam moments saved by `save_checkpoint` into ``model`` and ``opt``."""
    cfg = model.cfg
    for i, (name, p) in enumerate(model.named_parameters()):
        p.update(minitorch.from_numpy(arrays[f"param/{name}"], backend=cfg.backend, dtype=cfg.dtype))
        if f"adam_m/{name}" in arrays:
            opt.state[i] = {"step": int(arrays[f"adam_step/{name}"]), "m": arrays[f"adam_m/{name}"].astype(cfg.dtype),
                            "v": arrays[f"adam_v/{name}"].astype(cfg.dtype)}


# =====================================================================================================================
# Training
# =====================================================================================================================


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to ``lr / 10`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0))))


def clip_gradients(params: Sequence[Parameter], max_norm: float) -> float:
    """Scale all gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    grads = [p.value.grad for p in params if p.value.grad is not None]
    norm = math.sqrt(sum(float(np.sum(np.square(g.to_numpy(), dtype=np.float64))) for g in grads))
    if max_norm > 0 and norm > max_norm:
        for p in params:
            if p.value.grad is not None:
                p.value.grad = p.value.grad * (max_norm / (norm + 1e-6))
    return norm


def evaluate(model: GPT, data: np.ndarray, args: argparse.Namespace) -> float:
    """Mean loss over ``--eval-batches`` fixed batches of ``data`` (the same ones every time)."""
    rng = np.random.default_rng([args.seed, 10**6])
    losses = []
    with no_grad(model):
        for _ in range(args.eval_batches):
            x, y, pos = get_batch(data, args.batch, model.cfg.context, rng)
            losses.append(cross_entropy(model(x, pos), y).item())
    return float(np.mean(losses))


def plot_losses(path: str, history: Dict[str, Any], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(history["train"]) + 1)
    train = np.asarray(history["train"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, train, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
    if len(train) >= 10:
        k = max(5, len(train) // 40)
        smooth = np.convolve(train, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=1.8, label=f"train (mean of {k})")
    if history["val"]:
        vs, vl = zip(*history["val"])
        ax.plot(vs, vl, "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    ax.axhline(math.log(history.get("vocab_size", 1) or 1), color="gray", ls=":", lw=1, label="uniform guess")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def train(args: argparse.Namespace, model: GPT, opt: minitorch.Adam, tok: CharTokenizer, train_data: np.ndarray,
          val_data: np.ndarray, state: Dict[str, Any], keep_until: int = 0) -> Dict[str, Any]:
    """Run steps ``state["step"] .. args.steps - 1``. The batch of step ``s`` is drawn from a generator seeded with
    ``(seed, s)``, so a resumed run sees exactly the batches the uninterrupted one would have.

    Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes the checkpoint and returns: a step is never half
    applied. A second Ctrl-C quits at once (the last periodic checkpoint stays valid). Saves before step
    ``keep_until`` are skipped: they would replace a checkpoint further along (see `guard_checkpoint`).
    """
    cfg = model.cfg
    params = model.parameters()
    if args.comm is not None:
        from minitorch.distributed import allreduce_gradients
    tokens_per_step = args.batch * cfg.context
    bar = Progress(args.steps, desc="train", initial=state["step"], log_every=args.log_every)
    save = bool(args.checkpoint) and not args.no_save

    def checkpoint(reason: str) -> None:
        if not save or args.rank != 0:  # data parallel: the ranks hold the same state; rank 0 writes it
            return
        if state["step"] < keep_until:
            bar.write(f"[checkpoint] step {state['step']} ({reason}) not saved: {args.checkpoint} is at step "
                      f"{keep_until}")
            return
        save_checkpoint(args.checkpoint, model, opt, tok, state, train_config(args))
        bar.write(f"[checkpoint] step {state['step']} ({reason}) -> {args.checkpoint}")

    stop: Dict[str, Any] = {"signal": None}

    def request_stop(signum: int, frame: Any) -> None:
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum
        bar.write("stopping after this step (Ctrl-C again to quit at once) ...")

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers only work in the main thread
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    t_run = time.perf_counter()
    last = last_step(args, state["step"])
    try:
        while state["step"] < last:
            step = state["step"]
            t0 = time.perf_counter()
            x, y, pos = get_batch(train_data, args.batch, cfg.context, np.random.default_rng([args.seed, step]))
            if args.comm is not None:  # data parallel: this rank's equal share of the global batch
                share = slice(args.rank * args.batch // args.world, (args.rank + 1) * args.batch // args.world)
                x, y, pos = x[share], y[share], pos[share]
            opt.lr = lr_at(step, args)
            opt.zero_grad()
            loss = cross_entropy(model(x, pos), y)
            loss.backward()
            if args.comm is not None:  # mean of the ranks' mean-loss gradients = gradient of the global mean loss
                allreduce_gradients(model, args.comm)
            clip_gradients(params, args.clip)
            opt.step()
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["tokens"] += tokens_per_step
            state["train_seconds"] += dt
            state["history"]["train"].append(
                loss.item() if args.comm is None else args.comm.allreduce(loss.item()) / args.world)
            metrics = {"loss": state["history"]["train"][-1], "tok/s": round(tokens_per_step / dt)}
            if args.eval_every and (state["step"] % args.eval_every == 0 or state["step"] == args.steps):
                state["history"]["val"].append((state["step"], evaluate(model, val_data, args)))
            if state["history"]["val"]:
                metrics["val"] = state["history"]["val"][-1][1]
            bar.update(**metrics)
            if args.comm is not None:  # data parallel: stop together, at the same step
                stop["signal"] = stop["signal"] if args.comm.allreduce(stop["signal"] is not None) else None
            if stop["signal"] is not None:
                state["interrupted"] = True
                break
            if args.save_every and state["step"] % args.save_every == 0 and state["step"] < args.steps:
                checkpoint("periodic")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        bar.close()
    state["wall_seconds"] = state.get("wall_seconds", 0.0) + time.perf_counter() - t_run
    if state.get("interrupted"):
        checkpoint("interrupted")
        print(f"stopped at step {state['step']}; continue with --resume")
    else:
        checkpoint("final" if state["step"] >= args.steps else "--stop-after")
    return state


# =====================================================================================================================
# Generation: with the ring-buffer KV cache, and by recomputing the window
# =====================================================================================================================


def sample(logits: np.ndarray, temperature: float, u: float) -> int:
    """A token from ``softmax(logits / temperature)`` by inverting the CDF at ``u`` (greedy if temperature 0)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    cdf = np.cumsum(p / p.sum())
    return int(min(np.searchsorted(cdf, u), len(cdf) - 1))


def generate(model: GPT, prompt: np.ndarray, n_new: int, temperature: float, seed: int, use_cache: bool
             ) -> Tuple[List[int], float, List[np.ndarray]]:
    """Generate ``n_new`` tokens after ``prompt``; returns the ids, the tokens/s of the new tokens (prefill
    excluded) and the logits used for each new token.

    With the cache: the prompt is prefilled into one ring buffer per layer, then every new token runs through the
    model alone, attending over its layer's cache (the newest ``context`` keys and values, read in place).
    Without: every new token re-runs the model on the whole window of the last ``context`` tokens.
    """
    C = model.cfg.context
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in prompt[-C:]]
    all_logits: List[np.ndarray] = []
    with no_grad(model):
        if use_cache:
            caches = model.new_caches()
            logits = model.forward_cached(np.array(ids), 0, caches).to_numpy()[-1]
        t0 = time.perf_counter()
        for i in range(n_new):
            if not use_cache:
                window = np.array(ids[-C:])
                start = len(ids) - len(window)
                logits = model(window[None, :], ((start + np.arange(len(window))) % C)[None, :]).to_numpy()[-1]
            all_logits.append(logits)
            ids.append(sample(logits, temperature, rng.random()))
            if use_cache and i + 1 < n_new:
                logits = model.forward_cached(np.array(ids[-1:]), len(ids) - 1, caches).to_numpy()[-1]
        seconds = time.perf_counter() - t0
    return ids, n_new / max(seconds, 1e-9), all_logits


def generate_paged(model: GPT, prompts: Sequence[np.ndarray], n_new: int, temperature: float, seed: int,
                   page_size: int = 16) -> Tuple[List[List[int]], float, Dict[str, int], List[List[np.ndarray]]]:
    """Generate ``n_new`` tokens after each of ``prompts`` (of different lengths) at once, with paged KV caches.

    Each prompt is prefilled into its own sequence of the shared pools; then every step runs the model once for
    the newest token of every sequence (``S`` rows), attending over each one's own pages in one call. Sequence
    ``s`` samples with its own generator seeded as :func:`generate` seeds it, so it gets the tokens it would get
    alone. Returns the ids of every sequence, the tokens/s of the batched steps, the pool's page counts and the
    logits every sequence sampled from.
    """
    C = model.cfg.context
    seqs = [[int(t) for t in p[-C:]] for p in prompts]
    S = len(seqs)
    num_pages = sum(-(-(len(s) + n_new) // page_size) for s in seqs)
    caches = model.new_paged_caches(num_pages, page_size)
    rngs = [np.random.default_rng(seed) for _ in range(S)]
    used: List[List[np.ndarray]] = [[] for _ in range(S)]
    with no_grad(model):
        ids = [caches[0].add_sequence() for _ in range(S)]
        for cache in caches[1:]:
            assert [cache.add_sequence() for _ in range(S)] == ids  # the same ids in every layer
        logits = np.stack([model.forward_paged(np.array([s]), np.array([0]), caches, [sid]).to_numpy()[-1]
                           for s, sid in zip(seqs, ids)])  # prefill, one prompt at a time (their own lengths)
        t0 = time.perf_counter()
        for i in range(n_new):
            for s in range(S):
                used[s].append(logits[s])
                seqs[s].append(sample(logits[s], temperature, rngs[s].random()))
            if i + 1 < n_new:  # one step for all sequences: the newest token of each, at its own position
                new = np.array([[s[-1]] for s in seqs])
                starts = np.array([len(s) - 1 for s in seqs])
                logits = model.forward_paged(new, starts, caches, ids).to_numpy()
        seconds = time.perf_counter() - t0
    pages = {"pages_in_use": caches[0].pages_in_use, "num_pages": num_pages, "page_size": page_size}
    return seqs, S * n_new / max(seconds, 1e-9), pages, used


def run_paged_generation(model: GPT, tok: CharTokenizer, args: argparse.Namespace) -> Dict[str, Any]:
    """``--paged``: generate for a batch of prompts of different lengths with paged caches, and for each prompt
    alone with its ring-buffer cache; the tokens must be the same."""
    prompts = [tok.encode(p) for p in args.paged_prompts]
    prompts = [p if len(p) else np.array([0]) for p in prompts]
    n = args.gen_tokens
    generate_paged(model, prompts, min(n, 2), args.temperature, args.seed)  # untimed: compiles the kernels
    seqs, tps, pages, logits = generate_paged(model, prompts, n, args.temperature, args.seed)
    alone = [generate(model, p, n, args.temperature, args.seed, use_cache=True) for p in prompts]
    same = [a[0] == b for a, b in zip(alone, seqs)]
    diff = max(float(np.max(np.abs(x - y))) for a, b in zip(alone, logits) for x, y in zip(a[2], b))
    out = {"texts": [tok.decode(s) for s in seqs], "same_tokens": all(same), "max_logit_diff": diff,
           "tokens_per_s": tps, **pages}
    print(f"\n--- {len(prompts)} prompts generated together with the paged KV cache ({tps:.1f} tokens/s, "
          f"{pages['pages_in_use']} pages of {pages['page_size']} tokens per layer; max |logit difference| from "
          f"generating alone {diff:.2e}) ---")
    for text, ok in zip(out["texts"], same):
        print(f"[{'same as alone' if ok else 'DIFFERENT from alone'}] {text!r}")
    return out


def run_generation(model: GPT, tok: CharTokenizer, args: argparse.Namespace) -> Dict[str, Any]:
    prompt = tok.encode(args.prompt) if args.prompt else np.array([0])
    if len(prompt) == 0:
        prompt = np.array([0])
    out: Dict[str, Any] = {}
    n_plain = min(args.gen_tokens, args.gen_tokens_recompute)
    modes = {True: args.gen_tokens, False: n_plain} if RingBufferKVCache is not None else {False: n_plain}
    # Warm-up, untimed: the first calls of a kernel variant compile it (seconds), which must not be timed as
    # generation speed. Past `context` tokens every step looks alike (the cache has wrapped, the window is full),
    # so `context + 2` tokens reach every variant the timed runs use.
    for use_cache, n in modes.items():
        generate(model, prompt, min(n, model.cfg.context + 2), args.temperature, args.seed, use_cache=use_cache)
    out["timing"] = "warm, after an untimed pass that compiled the kernels"
    if RingBufferKVCache is None:
        print("RingBufferKVCache is not available: generating without a cache only")
    else:
        ids, tps, logits_c = generate(model, prompt, args.gen_tokens, args.temperature, args.seed, use_cache=True)
        out.update(cached_tokens_per_s=tps, text=tok.decode(ids))
        print(f"\n--- generated with the ring-buffer KV cache ({tps:.1f} tokens/s) ---\n{out['text']}\n---")
    ids2, tps2, logits_r = generate(model, prompt, n_plain, args.temperature, args.seed, use_cache=False)
    out.update(recompute_tokens_per_s=tps2, recompute_tokens=n_plain)
    if "text" not in out:
        out["text"] = tok.decode(ids2)
        print(f"\n--- generated ---\n{out['text']}\n---")
    else:
        # Within the first `context` tokens both see exactly the same keys: logits must agree to rounding. Later the
        # cache's deeper layers still carry information from beyond the window (a sliding-window model's receptive
        # field grows with depth) while recomputing forgets it, so the two may drift apart.
        n_same = max(0, min(n_plain, model.cfg.context - len(prompt[-model.cfg.context:])))
        diffs = [float(np.max(np.abs(a - b))) for a, b in zip(logits_c[:n_same], logits_r[:n_same])]
        out["max_logit_diff_within_context"] = max(diffs) if diffs else 0.0
        out["speedup"] = out["cached_tokens_per_s"] / tps2
        print(f"tokens/s ({out['timing']}): {out['cached_tokens_per_s']:.1f} with the KV cache, {tps2:.1f} "
              f"recomputing the {model.cfg.context}-token window ({n_plain} tokens): {out['speedup']:.1f}x; max "
              f"|logit difference| over the first {n_same} tokens: {out['max_logit_diff_within_context']:.2e}")
    if args.paged and PagedKVCache is None:
        print("PagedKVCache is not available: no --paged generation")
    elif args.paged:
        out["paged"] = run_paged_generation(model, tok, args)
    return out


# =====================================================================================================================
# Command line
# =====================================================================================================================


# --quick: a tiny model for a few steps; these replace the defaults, so options given explicitly still win
QUICK_DEFAULTS: Dict[str, Any] = dict(n_layer=1, d_model=32, n_head=2, context=32, steps=40, batch=8, warmup=5,
                                      eval_every=20, save_every=20, eval_batches=2, gen_tokens=40,
                                      gen_tokens_recompute=20)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to an option's help, except for flags (``--no-save``: off unless given) and
    options whose help already says ``(default: ...)`` in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    rel = lambda path: os.path.relpath(path, os.path.dirname(HERE))  # noqa: E731  (paths as the README writes them)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--backend", choices=["fast", "cuda", "simple"], default="fast",
                   help="fast: Numba CPU; cuda: Numba CUDA (GPU); simple: pure Python (only for --quick sizes)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter and activation dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="Numba CPU threads (0: Numba's default). A tiny model's tensors are small (~1e5 elements): "
                        "on an idle 2-core machine 1 and 2 threads train equally fast (~7,000 tokens/s), on a busy one "
                        "the fork-join of Numba's parallel loops makes 2 threads several times slower")
    p.add_argument("--data", nargs="*", default=[], metavar="FILE",
                   help="training text files (default: every project/data/*.txt)")
    m = p.add_argument_group("model")
    m.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    m.add_argument("--d-model", type=int, default=64, help="embedding width")
    m.add_argument("--n-head", type=int, default=4, help="attention heads (must divide --d-model)")
    m.add_argument("--context", type=int, default=64, help="tokens per training window = KV-cache window")
    m.add_argument("--no-tie", dest="tie", action="store_false",
                   help="give the output layer its own matrix (without it, the default, the output matrix is the "
                        "token embedding transposed: weight tying)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1200, help="total optimizer steps (a resumed run continues to it)")
    t.add_argument("--batch", type=int, default=16, help="windows per step")
    t.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate (warm-up, then cosine to lr/10)")
    t.add_argument("--warmup", type=int, default=30, help="linear learning-rate warm-up steps")
    t.add_argument("--clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    t.add_argument("--seed", type=int, default=1337, help="initialisation and batches (step s uses (seed, s))")
    t.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (0: never)")
    t.add_argument("--eval-batches", type=int, default=4, help="batches per validation loss")
    t.add_argument("--log-every", type=int, default=None,
                   help="steps between progress lines when the output is not a terminal (default: 1/20 of the run)")
    t.add_argument("--stop-after", type=int, default=0,
                   help="train at most this many steps in this invocation, checkpoint and exit (0: no limit); "
                        "--resume continues (time-sliced training)")
    c = p.add_argument_group("checkpoints and outputs")
    c.add_argument("--checkpoint", default=None, metavar="PATH",
                   help=f"the .npz written every --save-every steps (default: {rel(DEFAULT_CHECKPOINT)}; with --quick "
                        f"{rel(QUICK_CHECKPOINT)})")
    c.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    c.add_argument("--no-save", action="store_true", help="write no checkpoint")
    c.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint (the model settings and seed come from it); a finished run "
                        "only samples")
    c.add_argument("--overwrite", action="store_true",
                   help="let a fresh run replace a --checkpoint that holds a different run, one further along, or "
                        "an unreadable file (without it such a run stops before training)")
    c.add_argument("--plot", default=DEFAULT_PLOT, metavar="PATH",
                   help=f"loss-curve PNG, '' for none (default: {rel(DEFAULT_PLOT)})")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default="Alice ", help="text the generation starts from (default: 'Alice ')")
    g.add_argument("--gen-tokens", type=int, default=300, help="tokens to generate with the KV cache (0: none)")
    g.add_argument("--gen-tokens-recompute", type=int, default=100,
                   help="of those, how many to time without the cache (recomputing the window)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    g.add_argument("--paged", action="store_true",
                   help="also generate for a batch of prompts of different lengths at once with the paged KV cache, "
                        "and check each gets the tokens it gets alone")
    g.add_argument("--paged-prompts", nargs="+", default=["Alice ", "The Queen said, ", "W"], metavar="TEXT",
                   help="the prompts of --paged")
    p.add_argument("--data-parallel", action="store_true",
                   help="run under mpiexec -n P: split each step's batch over the P ranks and average the gradients "
                        "(needs mpi4py: pip install 'minitorch[dist]'); --batch must be a multiple of P")
    p.add_argument("--quick", action="store_true",
                   help="smoke test (tests/test_project.py): a tiny model for a few steps, the loss must fall. Sets "
                        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK_DEFAULTS.items())
                        + " unless given, and its own --checkpoint")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.comm, args.rank, args.world = None, 0, 1  # main() starts MPI for --data-parallel
    if args.quick:  # parse again with --quick's defaults: options given explicitly still win
        p.set_defaults(**QUICK_DEFAULTS)
        args = p.parse_args(argv)
        args.comm, args.rank, args.world = None, 0, 1
    if args.checkpoint is None:
        args.checkpoint = QUICK_CHECKPOINT if args.quick else DEFAULT_CHECKPOINT
    return args


def get_backend(name: str) -> minitorch.TensorBackend:
    if name == "cuda":
        from numba import cuda

        if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" and not cuda.is_available():
            sys.exit("--backend cuda: no CUDA GPU found")
        return minitorch.CudaBackend
    return {"fast": minitorch.FastTensorBackend, "simple": minitorch.SimpleBackend}[name]


def start_data_parallel(args: argparse.Namespace) -> Tuple[Any, int, int]:
    """``(comm, rank, world size)`` with ``--data-parallel``, else ``(None, 0, 1)``. Ranks other than 0 print nothing,
    and an exception on any rank aborts them all (instead of leaving the others waiting in an all-reduce)."""
    if not args.data_parallel:
        return None, 0, 1
    from minitorch.distributed import MPI, abort_on_exception

    abort_on_exception()
    comm = MPI.COMM_WORLD
    if args.batch % comm.Get_size():
        sys.exit(f"--data-parallel: --batch {args.batch} must be a multiple of the {comm.Get_size()} ranks")
    if comm.Get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return comm, comm.Get_rank(), comm.Get_size()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train (or resume), plot, generate. Returns a summary (losses, timings, generation) for tests."""
    args = parse_args(argv)
    backend = get_backend(args.backend)
    args.comm, args.rank, args.world = start_data_parallel(args)
    import numba

    threads_before = numba.get_num_threads()
    if args.threads > 0:
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return _run(args, backend)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    finally:
        numba.set_num_threads(threads_before)  # main() may run in-process (tests): leave Numba as it was


def _run(args: argparse.Namespace, backend: minitorch.TensorBackend) -> Dict[str, Any]:
    texts = load_texts(args.data)
    state: Dict[str, Any] = {"step": 0, "tokens": 0, "train_seconds": 0.0, "history": {"train": [], "val": []},
                             "seed": args.seed}
    arrays = None
    tok = CharTokenizer.from_text("".join(texts))
    save = bool(args.checkpoint) and not args.no_save
    if save:
        for stale in remove_stale_temp_files(args.checkpoint):
            print(f"removed {stale}: the temporary file of an interrupted save")
    keep_until = 0
    if args.resume and not os.path.exists(args.checkpoint):
        print(f"--resume: no checkpoint at {args.checkpoint}; starting from scratch")
    elif args.resume:
        meta, arrays = read_checkpoint(args.checkpoint)
        tok = CharTokenizer(meta["chars"])  # the ids the checkpoint was trained with
        for key in MODEL_KEYS:  # the checkpoint decides the model
            if getattr(args, key) != meta["model"][key]:
                print(f"--resume: {key} = {meta['model'][key]} from the checkpoint (not {getattr(args, key)})")
            setattr(args, key, meta["model"][key])
        state.update({k: meta[k] for k in ("step", "tokens", "train_seconds", "history", "wall_seconds") if k in meta})
        state["history"]["val"] = [tuple(v) for v in state["history"]["val"]]
        if meta.get("seed", args.seed) != args.seed:
            print(f"--resume: seed {meta['seed']} from the checkpoint (not {args.seed}), for the same batches")
            args.seed = state["seed"] = meta["seed"]
        if state["step"] >= args.steps:
            print(f"--resume: {args.checkpoint} is a finished run (step {state['step']} of {args.steps}): nothing to "
                  "train, sampling only (a larger --steps trains further)")
    if save and not args.resume:
        keep_until = guard_checkpoint(args, tok)
    train_data, val_data = split_data(texts, tok, args.context)

    np.random.seed(args.seed)  # parameter initialisation
    cfg = Config(tok.vocab_size, args.n_layer, args.d_model, args.n_head, args.context, args.tie, backend, args.dtype)
    model = GPT(cfg)
    opt = minitorch.Adam(model.parameters(), lr=args.lr)
    if arrays is not None:
        restore(model, opt, arrays)
        print(f"resumed from {args.checkpoint} at step {state['step']} ({state['tokens']} tokens seen)")
    n_params = sum(p.value.size for p in model.parameters())
    print(f"GPT: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {cfg.context}, "
          f"vocab {cfg.vocab_size}, {n_params:,} parameters, {args.backend} backend, {cfg.dtype.name}; "
          f"{len(train_data):,} training / {len(val_data):,} validation characters; "
          f"{args.steps} steps of {args.batch} x {cfg.context} tokens")
    if state["step"] == 0 and args.eval_every:
        state["history"]["val"].append((0, evaluate(model, val_data, args)))

    if state["step"] < args.steps:
        state = train(args, model, opt, tok, train_data, val_data, state, keep_until)
    hist = state["history"]["train"]
    summary: Dict[str, Any] = {"steps": state["step"], "train_losses": hist, "val_losses": state["history"]["val"],
                               "train_seconds": state["train_seconds"], "tokens": state["tokens"],
                               "n_params": n_params, "interrupted": bool(state.get("interrupted"))}
    if hist:
        k = min(10, max(1, len(hist) // 4))
        summary["initial_loss"], summary["final_loss"] = float(np.mean(hist[:k])), float(np.mean(hist[-k:]))
        rate = state["tokens"] / max(state["train_seconds"], 1e-9)
        print(f"loss {summary['initial_loss']:.3f} -> {summary['final_loss']:.3f} (means of the first/last {k} "
              f"steps; uniform guess {math.log(cfg.vocab_size):.3f}); {state['tokens']:,} tokens in "
              f"{format_seconds(state['train_seconds'])} of steps ({rate:,.0f} tokens/s)")
        if args.plot and args.rank == 0:
            plot_losses(args.plot, dict(state["history"], vocab_size=cfg.vocab_size),
                        f"char-level GPT ({cfg.n_layer}x{cfg.d_model}, {cfg.n_head} heads, ctx {cfg.context}), "
                        f"{args.backend} backend")
            summary["plot"] = args.plot
            print(f"loss curve: {args.plot}")
    if args.gen_tokens > 0 and state["step"] >= args.steps and not state.get("interrupted") and args.rank == 0:
        summary["generation"] = run_generation(model, tok, args)
    return summary


if __name__ == "__main__":
    main()
