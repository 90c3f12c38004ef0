"""The MPI side of :mod:`minitorch.distributed`: the communicator, argument checks every rank agrees on, and
aborting all ranks when one fails.

MPI (through ``mpi4py``) is the only transport. Everything here is collective: every rank of the communicator must
make the same call, in the same order.
"""

from __future__ import annotations

import sys
import time
import traceback
from types import TracebackType
from typing import Any, List, Optional, Type

try:
    from mpi4py import MPI
except ImportError as err:  # pragma: no cover - exercised in a subprocess by tests/test_distributed.py
    raise ImportError(
        "minitorch.distributed needs mpi4py and an MPI library; install them with "
        "pip install 'minitorch[dist]' (that is: pip install mpi4py mpich). "
        f"The import failed with: {err}"
    ) from err

__all__ = ["MPI", "get_comm", "agree", "abort_on_exception"]

ABORT_GRACE_S = 0.5  # seconds between printing a failing rank's traceback and MPI_Abort

# Errors that a failed check re-raises on every rank; anything else becomes a RuntimeError.
_KINDS = {"ValueError": ValueError, "TypeError": TypeError}


def get_comm(comm: Any = None) -> "MPI.Comm":
    """``comm``, or ``MPI.COMM_WORLD`` when it is None; a ``TypeError`` for anything that is not a communicator."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py communicator (MPI.Comm) or None, got {type(comm).__name__}")
    return comm


def agree(comm: "MPI.Comm", error: Optional[BaseException], info: Any) -> List[Any]:
    """Share every rank's local check: ``info`` from each rank (an ``allgather``), or the same error on all of them.

    A rank whose own arguments are wrong cannot simply raise: its peers would wait for it forever inside the next
    message. So each rank passes its error (or None) here; if any rank has one, every rank raises it, named by
    rank, and the call fails cleanly everywhere.
    """
    mine = None if error is None else (type(error).__name__, str(error))
    gathered = comm.allgather((mine, info))
    for rank, (err, _) in enumerate(gathered):
        if err is not None:
            kind, message = err
            raise _KINDS.get(kind, RuntimeError)(f"rank {rank} of {len(gathered)}: {message}")
    return [info for _, info in gathered]


def abort_on_exception(comm: Any = None) -> None:
    """Make an uncaught exception on this rank abort every rank of ``comm`` (``MPI_Abort``), so ``mpiexec`` exits
    non-zero instead of hanging while the other ranks wait for a message that never comes.

    Installs a ``sys.excepthook`` that prints the traceback, then calls ``comm.Abort(1)``. Call it at the top of an
    MPI program (the demo, the benchmark and ``run_transformer.py --data-parallel`` do). ``python -m mpi4py
    script.py`` gives the same protection to a script that does not call it.
    """
    comm = get_comm(comm)
    previous = sys.excepthook

    def hook(kind: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
        if comm.Get_size() == 1:  # nobody is waiting for this rank
            previous(kind, value, tb)
            return
        try:
            sys.stderr.write(f"[rank {comm.Get_rank()} of {comm.Get_size()}] uncaught exception, aborting all ranks:\n")
            traceback.print_exception(kind, value, tb)
            sys.stderr.flush()
            sys.stdout.flush()
            time.sleep(ABORT_GRACE_S)  # let mpiexec forward the message before it kills every rank
        finally:
            comm.Abort(1)

    sys.excepthook = hook
