"""Stopping early and cleanly: on a signal (SLURM's warning before a time limit or
preemption, Ctrl-C) or when the run's wall-clock budget is spent.

A handler only sets a flag; the training loop asks :meth:`StopFlag.should_stop`
at step boundaries, where all ranks agree (one all-reduce of a single number),
so they all stop after the same step, checkpoint together and exit.

Exit status (what ``slurm/train.sbatch`` acts on): 0 when the run finished its
steps (or stopped at ``train.stop_at_step``, a planned stop), ``EXIT_STOPPED``
(75, EX_TEMPFAIL) when a signal or ``train.max_minutes`` stopped it with a
checkpoint (restart it to continue), ``EXIT_USAGE`` (2) for a problem the user
can fix (config, data, checkpoint, a full disk: one ``error:`` line says which),
``EXIT_DIVERGED`` (3) when the loss or gradient norm stopped being finite
(the last finite checkpoint is kept), anything else a failure (a bug: a
traceback). Under torchrun the agent would treat a non-zero status as a worker
failure (restart the workers, print a failure dump per rank), so when
``FMTRAIN_STATUS_FILE`` is set (``launch/run.sh`` sets it) the trainer exits 0
and writes its outcome (``finished``, ``stopped``, ``error`` or ``diverged``)
to that file instead, and the wrapper turns it back into the exit status.
"""
from __future__ import annotations

import os
import signal
import time

from .errors import EXIT_DIVERGED, EXIT_USAGE  # an error: line says what to fix


# SIGUSR1: SLURM's --signal warning (torchrun forwards it with --signals-to-handle).
HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again to continue
STATUS_ENV = "FMTRAIN_STATUS_FILE"

OUTCOMES = {"finished": 0, "stopped": EXIT_STOPPED, "error": EXIT_USAGE, "diverged": EXIT_DIVERGED}


def exit_status(outcome: str | bool) -> int:
    """The process exit status for a run's outcome (see the module docstring): one of
    ``OUTCOMES``, or a bool for "stopped early" (True) or "finished" (False)."""
    if isinstance(outcome, bool):
        outcome = "stopped" if outcome else "finished"
    status_file = os.environ.get(STATUS_ENV)
    if not status_file:
        return OUTCOMES[outcome]
    from .parallel.groups import local_rank

    if local_rank() == 0:  # one writer per node; every rank agreed on the same outcome
        with open(status_file, "w") as fh:
            fh.write(outcome + "\n")
    return 0


class StopFlag:
    def __init__(self, world, max_minutes: float | None = None):
        self.world = world
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self.signal: int | None = None
        self._previous = {}
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    @property
    def reason(self) -> str:
        if self.signal is not None:
            return f"signal {signal.Signals(self.signal).name}"
        return "wall-clock budget (train.max_minutes) spent"

    def should_stop(self) -> bool:
        """Whether any rank wants to stop (collective: every rank must call it)."""
        return self.world.any(self.requested)

    @property
    def requested(self) -> bool:
        """Whether this rank saw a signal or the budget ran out (local: no collective)."""
        return self.signal is not None or (self.deadline is not None and time.monotonic() >= self.deadline)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
