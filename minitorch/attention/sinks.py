"""Learnable attention sinks (gpt-oss): one more term in every row's softmax, with no value.

With a sink logit ``sinks[h]`` per query head, row ``i``'s probabilities are ``P_ij = exp(s_ij - lse_i)`` with
``lse_i = log(sum_j exp(s_ij) + exp(sinks[h]))``, and the sink takes the rest, ``P_sink_i = exp(sinks[h] - lse_i)``.
The output ``O_i = sum_j P_ij V_j`` is pulled towards 0 by the sink's share; a row that sees no key outputs 0 with
``lse = sinks[h]`` (finite).

In the engines the sink is where the online softmax starts, ``(m, l) = (sinks[h], 1)``: nothing else changes in
the forward. In the backward, the sink is one more column of ``dS`` with ``dP = 0``::

    dS_sink_i  = -P_sink_i delta_i,        delta_i = rowsum(dO_i O_i) - dlse_i
    d sinks[h] = sum over (b, i) of dS_sink_i = -sum_(b, i) P_sink_i delta_i

This module holds the two host-array (NumPy) formulas the Simple and CPU engines share; the CUDA engine computes
the same on the device.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def sink_probs(lse: np.ndarray, sinks: Any) -> Any:
    """``P_sink (B, H, Nq)``: each row's probability of its head's sink (0 without sinks: the scalar 0)."""
    if sinks is None:
        return lse.dtype.type(0)
    return np.exp(np.asarray(sinks, dtype=lse.dtype)[None, :, None] - lse)


def sinks_backward(out: np.ndarray, lse: np.ndarray, dout: Optional[np.ndarray], dlse: Optional[np.ndarray],
                   sinks: Any) -> np.ndarray:
    """``d sinks (H,)`` of ``sum(out * dout) + sum(lse * dlse)``: ``-sum_(b, i) P_sink delta`` (module docstring)."""
    delta = np.zeros(lse.shape, lse.dtype) if dout is None else (dout * out).sum(axis=-1, dtype=lse.dtype)
    if dlse is not None:
        delta = delta - dlse
    return -(sink_probs(lse, sinks) * delta).sum(axis=(0, 2), dtype=lse.dtype)
