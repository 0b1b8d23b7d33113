"""CPU threads on a shared machine: use the cores other processes leave free.

torch starts one intra-op thread per core. When another process keeps a core busy (a
laptop, a login node, a second job), a thread team waits at every operation for the
member that lost its core: on 2 cores beside one busy process the blocked core ran
2x slower with 2 threads than with 1, and a decode step 6x (``bench/threads.py``).

:func:`usable_threads` measures, over the time since it last looked (at least
``MIN_INTERVAL_S``), how many of this process's CPUs the other processes kept busy
(``/proc/stat`` minus this process's own time from ``/proc/self/stat``), and returns the
cores left, at most the thread count torch was given (``OMP_NUM_THREADS`` or
``torch.set_num_threads``, which it never exceeds). The blocked core sizes its pool of
head threads by it (the numbers do not depend on that count).

:func:`adapt_torch_threads` sets torch's own intra-op threads to it. Matrix products
can round differently with another thread count (a 4096-long reduction did here), so
only what owns the process and needs no bitwise repeatability calls it often (decoding,
``bench/``); the trainer calls it once at its start and keeps that count for the run.
``FMTRAIN_FIXED_THREADS=1`` turns the adaptation off (torch's own count, as in a
benchmark that pins it). Linux only; elsewhere both return torch's own count.
"""
from __future__ import annotations

import os
import threading
import time

import torch

MIN_INTERVAL_S = 0.5  # look at the CPUs at most this often
FIRST_SAMPLE_S = 0.05  # the first look waits this long to have an interval at all
_lock = threading.Lock()
_state: dict = {}


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def _sample(cpus: list[int]) -> tuple[float, float, float] | None:
    """(busy jiffies of ``cpus``, all jiffies of ``cpus``, this process's jiffies), or None."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cpus}
    busy = total = 0.0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            vals = [float(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(vals)
            busy += sum(vals) - vals[3] - vals[4]
    return busy, total, float(own[11]) + float(own[12])  # utime + stime


def _ceiling() -> int:
    """The most threads to use: what torch was configured with (``OMP_NUM_THREADS``,
    ``torch.set_num_threads``), not counting this module's own adaptations."""
    current = torch.get_num_threads()
    # A count that is neither this module's own adaptation nor the one seen last time was set by the
    # user since (or this is the first call): theirs is the limit.
    if "ceiling" not in _state or current not in (_state.get("applied"), _state.get("seen")):
        _state["ceiling"] = current
        _state.pop("applied", None)
    _state["seen"] = current
    return _state["ceiling"]


def usable_threads() -> int:
    """Cores of this process's CPUs that other processes left free lately (>= 1)."""
    ceiling = _ceiling()
    if ceiling <= 1 or os.environ.get("FMTRAIN_FIXED_THREADS", "0") not in ("", "0"):
        return ceiling
    with _lock:
        now = time.monotonic()
        last = _state.get("last")
        if last is not None and now - last[0] < MIN_INTERVAL_S:
            return min(_state["threads"], ceiling)  # (a ceiling the user lowered since counts at once)
        cpus = _cpus()
        if last is None:
            first = _sample(cpus)
            if first is None:
                _state["threads"] = ceiling
                _state["last"] = (now, None)
                return ceiling
            time.sleep(FIRST_SAMPLE_S)
            last, now = (now, first), time.monotonic()
        cur = _sample(cpus)
        if cur is None or last[1] is None:
            _state.update(last=(now, cur), threads=ceiling)
            return ceiling
        d_busy, d_total, d_own = (c - p for c, p in zip(cur, last[1]))
        threads = ceiling
        if d_total > 0:
            per_cpu = d_total / len(cpus)  # jiffies one CPU had in the interval
            others = max(0.0, d_busy - d_own) / per_cpu  # CPUs' worth of other processes' work
            # A core counts as taken once another process used most of it.
            threads = max(1, min(ceiling, round(len(cpus) - others + 0.25)))
        _state.update(last=(now, cur), threads=threads)
        return threads


def adapt_torch_threads() -> int:
    """Set torch's intra-op threads to :func:`usable_threads`; returns the count. Cheap
    between looks (``MIN_INTERVAL_S``): callable at every step or layer."""
    n = usable_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _state["applied"] = n
    return n


__all__ = ["usable_threads", "adapt_torch_threads"]
