"""Stopping early and cleanly: on a signal (SLURM's warning before a time limit or
preemption, Ctrl-C) or when the run's wall-clock budget is spent.

A handler only sets a flag; the training loop asks :meth:`StopFlag.should_stop`
at step boundaries, where all ranks agree (one all-reduce of a single number),
so they all stop after the same step, checkpoint together and exit.
"""
from __future__ import annotations

import signal
import time

import torch

# SIGUSR1: SLURM's --signal warning (torchrun forwards it with --signals-to-handle).
HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


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
        local = self.signal is not None or (self.deadline is not None and time.monotonic() >= self.deadline)
        flag = torch.tensor([1.0 if local else 0.0])
        if self.world.backend == "nccl":
            flag = flag.to(self.world.device)
        return bool(self.world.all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
